"""Checks of the user's own files named by a config, before any model loads: the reward
functions and rollout workflow (imported, their signatures checked), the dataset's files
(readable, with rows and the named columns), the model directory (config and tokenizer
files) and the run directory (creatable and writable).

Each check yields one-line refusals; `areal_cli/validation.py` raises the first as a
`ConfigError` (exit status 2).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from workflows.config import MULTI_TURN_WORKFLOW, PROCEDURAL_PREFIX, ExperimentConfig

# Files that hold a tokenizer in a Hugging Face model directory, one of which must exist.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


def code_errors(cfg: ExperimentConfig) -> list[str]:
    """`reward.fn` / `reward.weights` and `rollout.workflow` / `rollout.workflow_args`:
    importable, callable, taking the documented arguments."""
    from workflows.rollout.reward_fns import resolve_rewards, reward_specs
    from workflows.user_code import UserCodeError, load_object, workflow_keywords

    errors = []
    if "reasoning_gym" in reward_specs(cfg) and not cfg.dataset.path.startswith(PROCEDURAL_PREFIX):
        errors.append(f"reward.fn=reasoning_gym scores reasoning-gym tasks only, not dataset.path={cfg.dataset.path!r}; "
                      "use dataset.path=reasoning_gym:<task> or another reward.fn")
    try:
        resolve_rewards(cfg)
    except UserCodeError as exc:
        errors.append(str(exc))
    key_env = cfg.reward.judge.api_key_env
    if "llm_judge" in reward_specs(cfg) and key_env and not os.environ.get(key_env):
        errors.append(f"reward.judge.api_key_env={key_env} names an environment variable that is not set; export "
                      f"{key_env} with the judge's API key, or set reward.judge.api_key_env=null")
    spec = cfg.rollout.workflow
    if spec == MULTI_TURN_WORKFLOW:
        if cfg.multi_turn.environment == "tools":
            from workflows.rollout.tools import load_tools

            try:
                load_tools(list(cfg.multi_turn.tools))
            except (UserCodeError, ValueError) as exc:
                errors.append(str(exc))
    elif spec is not None:
        try:
            workflow_keywords(load_object(spec, "rollout.workflow"), dict(cfg.rollout.workflow_args), spec)
        except UserCodeError as exc:
            errors.append(str(exc))
    return errors


def dataset_errors(cfg: ExperimentConfig) -> list[str]:
    """A local `dataset.path`: the training split (and the held-out one, when the run
    evaluates) reads, has rows, the named columns and a usable row."""
    data = cfg.dataset
    if data.path.startswith(PROCEDURAL_PREFIX) or not Path(data.path).expanduser().exists():
        return []
    from workflows.data.sources import DatasetError, check_dataset

    splits = [data.split] + ([data.eval_split] if cfg.trainer.eval_freq_steps else [])
    try:
        check_dataset(data, splits, min_rows=data.batch_size)
    except DatasetError as exc:
        return [str(exc)]
    return []


def model_dir_errors(cfg: ExperimentConfig) -> list[str]:
    """A local model directory must hold `config.json` and a tokenizer."""
    path = Path(cfg.model.path).expanduser()
    if cfg.model.path.startswith("gguf:") or not path.is_dir():
        return []
    if not (path / "config.json").is_file():
        return [f"model.path={cfg.model.path!r} has no config.json; pass a Hugging Face model directory "
                "(save_pretrained writes one)"]
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return [f"model.path={cfg.model.path!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save "
                "the tokenizer into it too (tokenizer.save_pretrained)"]
    return []


def run_dir_errors(cfg: ExperimentConfig) -> list[str]:
    """The run directory exists as a writable directory, or can be created: its nearest
    existing ancestor is a writable directory. Nothing is created here."""
    run_dir = cfg.resolved_run_dir().expanduser().absolute()
    key = "run_dir" if cfg.run_dir else "run_root"
    value = cfg.run_dir if cfg.run_dir else cfg.run_root
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [f"{key}={value!r}: the run directory {run_dir} cannot be created, {probe} is a file; choose another "
                f"{key}"]
    try:
        # A file made and removed at once: os.access says yes to root, and nothing about a
        # read-only file system.
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        verb = "written" if probe == run_dir else "created"
        return [f"{key}={value!r}: the run directory {run_dir} cannot be {verb} ({probe}: {exc.strerror}); choose "
                f"another {key}"]
    return []


def user_file_errors(cfg: ExperimentConfig) -> list[str]:
    """The refusals of the first check of this module that has any, cheapest first."""
    for check in (run_dir_errors, model_dir_errors, code_errors, dataset_errors):
        errors = check(cfg)
        if errors:
            return errors
    return []
