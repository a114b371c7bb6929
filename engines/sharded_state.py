"""Model and optimizer state of a sharded (FSDP2) policy: to and from
`torch.distributed.checkpoint` (DCP), and gathered whole for export.

DCP writes one file per rank plus a `.metadata` file that records each tensor's global
shape and where its pieces are; loading reads the pieces a rank's own shards need, so a
checkpoint written by N ranks loads on M (resharding; PyTorch's "Distributed
Checkpoint" docs). It works on unsharded models too (one file, no process group).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

DCP_METADATA = ".metadata"  # the file `dcp.save` writes last, on the coordinator rank


def save_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Write `{"model", "optim"}` state dicts with DCP under `path` (a directory every
    rank sees). A collective: every rank calls it, each writes its own shards.

    Raises:
        torch.distributed.checkpoint.api.CheckpointException: a rank failed to write
            (raised on every rank).
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))


def load_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load what `save_dcp` wrote, at this job's rank count (which may differ from the
    writer's), into `model` and `optimizer` in place. A collective when sharded.

    Raises:
        ValueError: the checkpoint holds other parameter names or shapes (another model).
    """
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"sharded checkpoint {path} does not fit this model or optimizer: {exc}") from exc
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0, in host memory (each parameter gathered in
    turn; the other ranks keep nothing and get `{}`). A collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a whole state dict (read by every rank, e.g. from safetensors) into the shards
    of `model`. A collective. Missing keys other than a tied LM head are an error.

    Raises:
        ValueError: keys missing or unexpected.
    """
    tied = "lm_head.weight" not in state and getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    options = StateDictOptions(full_state_dict=True, strict=not tied)
    try:
        set_model_state_dict(model, state, options=options)
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"the weights do not match the model: {exc}") from exc


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
