"""The built-in reward functions, and resolving `reward.fn` to the functions a run scores with.

Each built-in follows workflows/api.py's `RewardFn`: `fn(completion, reference, ...) ->
float`, a top-level function, so reward worker processes import it by reference. A
`reward.fn` entry is one of `BUILTIN_REWARDS` by name, or the user's own function by
import path (workflows/user_code.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from workflows.config import BUILTIN_REWARDS, PROCEDURAL_PREFIX, ExperimentConfig, JudgeConfig
from workflows.data.answers import last_boxed
from workflows.user_code import UserCodeError, is_import_path, load_object, reward_keywords


def math_verify_reward(completion: str, reference: str) -> float:
    """1.0 when the last boxed (or otherwise extracted) answer in `completion` equals
    `reference` mathematically, else 0.0 (reward.fn=math_verify). Runs in a worker process."""
    from math_verify import parse, verify

    # Timeouts are the pool's job (workflows/rollout/reward.py); math-verify's signal-based
    # ones only work on a main thread and are switched off.
    gold = parse(reference, parsing_timeout=None)
    answer = parse(completion, parsing_timeout=None)
    if not gold or not answer:
        return 0.0
    return 1.0 if verify(gold, answer, timeout_seconds=None) else 0.0


def boxed_math_verify_reward(completion: str, reference: str) -> float:
    """`math_verify_reward`, but only for an answer given in `\\boxed{}` as the prompt's
    instruction asks (reward.fn=boxed_math_verify): an unboxed answer scores 0.0."""
    if "\\boxed{" not in completion:
        return 0.0
    return math_verify_reward(completion, reference)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number_reward(completion: str, reference: str) -> float:
    """1.0 when the last number written in `completion` equals `reference`
    (reward.fn=final_number). math-verify alone also accepts an expression that
    evaluates to the answer, so on arithmetic tasks restating the question ("74 + 30 =")
    would score; here only a number counts."""
    found = _NUMBER.findall(completion)
    if not found:
        return 0.0
    return math_verify_reward(found[-1].replace(",", ""), reference)


def final_answer(completion: str) -> Optional[str]:
    """The answer a completion gives: its last `\\boxed{}`, else its last
    `<answer>...</answer>` (reasoning-gym's own format), else None."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    from reasoning_gym.utils import extract_answer

    return extract_answer(completion, tag_name="answer")


def exact_match_reward(completion: str, reference: str) -> float:
    """1.0 when the completion's final answer (`final_answer`), whitespace collapsed,
    equals `reference` exactly, else 0.0 (reward.fn=exact_match)."""
    answer = final_answer(completion)
    return 1.0 if answer is not None and " ".join(answer.split()) == " ".join(reference.split()) else 0.0


def reasoning_gym_reward(completion: str, reference: str, row: dict) -> float:
    """reasoning-gym's own scorer of the row's task (`score_answer` of the dataset the row
    came from, `row["metadata"]["source_dataset"]`) on the completion's final answer
    (`final_answer`): 1.0 right, partial credit where the task gives it, 0.0 wrong
    (reward.fn=reasoning_gym, the default for `reasoning_gym:<task>` datasets).

    Raises:
        ValueError: the row is not a reasoning-gym entry (no metadata.source_dataset).
    """
    import reasoning_gym

    metadata = row.get("metadata") if isinstance(row, dict) else None
    if not isinstance(metadata, dict) or "source_dataset" not in metadata:
        raise ValueError("reward.fn=reasoning_gym scores rows of dataset.path=reasoning_gym:<task> only; this row "
                         "has no metadata.source_dataset")
    score = _RG_SCORERS.get(metadata["source_dataset"])
    if score is None:
        score = _RG_SCORERS[metadata["source_dataset"]] = reasoning_gym.get_score_answer_fn(metadata["source_dataset"])
    entry = {"question": row.get("question"), "answer": reference, "metadata": metadata}
    try:
        return float(score(final_answer(completion), entry))
    except Exception:  # noqa: BLE001 - some task scorers raise on an answer they cannot parse: a wrong answer
        return 0.0


_RG_SCORERS: dict[str, Callable] = {}

# reward.fn name -> the built-in function. The names are listed once, as BUILTIN_REWARDS
# (workflows/config.py); a name without a function here (or in CONFIGURED_REWARDS), or a
# function for no name, fails this module's import.
REWARD_FUNCTIONS = {
    "math_verify": math_verify_reward,
    "boxed_math_verify": boxed_math_verify_reward,
    "final_number": final_number_reward,
    "exact_match": exact_match_reward,
    "reasoning_gym": reasoning_gym_reward,
}
# Built-ins made from settings (`reward.judge`): name -> the settings' class.
CONFIGURED_REWARDS = {"llm_judge": JudgeConfig}
if set(REWARD_FUNCTIONS) | set(CONFIGURED_REWARDS) != set(BUILTIN_REWARDS):
    raise ImportError(
        f"REWARD_FUNCTIONS and CONFIGURED_REWARDS map {', '.join([*REWARD_FUNCTIONS, *CONFIGURED_REWARDS])} but "
        f"workflows.config.BUILTIN_REWARDS lists {', '.join(BUILTIN_REWARDS)}; make them name the same functions"
    )


def reward_specs(cfg: ExperimentConfig) -> list[str]:
    """`reward.fn` as a list of entries; null: `reasoning_gym` for `reasoning_gym:<task>`
    datasets, else `math_verify`."""
    fn = cfg.reward.fn
    if fn is None:
        return ["reasoning_gym" if cfg.dataset.path.startswith(PROCEDURAL_PREFIX) else "math_verify"]
    return [fn] if isinstance(fn, str) else list(fn)


@dataclass(frozen=True)
class RewardTerm:
    """One reward function of a run.

    Attributes:
        name: how logs and stats name it (the `reward.fn` entry).
        target: what a worker process calls: the built-in function itself, or the
            import path (a file path made absolute), loaded once per worker.
        keywords: which of `prompt`, `row` it takes.
        weight: its factor in the summed reward.
        timeout: seconds per call, in place of the scorer's (`rollout.reward_timeout`);
            None: the scorer's. The LLM judge's is its own deadline, every retry included.
    """

    name: str
    target: Any
    keywords: frozenset[str]
    weight: float = 1.0
    timeout: Optional[float] = None


def resolve_reward(entry: Any, weight: float = 1.0, key: str = "reward.fn",
                   judge: Optional[JudgeConfig] = None) -> RewardTerm:
    """A `reward.fn` entry (a built-in name, an import path, or a callable) as a
    `RewardTerm`, its signature checked; `llm_judge` with the `judge` settings (default:
    `JudgeConfig()`).

    Raises:
        UserCodeError: an unknown name, a path that does not load, or a wrong signature.
    """
    if entry == "llm_judge":
        from workflows.rollout.judge import LLMJudge

        fn = LLMJudge(judge if judge is not None else JudgeConfig())
        return RewardTerm(entry, fn, frozenset({"prompt", "row"}), weight, timeout=fn.deadline)
    if callable(entry):
        return RewardTerm(getattr(entry, "__name__", repr(entry)), entry, reward_keywords(entry, repr(entry), key), weight)
    if not isinstance(entry, str) or not entry.strip():
        raise UserCodeError(f"{key}={entry!r} must be a built-in name ({', '.join(BUILTIN_REWARDS)}) or "
                            "package.module:function / path/to/file.py:function")
    if entry in REWARD_FUNCTIONS:
        fn = REWARD_FUNCTIONS[entry]
        return RewardTerm(entry, fn, reward_keywords(fn, entry, key), weight)
    if not is_import_path(entry):
        raise UserCodeError(f"{key}={entry!r} is no built-in reward ({', '.join(BUILTIN_REWARDS)}) and not an import "
                            "path (package.module:function or path/to/file.py:function)")
    fn = load_object(entry, key)
    keywords = reward_keywords(fn, entry, key)
    target, _, attr = entry.rpartition(":")
    if target.endswith(".py"):
        from pathlib import Path

        # Absolute, so a worker started elsewhere loads the same file.
        entry_target = f"{Path(target).expanduser().resolve()}:{attr}"
    else:
        entry_target = entry
    return RewardTerm(entry, entry_target, keywords, weight)


def resolve_rewards(cfg: ExperimentConfig) -> list[RewardTerm]:
    """Every `reward.fn` entry of `cfg` with its `reward.weights` weight, resolved.

    Raises:
        UserCodeError: see `resolve_reward`; or `reward.weights` does not give one weight per entry.
    """
    specs = reward_specs(cfg)
    weights = cfg.reward.weights
    if weights is not None and len(weights) != len(specs):
        raise UserCodeError(f"reward.weights={list(weights)} gives {len(weights)} weights for {len(specs)} reward "
                            f"functions ({', '.join(map(str, specs))}); give one per reward.fn entry, or null")
    return [resolve_reward(spec, 1.0 if weights is None else float(w), judge=cfg.reward.judge) for spec, w in
            zip(specs, weights if weights is not None else [1.0] * len(specs))]


def call_reward(target: Any, completion: str, reference: str, kwargs: dict) -> float:
    """In a worker: call `target` (a function, or an import path loaded once per process);
    an async function is run to completion here."""
    import asyncio
    import inspect

    fn = _LOADED.get(target) if isinstance(target, str) else target
    if fn is None:
        fn = _LOADED[target] = load_object(target, "reward.fn")
    value = fn(completion, reference, **kwargs)
    if inspect.isawaitable(value):
        value = asyncio.run(_awaited(value))
    return value


async def _awaited(awaitable):
    return await awaitable


_LOADED: dict[str, Callable] = {}
