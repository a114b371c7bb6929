"""Factories that build the training engine's parts from config.

The training engine is assembled only through these functions, so each decision (which
optimizer, which schedule, which layers are checkpointed, what "deterministic" means)
lives in exactly one place and is unit-tested on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from engines.config import DEVICES, LR_SCHEDULERS, MIXED_PRECISION, OPTIMIZERS, ActorConfig, OptimizerConfig


def create_optimizer(params: Iterable[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Build the optimizer named by `cfg.type`.

    Raises:
        ValueError: `cfg.type` is not one of `OPTIMIZERS`.
    """
    kind = cfg.type.lower()
    if kind == "adamw":
        # The fused kernel (CPU and CUDA) updates each tensor in one pass; the default
        # multi-tensor path allocates temporaries the size of all parameters (the model
        # in float32 once more at peak) and is slower on CPU.
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True
        )
    if kind == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"actor.optimizer.type={cfg.type!r} is not supported; valid types: {', '.join(OPTIMIZERS)}")


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float) -> float:
    """The factor applied to the base learning rate at optimizer step `step` (0-based).

    Linear warm-up from 0 over `warmup_steps`, then constant, linear decay or half-cosine
    decay (Loshchilov & Hutter, SGDR, 2017) down to the floor `min_lr_ratio` at
    `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        shape = 1.0 - progress
    elif kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise _unknown_scheduler(kind)
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def _unknown_scheduler(kind: str) -> ValueError:
    return ValueError(
        f"actor.optimizer.lr_scheduler_type={kind!r} is not supported; valid types: {', '.join(LR_SCHEDULERS)}"
    )


def create_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, *, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `lr_multiplier`; `total_steps` counts optimizer steps.

    Raises:
        ValueError: unknown `cfg.lr_scheduler_type`, or a `min_lr_ratio` outside [0, 1].
    """
    if cfg.lr_scheduler_type not in LR_SCHEDULERS:
        raise _unknown_scheduler(cfg.lr_scheduler_type)
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"actor.optimizer.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    warmup_steps = int(cfg.warmup_steps_proportion * total_steps)

    def factor(step: int) -> float:
        return lr_multiplier(
            step,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            kind=cfg.lr_scheduler_type,
            min_lr_ratio=cfg.min_lr_ratio,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_ac_config(model: nn.Module, enabled: bool) -> list[nn.Module]:
    """Turn on activation checkpointing for every decoder layer of a transformers model.

    Uses transformers' own `activation_checkpointing_enable` (non-reentrant
    `torch.utils.checkpoint`), which recomputes each decoder layer's activations in the
    backward pass. Returns the checkpointed layers (empty when disabled).

    Raises:
        ValueError: `enabled` but the model does not support gradient checkpointing.
    """
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not enabled:
        return []
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"actor.gradient_checkpointing=true but {type(model).__name__} does not support it; set it to false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # The KV cache is useless while training and incompatible with recomputation.
    model.config.use_cache = False
    return layers


def native_bf16() -> bool:
    """Whether this machine computes bfloat16 matmuls natively: a CUDA device with bf16,
    or a CPU with AVX512-BF16 or AMX tiles (oneDNN's bf16 kernels). Elsewhere bf16 is
    emulated and slower than float32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_mixed_precision(mode: str) -> Optional[torch.dtype]:
    """The autocast dtype for `actor.mixed_precision` (None: compute in the weights' dtype).

    Raises:
        ValueError: `mode` is not one of `MIXED_PRECISION`.
    """
    if mode not in MIXED_PRECISION:
        raise ValueError(f"actor.mixed_precision={mode!r} is not supported; use one of {', '.join(MIXED_PRECISION)}")
    if mode == "bf16" or (mode == "auto" and native_bf16()):
        return torch.bfloat16
    return None


def resolve_device(name: str) -> torch.device:
    """The device of `model.device`: `cuda:<LOCAL_RANK>` for cuda (and for auto where CUDA
    is visible), else the CPU.

    Raises:
        ValueError: `name` is not one of `DEVICES`, or it is cuda and no GPU is visible.
    """
    if name not in DEVICES:
        raise ValueError(f"model.device={name!r} is not supported; use one of {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("model.device=cuda but this process sees no CUDA device; set model.device=cpu or auto")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def autocast(dtype: Optional[torch.dtype], device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """`torch.autocast` to `dtype` for tensors on `device`, or nothing when None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def setup_cpu_threads() -> int:
    """Give torch's intra-op pool every CPU this process may use, shared among the
    replicas on this machine (`LOCAL_WORLD_SIZE`, set by `areal launch`), so two local
    replicas do not each start a thread per core. An explicit `OMP_NUM_THREADS` wins.
    Returns the number of threads in use."""
    if "OMP_NUM_THREADS" not in os.environ:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
    return torch.get_num_threads()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def setup_malloc(mmap_threshold: int = 1 << 20, trim_threshold: int = 32 << 20) -> bool:
    """Serve every allocation of `mmap_threshold` bytes or more with its own mmap, so a
    freed tensor goes back to the kernel at once.

    glibc otherwise raises its mmap threshold up to 32 MB as large blocks are freed, after
    which the activations, KV caches and logits of each step come from the heap, where
    freed holes of varying sizes keep the process's RSS at its high-water mark and
    beyond: the GRPO step on SmolLM2-135M peaked 1.2 GB higher without this
    (docs/benchmarks.md). No-op (returns False) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False


def setup_deterministic_mode(seed: int, enabled: bool) -> None:
    """Seed every RNG (python, numpy, torch CPU and CUDA); with `enabled`, also make
    kernels deterministic.

    `CUBLAS_WORKSPACE_CONFIG` must be set before cuBLAS initialises for deterministic
    matmuls on CUDA (PyTorch reproducibility notes); on CPU it is harmless.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too when present
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def validate_and_force_pad_to_maximum(cfg: ActorConfig, *, max_sequence_tokens: int) -> int:
    """Check the micro-batch budget and return the length every sequence is padded to.

    A micro-batch holds whole sequences of at most `max_sequence_tokens` tokens (prompt
    + completion), so `max_tokens_per_mb` must be at least that. With `pad_to_maximum`,
    every sequence is right-padded to `max_sequence_tokens`, so tensor shapes are the
    same at every step; deterministic mode forces it on so that a run's numerics never
    depend on how long the sampled completions happened to be.

    Returns:
        The padded sequence length in tokens, or 0 for "pad to the longest sequence".

    Raises:
        ValueError: `max_tokens_per_mb` is smaller than one sequence.
    """
    if cfg.max_tokens_per_mb < max_sequence_tokens:
        raise ValueError(
            f"actor.max_tokens_per_mb={cfg.max_tokens_per_mb} cannot hold one sequence of up to "
            f"{max_sequence_tokens} tokens (dataset.max_prompt_length + gconfig.max_new_tokens); raise it"
        )
    if cfg.deterministic:
        cfg.pad_to_maximum = True
    return max_sequence_tokens if cfg.pad_to_maximum else 0
