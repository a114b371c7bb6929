"""The parts of one training run: built from config, restored from a recover checkpoint
(or reset for a fresh start), and closed.

`workflows/training/trainer.py` drives the loop over these parts; this module decides what they are
(`build_run`), where the loop starts (`find_resume_point`, `restore_or_reset`) and how they
stop (`close_run`). Crash recovery itself (the checkpoint format) is workflows/training/recover.py.
"""

from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from engines.critic import CriticEngine, ValueModel
from engines.distributed import DistributedContext
from engines.inference import LocalInferenceEngine
from engines.model import load_model
from engines.remote import RemoteInferenceEngine
from engines.servers import ServerGroup
from engines.train_engine import TrainEngine
from workflows.api import RolloutWorkflow
from workflows.build import (
    build_executor,
    build_inference,
    build_scorer,
    build_workflow,
    close_inference,
    prepare_process,
)
from workflows.config import ExperimentConfig, to_yaml
from workflows.control_plane.modes import ControlPlane, resolve_control_plane
from workflows.control_plane.rollouts import ColocatedRollouts, DisaggregatedRollouts, RolloutWorkers, WorkerLauncher
from workflows.controller.executor import WorkflowExecutor
from workflows.data.dataset import PromptLoader, TrainedPrompts, load_eval_rows, load_prompt_dataset
from workflows.metrics.stats import NullStatsLogger, StatsLogger
from workflows.rollout.reward import RewardScorer
from workflows.training.checkpoint_files import remove_stale_temporaries
from workflows.training.recover import (
    CorruptCheckpointError,
    drop_trajectory_dumps,
    find_recover_checkpoint,
    load_recover_checkpoint,
    read_recover_info,
    truncate_records,
)

logger = logging.getLogger(__name__)


def last_recover_step(run_dir: Path) -> Optional[int]:
    """The step of the complete recover checkpoint in `run_dir`, or None."""
    try:
        found = find_recover_checkpoint(Path(run_dir) / "checkpoints")
        return read_recover_info(found).step if found is not None else None
    except (OSError, ValueError):
        return None


def find_resume_point(cfg: ExperimentConfig, run_dir: Path, dist_ctx: DistributedContext, say) -> Optional[Path]:
    """The recover checkpoint to continue from (None: start at step 0), agreed by all ranks."""
    checkpoints = run_dir / "checkpoints"
    try:
        found = find_recover_checkpoint(checkpoints)
    except CorruptCheckpointError as exc:
        if cfg.trainer.resume:
            raise
        say(f"trainer.resume=false: ignoring {exc}")
        found = None
    if found is not None and not cfg.trainer.resume:
        say(f"trainer.resume=false: ignoring the recover checkpoint at step {read_recover_info(found).step} "
            f"({found.relative_to(run_dir)}); starting from step 0")
        found = None
    elif found is None:
        say(f"no recover checkpoint in {checkpoints}; starting from step 0")
    if dist_ctx.world_size > 1:
        mine = read_recover_info(found).step if found is not None else -1
        steps: list = [None] * dist_ctx.world_size
        dist.all_gather_object(steps, mine)
        if len(set(steps)) > 1:
            raise RuntimeError(
                f"ranks disagree on the recover checkpoint (steps by rank, -1 = none: {steps}); "
                f"run_dir={run_dir} must be on storage every rank sees, or set trainer.resume=false"
            )
    return found


@dataclass
class Run:
    """The parts of one training run, built once by `build_run`."""

    cfg: ExperimentConfig
    dist_ctx: DistributedContext
    run_dir: Path
    stats_logger: StatsLogger
    tokenizer: object
    num_prompts: int
    loader: PromptLoader
    total_steps: int
    eval_rows: list[dict]
    # The rollout side in this process; all None when deployment_mode=disaggregated
    # (the rollout workers hold them).
    inference: Optional[LocalInferenceEngine | RemoteInferenceEngine]
    servers: Optional[ServerGroup]  # inference servers this run started (rollout.backend != local)
    engine: TrainEngine
    scorer: Optional[RewardScorer]
    workflow: Optional[RolloutWorkflow]
    executor: Optional[WorkflowExecutor]
    dump_dir: Optional[Path]
    control: ControlPlane
    rollouts: ColocatedRollouts | DisaggregatedRollouts
    critic: Optional[CriticEngine] = None  # actor.adv_estimator=gae

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


@dataclass
class Position:
    """Where the loop starts: 0 for a fresh run, the recover checkpoint's step otherwise."""

    step: int = 0
    stats_records: int = 0
    reward_failures: int = 0
    trained: Optional[TrainedPrompts] = None


