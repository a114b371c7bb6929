"""Writing checkpoint directories so that a crash or a full disk never leaves a
half-written one in place, and listing their files' sizes and digests so that a reader
can tell whether they changed since.

A directory is assembled in a temporary sibling (`.<name>.tmp-<pid>`), every file is
fsynced, and then it replaces `<name>` by two renames (`<name>` -> `<name>.old`, tmp ->
`<name>`) before `<name>.old` is deleted: a crash at any point leaves `<name>` or
`<name>.old` complete. With a sharded policy every rank calls `save_checkpoint` (the
weights are gathered on rank 0, which alone writes). Recover checkpoints (workflows/training/recover.py) and step
checkpoints are both written this way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from engines.sharded_state import is_main

_HASH_BLOCK = 8 << 20  # bytes read at a time while hashing


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, I/O error); the message names the path.
    Nothing of the failed write is left, and the previous checkpoint is untouched."""


# -- atomic directories -------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it in for `final` on success.

    Yields the temporary directory to fill. On normal exit its files are fsynced, an
    existing `final` is renamed to `<final>.old`, the new one is renamed to `final`, and
    `<final>.old` is deleted; on an exception the temporary directory is deleted and
    `final` is untouched. Readers must fall back to `<final>.old` when `final` is missing
    (a crash between the two renames); `find_recover_checkpoint` does.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    old = final.parent / f"{final.name}.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def remove_stale_temporaries(checkpoints_dir: Path) -> None:
    """Delete the `.<name>.tmp-*` directories of `atomic_directory` writes that a crash
    interrupted (recover and step checkpoints alike)."""
    for path in Path(checkpoints_dir).glob(".*.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def write_atomically(final: Path, write, *, what: str) -> None:
    """`write(tmp)` inside `atomic_directory(final)`, with an I/O failure reported as
    `CheckpointWriteError` naming `final` (the previous `final`, if any, stays intact).
    torch's writer reports the OS error of a short write as a RuntimeError, safetensors'
    as a SafetensorError; both count as I/O failures."""
    try:
        with atomic_directory(final) as tmp:
            write(tmp)
    except (OSError, RuntimeError, SafetensorError) as exc:
        kept = " (the previous one is intact)" if Path(final).exists() else ""
        raise CheckpointWriteError(f"writing the {what} {final} failed{kept}: {exc}") from exc


def save_checkpoint(engine, path: Path, tokenizer=None) -> Path:
    """`engine.save(path, tokenizer)` (a Hugging Face model directory), atomically: a full
    disk leaves no half-written `path` that `areal eval` or a user would load.

    Raises:
        CheckpointWriteError: the write failed; the message names `path`.
    """
    if getattr(engine, "sharded", False) and not is_main():
        engine.save(path, tokenizer)  # joins rank 0's gather of the shards; writes nothing
        return Path(path)
    write_atomically(Path(path), lambda tmp: engine.save(tmp, tokenizer), what="checkpoint")
    return Path(path)


# -- manifests ----------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of the file at `path`, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(root: Path) -> dict[str, list]:
    """{path relative to `root`: [size in bytes, SHA-256 hex]} of every file under `root`."""
    root = Path(root)
    return {str(p.relative_to(root)): [p.stat().st_size, file_sha256(p)] for p in sorted(root.rglob("*")) if p.is_file()}
