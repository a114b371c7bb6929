"""Batches of trajectories: dicts of tensors sharing the leading (sequence) dimension."""

from __future__ import annotations

import torch


def concat_padded_tensors(items: list[dict[str, torch.Tensor]], pad_value: int = 0) -> dict[str, torch.Tensor]:
    """Concatenate trajectory dicts along dim 0, right-padding 2-D tensors along dim 1.

    Every dict must have the same keys. 2-D tensors ([n, L_i]) are padded to the largest
    L_i with `pad_value`, except `versions`, padded with -1 (no policy produced padding).
    1-D tensors ([n]) are concatenated as they are.

    Raises:
        ValueError: empty input or mismatched keys.
    """
    if not items:
        raise ValueError("no trajectories to concatenate")
    keys = set(items[0])
    if any(set(item) != keys for item in items):
        raise ValueError(f"trajectories have different keys: {[sorted(item) for item in items]}")
    width = max(v.shape[1] for item in items for v in item.values() if v.dim() == 2)
    out = {}
    for key in items[0]:
        parts = []
        for item in items:
            v = item[key]
            if v.dim() == 2 and v.shape[1] < width:
                fill = -1 if key == "versions" else pad_value
                v = torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill)
            parts.append(v)
        out[key] = torch.cat(parts, dim=0)
    return out
