"""Cutting a padded token batch into micro-batches that fit a token budget.

A micro-batch's cost is its padded size, rows x width, so rows of similar length are
grouped together and each group is cut to its own longest row (or padded to a fixed
width, `pad_to`, when every step must see the same shapes).
"""

from __future__ import annotations

import torch


def split_micro_batches(lengths: list[int], max_tokens: int, pad_to: int = 0) -> list[list[int]]:
    """Group sequence indices, in order, so that each group's padded size (number of
    sequences x longest length, or x `pad_to`) stays within `max_tokens`."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        width = pad_to or max(longest, n)
        if current and width * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, longest = [], 0
            width = pad_to or n
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def micro_batches(
    batch: dict[str, torch.Tensor], *, max_tokens: int, pad_to: int, device: torch.device
) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """(row indices, micro-batch) pairs within `max_tokens` (padded tokens), each
    micro-batch moved to `device`; 2-D tensors are cut to the micro-batch's longest
    sequence (by `attention_mask`), or padded to `pad_to` when it is non-zero."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    # Longest first, so each micro-batch holds sequences of similar length and pads
    # little. With `pad_to_maximum` every row has the same width anyway and the batch
    # order is kept (deterministic mode keeps its numerics).
    order = list(range(len(lengths))) if pad_to else sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups = split_micro_batches([lengths[i] for i in order], max_tokens, pad_to)
    groups = [[order[j] for j in group] for group in groups]
    out = []
    for idx in groups:
        width = pad_to or max(lengths[i] for i in idx)
        mb = {}
        for k, v in batch.items():
            v = v[idx]
            if v.dim() == 2:
                v = v[:, :width] if v.shape[1] >= width else torch.nn.functional.pad(v, (0, width - v.shape[1]))
            mb[k] = v.to(device, non_blocking=True)
        out.append((idx, mb))
    return out
