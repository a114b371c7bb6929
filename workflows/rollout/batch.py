"""Batches of trajectories: dicts of tensors sharing the leading (sequence) dimension.

Per-token tensors are `[n, L]`, per-sample ones `[n]`. Also the staleness measures of a
batch: which policy versions produced its trained tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_rows(
    input_ids: Sequence[list[int]],
    loss_masks: Sequence[list[int]],
    logprobs: Sequence[list[float]],
    versions: Sequence[list[int]],
    rewards: Sequence[float],
    *,
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """Right-pad n rows into a `Trajectory`'s tensors (workflows/api.py; all but
    `prompt_id` and `epoch`, which the workflow adds): `input_ids`, `attention_mask`,
    `loss_mask`, `versions` as `[n, L]` int64, `logprobs` `[n, L]` float32 and `rewards`
    `[n]` float32, L the longest row. A row's four lists have one entry per token; its
    untrained tokens carry logprob 0 and version -1, as does the padding."""
    n, width = len(input_ids), max(len(ids) for ids in input_ids)
    out = {
        "input_ids": torch.full((n, width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(n, width, dtype=torch.long),
        "loss_mask": torch.zeros(n, width, dtype=torch.long),
        "logprobs": torch.zeros(n, width, dtype=torch.float32),
        "versions": torch.full((n, width), -1, dtype=torch.long),
        "rewards": torch.tensor(list(rewards), dtype=torch.float32),
    }
    for i, ids in enumerate(input_ids):
        length = len(ids)
        out["input_ids"][i, :length] = torch.tensor(ids)
        out["attention_mask"][i, :length] = 1
        out["loss_mask"][i, :length] = torch.tensor(loss_masks[i])
        out["logprobs"][i, :length] = torch.tensor(logprobs[i], dtype=torch.float32)
        out["versions"][i, :length] = torch.tensor(versions[i])
    return out


def concat_padded_tensors(items: Sequence[dict[str, torch.Tensor]], pad_value: float = 0) -> dict[str, torch.Tensor]:
    """Concatenate trajectory dicts along dim 0, right-padding 2-D tensors along dim 1.

    Every dict must have the same keys. 2-D tensors (`[n_i, L_i]`) are padded to the
    largest `L_i` over all keys and dicts with `pad_value`, except `versions`, padded
    with -1 (no policy produced padding). 1-D tensors (`[n_i]`) are concatenated as they
    are. Output shapes: `[sum n_i, max L_i]` and `[sum n_i]`.

    Raises:
        ValueError: empty input, mismatched keys, or a key mixing 1-D and 2-D tensors.
    """
    if not items:
        raise ValueError("no trajectories to concatenate")
    keys = set(items[0])
    if any(set(item) != keys for item in items):
        raise ValueError(f"trajectories have different keys: {[sorted(item) for item in items]}")
    # One width for every 2-D key, so input_ids, masks, logprobs and versions stay aligned.
    width = max((v.shape[1] for item in items for v in item.values() if v.dim() == 2), default=0)
    out = {}
    for key in items[0]:
        if len({item[key].dim() for item in items}) != 1:
            raise ValueError(f"key {key!r} mixes tensors of different dimensions")
        parts = []
        for item in items:
            v = item[key]
            if v.dim() == 2 and v.shape[1] < width:
                fill = -1 if key == "versions" else pad_value
                v = torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill)
            parts.append(v)
        out[key] = torch.cat(parts, dim=0)
    return out


def oldest_version(versions: torch.Tensor) -> int | None:
    """The oldest policy version among generated tokens (`versions >= 0`), or None if none.

    Args:
        versions: long tensor of any shape; -1 marks prompt tokens and padding.
    """
    generated = versions[versions >= 0]
    if generated.numel() == 0:
        return None
    return int(generated.min())


def staleness_stats(versions: torch.Tensor, loss_mask: torch.Tensor, current_version: int) -> dict[str, float]:
    """Version lag of trained samples: how many versions behind `current_version` each ran.

    A sample's lag is `current_version - min(version of its trained tokens)`, trained
    tokens being those with `loss_mask != 0` and `versions >= 0`; samples with no trained
    token are left out. The bound enforced by the rollout controller is
    `max_lag <= max_head_offpolicyness` (AReaL, arXiv 2505.24298, section 5.1).

    Args:
        versions: `[B, L]` long, the policy version that generated each token, -1 on
            prompt tokens.
        loss_mask: `[B, L]`, nonzero on tokens the loss trains.
        current_version: the trainer's version when the batch is trained.

    Returns:
        `{"max_lag": float, "mean_lag": float, "num_samples": float}`; zeros when no
        sample has a trained token.

    Raises:
        ValueError: if the shapes differ or are not 2-D.
    """
    if versions.dim() != 2 or versions.shape != loss_mask.shape:
        raise ValueError(f"versions {tuple(versions.shape)} and loss_mask {tuple(loss_mask.shape)} must be equal [B, L]")
    trained = (loss_mask != 0) & (versions >= 0)
    has_trained = trained.any(dim=1)
    if not bool(has_trained.any()):
        return {"max_lag": 0.0, "mean_lag": 0.0, "num_samples": 0.0}
    # Untrained positions get +inf-like versions so they never win the min.
    big = torch.iinfo(torch.long).max
    oldest = torch.where(trained, versions.long(), torch.full_like(versions, big, dtype=torch.long)).min(dim=1).values
    lag = (current_version - oldest[has_trained]).double()
    return {"max_lag": float(lag.max()), "mean_lag": float(lag.mean()), "num_samples": float(lag.numel())}
