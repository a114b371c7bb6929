"""Stats loggers: one smoke run writes the console, stats.jsonl, TensorBoard event files and
an offline W&B run at once; each is read back and agrees with stats.jsonl."""

import json
import struct
import subprocess
from pathlib import Path

import pytest

from tests.cli.test_resume import command
from tests.cli.test_train_smoke import SIGNAL
from tests.conftest import REPO, cli_env
from workflows.metrics.stats import read_stats

WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log of 32 KiB blocks


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file (`run-<id>.wandb`), decoded with wandb's
    own protobuf schema: a 7-byte header, then records of (crc32, length, type) + body."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, bodies, partial = 7, [], b""
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer padding
            pos += left
            continue
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # a whole record
            bodies.append(body)
        elif kind in (2, 3):  # first / middle fragment
            partial = body if kind == 2 else partial + body
        elif kind == 4:  # last fragment
            bodies.append(partial + body)
    rows = []
    for body in bodies:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(body)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_every_backend_reads_back_what_the_run_logged(tmp_path, gsm8k_dir):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    secret = "wandb-secret-0123456789abcdef0123456789abcdef"
    env = {**cli_env(), "WANDB_API_KEY": secret, "WANDB_SILENT": "true"}
    result = subprocess.run(
        command(tmp_path, gsm8k_dir, "trainer.total_steps=3", *SIGNAL,
                "stats_logger.backends=[console,jsonl,tensorboard,wandb]", "stats_logger.wandb_project=areal-test"),
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = read_stats(tmp_path / "stats.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] != 0 for r in records)
    assert result.stdout.count("step ") >= 3  # the console line of each step

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("loss", "reward_mean", "step_time_s"):
        scalars = events.Scalars(key)
        assert [e.step for e in scalars] == [1, 2, 3]
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)  # float32 in TB

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert [row["_step"] for row in history] == [1, 2, 3]
    assert [row["loss"] for row in history] == [r["loss"] for r in records]
    assert [row["grad_norm"] for row in history] == [r["grad_norm"] for r in records]
    assert run_file.stem.removeprefix("run-") == (tmp_path / "wandb_run_id").read_text().strip()

    # The API key reaches wandb through the environment only: no file of the run holds it.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
