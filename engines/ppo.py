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

from engines.config import IMPORTANCE_LEVELS, KL_ESTIMATORS, TIS_MODES


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
        [B] float32 advantages, one per sequence; exactly 0 for a group whose rewards
        are all equal.
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
    # A group whose rewards are all equal carries no signal. The float32 mean of equal
    # non-round values can differ from them in the last bit, and dividing that by a std
    # of ~0 + eps would make it a large advantage.
    uniform = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return centered.masked_fill(uniform, 0.0).view(-1)


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


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence log-ratio (Zheng et al., 2025, arXiv 2507.18071, eq. 7):
    log s_i = 1/|y_i| sum_t (log pi(y_it) - log pi_old(y_it)), the log of the geometric
    mean of the sequence's token ratios, broadcast over its tokens.

    Args:
        log_ratio: [B, L] float32 token log-ratios (differentiable).
        mask: [B, L] 0/1, the sequence's tokens.
    Returns:
        [B, L] float32, each row constant (0 for a row without tokens).
    """
    mask = mask.float()
    return ((log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)).expand_as(log_ratio)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, denominator: Optional[float] = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1, divided by `denominator` (default: mask count)."""
    total = (values * mask).sum()
    count = mask.sum() if denominator is None else torch.tensor(denominator, dtype=values.dtype)
    return total / count.clamp(min=1)