def build_stats_logger(cfg: ExperimentConfig, run_dir: Path) -> StatsLogger:
    """The console / jsonl / tensorboard / wandb backends of `stats_logger.backends`."""
    s = cfg.stats_logger
    trackers = []
    if "tensorboard" in s.backends:
        from workflows.metrics.trackers import TensorBoardTracker

        trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
    if "wandb" in s.backends:
        from workflows.metrics.trackers import WandbTracker

        trackers.append(WandbTracker(run_dir, project=s.wandb_project, name=f"{cfg.experiment_name}/{cfg.trial_name}",
                                     mode=s.wandb_mode, config=asdict(cfg)))
    return StatsLogger(run_dir / s.file_name if "jsonl" in s.backends else None,
                       print_every=s.print_every if "console" in s.backends else 0, trackers=trackers)


def build_run(cfg: ExperimentConfig, dist_ctx: DistributedContext, worker_launcher: Optional[WorkerLauncher] = None) -> Run:
    """Model, data, sampler, trainer, reward and rollout controller, from config; with
    `deployment_mode=disaggregated` the rollout side is `rollout.workers` processes
    started through `worker_launcher`.

    Raises:
        ValueError: disaggregated without a `worker_launcher`.
    """
    run_dir = cfg.resolved_run_dir()
    if dist_ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir / "checkpoints")
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        stats_logger = build_stats_logger(cfg, run_dir)
    else:
        stats_logger = NullStatsLogger()
    model_dir, tokenizer = prepare_process(cfg)
    train_data = load_prompt_dataset(cfg.dataset, tokenizer)
    stats_logger.info(f"data: {train_data.report()}")
    loader = PromptLoader(
        train_data,
        batch_size=cfg.dataset.batch_size,
        shuffle=cfg.dataset.shuffle,
        seed=cfg.seed,
        rank=dist_ctx.rank,
        world_size=dist_ctx.world_size,
    )
    total_steps = cfg.trainer.total_steps or cfg.trainer.total_epochs * loader.steps_per_epoch()
    eval_rows: list[dict] = []
    if cfg.trainer.eval_freq_steps > 0 and dist_ctx.is_main:
        eval_rows, overlap = load_eval_rows(cfg.dataset, tokenizer, train_rows=train_data.rows)
        stats_logger.info(f"evaluation: {len(eval_rows)} held-out prompts of {cfg.dataset.eval_split}"
                          + (f" ({overlap} also in the training split left out)" if overlap else ""))

    policy = load_model(cfg.model, model_dir, seed=cfg.seed)
    control = resolve_control_plane(cfg.deployment_mode, run_dir, cfg.metadata_store)
    inference = servers = scorer = workflow = executor = dump_dir = None
    try:  # the scorer and the servers are processes: nothing below may leave them behind
        if not control.disaggregated:
            inference, servers = build_inference(cfg, policy, tokenizer, model_dir, run_dir, dist_ctx)
        engine = TrainEngine(
            cfg.actor,
            policy,
            total_steps=total_steps,
            max_sequence_tokens=cfg.dataset.max_prompt_length + cfg.max_completion_tokens(),
            temperature=cfg.gconfig.temperature,
            # The reference model (KL penalty) is the initial policy, also after a resume;
            # with LoRA, the policy itself with its adapters disabled.
            ref_model=copy.deepcopy(policy) if cfg.actor.kl_ctl > 0 and not cfg.actor.lora.enabled else None,
            dist_ctx=dist_ctx,
            max_new_tokens=cfg.gconfig.max_new_tokens,
        )
        critic = build_critic(cfg, policy, engine, total_steps) if cfg.actor.adv_estimator == "gae" else None
        if control.disaggregated:
            if worker_launcher is None:
                raise ValueError("deployment_mode=disaggregated needs a worker launcher to start its rollout workers "
                                 "(`areal train` passes one: areal_cli/workers.py)")
            workers = RolloutWorkers(worker_launcher, run_dir, cfg.rollout.workers, cfg.rollout.worker_restarts)
            rollouts = DisaggregatedRollouts(
                control, workers, policy, batch_size=cfg.rollout.consumer_batch_size or loader.local_batch_size,
                max_head_offpolicyness=cfg.rollout.max_head_offpolicyness, total_steps=total_steps,
            )
        else:
            scorer = build_scorer(cfg)
            workflow = build_workflow(cfg, tokenizer, scorer)
            dump_dir = run_dir / "trajectories" if cfg.rollout.dump_trajectories and dist_ctx.is_main else None
            executor = build_executor(cfg, inference, trajectory_dump_dir=dump_dir,
                                      consumer_batch_size=cfg.rollout.consumer_batch_size or loader.local_batch_size)
            rollouts = ColocatedRollouts(executor, loader, workflow, inference, control, cfg.gconfig.temperature)
    except BaseException:
        try:
            if scorer is not None:
                scorer.close()
        finally:
            try:
                if inference is not None:
                    close_inference(inference, servers)
            finally:
                control.close()
        raise
    return Run(
        cfg=cfg, dist_ctx=dist_ctx, run_dir=run_dir, stats_logger=stats_logger, tokenizer=tokenizer,
        num_prompts=len(train_data), loader=loader, total_steps=total_steps, eval_rows=eval_rows,
        inference=inference, servers=servers, engine=engine, scorer=scorer, workflow=workflow, executor=executor,
        dump_dir=dump_dir, control=control, rollouts=rollouts, critic=critic,
    )


