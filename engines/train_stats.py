"""The statistics of one policy update (`TrainEngine.train_batch`, engines/train_engine.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainStats:
    """One update's statistics. `loss` and `num_loss_tokens` cover the whole batch; the
    entropy, clip fractions and importance weights cover the tokens that carry a gradient
    (rows with a non-zero advantage, see `TrainEngine._rows_with_gradient`): the entropy
    is NaN and the rest 0 when none do.

    `entropy` is the policy's mean token entropy in nats, of the temperature-scaled
    distribution, from the training forward pass: when it falls towards 0 the samples of
    a group become identical and GRPO stops learning (entropy collapse)."""

    loss: float
    grad_norm: float
    lr: float
    entropy: float
    clip_fraction: float
    dual_clip_fraction: float
    importance_weight_mean: float
    importance_weight_max: float
    masked_fraction: float
    kl: float
    num_loss_tokens: int


def nanmean(values: list[float]) -> float:
    """Mean of the values that are not NaN; NaN when all are."""
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")
