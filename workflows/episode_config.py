"""What an episode is and how it is scored: the reward (`RewardConfig`, with the LLM
judge's `JudgeConfig`) and multi-turn episodes (`MultiTurnConfig`, with the python tool's
`SandboxConfig`). Part of the job's schema (workflows/config.py's `ExperimentConfig` holds
them as `reward` and `multi_turn`); the checks of their values are areal_cli/rules.py's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from engines.config import option

# The built-in reward functions, by the name `reward.fn` takes: workflows/rollout/reward_fns.py
# maps each to its function and refuses, at import, a mapping that differs from it.
BUILTIN_REWARDS = ("math_verify", "boxed_math_verify", "final_number", "exact_match", "reasoning_gym", "llm_judge")
# The shipped multi-turn workflow, by the name `rollout.workflow` takes, and its environments
# (workflows/rollout/multiturn.py, environments.py).
MULTI_TURN_WORKFLOW = "multi_turn"
MULTI_TURN_ENVIRONMENTS = ("retry", "tools")
DEFAULT_FEEDBACK = ("Your answer is incorrect. Read the question again, check each step of your work, and give "
                    "the final answer again.")


# The LLM judge's default rubric (workflows/rollout/judge.py): a grade from 0 to 10.
DEFAULT_RUBRIC = (
    "Grade the response to the question below against the reference answer.\n\n"
    "Question:\n{question}\n\nReference answer:\n{reference}\n\nResponse:\n{completion}\n\n"
    "Give a grade from 0 (wrong) to 10 (correct and complete). Reply with one line: Grade: <number>"
)
DEFAULT_GRADE_PATTERN = r"(?i)grade\W*(-?\d+(?:\.\d+)?)"


@dataclass
class JudgeConfig:
    """`reward.fn=llm_judge`: an OpenAI-compatible chat endpoint (`vllm serve`, or any URL)
    grades each completion (workflows/rollout/judge.py)."""

    base_url: str = option(
        "http://127.0.0.1:8000/v1",
        "The OpenAI-compatible API root of the judge (a `vllm serve MODEL` on this machine answers at "
        "http://127.0.0.1:8000/v1).",
    )
    model: Optional[str] = option(None, "The judge model's name on the server; null: the first one it lists (/models).")
    api_key_env: Optional[str] = option(
        None,
        "The NAME of the environment variable that holds the endpoint's API key (never the key itself); it is read "
        "in the reward workers and never written to logs, configs or errors. null: no key.",
    )
    rubric: str = option(
        DEFAULT_RUBRIC,
        "The judge's user message: {question} (the row's prompt text), {completion} and {reference} are filled "
        "in; write other braces doubled ({{ }}). The default asks for 'Grade: <0-10>'.",
    )
    system_prompt: Optional[str] = option(None, "A system message before the rubric; null: none.")
    grade_pattern: str = option(
        DEFAULT_GRADE_PATTERN,
        "A regular expression whose first group captures the grade (a number) in the judge's reply; the last "
        "match counts.",
    )
    min_grade: float = option(0.0, "The lowest grade; it scores 0.0.")
    max_grade: float = option(10.0, "The highest grade; it scores 1.0 (grades in between scale linearly).")
    temperature: float = option(0.0, "The judge's sampling temperature (0: greedy).")
    max_tokens: int = option(256, "Most tokens of the judge's reply.")
    timeout: float = option(30.0, "Seconds per judge request before it is retried.")
    max_retries: int = option(
        2, "Retries of a request that timed out, could not connect or got a 429 or 5xx answer; >= 0."
    )
    backoff: float = option(1.0, "Seconds before the first retry; each later retry waits twice as long as the one before.")


@dataclass
class SandboxConfig:
    """The limits of the sandboxed python tool (workflows/rollout/sandbox.py)."""

    cpu_seconds: int = option(5, "CPU seconds per run (RLIMIT_CPU); the process is killed beyond them.")
    memory_mb: int = option(512, "Address space per run, MiB (RLIMIT_AS); allocations beyond it fail.")
    file_size_mb: int = option(8, "Largest file a run may write, its output included, MiB (RLIMIT_FSIZE).")
    max_processes: int = option(16, "Processes a run may start besides its own (RLIMIT_NPROC and a fork count).")
    wall_seconds: float = option(
        10.0, "Wall-clock seconds per run (and per call of any other tool) before it is killed."
    )
    output_chars: int = option(2000, "Characters of a tool's output shown to the model; the middle is cut.")
    block_network: bool = option(
        True, "Run in a network namespace without interfaces (unshare -rn) where the OS allows it."
    )


@dataclass
class MultiTurnConfig:
    """Multi-turn episodes (`rollout.workflow=multi_turn`, workflows/rollout/multiturn.py):
    up to max_turns assistant turns per episode on exact tokens."""

    environment: str = option(
        "retry",
        "retry: a wrong answer gets multi_turn.feedback and another turn; tools: the model's <tool_call>s are "
        "executed (multi_turn.tools) and their results appended, a turn without one is the final answer.",
        choices=MULTI_TURN_ENVIRONMENTS,
    )
    max_turns: int = option(2, "Most assistant turns per episode.")
    turn_discount: float = option(
        1.0, "A right answer at turn t (from 1) earns its score x turn_discount ** (t - 1)."
    )
    max_tokens_per_turn: Optional[int] = option(
        None, "Most tokens sampled per turn; null: gconfig.max_new_tokens."
    )
    max_total_tokens: int = option(
        512,
        "Most tokens per episode after the prompt (sampled and appended); an episode that would exceed it ends "
        "with its reward so far and is counted (over_budget).",
    )
    feedback: str = option(DEFAULT_FEEDBACK, "environment=retry: the user message after a wrong answer.")
    tools: list[str] = option(
        [],
        "environment=tools: the tools, each package.module:function or path/to/file.py:function (type hints and "
        "a docstring with Args:, for transformers' get_json_schema), or python for the sandboxed interpreter.",
    )
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class RewardConfig:
    """What scores a completion (workflows/rollout/reward_fns.py; the contract is
    workflows/api.py's `RewardFn`)."""

    fn: Any = option(
        None,
        "The reward function: a built-in name (math_verify, boxed_math_verify, final_number, exact_match, "
        "reasoning_gym, llm_judge: an LLM grades it, see reward.judge), package.module:function or path/to/file.py:function; a list of them for a weighted sum. "
        "null: reasoning_gym for reasoning_gym:<task> datasets, else math_verify.",
    )
    weights: Optional[list[float]] = option(None, "One weight per reward.fn entry; null: 1.0 each.")
    judge: JudgeConfig = field(default_factory=JudgeConfig)