def truncated_importance_weights(
    train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, *, cap: float, mode: str = "truncate"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token correction of the sampler-trainer mismatch: truncated importance sampling
    (Yao et al., 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"). The sampler (its kernels, precision, batching) does not compute exactly
    the trainer's distribution, so tokens drawn from pi_sampler are reweighted by
    rho = pi_train_old(y_t) / pi_sampler(y_t), truncated to bound the variance:

        truncate: w_t = min(rho_t, C)
        mask:     w_t = rho_t where rho_t <= C, and the token is dropped where rho_t > C

    Args:
        train_logprobs: [B, L] float32, the trainer's logprobs of the sampled tokens
            under the weights that sampled them (`actor.recompute_logprob`).
        sampler_logprobs: [B, L] float32, the sampler's logprobs of the same tokens.
        cap: C (>= 1).
        mode: "truncate" or "mask".
    Returns:
        (w [B, L] float32 without gradient, keep [B, L] float32 0/1: 0 where `mask`
        dropped the token, else 1).
    Raises:
        ValueError: unknown mode.
    """
    if mode not in TIS_MODES:
        raise ValueError(f"actor.tis_mode={mode!r} is not supported; valid: {', '.join(TIS_MODES)}")
    rho = torch.exp(train_logprobs.detach().float() - sampler_logprobs.detach().float())
    if mode == "truncate":
        return rho.clamp(max=cap), torch.ones_like(rho)
    keep = (rho <= cap).float()
    return rho * keep, keep


@dataclass
class PPOLossOutput:
    """The loss and its token statistics; every field is a float32 scalar tensor."""

    loss: torch.Tensor  # differentiable
    clip_fraction: torch.Tensor  # share of kept tokens where the clipped branch was taken
    dual_clip_fraction: torch.Tensor  # share of kept tokens bounded by the dual clip
    importance_weight_mean: torch.Tensor  # mean importance weight (behaviour and/or TIS) over kept tokens
    importance_weight_max: torch.Tensor  # its max over kept tokens
    masked_fraction: torch.Tensor  # share of trained tokens dropped by a weight cap


def ppo_clipped_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    eps_clip: float,
    eps_clip_higher: Optional[float] = None,
    c_clip: Optional[float] = None,
    num_loss_tokens: Optional[float] = None,
    proximal_logprobs: Optional[torch.Tensor] = None,
    behav_imp_weight_cap: Optional[float] = None,
    sampler_logprobs: Optional[torch.Tensor] = None,
    tis_cap: Optional[float] = None,
    tis_mode: str = "truncate",
    importance_level: str = "token",
) -> PPOLossOutput:
    """PPO's clipped surrogate (Schulman et al., 2017, arXiv 1707.06347), negated so that
    it is minimised, averaged over tokens ("token-level" normalisation from DAPO, Yu et
    al., 2025, arXiv 2503.14476: long answers are not down-weighted per token).

    The ratio is clipped to [1 - eps_clip, 1 + eps_clip_higher] (`eps_clip_higher`
    defaults to `eps_clip`; DAPO's clip-higher raises it, 0.28 against 0.2, so that
    unlikely tokens with a positive advantage can gain probability and entropy does not
    collapse). `c_clip` > 1 is the dual clip (Ye et al., 2020, arXiv 1912.09729): a token
    with a negative advantage contributes at most c_clip * |advantage|, however large its
    ratio, which bounds the loss of stale samples the policy has moved away from.

    Without `proximal_logprobs` the ratio is exp(logprobs - old_logprobs). With them,
    this is AReaL's decoupled objective (Fu et al., 2025, arXiv 2505.24298, section 5):
    the trust region is anchored at the proximal policy, ratio = exp(logprobs -
    proximal_logprobs), and each token is weighted by the behaviour importance weight
    exp(proximal_logprobs - old_logprobs); tokens whose weight exceeds
    `behav_imp_weight_cap` are masked out (and left out of the statistics but
    `masked_fraction`).

    With `sampler_logprobs` and `tis_cap`, `old_logprobs` are the trainer's own and each
    token is also weighted by `truncated_importance_weights(old_logprobs,
    sampler_logprobs, cap=tis_cap, mode=tis_mode)` (tokens the mask mode drops are left
    out as the cap's are).

    `importance_level="sequence"` is GSPO (Zheng et al., 2025, arXiv 2507.18071): every
    token of a sequence takes the sequence's ratio (`sequence_log_ratio`), so the clip
    keeps or drops whole sequences; the loss stays a token mean, whose gradient per token
    is then s_i * A_i * grad log pi(y_it) / N, GSPO-token's.

    Args:
        logprobs: [B, L] float32, current policy, differentiable.
        old_logprobs: [B, L] float32, the behaviour policy that generated the tokens.
        advantages: [B, L] float32 (a sequence advantage broadcast over its tokens).
        loss_mask: [B, L] 0/1.
        num_loss_tokens: divide by this instead of `loss_mask.sum()`, so micro-batches of
            one batch add up to the batch's token mean.
    Raises:
        ValueError: unknown `importance_level` or `tis_mode`.
    """
    mask = loss_mask.float()
    anchor = old_logprobs if proximal_logprobs is None else proximal_logprobs
    log_ratio = logprobs - anchor.detach()
    if importance_level == "sequence":
        log_ratio = sequence_log_ratio(log_ratio, mask)
    elif importance_level != "token":
        raise ValueError(f"actor.importance_level={importance_level!r} is not supported; "
                         f"valid: {', '.join(IMPORTANCE_LEVELS)}")
    ratio = torch.exp(log_ratio)
    high = eps_clip if eps_clip_higher is None else eps_clip_higher
    unclipped = ratio * advantages
    clipped_branch = ratio.clamp(1.0 - eps_clip, 1.0 + high) * advantages
    surrogate = torch.minimum(unclipped, clipped_branch)
    dual_clipped = torch.zeros_like(mask, dtype=torch.bool)
    if c_clip is not None:
        floor = c_clip * advantages  # below the clipped surrogate only where advantage < 0
        dual_clipped = (advantages < 0) & (surrogate < floor)
        surrogate = torch.where(dual_clipped, floor, surrogate)

    kept = mask
    if proximal_logprobs is None:
        weight = torch.ones_like(mask)
    else:
        weight = torch.exp(proximal_logprobs.detach() - old_logprobs.detach())
        if behav_imp_weight_cap is not None:
            kept = mask * (weight <= behav_imp_weight_cap).float()
    if sampler_logprobs is not None and tis_cap is not None:
        tis_weight, tis_keep = truncated_importance_weights(old_logprobs, sampler_logprobs, cap=tis_cap, mode=tis_mode)
        weight, kept = weight * tis_weight, kept * tis_keep
    loss = -masked_mean(surrogate * weight, kept, num_loss_tokens)
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        kept_count = kept.sum().clamp(min=1)
        # The clipped branch is the one taken where it is strictly smaller; there the
        # token has no gradient.
        clipped = (clipped_branch < unclipped) & ~dual_clipped
        kept_weights = weight * kept
        stats = dict(
            clip_fraction=(clipped.float() * kept).sum() / kept_count,
            dual_clip_fraction=(dual_clipped.float() * kept).sum() / kept_count,
            importance_weight_mean=kept_weights.sum() / kept_count,
            # The weights are positive and 0 off the kept tokens, so the plain max is the
            # masked one (and 0 without kept tokens) with no host sync to ask `kept.any()`.
            importance_weight_max=kept_weights.amax() if kept_weights.numel() else weight.new_zeros(()),
            masked_fraction=(mask - kept).sum() / count,
        )
    return PPOLossOutput(loss=loss, **stats)
