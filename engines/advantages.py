"""Advantage estimators beside GRPO's: a reward per sequence in, an advantage per sequence out.

Pure tensor functions, called by the trainer (`workflows/training/trainer.py`,
`compute_advantages`) through `sequence_advantages`, which picks one by
`actor.adv_estimator`; GRPO's own, `group_normalized_advantages`, is in engines/ppo.py.
Rewards arrive in groups of `group_size` consecutive samples of one prompt. A group
whose rewards are all equal gets advantage exactly 0 wherever the estimator's formula
gives 0, so the training engine can skip it (engines/train_engine.py,
`_rows_with_gradient`).
"""

from __future__ import annotations

from typing import Optional

import torch

from engines.config import ADV_ESTIMATORS
from engines.ppo import group_normalized_advantages


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.double().view(-1, group_size)


def rloo_advantages(rewards: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """RLOO advantages (Ahmadian et al., 2024, arXiv 2402.14740, eq. 6): each reward minus
    the mean reward of the other k - 1 samples of its prompt,
    A_i = r_i - 1/(k - 1) sum_{j != i} r_j  (= k/(k - 1) (r_i - mean_j r_j)).

    Args:
        rewards: [B] float, groups of `group_size` (k >= 2) consecutive samples of one prompt.
    Returns:
        [B] float32, exactly 0 for a group whose rewards are all equal.
    Raises:
        ValueError: B is not a multiple of `group_size`, or `group_size` < 2 (a sample
            alone has no others to compare with).
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs groups of at least 2 samples, got {group_size}")
    grouped = _grouped(rewards, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    uniform = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return (grouped - others).masked_fill(uniform, 0.0).view(-1).float()


def reinforce_plus_plus_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int,
    group_baseline: bool = True,
    batch_rewards: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """REINFORCE++ advantages (Hu, 2025, arXiv 2501.03262): global batch normalisation,
    A = (a - mean_batch(a)) / std_batch(a), of a = r - mean of the prompt's group
    (`group_baseline`, REINFORCE++-baseline) or of the reward itself. The statistics are
    over sequences (each sequence's tokens share its advantage), std the population one.

    With `group_baseline` the centred rewards' batch mean is 0 by construction, so only
    the std divides: a group whose rewards are all equal keeps advantage exactly 0
    (the training engine then skips it), rather than the rounding error of its mean.

    Args:
        rewards: [B] float, this replica's rewards, groups of `group_size` consecutive
            samples of one prompt.
        batch_rewards: [N] float, the rewards of the whole global batch (all replicas),
            whose statistics normalise; default `rewards`.
    Returns:
        [B] float32 (computed in float64); all 0 when the batch's advantages are all equal.
    Raises:
        ValueError: B or N is not a multiple of `group_size`.
    """

    def centred(r: torch.Tensor) -> torch.Tensor:
        grouped = _grouped(r, group_size)
        if not group_baseline:
            return grouped.view(-1)
        uniform = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
        return (grouped - grouped.mean(dim=1, keepdim=True)).masked_fill(uniform, 0.0).view(-1)

    local = centred(rewards)
    batch = local if batch_rewards is None else centred(batch_rewards)
    if bool((batch == batch[0]).all()):
        return torch.zeros_like(local, dtype=torch.float32)
    mean = 0.0 if group_baseline else batch.mean()
    return ((local - mean) / (batch.std(unbiased=False) + eps)).float()


def sequence_advantages(
    rewards: torch.Tensor,
    *,
    estimator: str,
    group_size: int,
    group_reward_norm: bool = True,
    std_norm: bool = True,
    batch_rewards: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[B] float32 advantages of [B] rewards by `actor.adv_estimator`: grpo
    (`group_normalized_advantages` when `group_reward_norm`, else the reward itself), rloo
    (`rloo_advantages`) or reinforce_plus_plus (`reinforce_plus_plus_advantages`, the group
    baseline when `group_reward_norm`, normalised over `batch_rewards`).

    Raises:
        ValueError: unknown estimator, gae (per token: `gae_advantages`), or what the
            estimator raises.
    """
    if estimator == "grpo":
        if not group_reward_norm:
            return rewards.float()  # REINFORCE with the constant baseline `reward_bias`
        return group_normalized_advantages(rewards, group_size=group_size, std_norm=std_norm)
    if estimator == "rloo":
        return rloo_advantages(rewards, group_size=group_size)
    if estimator == "reinforce_plus_plus":
        return reinforce_plus_plus_advantages(
            rewards, group_size=group_size, group_baseline=group_reward_norm, batch_rewards=batch_rewards
        )
    if estimator == "gae":
        raise ValueError("actor.adv_estimator=gae gives advantages per token, from a critic's values: use gae_advantages")
    raise ValueError(f"actor.adv_estimator={estimator!r} is not supported; valid: {', '.join(ADV_ESTIMATORS)}")


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, loss_mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016, arXiv 1506.02438, eq. 16)
    per token, with the sequence's reward at its last completion token:

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t)     (V after the last token: 0)
        A_t = sum_l (gamma lambda)^l delta_{t+l},      R_t = A_t + V(s_t)

    where r_t is the reward on the last trained token of a row and 0 before it.

    Args:
        rewards: [B] float, one (shaped) reward per sequence.
        values: [B, L] float32, V(s_t) aligned with the tokens (engines/critic.py).
        loss_mask: [B, L] 0/1, each row's completion as one contiguous run.
        gamma, lam: the discount and GAE's lambda, in [0, 1].
    Returns:
        (advantages [B, L] float32, returns [B, L] float32), 0 outside `loss_mask`.
    """
    mask = loss_mask.float()
    values = values.float() * mask
    B, L = mask.shape
    # The last trained position of each row holds its reward.
    last = (mask * torch.arange(1, L + 1, dtype=torch.float32)).argmax(dim=1)
    token_rewards = torch.zeros(B, L).scatter(1, last[:, None], rewards.float()[:, None]) * mask
    advantages = torch.zeros(B, L)
    running = torch.zeros(B)
    next_value = torch.zeros(B)
    for t in reversed(range(L)):
        # Outside the completion both carries are 0, so the run after a completion (padding)
        # contributes nothing and the prompt before it is masked out.
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = mask[:, t] * (delta + gamma * lam * running)
        next_value = values[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask
