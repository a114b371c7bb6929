"""The training loop: from a resolved config to trained weights.

    areal train config=gsm8k_grpo dataset.path=../shared/data/gsm8k trainer.total_steps=3

Each step
  1. takes `consumer_batch_size` scored prompt groups from the rollout controller
     (workflows/executor.py), which keeps generating in the background within the
     staleness bound `rollout.max_head_offpolicyness` (0: synchronous RL);
  2. turns rewards into group-normalised advantages (GRPO);
  3. optionally recomputes proximal logprobs (decoupled PPO, AReaL);
  4. updates the policy with the clipped PPO objective (engines/train_engine.py);
  5. pauses rollouts, copies the new weights into the inference engine, bumps the
     policy version, resumes;
  6. logs one stats record, and saves a Hugging Face checkpoint when due;
  7. saves a recover checkpoint when due (every `trainer.recover_freq_steps`, default
     `save_freq_steps`, and at the end).

Crash recovery (workflows/recover.py): with `trainer.resume=true` (the default) a run
whose `<run_dir>/checkpoints/recover/` holds a complete recover checkpoint continues from
it: weights, optimizer and LR schedule, policy version, RNG states and the data position
(which prompts of which epoch have been trained) are restored, `stats.jsonl` and the
trajectory dumps are rolled back to the checkpoint, and no prompt is trained twice or
dropped, also in asynchronous mode. Each stats record lists the prompts its step trained
(`prompt_ids`, with their epochs in `prompt_epochs`).

Stopping (workflows/shutdown.py). SIGINT (Ctrl-C) or SIGTERM raises `RunInterrupted` in
the training thread; the rollout thread, the inference worker and the reward processes are
shut down on the way out, and the exception carries the run directory and the step of the
last recover checkpoint, from which a new start continues. A step's stats record and
checkpoints are written whole or not at all (a signal meanwhile waits for them). If
rollouts keep failing, `prepare_batch` raises `RolloutFailureError` (workflows/executor.py)
and the run ends without saving anything, so the last recover checkpoint stays as it was.

With `WORLD_SIZE > 1` (see `areal launch`) every rank runs this loop on its shard of each
global batch; gradients are all-reduced and only rank 0 writes files. Every rank reads the
same recover checkpoint, so `run_dir` must be on storage that all ranks see.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import datasets
import torch
import torch.distributed as dist
import transformers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from areal_cli.config import ExperimentConfig, to_yaml
from engines.distributed import DistributedContext, init_distributed, shutdown_distributed
from engines.factories import setup_deterministic_mode
from engines.inference import GenerationRequest, LocalInferenceEngine
from engines.model import load_model, load_tokenizer, resolve_model_dir
from engines.ppo import group_normalized_advantages
from engines.train_engine import TrainEngine
from workflows.batch import staleness_stats
from workflows.dataset import PromptLoader, TrainedPrompts, load_prompt_dataset
from workflows.executor import RolloutFailureError, WorkflowExecutor
from workflows.recover import (
    RecoverInfo,
    drop_trajectory_dumps,
    find_recover_checkpoint,
    inject_fault_after,
    load_recover_checkpoint,
    load_rng_state,
    read_recover_info,
    remove_stale_temporaries,
    save_recover_checkpoint,
    truncate_records,
)
from workflows.reward import RewardScorer
from workflows.rlvr import RLVRWorkflow
from workflows.shutdown import RunInterrupted, deferred_stop, stop_on_signals
from workflows.stats import NullStatsLogger, StatsLogger

logger = logging.getLogger(__name__)


def compute_advantages(batch: dict[str, torch.Tensor], cfg: ExperimentConfig) -> torch.Tensor:
    """[B, L] float32 advantages: rewards shifted by `reward_bias` and scaled by
    `reward_scaling`, then group-normalised per prompt (GRPO) unless
    `actor.group_reward_norm=false`, broadcast over each sequence's completion tokens."""
    actor = cfg.actor
    rewards = (batch["rewards"] + actor.reward_bias) * actor.reward_scaling
    if actor.group_reward_norm:
        adv = group_normalized_advantages(rewards, group_size=cfg.gconfig.n_samples, std_norm=actor.group_adv_std_norm)
    else:
        # REINFORCE with the constant baseline `reward_bias`.
        adv = rewards
    return adv[:, None] * batch["loss_mask"].float()


