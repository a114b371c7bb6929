"""The training loop: from a resolved config to trained weights.

    areal train config=gsm8k_grpo dataset.path=../shared/data/gsm8k trainer.total_steps=3

Each step
  1. takes a batch of prompts and samples `gconfig.n_samples` completions per prompt
     with the inference engine, scoring each with the reward (workflows/rlvr.py);
  2. turns rewards into group-normalised advantages (GRPO);
  3. updates the policy with the clipped PPO objective (engines/train_engine.py);
  4. copies the new weights into the inference engine and bumps the policy version;
  5. logs one stats record, and saves a Hugging Face checkpoint when due.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import datasets
import torch
import transformers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from areal_cli.config import ExperimentConfig, to_yaml
from engines.factories import setup_deterministic_mode
from engines.inference import LocalInferenceEngine
from engines.model import load_model, load_tokenizer, resolve_model_dir
from engines.ppo import group_normalized_advantages
from engines.train_engine import TrainEngine
from workflows.batch import concat_padded_tensors
from workflows.dataset import PromptLoader, load_prompt_dataset
from workflows.reward import RewardScorer
from workflows.rlvr import RLVRWorkflow
from workflows.stats import StatsLogger

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


def rollout_synchronously(workflow: RLVRWorkflow, engine, rows: list[dict]) -> tuple[list[dict], int]:
    """Run one episode per prompt row concurrently; returns (trajectories, num_rejected).
    A failing episode is rejected and counted, never raised."""

    async def run_all():
        return await asyncio.gather(*(workflow.arun_episode(engine, row) for row in rows), return_exceptions=True)

    results = asyncio.run(run_all())
    accepted = [r for r in results if isinstance(r, dict)]
    for r in results:
        if isinstance(r, BaseException):
            logger.warning("rollout rejected: %r", r)
    return accepted, len(results) - len(accepted)


def batch_stats(batch: dict[str, torch.Tensor]) -> dict[str, float]:
    lengths = batch["loss_mask"].sum(dim=1).float()
    return {
        "reward_mean": float(batch["rewards"].mean()),
        "accuracy": float((batch["rewards"] >= 1.0).float().mean()),
        "response_length_mean": float(lengths.mean()),
        "response_length_max": int(lengths.max()),
        "num_sequences": int(batch["rewards"].numel()),
    }


def evaluate(workflow: RLVRWorkflow, engine, rows: list[dict]) -> dict[str, float]:
    """Accuracy of one sampled completion per held-out prompt."""
    trajectories, _ = rollout_synchronously(workflow, engine, rows)
    if not trajectories:
        return {"eval_accuracy": 0.0}
    rewards = torch.cat([t["rewards"][:1] for t in trajectories])
    return {"eval_accuracy": float((rewards >= 1.0).float().mean()), "eval_num_prompts": len(rows)}


def run_training(cfg: ExperimentConfig) -> Path:
    """Train per `cfg`; returns the run directory (stats.jsonl, config.yaml, checkpoints/)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Our own progress bar and stats lines say what is happening; library bars would
    # interleave with them.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    run_dir = cfg.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    stats_logger = StatsLogger(run_dir / cfg.stats_logger.file_name, print_every=cfg.stats_logger.print_every)
    setup_deterministic_mode(cfg.seed, cfg.actor.deterministic)

    # -- model, tokenizer, data ----------------------------------------------------------------
    model_dir = resolve_model_dir(cfg.model.path, Path(cfg.cache_dir) if cfg.cache_dir else None)
    tokenizer = load_tokenizer(model_dir)
    train_data = load_prompt_dataset(cfg.dataset, tokenizer)
    stats_logger.info(f"data: {train_data.report()}")
    loader = PromptLoader(train_data, batch_size=cfg.dataset.batch_size, shuffle=cfg.dataset.shuffle, seed=cfg.seed)
    total_steps = cfg.trainer.total_steps or cfg.trainer.total_epochs * loader.steps_per_epoch()
    eval_rows: list[dict] = []
    if cfg.trainer.eval_freq_steps > 0:
        eval_rows = load_prompt_dataset(cfg.dataset, tokenizer, split=cfg.dataset.eval_split).rows
        eval_rows = eval_rows[: cfg.dataset.max_eval_samples]

    policy = load_model(cfg.model, model_dir, seed=cfg.seed)
    # The sampler owns its own copy so that, once rollouts run concurrently with
    # training, generation never reads half-updated weights.
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
        ref_model=copy.deepcopy(policy) if cfg.actor.kl_ctl > 0 else None,
    )
    scorer = RewardScorer(num_workers=cfg.rollout.reward_workers, timeout=cfg.rollout.reward_timeout)
    sampling_seed = cfg.seed if cfg.actor.deterministic else None
    workflow = RLVRWorkflow(gconfig=cfg.gconfig, tokenizer=tokenizer, scorer=scorer, seed=sampling_seed)
    eval_workflow = RLVRWorkflow(gconfig=replace(cfg.gconfig, n_samples=1), tokenizer=tokenizer, scorer=scorer)

    # -- the loop -------------------------------------------------------------------------------
    batches = _forever(loader)
    progress = Progress(
        TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stats_logger.console, transient=True,
    )
    try:
        with progress:
            task = progress.add_task("steps", total=total_steps)
            for step in range(1, total_steps + 1):
                record = train_step(cfg, step, next(batches), workflow, inference, engine)
                record["reward_failures"] = scorer.stats.num_failed
                if eval_rows and step % cfg.trainer.eval_freq_steps == 0:
                    record.update(evaluate(eval_workflow, inference, eval_rows))
                stats_logger.log(record, total_steps=total_steps)
                if cfg.trainer.save_freq_steps > 0 and step % cfg.trainer.save_freq_steps == 0 and step < total_steps:
                    engine.save(run_dir / "checkpoints" / f"step_{step}", tokenizer)
                progress.advance(task)
        final = run_dir / "checkpoints" / f"step_{total_steps}"
        engine.save(final, tokenizer)
        stats_logger.info(f"done: {total_steps} steps; checkpoint {final}; stats {stats_logger.path}")
    finally:
        scorer.close()
        inference.destroy()
    return run_dir


def train_step(cfg: ExperimentConfig, step: int, rows: list[dict], workflow, inference, engine: TrainEngine) -> dict:
    """One synchronous GRPO step; returns its stats record."""
    start = time.perf_counter()
    tokens_before = inference.num_generated_tokens
    trajectories, num_rejected = rollout_synchronously(workflow, inference, rows)
    gen_seconds = time.perf_counter() - start
    if not trajectories:
        raise RuntimeError(f"step {step}: every rollout failed; see the warnings above")
    batch = concat_padded_tensors(trajectories)
    batch["advantages"] = compute_advantages(batch, cfg)
    if cfg.actor.kl_ctl > 0:
        batch["ref_logp"] = engine.compute_logp(batch, model=engine.ref_model)
    if cfg.actor.recompute_logprob or cfg.actor.use_decoupled_loss:
        batch["prox_logp"] = engine.compute_logp(batch)
    train = engine.train_batch(batch)
    engine.set_version(step)
    engine.upload_weights(inference)
    inference.set_version(step)
    return {
        "step": step,
        "version": step,
        **batch_stats(batch),
        **asdict(train),
        "rollouts_accepted": len(trajectories),
        "rollouts_rejected": num_rejected,
        "gen_tokens_per_s": (inference.num_generated_tokens - tokens_before) / max(gen_seconds, 1e-9),
        "gen_time_s": gen_seconds,
        "step_time_s": time.perf_counter() - start,
    }


def _forever(loader: PromptLoader):
    while True:
        yield from loader
