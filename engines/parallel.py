"""How the policy is spread over data-parallel ranks (`actor.parallelism`).

* `ddp`: every rank holds the whole model, its gradients and its optimizer state
  (`DistributedDataParallel` all-reduces the gradients); about 16 bytes per parameter in
  float32 with AdamW, per rank.
* `fsdp2`: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`; Zhao et al., "PyTorch
  FSDP", VLDB 2023, and the per-parameter sharding of torchtitan): each decoder layer and
  the root are sharded, so a rank keeps 1/world_size of the parameters, gradients and
  AdamW state and all-gathers one layer's parameters at a time in the forward and
  backward passes. With bf16 mixed precision the gathered parameters are bf16 and the
  gradients are reduce-scattered in float32 (`MixedPrecisionPolicy`); `actor.cpu_offload`
  keeps the sharded parameters, gradients and optimizer state in host memory
  (`CPUOffloadPolicy`).

Everything here is applied from outside the model (transformers' classes are not
changed); `engines/train_engine.py` asks this module for the wrapping, for gradient
synchronisation and clipping, and for full tensors when weights leave the trainer.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel


def ensure_process_group(device: torch.device) -> None:
    """A one-rank process group for FSDP2 when the job runs in one process (FSDP2 needs a
    device mesh even at world size 1); gloo on the CPU, NCCL on a GPU. No-op when a group
    exists (`engines.distributed.init_distributed` made it)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers causal LM (classes named `*DecoderLayer`)."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def apply_fsdp2(
    model: nn.Module, *, param_dtype: Optional[torch.dtype], cpu_offload: bool, device: torch.device
) -> nn.Module:
    """Shard `model` in place with `fully_shard`, each decoder layer as one unit and the
    root (embeddings, final norm, LM head) as another, over every rank of the default
    process group.

    Args:
        param_dtype: the dtype the gathered parameters are computed in (bf16), with float32
            gradient reduction; None keeps the parameters' own dtype.
        cpu_offload: keep sharded parameters, gradients and optimizer state on the host.
    Returns:
        `model` itself (its class is now a subclass of `FSDPModule`; its parameters are
        `DTensor`s sharded on dim 0).
    Raises:
        ValueError: the model has no `*DecoderLayer` modules to shard.
    """
    ensure_process_group(device)
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"actor.parallelism=fsdp2: {type(model).__name__} has no *DecoderLayer modules to shard")
    kwargs: dict = {}
    if param_dtype is not None:
        # Every unit gets the policy: a layer without it would meet bf16 activations with
        # float32 weights.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    # The engine never changes a forward pass's output in place (the case this warning is
    # about); hidden states sliced for the LM head are views, and it would fire every step.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def wrap_data_parallel(
    model: nn.Module, *, parallelism: str, cpu_offload: bool, world_size: int, device: torch.device,
    param_dtype: Optional[torch.dtype],
) -> Optional[DistributedDataParallel]:
    """Apply `parallelism` to `model`; returns the DDP wrapper to run the forward pass
    through (None for one-process DDP, where nothing is wrapped, and for FSDP2, which
    shards `model` in place).

    Raises:
        ValueError: an unknown `parallelism`, or `cpu_offload` without fsdp2.
    """
    if parallelism == "fsdp2":
        apply_fsdp2(model, param_dtype=param_dtype, cpu_offload=cpu_offload, device=device)
        return None
    if parallelism != "ddp":
        raise ValueError(f"actor.parallelism={parallelism!r} is not supported; use ddp or fsdp2")
    if cpu_offload:
        raise ValueError("actor.cpu_offload=true needs actor.parallelism=fsdp2")
    if world_size <= 1:
        return None
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, ddp: Optional[DistributedDataParallel], last: bool):
    """A context for one micro-batch's backward pass: gradients are reduced across ranks
    on the `last` micro-batch of an optimizer step only (DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync`)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if ddp is None or last:
        return contextlib.nullcontext()
    return ddp.no_sync()


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """`clip_grad_norm_` over every parameter; returns the global norm before clipping
    (for sharded gradients, the norm over all ranks' shards together)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def pad_to_common_count(items: list, model: nn.Module) -> tuple[list, int]:
    """FSDP2 all-gathers parameters in every forward and backward pass, so every rank must
    run as many micro-batches as the rank with the most. Returns `items` extended by
    repeats of its first item, and the count of real ones (those after it are padding,
    whose loss is multiplied by 0). Unchanged without sharding."""
    if not isinstance(model, FSDPModule) or dist.get_world_size() == 1:
        return items, len(items)
    count = torch.tensor([len(items)])
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    if not items and int(count):
        raise RuntimeError("a rank has no micro-batch while others have some; FSDP2 needs one on every rank")
    return items + [items[0]] * (int(count) - len(items)), len(items)


def full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for each entry of `model.state_dict()`, one at a time.

    A sharded parameter is all-gathered (`DTensor.full_tensor`, a collective: every rank
    must iterate in the same order) just before it is yielded, so at most one whole
    tensor exists beside the shards; the caller drops it before taking the next. Plain
    tensors are yielded as they are.
    """
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            yield name, tensor.detach()