def sort_by_prompt(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Order a batch by (epoch, prompt id) (stable, so each group stays contiguous and in
    order): the rollout controller returns groups in completion order, which varies run
    to run."""
    order = torch.sort(batch["prompt_id"], stable=True).indices
    order = order[torch.sort(batch["epoch"][order], stable=True).indices]
    return {k: v[order] for k, v in batch.items()}


def gather_sequences(batch: dict[str, torch.Tensor], dist_ctx: DistributedContext) -> dict[str, torch.Tensor]:
    """Per-sequence columns of the global batch, all ranks in rank order, in one collective:
    `rewards` and `lengths` (completion tokens) float32 [B], `epoch` and `prompt_id` long [B]."""
    columns = {
        "rewards": batch["rewards"].float(),
        "lengths": batch["loss_mask"].sum(dim=1).float(),
        "epoch": batch["epoch"],
        "prompt_id": batch["prompt_id"],
    }
    if dist_ctx.world_size > 1:
        gathered: list = [None] * dist_ctx.world_size
        dist.all_gather_object(gathered, {k: v.tolist() for k, v in columns.items()})
        columns = {k: torch.tensor([x for g in gathered for x in g[k]], dtype=v.dtype) for k, v in columns.items()}
    return columns


def trained_prompts(sequences: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """Sorted distinct `(epoch, prompt_id)` of `gather_sequences`' output."""
    return sorted(set(zip(sequences["epoch"].tolist(), sequences["prompt_id"].tolist())))


def batch_stats(sequences: dict[str, torch.Tensor]) -> dict[str, float]:
    """Reward, accuracy and length statistics of `gather_sequences`' output."""
    rewards, lengths = sequences["rewards"], sequences["lengths"]
    return {
        "reward_mean": float(rewards.mean()),
        "accuracy": float((rewards >= 1.0).float().mean()),
        "response_length_mean": float(lengths.mean()),
        "response_length_max": int(lengths.max()),
        "num_sequences": int(rewards.numel()),
    }


def evaluate(cfg: ExperimentConfig, inference: LocalInferenceEngine, scorer: RewardScorer, tokenizer, rows: list[dict]) -> dict:
    """Accuracy of one sampled completion per held-out prompt."""
    g = replace(cfg.gconfig, n_samples=1)
    correct = 0
    for start in range(0, len(rows), g.max_batch_size):
        chunk = rows[start : start + g.max_batch_size]
        responses = inference.generate_blocking([GenerationRequest.from_gconfig(r["prompt_ids"], g) for r in chunk])
        for row, response in zip(chunk, responses):
            correct += scorer.score(tokenizer.decode(response.output_ids, skip_special_tokens=True), row["answer"])
    return {"eval_accuracy": correct / max(len(rows), 1), "eval_num_prompts": len(rows)}


def run_training(cfg: ExperimentConfig) -> Path:
    """Train per `cfg`; returns the run directory (stats.jsonl, config.yaml, checkpoints/).

    `cfg` comes from `areal_cli.config.load_config`, which has checked every value
    (areal_cli/validation.py).

    Raises:
        RunInterrupted: SIGINT or SIGTERM stopped the run (in the main thread, the
            previous handlers are restored afterwards); it carries the run directory and
            the last recover checkpoint's step (`resume_hint`).
        RolloutFailureError: `rollout.max_consecutive_rejections` rollouts in a row were
            rejected; nothing was saved on the way out.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Our own progress bar and stats lines say what is happening; library bars would
    # interleave with them.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    run_dir = cfg.resolved_run_dir()

    def describe(signum: int) -> str:
        return _interrupted(signum, run_dir).resume_hint()

    with stop_on_signals(describe):
        try:
            dist_ctx = init_distributed()
            try:
                return _train(cfg, dist_ctx)
            finally:
                with deferred_stop():
                    shutdown_distributed()
        except RunInterrupted as exc:
            exc.run_dir, exc.recover_step = run_dir, last_recover_step(run_dir)
            raise


def last_recover_step(run_dir: Path) -> Optional[int]:
    """The step of the complete recover checkpoint in `run_dir`, or None."""
    found = find_recover_checkpoint(Path(run_dir) / "checkpoints")
    if found is None:
        return None
    try:
        return read_recover_info(found).step
    except (OSError, ValueError):
        return None


def _interrupted(signum: int, run_dir: Path) -> RunInterrupted:
    exc = RunInterrupted(signum)
    exc.run_dir, exc.recover_step = run_dir, last_recover_step(run_dir)
    return exc


def recover_due(cfg: ExperimentConfig, step: int, total_steps: int) -> bool:
    """Whether a recover checkpoint is written after `step`: every
    `trainer.recover_freq_steps` (None: `save_freq_steps`; 0: never) and at the last step."""
    freq = cfg.trainer.recover_freq_steps
    if freq is None:
        freq = cfg.trainer.save_freq_steps
    return step == total_steps or (freq > 0 and step % freq == 0)


def _find_resume_point(cfg: ExperimentConfig, run_dir: Path, dist_ctx: DistributedContext, say) -> Optional[Path]:
    """The recover checkpoint to continue from (None: start at step 0), agreed by all ranks."""
    checkpoints = run_dir / "checkpoints"
    found = find_recover_checkpoint(checkpoints)
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
    inference: LocalInferenceEngine
    engine: TrainEngine
    scorer: RewardScorer
    workflow: RLVRWorkflow
    executor: WorkflowExecutor
    dump_dir: Optional[Path]

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


def build_run(cfg: ExperimentConfig, dist_ctx: DistributedContext) -> Run:
    """Model, data, sampler, trainer, reward and rollout controller, from config."""
    run_dir = cfg.resolved_run_dir()
    if dist_ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir / "checkpoints")
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        stats_logger = StatsLogger(run_dir / cfg.stats_logger.file_name, print_every=cfg.stats_logger.print_every)
    else:
        stats_logger = NullStatsLogger()
    setup_deterministic_mode(cfg.seed, cfg.actor.deterministic)

    model_dir = resolve_model_dir(cfg.model.path, Path(cfg.cache_dir) if cfg.cache_dir else None)
    tokenizer = load_tokenizer(model_dir)
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
        eval_rows = load_prompt_dataset(cfg.dataset, tokenizer, split=cfg.dataset.eval_split).rows
        eval_rows = eval_rows[: cfg.dataset.max_eval_samples]

    policy = load_model(cfg.model, model_dir, seed=cfg.seed)
    # The sampler owns its own copy so that generation, which runs while the trainer
    # updates the policy, never reads half-updated weights.
    inference = LocalInferenceEngine(
        copy.deepcopy(policy),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_batch_size=cfg.gconfig.max_batch_size,
    )
    engine = TrainEngine(
        cfg.actor,
        policy,
        total_steps=total_steps,
        max_sequence_tokens=cfg.dataset.max_prompt_length + cfg.gconfig.max_new_tokens,
        temperature=cfg.gconfig.temperature,
        # The reference model (KL penalty) is the initial policy, also after a resume.
        ref_model=copy.deepcopy(policy) if cfg.actor.kl_ctl > 0 else None,
        dist_ctx=dist_ctx,
    )
    scorer = RewardScorer(num_workers=cfg.rollout.reward_workers, timeout=cfg.rollout.reward_timeout)
    try:  # the scorer holds processes: nothing below may leave them behind
        sampling_seed = cfg.seed if cfg.actor.deterministic else None
        workflow = RLVRWorkflow(gconfig=cfg.gconfig, tokenizer=tokenizer, scorer=scorer, seed=sampling_seed)
        dump_dir = run_dir / "trajectories" if cfg.rollout.dump_trajectories and dist_ctx.is_main else None
        executor = WorkflowExecutor(
            cfg.rollout,
            inference,
            consumer_batch_size=None if cfg.rollout.consumer_batch_size else loader.local_batch_size,
            trajectory_dump_dir=dump_dir,
        )
    except BaseException:
        scorer.close()
        inference.destroy()
        raise
    return Run(
        cfg=cfg, dist_ctx=dist_ctx, run_dir=run_dir, stats_logger=stats_logger, tokenizer=tokenizer,
        num_prompts=len(train_data), loader=loader, total_steps=total_steps, eval_rows=eval_rows,
        inference=inference, engine=engine, scorer=scorer, workflow=workflow, executor=executor, dump_dir=dump_dir,
    )


def restore_or_reset(run: Run, resume_from: Optional[Path]) -> Position:
    """Load the recover checkpoint into the run's parts, or clear what an earlier run left;
    either way roll `stats.jsonl` and the trajectory dumps back to the starting step, so no
    step appears twice."""
    position = Position(trained=TrainedPrompts(run.loader.epoch_size))
    say = run.stats_logger.info
    if resume_from is not None:
        info = load_recover_checkpoint(resume_from, run.engine, run.inference)
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
        say(f"resuming from step {position.step} ({resume_from.relative_to(run.run_dir)})")
    if run.dist_ctx.is_main:
        if resume_from is None:
            # A fresh start supersedes an ignored checkpoint: resuming from it later would
            # pair it with this run's stats and data.
            for stale in (run.checkpoints / "recover", run.checkpoints / "recover.old"):
                if stale.exists():
                    shutil.rmtree(stale)
                    say(f"removed the superseded recover checkpoint {stale}")
        try:
            dropped = truncate_records(run.stats_logger.path, position.stats_records)
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


def _train(cfg: ExperimentConfig, dist_ctx: DistributedContext) -> Path:
    run = build_run(cfg, dist_ctx)
    try:
        _train_loop(cfg, dist_ctx, run)
    finally:
        # Whole even when a signal arrives meanwhile: the rollout thread first (its
        # rollouts use the engine and the scorer), then the reward processes, then the
        # inference worker thread.
        with deferred_stop():
            close_run(run)
    return run.run_dir


def close_run(run: Run) -> None:
    """Stop the rollout thread, the reward process pool and the inference worker, each
    even if an earlier one fails."""
    try:
        run.executor.destroy()
    finally:
        try:
            run.scorer.close()
        finally:
            run.inference.destroy()


def _train_loop(cfg: ExperimentConfig, dist_ctx: DistributedContext, run: Run) -> None:
    resume_from = _find_resume_point(cfg, run.run_dir, dist_ctx, run.stats_logger.info)
    position = restore_or_reset(run, resume_from)
    engine, executor, stats_logger, total_steps = run.engine, run.executor, run.stats_logger, run.total_steps

    progress = Progress(
        TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stats_logger.console if dist_ctx.is_main else None, transient=True, disable=not dist_ctx.is_main,
    )
    executor.initialize()
    # Before any rollout starts: the staleness capacity counts the batches already trained.
    executor.staleness_manager.on_version_recovered(position.step)
    if resume_from is not None:
        # Last, after model construction and loading consumed randomness.
        load_rng_state(resume_from)
    final = run.checkpoints / f"step_{total_steps}"
    with progress:
        task = progress.add_task("steps", total=total_steps, completed=position.step)
        for step in range(position.step + 1, total_steps + 1):
            try:
                record = train_step(cfg, step, run.loader, run.workflow, executor, run.inference, engine, dist_ctx)
            except RolloutFailureError as exc:
                # Nothing is saved on this path: the last recover checkpoint stays as it was.
                recovered = last_recover_step(run.run_dir)
                exc.context = f"the run stopped at step {step} of {total_steps} without saving; " + (
                    f"its last recover checkpoint (step {recovered}) is intact in {run.checkpoints / 'recover'}"
                    if recovered is not None
                    else "it has no recover checkpoint yet"
                )
                raise
            record["reward_failures"] = position.reward_failures + run.scorer.stats.num_failed
            if run.eval_rows and step % cfg.trainer.eval_freq_steps == 0:
                record.update(evaluate(cfg, run.inference, run.scorer, run.tokenizer, run.eval_rows))
            # The step's record and checkpoints are written whole: a signal waits for them.
            with deferred_stop():
                duplicates = position.trained.update(zip(record["prompt_epochs"], record["prompt_ids"]))
                if duplicates:
                    logger.error("step %d trained (epoch, prompt id) pairs already trained: %s", step, duplicates)
                stats_logger.log(record, total_steps=total_steps)
                position.stats_records += 1
                inject_fault_after(step)
                save_due = cfg.trainer.save_freq_steps > 0 and step % cfg.trainer.save_freq_steps == 0
                if save_due and step < total_steps and dist_ctx.is_main:
                    engine.save(run.checkpoints / f"step_{step}", run.tokenizer)
                if recover_due(cfg, step, total_steps) and dist_ctx.is_main:
                    info = RecoverInfo(
                        step=step,
                        total_steps=total_steps,
                        stats_records=position.stats_records,
                        data_position=position.trained.state_dict(),
                        num_prompts=run.num_prompts,
                        world_size=dist_ctx.world_size,
                        reward_failures=record["reward_failures"],
                    )
                    save_recover_checkpoint(run.checkpoints, engine, info)
            progress.advance(task)
    if position.step >= total_steps:
        stats_logger.info(f"the recover checkpoint is at step {position.step} >= trainer.total_steps={total_steps}; nothing to train")
    with deferred_stop():
        if dist_ctx.is_main and (position.step < total_steps or not final.exists()):
            engine.save(final, run.tokenizer)
    stats_logger.info(f"done: {total_steps} steps; checkpoint {final}; stats {stats_logger.path}")


def train_step(
    cfg: ExperimentConfig,
    step: int,
    loader: PromptLoader,
    workflow,
    executor: WorkflowExecutor,
    inference: LocalInferenceEngine,
    engine: TrainEngine,
    dist_ctx: DistributedContext,
) -> dict:
    """One GRPO step at policy version `step - 1`; returns its stats record."""
    start = time.perf_counter()
    tokens_before = inference.num_generated_tokens
    batch = sort_by_prompt(executor.prepare_batch(loader, workflow))
    wait_seconds = time.perf_counter() - start
    version = engine.get_version()
    staleness = staleness_stats(batch["versions"], batch["loss_mask"], version)
    batch["advantages"] = compute_advantages(batch, cfg)
    if cfg.actor.kl_ctl > 0:
        batch["ref_logp"] = engine.compute_logp(batch, model=engine.ref_model)
    if cfg.actor.recompute_logprob:
        prox_logp = engine.compute_logp(batch)
        if cfg.actor.use_decoupled_loss:
            batch["prox_logp"] = prox_logp
        else:
            # Plain PPO, with the current weights as the trust-region anchor.
            batch["logprobs"] = prox_logp
    train = engine.train_batch(batch)

    # Weight update: no rollout starts while the sampler's weights change; rollouts in
    # flight finish with the version they started with (their tokens say so).
    executor.pause()
    with engine.engine_lock:
        engine.upload_weights(inference)
    engine.set_version(step)
    inference.set_version(step)
    executor.resume()

    rollout = executor.get_stats()
    sequences = gather_sequences(batch, dist_ctx)
    prompts = trained_prompts(sequences)
    elapsed = time.perf_counter() - start
    return {
        "step": step,
        "version": step,
        **batch_stats(sequences),
        **asdict(train),
        "staleness_max": int(staleness["max_lag"]),
        "staleness_mean": staleness["mean_lag"],
        "rollouts_accepted": rollout.accepted,
        "rollouts_rejected": rollout.rejected,
        "rollouts_running": rollout.running,
        "capacity": executor.get_capacity(),
        "gen_tokens_per_s": (inference.num_generated_tokens - tokens_before) / max(elapsed, 1e-9),
        "rollout_wait_s": wait_seconds,
        "step_time_s": elapsed,
        "prompt_ids": [i for _, i in prompts],
        "prompt_epochs": [e for e, _ in prompts],
    }
