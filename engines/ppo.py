"""The GRPO/PPO objective as pure tensor functions.

Shapes: B sequences of L tokens. `loss_mask` [B, L] marks completion tokens that are
trained (1) versus prompt and padding (0). Logprobs are float32 and aligned with the
token they score: `logprobs[:, t]` is log p(input_ids[:, t] | input_ids[:, :t]), 0 at
position 0 and wherever `loss_mask` is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engines.config import KL_ESTIMATORS


def group_normalized_advantages(
    rewards: torch.Tensor, *, group_size: int, std_norm: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages: each reward minus the mean of its prompt's group, optionally
    divided by the group's standard deviation.

    From DeepSeekMath (Shao et al., 2024, arXiv 2402.03300), section 4.1.2 (outcome
    supervision). `std_norm=False` is the Dr. GRPO variant (Liu et al., 2025, arXiv
    2503.20783), which removes the per-group difficulty weighting.

    Args:
        rewards: [B] float, groups of `group_size` consecutive samples of one prompt.
    Returns:
        [B] float32 advantages, one per sequence.
    Raises:
        ValueError: B is not a multiple of `group_size`.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if std_norm:
        # Unbiased std is undefined for a group of one; such a group has advantage 0.
        std = grouped.std(dim=1, keepdim=True, unbiased=group_size > 1) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centered = centered / (std + eps)
    return centered.view(-1)


def overlong_penalty(lengths: torch.Tensor, *, max_new_tokens: int, buffer_tokens: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al., 2025, arXiv 2503.14476, eq. 13), a
    reward term per completion: 0 up to `max_new_tokens - buffer_tokens` tokens, then
    falling linearly to `-factor` at `max_new_tokens` (and below that for longer ones).

    Args:
        lengths: [B] completion lengths in tokens.
    Returns:
        [B] float32, <= 0.
    Raises:
        ValueError: `buffer_tokens` outside [1, max_new_tokens].
    """
    if not 1 <= buffer_tokens <= max_new_tokens:
        raise ValueError(f"overlong buffer must be in [1, {max_new_tokens}] tokens, got {buffer_tokens}")
    excess = lengths.float() - (max_new_tokens - buffer_tokens)
    return -factor * (excess.clamp(min=0) / buffer_tokens)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    With log-ratio r = logprobs - ref_logprobs (Schulman, "Approximating KL Divergence",
    2020): k1 = r (unbiased, high variance), k2 = r^2 / 2 (biased, low variance),
    k3 = (exp(-r) - 1) + r (unbiased, low variance, always >= 0).

    Args:
        logprobs, ref_logprobs: [B, L] float32.
    Returns:
        [B, L] float32.
    Raises:
        ValueError: unknown estimator.
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"actor.kl_estimator={estimator!r} is not supported; valid: {', '.join(KL_ESTIMATORS)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, denominator: Optional[float] = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1, divided by `denominator` (default: mask count)."""
    total = (values * mask).sum()
    count = mask.sum() if denominator is None else torch.tensor(denominator, dtype=values.dtype)
    return total / count.clamp(min=1)


@dataclass
class PPOLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: torch.Tensor  # scalar: share of trained tokens whose ratio was clipped
    importance_weight_mean: torch.Tensor  # scalar: mean behaviour importance weight
    importance_weight_max: torch.Tensor
    masked_fraction: torch.Tensor  # scalar: share of tokens dropped by the weight cap


def ppo_clipped_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    eps_clip: float,
    num_loss_tokens: Optional[float] = None,
    proximal_logprobs: Optional[torch.Tensor] = None,
    behav_imp_weight_cap: Optional[float] = None,
) -> PPOLossOutput:
    """PPO's clipped surrogate (Schulman et al., 2017, arXiv 1707.06347), negated so that
    it is minimised, averaged over tokens ("token-level" normalisation from DAPO, Yu et
    al., 2025, arXiv 2503.14476: long answers are not down-weighted per token).

    Without `proximal_logprobs` the ratio is exp(logprobs - old_logprobs). With them,
    this is AReaL's decoupled objective (Fu et al., 2025, arXiv 2505.24298, section 5):
    the trust region is anchored at the proximal policy, ratio = exp(logprobs -
    proximal_logprobs), and each token is weighted by the behaviour importance weight
    exp(proximal_logprobs - old_logprobs); tokens whose weight exceeds
    `behav_imp_weight_cap` are masked out.

    Args:
        logprobs: [B, L] float32, current policy, differentiable.
        old_logprobs: [B, L] float32, the behaviour policy that generated the tokens.
        advantages: [B, L] float32 (a sequence advantage broadcast over its tokens).
        loss_mask: [B, L] 0/1.
        num_loss_tokens: divide by this instead of `loss_mask.sum()`, so micro-batches of
            one batch add up to the batch's token mean.
    """
    mask = loss_mask.float()
    anchor = old_logprobs if proximal_logprobs is None else proximal_logprobs
    ratio = torch.exp(logprobs - anchor.detach())
    clipped_ratio = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip)
    surrogate = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio - clipped_ratio).abs() > 0).float()

    kept = mask
    if proximal_logprobs is None:
        weight = torch.ones_like(mask)
    else:
        weight = torch.exp(proximal_logprobs.detach() - old_logprobs.detach())
        if behav_imp_weight_cap is not None:
            kept = mask * (weight <= behav_imp_weight_cap).float()
    loss = -masked_mean(surrogate * weight, kept, num_loss_tokens)
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        masked_weights = torch.where(mask.bool(), weight, torch.zeros_like(weight))
        stats = dict(
            clip_fraction=(clipped * kept).sum() / count,
            importance_weight_mean=masked_weights.sum() / count,
            # The weights are positive and 0 off the mask, so the plain max is the masked
            # one (and 0 without trained tokens) with no host sync to ask `mask.any()`.
            importance_weight_max=masked_weights.amax() if masked_weights.numel() else weight.new_zeros(()),
            masked_fraction=(mask - kept).sum() / count,
        )
    return PPOLossOutput(loss=loss, **stats)
