"""Checkpoints under faults: a write that fails part-way (the file-size limit makes the
kernel refuse writes, as a full disk does) and a checkpoint damaged after it was written
(each file truncated or with a flipped byte, in turn)."""

import contextlib
import resource
import signal
from pathlib import Path

import pytest

from workflows.training.checkpoint_files import CheckpointWriteError, save_checkpoint
from workflows.training.recover import (
    META_FILE,
    CorruptCheckpointError,
    RecoverInfo,
    find_recover_checkpoint,
    load_recover_checkpoint,
    read_recover_info,
    save_recover_checkpoint,
)


@contextlib.contextmanager
def file_size_limit(max_bytes: int):
    """Writes past `max_bytes` in any file fail with EFBIG (RLIMIT_FSIZE; SIGXFSZ, which
    would kill the process, ignored): the kernel refusing a write, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.fixture
def engine(tiny_model):
    from tests.engines.test_train_engine import make_engine

    return make_engine(tiny_model)


def info(step: int) -> RecoverInfo:
    return RecoverInfo(step=step, total_steps=4, stats_records=step, data_position={}, num_prompts=1)


def leftovers(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir() if ".tmp-" in p.name or p.name.endswith(".old"))


def test_a_failed_recover_write_names_the_path_and_keeps_the_previous_one(tmp_path, engine):
    engine.set_version(1)
    save_recover_checkpoint(tmp_path, engine, info(1))
    engine.set_version(2)
    with file_size_limit(64 << 10), pytest.raises(CheckpointWriteError) as caught:
        save_recover_checkpoint(tmp_path, engine, info(2))
    message = str(caught.value)
    assert str(tmp_path / "recover") in message and "the previous one is intact" in message
    assert leftovers(tmp_path) == []  # nothing half-written that a resume could pick up
    found = find_recover_checkpoint(tmp_path)
    assert found == tmp_path / "recover" and read_recover_info(found).step == 1
    assert load_recover_checkpoint(found, engine, None).step == 1


def test_a_failed_model_checkpoint_leaves_no_directory(tmp_path, engine, tokenizer):
    with file_size_limit(64 << 10), pytest.raises(CheckpointWriteError, match="step_3"):
        save_checkpoint(engine, tmp_path / "step_3", tokenizer)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(tmp_path, engine):
    engine.set_version(1)
    path = save_recover_checkpoint(tmp_path, engine, info(1))
    return path, sorted(read_recover_info(path).files) + [META_FILE]


def test_the_manifest_lists_every_file(saved):
    path, names = saved
    on_disk = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert sorted(names) == on_disk


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_each_damaged_file_is_refused_by_name(saved, engine, damage):
    path, names = saved
    pristine = {name: (path / name).read_bytes() for name in names}
    for name in names:
        data = pristine[name]
        damaged = data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 0xFF])
        (path / name).write_bytes(damaged)
        with pytest.raises(CorruptCheckpointError) as caught:
            load_recover_checkpoint(find_recover_checkpoint(path.parent), engine, None)
        assert str(path) in str(caught.value)
        if name != META_FILE:
            assert name in str(caught.value)
        (path / name).write_bytes(data)
    assert load_recover_checkpoint(find_recover_checkpoint(path.parent), engine, None).step == 1


def test_a_damaged_latest_falls_back_to_a_complete_previous_one(saved, engine):
    import shutil

    path, _ = saved
    shutil.copytree(path, path.parent / "recover.old")
    (path / META_FILE).write_text("{")
    assert find_recover_checkpoint(path.parent) == path.parent / "recover.old"
