"""The training loop: from a resolved config to trained weights.

    areal train config=gsm8k_grpo trainer.total_steps=3

The run's parts (model, data, sampler, trainer, reward, rollout controller) are built by
`workflows/training/run.py`, which also restores them from a recover checkpoint. Each step
  1. takes `consumer_batch_size` scored prompt groups from the run's rollouts
     (workflows/control_plane/rollouts.py): the rollout controller (workflows/controller/executor.py) in this
     process, or rollout worker processes with `deployment_mode=disaggregated`; either
     keeps generating in the background within the staleness bound
     `rollout.max_head_offpolicyness` (0: synchronous RL);
  2. turns rewards into advantages (`actor.adv_estimator`: GRPO's group-normalised
     ones, RLOO, REINFORCE++, or GAE from a critic, which is trained after the policy);
  3. recomputes logprobs where the loss needs the trainer's own (workflows/training/anchors.py):
     the proximal policy of decoupled PPO (AReaL), or the anchor of the tokens the current
     weights sampled when the trainer computes in another precision than the sampler;
  4. updates the policy with the clipped PPO objective (engines/train_engine.py), then
     acknowledges the batch's samples in the metadata store (durable deployment modes,
     workflows/control_plane/modes.py);
  5. sends the new weights to the rollouts (in process: pause, copy, bump the policy
     version, resume; disaggregated: a published version directory);
  6. logs one stats record, and saves a Hugging Face checkpoint when due;
  7. saves a recover checkpoint when due (every `trainer.recover_freq_steps`, default
     `save_freq_steps`, and at the end).

Crash recovery (workflows/training/recover.py): with `trainer.resume=true` (the default) a run
whose `<run_dir>/checkpoints/recover/` holds a complete recover checkpoint continues from
it: weights, optimizer and LR schedule, policy version, RNG states and the data position
(which prompts of which epoch have been trained) are restored, `stats.jsonl` and the
trajectory dumps are rolled back to the checkpoint, and no prompt is trained twice or
dropped, also in asynchronous mode. Each stats record lists the prompts its step trained
(`prompt_ids`, with their epochs in `prompt_epochs`).

Stopping (workflows/training/shutdown.py). SIGINT (Ctrl-C) or SIGTERM raises `RunInterrupted` in
the training thread; the rollout thread, the inference worker and the reward processes are
shut down on the way out, and the exception carries the run directory and the step of the
last recover checkpoint, from which a new start continues. A step's stats record and
checkpoints are written whole or not at all (a signal meanwhile waits for them). If
rollouts keep failing, `prepare_batch` raises `RolloutFailureError` (workflows/controller/failures.py)
and the run ends without saving anything, so the last recover checkpoint stays as it was.

With `WORLD_SIZE > 1` (see `areal launch`) every rank runs this loop on its shard of each
global batch; gradients are all-reduced and only rank 0 writes files. Every rank reads the
same recover checkpoint, so `run_dir` must be on storage that all ranks see.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import datasets
import torch
import torch.distributed as dist
import transformers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engines.advantages import gae_advantages, sequence_advantages
from engines.distributed import DistributedContext, init_distributed, shutdown_distributed
from engines.ppo import overlong_penalty
from workflows.config import ExperimentConfig
from workflows.control_plane.rollouts import WorkerLauncher
from workflows.controller.failures import RolloutFailureError
from workflows.metrics.stats import peak_rss_gb
from workflows.rollout.batch import staleness_stats
from workflows.rollout.multiturn import EPISODE_KEYS, episode_stats
from workflows.training.anchors import logprob_agreement, recompute_logprobs  # noqa: F401 - re-exported
from workflows.training.checkpoint_files import save_checkpoint
from workflows.training.evaluation import run_evaluation, stats_of, write_report
from workflows.training.recover import RecoverInfo, inject_fault_after, load_rng_state, save_recover_checkpoint
from workflows.training.run import Run, build_run, close_run, find_resume_point, last_recover_step, restore_or_reset
from workflows.training.shutdown import RunInterrupted, deferred_stop, stop_on_signals

logger = logging.getLogger(__name__)


def compute_advantages(
    batch: dict[str, torch.Tensor], cfg: ExperimentConfig, dist_ctx: Optional[DistributedContext] = None
) -> torch.Tensor:
    """[B, L] float32 advantages: rewards plus DAPO's overlong penalty (when
    `actor.overlong_buffer_tokens` > 0), shifted by `reward_bias` and scaled by
    `reward_scaling`, turned into one advantage per sequence by `actor.adv_estimator`
    (engines/advantages.py, `sequence_advantages`), broadcast over each sequence's
    completion tokens. reinforce_plus_plus normalises over the global batch: with
    several replicas (`dist_ctx`) every rank's rewards are gathered for its statistics.
    gae gives one advantage per token from the critic's `batch["values"]` ([B, L])."""
    actor = cfg.actor
    rewards = batch["rewards"].float()
    if actor.overlong_buffer_tokens > 0:
        rewards = rewards + overlong_penalty(batch["loss_mask"].sum(dim=1), max_new_tokens=cfg.gconfig.max_new_tokens,
                                             buffer_tokens=actor.overlong_buffer_tokens, factor=actor.overlong_penalty)
    rewards = (rewards + actor.reward_bias) * actor.reward_scaling
    if actor.adv_estimator == "gae":
        return gae_advantages(rewards, batch["values"], batch["loss_mask"], gamma=actor.gae_gamma, lam=actor.gae_lambda)[0]
    batch_rewards = None
    if actor.adv_estimator == "reinforce_plus_plus" and dist_ctx is not None and dist_ctx.world_size > 1:
        gathered: list = [None] * dist_ctx.world_size
        dist.all_gather_object(gathered, rewards.tolist())
        batch_rewards = torch.tensor([r for part in gathered for r in part], dtype=torch.float32)
    adv = sequence_advantages(rewards, estimator=actor.adv_estimator, group_size=cfg.gconfig.n_samples,
                              group_reward_norm=actor.group_reward_norm, std_norm=actor.group_adv_std_norm,
                              batch_rewards=batch_rewards)
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
    `rewards` and `lengths` (completion tokens) float32 [B], `signal` bool [B] (a non-zero
    advantage on some trained token, once `advantages` are in the batch), `epoch` and
    `prompt_id` long [B]."""
    columns = {
        "rewards": batch["rewards"].float(),
        "lengths": batch["loss_mask"].sum(dim=1).float(),
        "signal": ((batch["advantages"] != 0) & batch["loss_mask"].bool()).any(dim=1)
        if "advantages" in batch
        else torch.zeros(len(batch["rewards"]), dtype=torch.bool),
        "epoch": batch["epoch"],
        "prompt_id": batch["prompt_id"],
        **{key: batch[key] for key in EPISODE_KEYS if key in batch},  # multi-turn episodes' own columns
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
    """Reward, accuracy and length statistics of `gather_sequences`' output, and
    `signal_share`: the share of prompt groups with a non-zero advantage, the groups that
    can teach the policy anything (in GRPO, those whose samples did not all score the
    same). A share falling towards 0 with the entropy is a policy that stopped exploring.
    Multi-turn batches add `episode_stats`' `solved_turn_<t>` shares and counts."""
    rewards, lengths = sequences["rewards"], sequences["lengths"]
    groups: dict[tuple[int, int], bool] = {}
    for key, signal in zip(zip(sequences["epoch"].tolist(), sequences["prompt_id"].tolist()), sequences["signal"].tolist()):
        groups[key] = groups.get(key, False) or signal
    return {
        "signal_share": sum(groups.values()) / max(len(groups), 1),
        "reward_mean": float(rewards.mean()),
        "accuracy": float((rewards >= 1.0).float().mean()),
        "response_length_mean": float(lengths.mean()),
        "response_length_max": int(lengths.max()),
        "num_sequences": int(rewards.numel()),
        **episode_stats(sequences),
    }


