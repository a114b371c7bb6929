"""Trajectory files: how a disaggregated rollout worker hands a sample to the trainer.

One prompt group per safetensors file, `<run_dir>/samples/<sample_id>.safetensors`,
written to a temporary name and renamed into place (after an fsync), so the trainer
never reads half a file and a worker killed mid-write leaves only a `.tmp-*` file that
nothing references. The ref committed to the metadata store carries the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def write_sample(directory: Path, sample_id: str, trajectory: dict[str, torch.Tensor]) -> Path:
    """Write one trajectory (`{key: tensor}`, any shapes and dtypes) atomically; returns its path.

    Raises:
        OSError: the write failed; nothing is left under the final name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{sample_id}.safetensors"
    tmp = directory / f".tmp-{sample_id}-{os.getpid()}.safetensors"
    try:
        save_file({k: v.contiguous() for k, v in trajectory.items()}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def read_sample(path: str | Path) -> dict[str, torch.Tensor]:
    """The trajectory written by `write_sample`, bit for bit.

    Raises:
        FileNotFoundError: no such file; safetensors' error for a damaged one.
    """
    return load_file(str(path))
