"""Deployment modes through the real CLI: the placement changes the control plane only, so
the loss curve is bit-identical across local_colocated, dataflow_colocated and
disaggregated, every sample is committed and acknowledged exactly once, and a SIGKILL of
the trainer or of a rollout worker loses nothing and trains nothing twice."""

import json
import os
import random
import signal
import subprocess
import time

import pytest

from tests.cli.test_resume import command, num_records, resumed_from, train
from tests.cli.test_train_smoke import SIGNAL
from tests.conftest import REPO, cli_env
from workflows.control_plane.metadata import sample_id_of
from workflows.control_plane.modes import store_path
from workflows.control_plane.sqlite_store import SQLiteMetadataStore
from workflows.metrics.stats import read_stats

STEPS = 4
COMMON = [f"trainer.total_steps={STEPS}", "trainer.save_freq_steps=1", "actor.deterministic=true", *SIGNAL]
CURVE = ("loss", "grad_norm", "lr", "reward_mean", "prompt_ids", "prompt_epochs")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, gsm8k_dir):
    """The uninterrupted local_colocated run every other placement must reproduce."""
    run_dir = tmp_path_factory.mktemp("local_colocated")
    train(run_dir, gsm8k_dir, *COMMON)
    records = read_stats(run_dir / "stats.jsonl")
    assert all(r["loss"] != 0 for r in records)
    return records


def curve(records):
    return [{k: r[k] for k in CURVE} for r in records]


def worker_pids(run_dir):
    pids = []
    for handles in sorted((run_dir / "logs").glob("worker*/handles.json")):
        pids += [h["extras"]["pid"] for h in json.loads(handles.read_text())["handles"]]
    return pids


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (its parent has not reaped it yet).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids, seconds=20.0):
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def assert_trained_exactly_once(run_dir, records):
    """The store acknowledged each trained sample once, at the step that trained it."""
    store = SQLiteMetadataStore(store_path(run_dir))
    try:
        acked = store.acked_steps()
        expected = {sample_id_of(e, i): r["step"] for r in records for e, i in zip(r["prompt_epochs"], r["prompt_ids"])}
        assert acked == expected
        status = store.status()
        assert status.leased == 0 and status.expired == 0
        return store.refs(), status
    finally:
        store.close()


@pytest.mark.slow  # about 75 s on 2 cores: over the default suite's budget
def test_loss_curve_is_identical_across_deployment_modes(tmp_path, gsm8k_dir, reference):
    for mode, extra in (("dataflow_colocated", []), ("disaggregated", ["rollout.workers=2"])):
        run_dir = tmp_path / mode
        train(run_dir, gsm8k_dir, *COMMON, f"deployment_mode={mode}", *extra)
        records = read_stats(run_dir / "stats.jsonl")
        assert curve(records) == curve(reference), mode
        refs, status = assert_trained_exactly_once(run_dir, records)
        # Staleness 0: nothing is generated beyond what is trained.
        assert status.committed == status.acked == STEPS * 2 and status.duplicates == 0, (mode, status)
        if mode == "disaggregated":
            assert {r.worker for r in refs} == {0, 1}  # both workers generated their share
            assert all(os.path.exists(r.path) for r in refs)
            assert len(worker_pids(run_dir)) == 2 and wait_gone(worker_pids(run_dir), 5) == []


def start(run_dir, gsm8k_dir, *overrides):
    return subprocess.Popen(command(run_dir, gsm8k_dir, *overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=cli_env())


def wait_records(proc, run_dir, records, seconds=300, checkpoint=False):
    """Until stats.jsonl holds `records` records (and, with `checkpoint`, a recover checkpoint exists)."""
    deadline = time.monotonic() + seconds
    meta = run_dir / "checkpoints" / "recover" / "meta.json"
    while num_records(run_dir / "stats.jsonl") < records or (checkpoint and not meta.exists()):
        assert proc.poll() is None, f"the run ended (rc={proc.returncode}): {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


DISAGGREGATED = [*COMMON, "deployment_mode=disaggregated", "rollout.workers=1"]


@pytest.mark.slow
def test_sigkilled_trainer_of_a_disaggregated_run_resumes_exactly(tmp_path, gsm8k_dir, reference):
    kill_at = random.Random().randint(1, STEPS - 1)
    proc = start(tmp_path, gsm8k_dir, *DISAGGREGATED)
    try:
        wait_records(proc, tmp_path, kill_at, checkpoint=True)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # The workers notice their trainer is gone and exit: nothing is left behind.
    assert wait_gone(worker_pids(tmp_path)) == []

    result = train(tmp_path, gsm8k_dir, *DISAGGREGATED)
    assert 1 <= resumed_from(result.stdout) <= kill_at
    records = read_stats(tmp_path / "stats.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert curve(records) == curve(reference), f"killed after {kill_at} records"
    assert_trained_exactly_once(tmp_path, records)
    assert wait_gone(worker_pids(tmp_path), 5) == []


@pytest.mark.slow
def test_sigkilled_rollout_worker_is_restarted_and_nothing_is_lost(tmp_path, gsm8k_dir, reference):
    proc = start(tmp_path, gsm8k_dir, *DISAGGREGATED)
    try:
        wait_records(proc, tmp_path, 1)
        (victim,) = worker_pids(tmp_path)
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    records = read_stats(tmp_path / "stats.jsonl")
    assert max(r["worker_restarts"] for r in records) == 1
    assert curve(records) == curve(reference)
    assert_trained_exactly_once(tmp_path, records)
    assert len(worker_pids(tmp_path)) == 2 and wait_gone(worker_pids(tmp_path), 5) == []
