"""LoRA adapters merged into the weights they adapt, without changing the model.

`merged_named_tensors` yields a model's state dict under the base model's names, each
matrix that peft adapted (engines/lora.py) as W + (alpha / rank) B @ A from peft's own
`get_delta_weight`, one tensor at a time. peft's `merge_adapter` would add the delta into
W in place, and subtracting it again afterwards does not give W back bit for bit, so the
trained model is never merged. For a model without adapters this is its state dict as is,
so `engines/weights.py` publishes every policy through it.
"""

from __future__ import annotations

import sys
from typing import Iterator

import torch
from torch import nn


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> peft LoRA layer for every adapted module of `model` (empty when peft was
    never imported: then no module can be one)."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def base_name(name: str) -> str:
    """The base model's name of a state-dict key of an adapted model
    (`...q_proj.base_layer.weight` -> `...q_proj.weight`)."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def merged_named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of `model`'s state dict as the base model would have it, adapters
    merged: for each adapted linear layer W + (alpha / rank) B @ A (peft's
    `get_delta_weight`, in W's dtype), every other tensor as it is (not copied). One
    merged matrix exists at a time unless the caller keeps them; `model` is not changed.
    For a model without adapters this is `model.state_dict().items()`.

    Raises:
        ValueError: an adapted layer is currently merged in place (its W already holds
            the delta), which this function would add twice.
    """
    layers = _lora_layers(model)
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name} has its adapter merged in place; unmerge it before reading merged weights")
    for key, tensor in model.state_dict(keep_vars=False).items():
        if ".lora_" in key:
            continue
        name = base_name(key)
        module, _, leaf = name.rpartition(".")
        layer = layers.get(module)
        if layer is not None and leaf == "weight":
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            yield name, tensor + delta.to(tensor.dtype)
        else:
            yield name, tensor


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`dict(merged_named_tensors(model))`: every merged matrix at once (for writers that
    take a whole state dict, such as safetensors' `save_file`)."""
    return dict(merged_named_tensors(model))
