"""The job's schema: `ExperimentConfig` and the configuration of what flows (data, rollout
control, the training loop and its logs); the engines' own parts are in engines/config.py.

Plain dataclasses, read and written as YAML (`to_yaml`, `from_yaml`); `areal_cli/` composes
them from Hydra config files and command-line overrides and checks every value. Each
field's help text and choices are its metadata (`engines.config.option`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from engines.config import MODEL_DTYPES, ActorConfig, CriticConfig, GenerationConfig, ModelConfig, option
from workflows.episode_config import (  # noqa: F401 - part of the schema, re-exported
    BUILTIN_REWARDS,
    DEFAULT_FEEDBACK,
    MULTI_TURN_ENVIRONMENTS,
    MULTI_TURN_WORKFLOW,
    JudgeConfig,
    MultiTurnConfig,
    RewardConfig,
    SandboxConfig,
)

# The valid values of the string-typed keys, named by the fields below as `choices`.
ROLLOUT_BACKENDS = ("local", "vllm", "sglang")
# The control plane's (workflows/control_plane/modes.py).
DEPLOYMENT_MODES = ("local_colocated", "dataflow_colocated", "disaggregated")
METADATA_STORES = ("noop", "memory", "sqlite")
STATS_BACKENDS = ("console", "jsonl", "tensorboard", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
# How the reference answer is read from the answer column (workflows/data/sources.py).
ANSWER_FORMATS = ("gsm8k", "boxed", "raw")
PROCEDURAL_PREFIX = "reasoning_gym:"
# Today's instruction, which the shipped configs' results were measured with.
DEFAULT_INSTRUCTION = "{question}\nSolve the problem step by step, then give the final answer as a number in \\boxed{}."


@dataclass
class DatasetConfig:
    """Where prompts come from.

    `path` is a hub dataset id (read with `datasets.load_dataset`) or a local directory
    (or file) of `.jsonl` / `.json` / `.parquet` / `.csv` files such as `train.jsonl` and
    `test.jsonl`. With the hub unreachable, `openai/gsm8k` is read from the copy shipped
    with the package (workflows/data/gsm8k/). `reasoning_gym:<task>` generates a
    procedural task of the PyPI package reasoning-gym (workflows/data/sources.py,
    `procedural_split`). The column settings say which columns hold the prompt and the
    reference; every column of a row reaches the reward function (`row`).
    """

    path: str = option(
        "openai/gsm8k",
        "A hub dataset id, a local directory or file of .jsonl / .json / .parquet / .csv files, or "
        "reasoning_gym:<task> (a procedural task of the reasoning-gym package). With the hub unreachable, "
        "openai/gsm8k is read from the copy shipped in workflows/data/gsm8k/.",
    )
    prompt_column: str = option("question", "The column holding each prompt's text (the {question} of instruction).")
    answer_column: str = option("answer", "The column holding each row's reference answer (read per answer_format).")
    answer_format: Optional[str] = option(
        None,
        "How the reference is read from answer_column. gsm8k: the text after the last '####', thousands separators "
        "removed; boxed: the content of the last \\boxed{}; raw: the column as it is (stripped). null: gsm8k where "
        "the column has a '####', else raw.",
        choices=ANSWER_FORMATS,
        null="gsm8k where the column has a '####', else raw",
    )
    messages_column: Optional[str] = option(
        None,
        "A column of chat messages ([{role: ..., content: ...}, ...]) used as the prompt as it is: no instruction "
        "or system prompt is added. null: the prompt is built from prompt_column.",
    )
    system_prompt: Optional[str] = option(None, "A system message put before each prompt; null: none.")
    instruction: str = option(
        DEFAULT_INSTRUCTION,
        "The user message of each prompt: {question} is replaced by the prompt column's text (stripped); the "
        "default asks for a step-by-step solution and a \\boxed{} answer.",
    )
    name: Optional[str] = option("main", "The hub dataset's config name; ignored for local paths. null: none.")
    split: str = option("train", "The training split (local files whose names start with it).")
    eval_split: str = option("test", "The held-out evaluation split.")
    batch_size: int = option(4, "Prompts per training step.")
    max_prompt_length: int = option(512, "Most tokens of a prompt; longer prompts are skipped and counted.")
    shuffle: bool = option(True, "Reshuffle the prompts every epoch, from seed + epoch.")
    max_eval_samples: int = option(64, "Prompts scored at each evaluation.")
    task_args: dict[str, Any] = option(
        {}, "reasoning_gym:<task> only: the task's settings, e.g. {min_terms: 2, max_digits: 2}."
    )
    task_size: int = option(4096, "reasoning_gym:<task> only: problems generated per split.")
    task_seed: int = option(
        0,
        "reasoning_gym:<task> only: the seed of the train split. Held-out splits draw from task_seed + 2**31 on, "
        "so the splits never share a problem's seed.",
    )


@dataclass
class RolloutConfig:
    """The rollout controller (AReaL's asynchronous RL, arXiv 2505.24298)."""

    max_concurrent_rollouts: int = option(16, "Most rollouts (prompt groups) generating at once.")
    consumer_batch_size: Optional[int] = option(
        None, "Trajectories (prompt groups) per training step; null: dataset.batch_size."
    )
    max_head_offpolicyness: int = option(
        0, "How many policy versions a trained sample may lag; 0 is synchronous RL."
    )
    queue_size: int = option(64, "Most rollouts waiting to start.")
    reward_timeout: float = option(10.0, "Seconds per reward call before it scores 0.")
    reward_workers: int = option(2, "Processes that score rewards.")
    dump_trajectories: bool = option(
        False, "Append every trained trajectory to <run_dir>/trajectories/<version>.jsonl."
    )
    max_consecutive_rejections: int = option(
        64,
        "Stop the run with a RolloutFailureError once this many rollouts in a row were rejected (raised, returned "
        "None, or failed should_accept) with none accepted in between; staleness expiries and cancellations do "
        "not count. >= 1.",
    )
    max_failure_rate: float = option(
        0.5,
        "Also stop once more than this share of the last failure_rate_window finished rollouts failed (for the "
        "same reasons), even with accepted ones in between: a backend failing on a fraction of its requests would "
        "otherwise keep the run going on batches assembled from the prompts that happened to succeed. In (0, 1]; "
        "1 never trips.",
    )
    failure_rate_window: int = option(
        256, "Finished rollouts (accepted or failed) over which max_failure_rate is judged; >= 1."
    )
    max_consecutive_filtered: int = option(
        1024,
        "With actor.dynamic_sampling: stop with an error once this many prompt groups in a row had all-equal "
        "rewards (nothing to learn from), rather than generate forever. >= 1.",
    )
    backend: str = option(
        "local",
        "Where rollouts are generated. local: the in-process engine; vllm, sglang: inference servers over HTTP "
        "(engines/servers.py and engines/remote.py; make install-vllm).",
        choices=ROLLOUT_BACKENDS,
    )
    servers: Any = option(
        1,
        "vllm/sglang: how many servers to start on 127.0.0.1 (an int), or a list of host:port addresses of "
        "running servers to attach to (they must serve model.path and be able to read <run_dir>/weights/).",
    )
    server_python: Optional[str] = option(
        None, "The interpreter that has the backend installed; null: ./.venv-<backend>/bin/python, else this one."
    )
    server_args: list[str] = option([], "Extra arguments appended to each server's command line.")
    server_dtype: Optional[str] = option(
        None,
        "The servers' compute dtype; null: model.dtype. bfloat16 is several times faster on CPUs with AMX and on "
        "GPUs, at the cost of logprobs that differ more from the trainer's.",
        choices=MODEL_DTYPES,
        null="model.dtype",
    )
    server_startup_timeout: float = option(600.0, "Seconds until every server answers /health.")
    request_timeout: float = option(600.0, "Seconds per generation request before it is retried.")
    request_retries: int = option(
        3, "Retries of a failed generation request (with backoff) before the rollout fails."
    )
    interruptible_generation: bool = option(
        False,
        "On pause (a weight update), abort the requests in flight and finish them with the new weights, each "
        "token keeping the version that sampled it (AReaL); false lets them finish first.",
    )
    workers: int = option(
        1,
        "deployment_mode=disaggregated: rollout worker processes, each generating its share of every batch "
        "(dataset.batch_size must split over them).",
    )
    worker_restarts: int = option(
        3, "Restarts of rollout workers that die, over the whole run, before it stops with an error."
    )
    workflow: Optional[str] = option(
        None,
        "The rollout workflow: package.module:Class or path/to/file.py:Class, any class with an async "
        "arun_episode(engine, data) (workflows/api.py, RolloutWorkflow); multi_turn: the shipped multi-turn "
        "workflow, set by the multi_turn.* keys (docs/multi_turn.md). null: RLVRWorkflow.",
    )
    workflow_args: dict[str, Any] = option(
        {}, "Keyword arguments of rollout.workflow's constructor, besides the ones the run passes."
    )


@dataclass
class TrainerConfig:
    """The training loop: its length, checkpoints and evaluations."""

    total_steps: Optional[int] = option(
        None, "Training steps; takes precedence over total_epochs. null: train total_epochs epochs."
    )
    total_epochs: int = option(1, "Passes over the training split, used when total_steps is null.")
    save_freq_steps: int = option(0, "Steps between saved checkpoints; 0: save only at the end.")
    eval_freq_steps: int = option(0, "Steps between held-out evaluations; 0: no evaluation.")
    resume: bool = option(
        True,
        "Continue from <run_dir>/checkpoints/recover/ when it holds a complete recover checkpoint; false starts "
        "from step 0 (and discards the run_dir's stats records).",
    )
    recover_freq_steps: Optional[int] = option(
        None,
        "Steps between recover checkpoints (weights, optimizer, RNG, data position; see "
        "workflows/training/recover.py). null: the same as save_freq_steps; 0: only at the end.",
    )
    dist_timeout_s: float = option(
        600.0, "Seconds each replica waits for the others at the rendezvous and in every collective (gloo/NCCL)."
    )
    heartbeat_timeout_s: float = option(
        60.0,
        "Seconds without a heartbeat from another replica before it is declared lost: the survivors print one "
        "line naming its rank and exit 75 (engines/heartbeat.py); 0 disables the watch. Replicas >= 2 only.",
    )


@dataclass
class EvalConfig:
    """Held-out evaluation (workflows/training/evaluation.py): `areal eval`, and the trainer's every
    `trainer.eval_freq_steps` on `dataset.eval_split` (at most `dataset.max_eval_samples`)."""

    n_samples: int = option(
        0,
        "Sampled completions per prompt (at gconfig.temperature) for pass@k, beside the greedy one; 0: greedy "
        "pass@1 only.",
    )
    pass_k: list[int] = option([1, 4, 8], "The k of pass@k; those <= n_samples are reported.")
    report: Optional[str] = option(
        None, "areal eval's JSON report; null: <run_dir>/eval/<model directory name>-<eval split>.json."
    )


@dataclass
class StatsLoggerConfig:
    """Where each step's statistics go (workflows/metrics/stats.py)."""

    backends: list[str] = option(
        ["console", "jsonl"],
        "Where each step's record goes, any of: console (one line per step), jsonl (file_name in the run "
        "directory), tensorboard (<run_dir>/tensorboard/), wandb (<run_dir>/wandb/).",
        choices=STATS_BACKENDS,
    )
    print_every: int = option(1, "Steps between printed records.")
    file_name: str = option("stats.jsonl", "The stats file in the run directory.")
    wandb_project: str = option("areal", "The W&B project.")
    wandb_mode: str = option(
        "offline",
        "offline: no network or account needed (wandb sync uploads later); online: needs WANDB_API_KEY; disabled.",
        choices=WANDB_MODES,
    )


@dataclass
class ExperimentConfig:
    """The whole job. Every run saves the resolved copy as `<run_dir>/config.yaml`."""

    experiment_name: str = option("gsm8k-grpo", "Names the run directory (<run_root>/<experiment_name>/...).")
    trial_name: str = option("trial0", "Names the run directory (.../<experiment_name>/<trial_name>).")
    seed: int = option(1, "Seeds every RNG, the data order and (deterministic mode) sampling.")
    run_root: str = option(
        "runs", "Runs live in <run_root>/<experiment_name>/<trial_name> unless run_dir is set."
    )
    run_dir: Optional[str] = option(
        None, "An explicit run directory; null: <run_root>/<experiment_name>/<trial_name>."
    )
    cache_dir: Optional[str] = option(
        None, "Where converted models are cached; null: $AREAL_CACHE_DIR, else ~/.cache/areal."
    )
    deployment_mode: str = option(
        "local_colocated",
        "Where rollouts run and what the control plane records (workflows/control_plane/modes.py). "
        "local_colocated: no-op store; dataflow_colocated: SQLite store, samples acknowledged at the optimizer "
        "boundary; disaggregated: rollout.workers rollout worker processes over a SQLite store.",
        choices=DEPLOYMENT_MODES,
    )
    metadata_store: Optional[str] = option(
        None,
        "The control plane's metadata store; null: the deployment mode's own (disaggregated needs sqlite).",
        choices=METADATA_STORES,
        null="the mode's own",
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    gconfig: GenerationConfig = field(default_factory=GenerationConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    multi_turn: MultiTurnConfig = field(default_factory=MultiTurnConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stats_logger: StatsLoggerConfig = field(default_factory=StatsLoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def max_completion_tokens(self) -> int:
        """The most tokens a trajectory row holds after its prompt: `gconfig.max_new_tokens`,
        or `multi_turn.max_total_tokens` with `rollout.workflow=multi_turn`."""
        if self.rollout.workflow == MULTI_TURN_WORKFLOW:
            return self.multi_turn.max_total_tokens
        return self.gconfig.max_new_tokens

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