def build_critic(cfg: ExperimentConfig, policy, engine: TrainEngine, total_steps: int) -> CriticEngine:
    """PPO's critic: a value head on a copy of the initial policy (engines/critic.py),
    micro-batched and mixed-precision like the policy's trainer."""
    return CriticEngine(cfg.critic, ValueModel(copy.deepcopy(policy)), total_steps=total_steps,
                        n_minibatches=cfg.actor.ppo_n_minibatches, max_tokens_per_mb=cfg.actor.max_tokens_per_mb,
                        pad_to=engine.pad_to, autocast_dtype=engine.autocast_dtype)


def restore_or_reset(run: Run, resume_from: Optional[Path]) -> Position:
    """Load the recover checkpoint into the run's parts, or clear what an earlier run left;
    either way roll `stats.jsonl` and the trajectory dumps back to the starting step, so no
    step appears twice."""
    position = Position(trained=TrainedPrompts(run.loader.epoch_size))
    say = run.stats_logger.info
    if resume_from is not None:
        info = load_recover_checkpoint(resume_from, run.engine, run.inference, critic=run.critic)
        if info.num_prompts != run.num_prompts:
            raise ValueError(
                f"{resume_from} was written for {info.num_prompts} training prompts but dataset.path="
                f"{run.cfg.dataset.path!r} has {run.num_prompts}; resume with the same data or set trainer.resume=false"
            )
        if info.total_steps != run.total_steps:
            logger.warning(
                "the recover checkpoint was written for %d total steps, this run has %d: the LR schedule "
                "continues from the saved state", info.total_steps, run.total_steps,
            )
        position = Position(
            step=info.step,
            stats_records=info.stats_records,
            reward_failures=info.reward_failures,
            trained=TrainedPrompts.from_state_dict(info.data_position, epoch_size=run.loader.epoch_size),
        )
        run.loader.resume(position.trained)
        _restore_control_plane(run, info.step, info.store_acked, say)
        say(f"resuming from step {position.step} ({resume_from.relative_to(run.run_dir)})")
    if run.dist_ctx.is_main:
        if resume_from is None:
            run.control.reset()
            # A fresh start supersedes an ignored checkpoint: resuming from it later would
            # pair it with this run's stats and data.
            for stale in (run.checkpoints / "recover", run.checkpoints / "recover.old"):
                if stale.exists():
                    shutil.rmtree(stale)
                    say(f"removed the superseded recover checkpoint {stale}")
        try:
            dropped = truncate_records(run.stats_logger.path, position.stats_records) if run.stats_logger.path else 0
        except ValueError as exc:
            logger.warning("stats not rolled back: %s", exc)
            dropped = 0
        if dropped:
            what = f"after step {position.step}" if resume_from is not None else "by an earlier run (fresh start)"
            say(f"dropped {dropped} stats record(s) written {what}")
        if run.dump_dir is not None:
            drop_trajectory_dumps(run.dump_dir, from_version=position.step)
            run.dump_dir.mkdir(parents=True, exist_ok=True)
    return position


def _restore_control_plane(run: Run, step: int, acked: Optional[int], say) -> None:
    """Roll the store back to the recover checkpoint's cursor, and check it matches."""
    dropped = run.control.restore(step)
    if dropped:
        say(f"dropped {dropped} sample(s) generated after step {step} by the interrupted run")
    if acked is not None and run.control.ack_at_optimizer_step:
        found = run.control.store.status().acked
        if found != acked:
            raise ValueError(
                f"the metadata store in {run.run_dir / 'control'} holds {found} acknowledged samples but the recover "
                f"checkpoint at step {step} counts {acked}; it belongs to another run: restore it, or set trainer.resume=false"
            )


def close_run(run: Run) -> None:
    """Stop the rollouts (the rollout thread, or the rollout workers), the reward process
    pool, the inference worker and the metadata store, each even if an earlier one fails."""
    try:
        run.rollouts.close()
    finally:
        try:
            if run.scorer is not None:
                run.scorer.close()
        finally:
            try:
                if run.inference is not None:
                    close_inference(run.inference, run.servers)
            finally:
                try:
                    run.control.close()
                finally:
                    run.stats_logger.close()