def evaluate_held_out(cfg: ExperimentConfig, run: Run, step: int, progress) -> dict:
    """Greedy pass@1 (and pass@k) on the held-out prompts with the weights of `step`,
    through the run's rollout controller; the report goes to `<run_dir>/eval/step_<step>.json`."""
    report = run_evaluation(run.executor, run.inference, run.scorer, run.tokenizer, run.eval_rows, cfg, progress=progress,
                            workflow=run.workflow)
    run.scorer.take_means()  # the held-out scores stay out of the next step's per-function means
    write_report(report, run.run_dir / "eval" / f"step_{step}.json")
    return stats_of(report)


def run_training(cfg: ExperimentConfig, worker_launcher: Optional[WorkerLauncher] = None) -> Path:
    """Train per `cfg`; returns the run directory (stats.jsonl, config.yaml, checkpoints/).

    `cfg` comes from `areal_cli.config.load_config`, which has checked every value
    (areal_cli/validation.py). `worker_launcher` starts the rollout workers of
    `deployment_mode=disaggregated` (`areal train` passes areal_cli/workers.py's).

    Raises:
        RunInterrupted: SIGINT or SIGTERM stopped the run (in the main thread, the
            previous handlers are restored afterwards); it carries the run directory and
            the last recover checkpoint's step (`resume_hint`).
        RolloutFailureError: `rollout.max_consecutive_rejections` rollouts in a row were
            rejected; nothing was saved on the way out.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # huggingface_hub's HTTP client logs every request at INFO.
    for name in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Our own progress bar and stats lines say what is happening; library bars would
    # interleave with them.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    run_dir = cfg.resolved_run_dir()

    def describe(signum: int) -> str:
        return _locate(RunInterrupted(signum), run_dir).resume_hint()

    with stop_on_signals(describe):
        try:
            dist_ctx = init_distributed(cfg.trainer.dist_timeout_s, cfg.trainer.heartbeat_timeout_s)
            try:
                return _train(cfg, dist_ctx, worker_launcher)
            except Exception as exc:
                # A collective that failed because a peer vanished: the heartbeat names
                # the lost rank in one line and ends the process, instead of a traceback.
                if dist_ctx.heartbeat is not None:
                    dist_ctx.heartbeat.await_verdict(exc)
                raise
            finally:
                with deferred_stop():
                    shutdown_distributed(dist_ctx)
        except RunInterrupted as exc:
            _locate(exc, run_dir)
            raise


def _locate(exc: RunInterrupted, run_dir: Path) -> RunInterrupted:
    """`exc` with the run directory and its last recover checkpoint's step filled in."""
    exc.run_dir, exc.recover_step = run_dir, last_recover_step(run_dir)
    return exc


