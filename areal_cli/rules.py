"""The per-key rules of a resolved config: a table, one row per key.

The schema's dataclasses (engines/config.py, workflows/config.py) fix each key's type;
these rules fix each key's range. Every key whose field metadata lists `choices` gets its
rule from there (`choice_rules`, one walk of the schema), so each enumeration is written
once, in the schema; the other rows are written here (`HAND_WRITTEN`). A refusal reads

    <key>=<value> is invalid; it <requirement>

and `areal_cli/validation.py` raises the first one as a `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable

from engines.config import leaf_fields
from workflows.config import MULTI_TURN_WORKFLOW, ExperimentConfig


@dataclass(frozen=True)
class Rule:
    """`key` (dotted) must satisfy `ok(value)`; otherwise the value "`requirement`"."""

    key: str
    ok: Callable[[Any], bool]
    requirement: str
    optional: bool = False  # None is allowed (it means "use the default behaviour")
    secret: bool = False  # the refusal does not quote the value (it may be a credential pasted by mistake)


def _number(value: Any) -> bool:
    # bool is an int in Python; a YAML `true` where a count belongs is a mistake.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: _number(v) and v >= low


def greater_than(low: float) -> Callable[[Any], bool]:
    return lambda v: _number(v) and v > low


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if not _number(v):
            return False
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    return ok


def non_empty(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def plain_name(v: Any) -> bool:
    return non_empty(v) and "/" not in v and "\\" not in v and v not in (".", "..")


def server_list(v: Any) -> bool:
    if _number(v):
        return isinstance(v, int) and v >= 1
    if isinstance(v, str) or not hasattr(v, "__iter__"):
        return False
    items = list(v)
    return bool(items) and all(isinstance(a, str) and a.rpartition(":")[2].isdigit() and a.rpartition(":")[0] for a in items)


def reward_entries(v: Any) -> bool:
    """A `reward.fn`: one non-empty name or import path, or a non-empty list of them."""
    if isinstance(v, str):
        return non_empty(v)
    return not hasattr(v, "keys") and hasattr(v, "__iter__") and bool(list(v)) and all(non_empty(e) for e in v)


def mapping(v: Any) -> bool:
    return hasattr(v, "keys") and all(isinstance(k, str) for k in v)


def env_name(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v) is not None


def http_url(v: Any) -> bool:
    return isinstance(v, str) and re.match(r"https?://[^/\s]+", v) is not None and not any(c.isspace() for c in v)


def rubric(v: Any) -> bool:
    """A judge rubric: a template with {completion}, and no placeholders besides
    {question}, {completion}, {reference}."""
    from workflows.rollout.judge import PLACEHOLDERS, rubric_fields

    try:
        fields = rubric_fields(v) if isinstance(v, str) else None
    except ValueError:
        return False
    return fields is not None and "completion" in fields and fields <= set(PLACEHOLDERS)


def grade_pattern(v: Any) -> bool:
    try:
        return isinstance(v, str) and re.compile(v).groups >= 1
    except re.error:
        return False


# Keys without `choices` in their metadata whose values are not all fine.

def optimizer_rules(prefix: str) -> tuple[Rule, ...]:
    """The rules of an OptimizerConfig at `prefix`: the actor's and the critic's share one schema."""
    return (
        Rule(f"{prefix}.lr", greater_than(0), "must be > 0"),
        Rule(f"{prefix}.weight_decay", at_least(0), "must be >= 0"),
        Rule(f"{prefix}.beta1", within(0, 1, high_open=True), "must be in [0, 1)"),
        Rule(f"{prefix}.beta2", within(0, 1, high_open=True), "must be in [0, 1)"),
        Rule(f"{prefix}.eps", greater_than(0), "must be > 0"),
        Rule(f"{prefix}.gradient_clipping", at_least(0), "must be >= 0 (0 disables clipping)"),
        Rule(f"{prefix}.warmup_steps_proportion", within(0, 1), "must be in [0, 1] (a fraction of the steps)"),
        Rule(f"{prefix}.min_lr_ratio", within(0, 1), "must be in [0, 1] (a fraction of lr)"),
    )

HAND_WRITTEN: tuple[Rule, ...] = (
    Rule("experiment_name", plain_name, "must be a non-empty name without '/'"),
    Rule("trial_name", plain_name, "must be a non-empty name without '/'"),
    Rule("run_root", non_empty, "must be a non-empty directory path"),
    Rule("dataset.split", non_empty, "must name a split such as train"),
    Rule("dataset.eval_split", non_empty, "must name a split such as test"),
    Rule("dataset.batch_size", at_least(1), "must be >= 1 (prompts per step)"),
    Rule("dataset.max_prompt_length", at_least(1), "must be >= 1 (tokens)"),
    Rule("dataset.max_eval_samples", at_least(1), "must be >= 1 (prompts per evaluation)"),
    Rule("dataset.prompt_column", non_empty, "must name the column that holds the prompts"),
    Rule("dataset.answer_column", non_empty, "must name the column that holds the reference answers"),
    Rule("dataset.messages_column", non_empty, "must name a column of chat messages, or null", optional=True),
    Rule("dataset.system_prompt", lambda v: isinstance(v, str), "must be a text, or null for none", optional=True),
    Rule("dataset.instruction", lambda v: isinstance(v, str) and "{question}" in v,
         "must contain {question}, where the prompt column's text goes"),
    Rule("dataset.task_args", mapping, "must be a mapping of the reasoning-gym task's settings, e.g. {min_terms: 2}"),
    Rule("dataset.task_size", at_least(1), "must be >= 1 (problems generated per split)"),
    Rule("dataset.task_seed", at_least(0), "must be >= 0"),
    Rule("gconfig.n_samples", at_least(1), "must be >= 1 (completions per prompt, the GRPO group size)"),
    Rule("gconfig.max_new_tokens", at_least(1), "must be >= 1 (tokens)"),
    Rule("gconfig.temperature", at_least(0), "must be >= 0 (0 samples greedily)"),
    Rule("gconfig.top_p", within(0, 1, low_open=True), "must be in (0, 1]"),
    Rule("gconfig.top_k", at_least(0), "must be >= 0 (0 disables top-k)"),
    Rule("gconfig.stop_token_ids", lambda v: all(_number(t) and t >= 0 for t in v), "must hold token ids >= 0"),
    Rule("gconfig.max_batch_size", at_least(1), "must be >= 1 (sequences per generate call)"),
    Rule("rollout.max_concurrent_rollouts", at_least(1), "must be >= 1"),
    Rule("rollout.consumer_batch_size", at_least(1), "must be >= 1 (trajectories per step), or null", optional=True),
    Rule("rollout.max_head_offpolicyness", at_least(0), "must be >= 0 (0 is synchronous RL)"),
    Rule("rollout.queue_size", at_least(1), "must be >= 1"),
    Rule("rollout.reward_timeout", greater_than(0), "must be > 0 (seconds)"),
    Rule("rollout.reward_workers", at_least(1), "must be >= 1 (processes)"),
    Rule("rollout.max_consecutive_rejections", at_least(1), "must be >= 1 (rollouts rejected in a row before the run stops)"),
    Rule("rollout.max_failure_rate", within(0, 1, low_open=True), "must be in (0, 1] (a share of finished rollouts)"),
    Rule("rollout.failure_rate_window", at_least(1), "must be >= 1 (finished rollouts)"),
    Rule("rollout.max_consecutive_filtered", at_least(1), "must be >= 1 (groups dropped in a row by dynamic sampling)"),
    Rule("rollout.servers", server_list, "must be a number of servers >= 1 or a list of host:port addresses"),
    Rule("rollout.server_python", non_empty, "must be an interpreter path, or null for ./.venv-<backend>", optional=True),
    Rule("rollout.server_args", lambda v: all(isinstance(a, str) for a in v), "must be a list of strings"),
    Rule("rollout.server_startup_timeout", greater_than(0), "must be > 0 (seconds)"),
    Rule("rollout.request_timeout", greater_than(0), "must be > 0 (seconds)"),
    Rule("rollout.request_retries", at_least(0), "must be >= 0"),
    Rule("rollout.workers", at_least(1), "must be >= 1 (rollout worker processes)"),
    Rule("rollout.worker_restarts", at_least(0), "must be >= 0"),
    Rule("rollout.workflow", lambda v: v == MULTI_TURN_WORKFLOW or (non_empty(v) and ":" in v),
         "must be package.module:Class or path/to/file.py:Class, multi_turn, or null for RLVRWorkflow", optional=True),
    Rule("rollout.workflow_args", mapping, "must be a mapping of the workflow constructor's keyword arguments"),
    Rule("reward.fn", reward_entries, "must be a built-in reward name or an import path (module:function or "
         "file.py:function), a non-empty list of them, or null for the dataset's default", optional=True),
    Rule("reward.weights", lambda v: bool(list(v)) and all(_number(w) for w in v),
         "must list one finite number per reward.fn entry, or be null for 1.0 each", optional=True),
    Rule("multi_turn.max_turns", at_least(1), "must be >= 1 (assistant turns per episode)"),
    Rule("multi_turn.turn_discount", within(0, 1, low_open=True), "must be in (0, 1] (1: no discount)"),
    Rule("multi_turn.max_tokens_per_turn", at_least(1), "must be >= 1 (tokens), or null for gconfig.max_new_tokens",
         optional=True),
    Rule("multi_turn.max_total_tokens", at_least(1), "must be >= 1 (tokens per episode after the prompt)"),
    Rule("multi_turn.feedback", non_empty, "must be a non-empty message"),
    Rule("multi_turn.tools", lambda v: all(non_empty(t) and (t == "python" or ":" in t) for t in v),
         "must list python or package.module:function / path/to/file.py:function entries"),
    Rule("multi_turn.sandbox.cpu_seconds", at_least(1), "must be >= 1 (CPU seconds)"),
    Rule("multi_turn.sandbox.memory_mb", at_least(64), "must be >= 64 (MiB; an interpreter needs about 30)"),
    Rule("multi_turn.sandbox.file_size_mb", at_least(1), "must be >= 1 (MiB)"),
    Rule("multi_turn.sandbox.max_processes", at_least(0), "must be >= 0"),
    Rule("multi_turn.sandbox.wall_seconds", greater_than(0), "must be > 0 (seconds)"),
    Rule("multi_turn.sandbox.output_chars", at_least(100), "must be >= 100 (characters)"),
    Rule("reward.judge.base_url", http_url, "must be an http:// or https:// URL such as http://127.0.0.1:8000/v1"),
    Rule("reward.judge.model", non_empty, "must name the judge model, or null for the first one the server lists",
         optional=True),
    Rule("reward.judge.api_key_env", env_name, "must be the NAME of an environment variable that holds the key "
         "(letters, digits, _), never the key itself, or null for no key", optional=True, secret=True),
    Rule("reward.judge.rubric", rubric, "must contain {completion}, and no placeholders but {question}, "
         "{completion}, {reference} (write other braces doubled: {{ }})"),
    Rule("reward.judge.system_prompt", lambda v: isinstance(v, str), "must be a text, or null for none",
         optional=True),
    Rule("reward.judge.grade_pattern", grade_pattern,
         "must be a regular expression whose first group captures the grade, e.g. Grade: (\\d+)"),
    Rule("reward.judge.min_grade", _number, "must be a finite number"),
    Rule("reward.judge.max_grade", _number, "must be a finite number"),
    Rule("reward.judge.temperature", at_least(0), "must be >= 0 (0 is greedy)"),
    Rule("reward.judge.max_tokens", at_least(1), "must be >= 1 (tokens)"),
    Rule("reward.judge.timeout", greater_than(0), "must be > 0 (seconds per request)"),
    Rule("reward.judge.max_retries", at_least(0), "must be >= 0"),
    Rule("reward.judge.backoff", at_least(0), "must be >= 0 (seconds before the first retry)"),
    *optimizer_rules("actor.optimizer"),
    Rule("actor.lora.rank", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
         "must be an integer >= 1"),
    Rule("actor.lora.alpha", greater_than(0), "must be > 0 (the update is scaled by alpha / rank)"),
    Rule("actor.lora.dropout", within(0, 1, high_open=True), "must be in [0, 1)"),
    Rule("actor.lora.target_modules", lambda v: not isinstance(v, str) and bool(list(v)) and all(non_empty(m) for m in v),
         "must list module names such as q_proj and v_proj, or be [all-linear]"),
    Rule("actor.max_tokens_per_mb", at_least(1), "must be >= 1 (tokens)"),
    Rule("actor.ppo_n_minibatches", at_least(1), "must be >= 1"),
    Rule("actor.eps_clip", within(0, 1, low_open=True, high_open=True), "must be in (0, 1)"),
    Rule("actor.eps_clip_higher", greater_than(0), "must be > 0, or null for actor.eps_clip", optional=True),
    Rule("actor.c_clip", greater_than(1), "must be > 1, or null for no dual clip", optional=True),
    Rule("actor.reward_scaling", greater_than(0), "must be > 0"),
    Rule("actor.reward_bias", _number, "must be a finite number"),
    Rule("actor.kl_ctl", at_least(0), "must be >= 0 (0 disables the KL penalty)"),
    Rule("actor.overlong_buffer_tokens", at_least(0), "must be >= 0 (tokens; 0 disables the overlong penalty)"),
    Rule("actor.overlong_penalty", at_least(0), "must be >= 0 (reward lost at gconfig.max_new_tokens)"),
    Rule("actor.recompute_logprob", lambda v: isinstance(v, bool), "must be true, false, or null to recompute "
         "when the trainer's precision differs from the sampler's", optional=True),
    Rule("actor.behav_imp_weight_cap", greater_than(1), "must be > 1, or null for no cap", optional=True),
    Rule("actor.tis_cap", at_least(1), "must be >= 1 (Yao et al. use 2), or null for no truncated importance sampling",
         optional=True),
    Rule("actor.gae_gamma", within(0, 1), "must be in [0, 1] (the discount per token)"),
    Rule("actor.gae_lambda", within(0, 1), "must be in [0, 1]"),
    *optimizer_rules("critic.optimizer"),
    Rule("critic.value_eps_clip", greater_than(0), "must be > 0, or null for no value clip", optional=True),
    Rule("trainer.total_steps", at_least(1), "must be >= 1, or null to train trainer.total_epochs", optional=True),
    Rule("trainer.total_epochs", at_least(1), "must be >= 1"),
    Rule("trainer.save_freq_steps", at_least(0), "must be >= 0 (0 saves only at the end)"),
    Rule("trainer.eval_freq_steps", at_least(0), "must be >= 0 (0 never evaluates)"),
    Rule("trainer.recover_freq_steps", at_least(0), "must be >= 0, or null to follow save_freq_steps", optional=True),
    Rule("trainer.dist_timeout_s", greater_than(0), "must be > 0 (seconds)"),
    Rule("trainer.heartbeat_timeout_s", at_least(0), "must be >= 0 (seconds; 0 disables the heartbeat watch)"),
    Rule("stats_logger.print_every", at_least(1), "must be >= 1 (steps)"),
    Rule("stats_logger.file_name", plain_name, "must be a file name without '/'"),
    Rule("stats_logger.wandb_project", plain_name, "must be a W&B project name without '/'"),
    Rule("eval.n_samples", at_least(0), "must be >= 0 (sampled completions per prompt; 0: greedy only)"),
    Rule("eval.pass_k", lambda v: all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in v),
         "must list integers k >= 1"),
    Rule("eval.report", non_empty, "must be a file path, or null for <run_dir>/eval/<model>.json", optional=True),
)


def choice_rule(key: str, f: dataclasses.Field, hint: Any) -> Rule:
    """The rule of a field whose metadata lists `choices`: its value is one of them (a
    list-valued key: distinct elements, each one of them); None too where it is Optional."""
    choices = tuple(f.metadata["choices"])
    listed = ", ".join(choices)
    if typing.get_origin(hint) is list:
        noun = key.rpartition(".")[2]
        return Rule(key, lambda v: len(set(v)) == len(v) and all(c in choices for c in v),
                    f"must list distinct {noun} among {listed}")
    optional = type(None) in typing.get_args(hint)
    null = f.metadata.get("null")
    requirement = f"must be one of {listed}" + ((", or null" + (f" for {null}" if null else "")) if optional else "")
    return Rule(key, lambda v: v in choices, requirement, optional=optional)


def choice_rules(schema: type = ExperimentConfig) -> tuple[Rule, ...]:
    """One rule per leaf key of `schema` whose field metadata lists `choices`."""
    return tuple(choice_rule(key, f, hint) for key, f, hint in leaf_fields(schema) if "choices" in f.metadata)


_ORDER = {key: i for i, (key, _, _) in enumerate(leaf_fields(ExperimentConfig))}
# Every rule, in the schema's key order (a hand-written row for a key the schema lacks
# fails here, at import).
RULES: tuple[Rule, ...] = tuple(sorted(HAND_WRITTEN + choice_rules(), key=lambda rule: _ORDER[rule.key]))


def lookup(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def rule_errors(cfg: ExperimentConfig) -> list[str]:
    """The refusal of each rule that `cfg` breaks, in the schema's key order."""
    errors = []
    for rule in RULES:
        value = lookup(cfg, rule.key)
        if value is None and rule.optional:
            continue
        if not rule.ok(value):
            shown = "<not shown>" if rule.secret else repr(value)
            errors.append(f"{rule.key}={shown} is invalid; it {rule.requirement}")
    return errors
