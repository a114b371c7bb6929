"""The logprobs a PPO step is anchored at: the sampler's, or the trainer's own, recomputed.

The clipped surrogate's ratio is pi_train / pi_old per token. With `pi_old` the sampler's
logprobs, the ratio of a token sampled by the current weights starts at 1 only if the
sampler and the trainer compute alike. They do not when the trainer autocasts to bf16
(`actor.mixed_precision`) and the sampler computes in float32 (or a server in another
dtype): SmolLM2-135M's first ratios were 0.013 nats per token off on average and up to
0.06 (a 32-token run of benchmarks/first_ratio.py, docs/benchmarks.md), none of them 1.
Decoding under the same autocast does not remove it (0.018 nats: the sampler's decode
shapes and its bf16 LM head differ from the trainer's), truncated importance sampling
(`actor.tis_cap`, Yao et al., 2025) corrects the loss's weight but needs the trainer's
logprobs as the anchor anyway, and recomputing the anchor with the trainer's own forward
pass makes the first ratio exactly 1 for one no-grad forward (about 15% of a training
forward + backward). So `actor.recompute_logprob=null` (the default) recomputes when the
precisions differ, and only for the tokens the current weights sampled: for an older
version's tokens the sampler's logprobs are the behaviour policy the correction needs.
"""

from __future__ import annotations

from typing import Optional

import torch

from workflows.config import ExperimentConfig


def sampler_dtype(cfg: ExperimentConfig) -> torch.dtype:
    """What the rollouts' sampler computes in: the weights' dtype (`model.dtype`) in
    process, `rollout.server_dtype` (null: `model.dtype`) on inference servers."""
    name = cfg.model.dtype if cfg.rollout.backend == "local" else (cfg.rollout.server_dtype or cfg.model.dtype)
    return getattr(torch, name)


def trainer_dtype(cfg: ExperimentConfig, autocast_dtype: Optional[torch.dtype]) -> torch.dtype:
    """What the trainer computes in: its autocast dtype (`TrainEngine.autocast_dtype`,
    resolved from `actor.mixed_precision`), else the weights' dtype."""
    return autocast_dtype if autocast_dtype is not None else getattr(torch, cfg.model.dtype)


def recompute_mode(cfg: ExperimentConfig, autocast_dtype: Optional[torch.dtype]) -> str:
    """`all` (actor.recompute_logprob=true), `fresh` (null, and the trainer's precision
    differs from the sampler's: the current version's tokens only) or `none`."""
    setting = cfg.actor.recompute_logprob
    if setting is not None:
        return "all" if setting else "none"
    return "fresh" if trainer_dtype(cfg, autocast_dtype) != sampler_dtype(cfg) else "none"


def logprob_agreement(batch: dict[str, torch.Tensor], recomputed: torch.Tensor, version: int) -> dict[str, float]:
    """Mean |sampler logprob - trainer logprob| (nats per token) over the trained tokens
    sampled by the current policy version, where the two should agree up to numerics
    (mixed precision, batch shapes); NaN when no token is that fresh."""
    fresh = batch["loss_mask"].bool() & (batch["versions"] == version)
    diff = (batch["logprobs"] - recomputed).abs()[fresh]
    return {"logprob_abs_diff_mean": float(diff.mean()) if diff.numel() else float("nan")}


def recompute_logprobs(batch: dict[str, torch.Tensor], cfg: ExperimentConfig, engine, version: int) -> dict:
    """The trainer's logprobs of the batch under the current weights
    (`engine.compute_logp`, [B, L] float32), put where the loss reads them, per
    `recompute_mode`:

    all: `prox_logp` for the decoupled loss, else `logprobs`, the PPO anchor (the
        sampler's then kept as `sampler_logp` for truncated importance sampling,
        `actor.tis_cap`);
    fresh: `logprobs` of the tokens whose `versions` is `version`, the rest left as the
        sampler gave them;
    none: nothing is computed.

    Returns `logprob_agreement`'s statistics ({} without recomputation)."""
    mode = recompute_mode(cfg, getattr(engine, "autocast_dtype", None))
    if mode == "none":
        return {}
    recomputed = engine.compute_logp(batch)
    extra = logprob_agreement(batch, recomputed, version)
    if mode == "fresh":
        batch["logprobs"] = torch.where(batch["versions"] == version, recomputed, batch["logprobs"])
        return extra
    if cfg.actor.use_decoupled_loss:
        batch["prox_logp"] = recomputed
        return extra
    if cfg.actor.tis_cap is not None:
        batch["sampler_logp"] = batch["logprobs"]
    batch["logprobs"] = recomputed
    return extra