def recover_due(cfg: ExperimentConfig, step: int, total_steps: int) -> bool:
    """Whether a recover checkpoint is written after `step`: every
    `trainer.recover_freq_steps` (None: `save_freq_steps`; 0: never) and at the last step."""
    freq = cfg.trainer.recover_freq_steps
    if freq is None:
        freq = cfg.trainer.save_freq_steps
    return step == total_steps or (freq > 0 and step % freq == 0)


def _train(cfg: ExperimentConfig, dist_ctx: DistributedContext, worker_launcher: Optional[WorkerLauncher]) -> Path:
    run = build_run(cfg, dist_ctx, worker_launcher)
    try:
        _train_loop(cfg, dist_ctx, run)
    finally:
        # Whole even when a signal arrives meanwhile: the rollout thread first (its
        # rollouts use the engine and the scorer), then the reward processes, then the
        # inference worker thread.
        with deferred_stop():
            close_run(run)
    return run.run_dir


def _train_loop(cfg: ExperimentConfig, dist_ctx: DistributedContext, run: Run) -> None:
    resume_from = find_resume_point(cfg, run.run_dir, dist_ctx, run.stats_logger.info)
    position = restore_or_reset(run, resume_from)
    engine, stats_logger, total_steps = run.engine, run.stats_logger, run.total_steps

    progress = Progress(
        TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stats_logger.console if dist_ctx.is_main else None, transient=True, disable=not dist_ctx.is_main,
    )
    run.rollouts.start(position.step)
    if resume_from is not None:
        # Last, after model construction and loading consumed randomness.
        load_rng_state(resume_from)
    final = run.checkpoints / f"step_{total_steps}"
    with progress:
        if run.eval_rows and position.step == 0:
            # The baseline every later evaluation is compared with, as a record of step 0.
            with deferred_stop():
                stats_logger.log({"step": 0, **evaluate_held_out(cfg, run, 0, progress)}, total_steps=total_steps)
                position.stats_records += 1
        task = progress.add_task("steps", total=total_steps, completed=position.step)
        for step in range(position.step + 1, total_steps + 1):
            try:
                record = train_step(cfg, step, run, dist_ctx)
            except RolloutFailureError as exc:
                # Nothing is saved on this path: the last recover checkpoint stays as it was.
                recovered = last_recover_step(run.run_dir)
                exc.context = f"the run stopped at step {step} of {total_steps} without saving; " + (
                    f"its last recover checkpoint (step {recovered}) is intact in {run.checkpoints / 'recover'}"
                    if recovered is not None
                    else "it has no recover checkpoint yet"
                )
                raise
            # With disaggregated rollouts the reward processes are the workers'; their logs count them.
            failed = run.scorer.stats.num_failed if run.scorer is not None else 0
            record["reward_failures"] = position.reward_failures + failed
            if run.scorer is not None and len(run.scorer.terms) > 1:
                # Each function's own mean beside the weighted sum (TRL's rewards/<name>).
                record.update({f"reward/{name}": mean for name, mean in run.scorer.take_means().items()})
            if run.eval_rows and step % cfg.trainer.eval_freq_steps == 0:
                record.update(evaluate_held_out(cfg, run, step, progress))
            # The step's record and checkpoints are written whole: a signal waits for them.
            with deferred_stop():
                duplicates = position.trained.update(zip(record["prompt_epochs"], record["prompt_ids"]))
                if duplicates:
                    logger.error("step %d trained (epoch, prompt id) pairs already trained: %s", step, duplicates)
                stats_logger.log(record, total_steps=total_steps)
                position.stats_records += 1
                inject_fault_after(step)
                save_due = cfg.trainer.save_freq_steps > 0 and step % cfg.trainer.save_freq_steps == 0
                # A sharded policy is gathered (save) or written (recover) by every rank.
                writes = dist_ctx.is_main or engine.sharded
                if save_due and step < total_steps and writes:
                    save_checkpoint(engine, run.checkpoints / f"step_{step}", run.tokenizer)
                if recover_due(cfg, step, total_steps) and writes:
                    info = RecoverInfo(
                        step=step,
                        total_steps=total_steps,
                        stats_records=position.stats_records,
                        data_position=position.trained.state_dict(),
                        num_prompts=run.num_prompts,
                        world_size=dist_ctx.world_size,
                        reward_failures=record["reward_failures"],
                        store_acked=run.control.cursor(),
                    )
                    save_recover_checkpoint(run.checkpoints, engine, info, critic=run.critic)
            progress.advance(task)
    if position.step >= total_steps:
        stats_logger.info(f"the recover checkpoint is at step {position.step} >= trainer.total_steps={total_steps}; nothing to train")
    with deferred_stop():
        if (dist_ctx.is_main or engine.sharded) and (position.step < total_steps or not final.exists()):
            save_checkpoint(engine, final, run.tokenizer)
    stats_logger.info(f"done: {total_steps} steps; checkpoint {final}; stats {stats_logger.path}")


