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


def average_minibatches(records: list[TrainStats]) -> TrainStats:
    """One update's statistics from its minibatches' (`actor.ppo_n_minibatches` optimizer
    steps): means, except the last step's lr, the largest importance weight and the summed
    token count; the entropy is the mean over the minibatches that had one."""
    mean = lambda name: sum(getattr(r, name) for r in records) / len(records)  # noqa: E731
    return TrainStats(
        loss=mean("loss"),
        grad_norm=mean("grad_norm"),
        lr=records[-1].lr,
        entropy=nanmean([r.entropy for r in records]),
        clip_fraction=mean("clip_fraction"),
        dual_clip_fraction=mean("dual_clip_fraction"),
        importance_weight_mean=mean("importance_weight_mean"),
        importance_weight_max=max(r.importance_weight_max for r in records),
        masked_fraction=mean("masked_fraction"),
        kl=mean("kl"),
        num_loss_tokens=sum(r.num_loss_tokens for r in records),
    )
