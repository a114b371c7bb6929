"""The job's schema: `ExperimentConfig` and the configuration of what flows (data, rollout
control, the training loop and its logs); the engines' own parts are in engines/config.py.

Plain dataclasses, read and written as YAML (`to_yaml`, `from_yaml`); `areal_cli/` composes
them from Hydra config files and command-line overrides and checks every value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from engines.config import ActorConfig, GenerationConfig, ModelConfig

# rollout.backend: the in-process engine, or inference servers (engines/servers.py).
ROLLOUT_BACKENDS = ("local", "vllm", "sglang")
# deployment_mode and metadata_store: the control plane (workflows/control_plane/modes.py).
DEPLOYMENT_MODES = ("local_colocated", "dataflow_colocated", "disaggregated")
METADATA_STORES = ("noop", "memory", "sqlite")
STATS_BACKENDS = ("console", "jsonl", "tensorboard", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
REWARD_FORMATS = ("any", "boxed", "number")


@dataclass
class DatasetConfig:
    """Where prompts come from.

    `path` is a hub dataset id (read with `datasets.load_dataset`) or a local directory
    (or file) of `.jsonl` / `.parquet` files such as `train.jsonl` and `test.jsonl`.
    With the hub unreachable, `openai/gsm8k` is read from the copy shipped with the
    package (workflows/data/gsm8k/). `reasoning_gym:<task>` generates a procedural task
    of the PyPI package reasoning-gym (workflows/data/dataset.py, `procedural_split`).
    """

    path: str = "openai/gsm8k"
    name: Optional[str] = "main"  # hub config name; ignored for local paths
    split: str = "train"
    eval_split: str = "test"
    batch_size: int = 4  # prompts per training step
    max_prompt_length: int = 512  # tokens; longer prompts are skipped and counted
    shuffle: bool = True
    max_eval_samples: int = 64  # prompts scored at each evaluation
    # reasoning_gym:<task> only: the task's settings (e.g. {min_terms: 2, max_digits: 2}),
    # problems generated per split, and the seed of the train split (held-out splits
    # draw from task_seed + 2**31 on, so the splits never share a problem's seed).
    task_args: dict[str, Any] = field(default_factory=dict)
    task_size: int = 4096
    task_seed: int = 0


@dataclass
class RolloutConfig:
    """The rollout controller (AReaL's asynchronous RL, arXiv 2505.24298)."""

    max_concurrent_rollouts: int = 16
    # Trajectories (prompt groups) per training step; None means `dataset.batch_size`.
    consumer_batch_size: Optional[int] = None
    # How many policy versions a trained sample may lag; 0 is synchronous RL.
    max_head_offpolicyness: int = 0
    queue_size: int = 64
    reward_timeout: float = 10.0  # seconds per reward call before it scores 0
    reward_workers: int = 2
    # any: math-verify takes the last answer it finds (an expression that evaluates to the
    # answer counts); boxed: only an answer in \boxed{}, as the prompt asks; number: only
    # the last number written (workflows/rollout/reward.py).
    reward_format: str = "any"
    # Append every trained trajectory to `<run_dir>/trajectories/<version>.jsonl`.
    dump_trajectories: bool = False
    # Stop the run with a RolloutFailureError once this many rollouts in a row were
    # rejected (raised, returned None, or failed should_accept) with none accepted in
    # between; staleness expiries and cancellations do not count. >= 1.
    max_consecutive_rejections: int = 64
    # Also stop once more than this share of the last `failure_rate_window` finished
    # rollouts failed (the same reasons as above), even with accepted ones in between: a
    # backend failing on a fraction of its requests would otherwise keep the run going on
    # batches assembled from the prompts that happened to succeed. In (0, 1]; 1 never trips.
    max_failure_rate: float = 0.5
    failure_rate_window: int = 256  # finished rollouts (accepted or failed); >= 1
    # actor.dynamic_sampling: stop with an error once this many prompt groups in a row had
    # all-equal rewards (nothing to learn from), rather than generate forever. >= 1.
    max_consecutive_filtered: int = 1024
    # Where rollouts are generated: local (the in-process engine) | vllm | sglang
    # (inference servers over HTTP, engines/servers.py and engines/remote.py).
    backend: str = "local"
    # vllm/sglang: how many servers to start on 127.0.0.1 (an int), or a list of
    # host:port addresses of running servers to attach to (they must serve model.path
    # and be able to read <run_dir>/weights/).
    servers: Any = 1
    # Interpreter that has the backend installed; null: ./.venv-<backend>/bin/python
    # (make install-vllm), else this one.
    server_python: Optional[str] = None
    server_args: list[str] = field(default_factory=list)  # appended to the server command
    # The servers' compute dtype; null: model.dtype. bfloat16 is several times faster on
    # CPUs with AMX and on GPUs, at the cost of logprobs that differ more from the trainer's.
    server_dtype: Optional[str] = None
    server_startup_timeout: float = 600.0  # seconds until every server answers /health
    request_timeout: float = 600.0  # seconds per generation request before it is retried
    request_retries: int = 3  # retries of a failed request (with backoff) before the rollout fails
    # On pause (weight update), abort requests in flight and finish them with the new
    # weights, each token keeping the version that sampled it (AReaL); false lets them
    # finish first.
    interruptible_generation: bool = False
    # deployment_mode=disaggregated: rollout worker processes, each generating its share
    # of every batch (dataset.batch_size must split over them).
    workers: int = 1
    # Restarts of rollout workers that die, over the whole run, before it stops with an error.
    worker_restarts: int = 3


@dataclass
class TrainerConfig:
    total_steps: Optional[int] = None  # takes precedence over total_epochs
    total_epochs: int = 1
    save_freq_steps: int = 0  # 0: save only at the end
    eval_freq_steps: int = 0  # 0: no evaluation
    # Continue from `<run_dir>/checkpoints/recover/` when it holds a complete recover
    # checkpoint; false starts from step 0 (and discards the run_dir's stats records).
    resume: bool = True
    # Steps between recover checkpoints (weights, optimizer, RNG, data position; see
    # workflows/training/recover.py); None: same as save_freq_steps; 0: only at the end.
    recover_freq_steps: Optional[int] = None


@dataclass
class EvalConfig:
    """Held-out evaluation (workflows/training/evaluation.py): `areal eval`, and the trainer's every
    `trainer.eval_freq_steps` on `dataset.eval_split` (at most `dataset.max_eval_samples`)."""

    # Sampled completions per prompt (at gconfig.temperature) for pass@k, beside the greedy
    # one; 0: greedy pass@1 only.
    n_samples: int = 0
    pass_k: list[int] = field(default_factory=lambda: [1, 4, 8])  # the k <= n_samples are reported
    # `areal eval`'s JSON report; null: <run_dir>/eval/<model directory name>-<eval split>.json
    report: Optional[str] = None


@dataclass
class StatsLoggerConfig:
    # Where each step's record goes (workflows/metrics/stats.py): any of console, jsonl,
    # tensorboard (<run_dir>/tensorboard/), wandb (<run_dir>/wandb/).
    backends: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    print_every: int = 1  # steps between printed records
    file_name: str = "stats.jsonl"
    wandb_project: str = "areal"
    # offline: no network or account needed (`wandb sync` uploads later); online; disabled.
    wandb_mode: str = "offline"


@dataclass
class ExperimentConfig:
    """The whole job. Every run saves the resolved copy as `<run_dir>/config.yaml`."""

    experiment_name: str = "gsm8k-grpo"
    trial_name: str = "trial0"
    seed: int = 1
    # Runs live in `<run_root>/<experiment_name>/<trial_name>` unless `run_dir` is set.
    run_root: str = "runs"
    run_dir: Optional[str] = None
    # Where converted models are cached; defaults to $AREAL_CACHE_DIR or ~/.cache/areal.
    cache_dir: Optional[str] = None
    # Where rollouts run and what the control plane records (workflows/control_plane/modes.py):
    # local_colocated | dataflow_colocated | disaggregated (rollout.workers processes).
    deployment_mode: str = "local_colocated"
    # The metadata store: noop | memory | sqlite; null: the deployment mode's own.
    metadata_store: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    gconfig: GenerationConfig = field(default_factory=GenerationConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stats_logger: StatsLoggerConfig = field(default_factory=StatsLoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def resolved_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        return Path(self.run_root) / self.experiment_name / self.trial_name


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(path: Path) -> ExperimentConfig:
    """The config a run saved with `to_yaml` (`<run_dir>/config.yaml`), typed again."""
    saved = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.load(Path(path)))
    return OmegaConf.to_object(saved)  # type: ignore[return-value]