def train_step(cfg: ExperimentConfig, step: int, run: Run, dist_ctx: DistributedContext) -> dict:
    """One GRPO step at policy version `step - 1`; returns its stats record."""
    engine, rollouts = run.engine, run.rollouts
    start = time.perf_counter()
    batch, info = rollouts.next_batch()
    batch = sort_by_prompt(batch)
    wait_seconds = time.perf_counter() - start
    gen_tokens = info["gen_tokens"]
    version = engine.get_version()
    staleness = staleness_stats(batch["versions"], batch["loss_mask"], version)
    if run.critic is not None:
        batch["values"] = run.critic.compute_values(batch)
    batch["advantages"] = compute_advantages(batch, cfg, dist_ctx)
    if run.critic is not None:
        batch["returns"] = (batch["advantages"] + batch["values"]) * batch["loss_mask"]
    if cfg.actor.kl_ctl > 0:
        batch["ref_logp"] = engine.compute_ref_logp(batch)
    extra = recompute_logprobs(batch, cfg, engine, version)
    train_start = time.perf_counter()
    train = engine.train_batch(batch)
    if run.critic is not None:
        extra.update(asdict(run.critic.train_batch(batch)))
    train_seconds = time.perf_counter() - train_start
    # The optimizer boundary: the durable modes acknowledge the batch's samples here.
    run.control.acknowledge(step)

    update_start = time.perf_counter()
    extra.update(rollouts.update_weights(engine, step, batch))
    update_seconds = time.perf_counter() - update_start

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
        **rollouts.stats(),
        "gen_tokens": gen_tokens,
        "gen_tokens_per_s": gen_tokens / max(elapsed, 1e-9),
        "train_tokens": int(batch["attention_mask"].sum()),
        "train_tokens_per_s": int(batch["attention_mask"].sum()) / max(train_seconds, 1e-9),
        "rollout_wait_s": wait_seconds,
        "train_time_s": train_seconds,
        "weight_update_s": update_seconds,
        "step_time_s": elapsed,
        "peak_rss_gb": peak_rss_gb(),
        **extra,
        "prompt_ids": [i for _, i in prompts],
        "prompt_epochs": [e for e, _ in prompts],
    }
