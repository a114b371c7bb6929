from __future__ import annotations

import json
import os
import signal
import sys
import time

from launchers import LocalProcessExecutor, ReplicaSpec, ReplicaState
from launchers.executor import load_handles
from tests.launchers.conftest import process_alive


def py(code: str) -> list[str]:
    return [sys.executable, "-c", "import os, sys, time, subprocess\n" + code]


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_sigkill_of_one_replica_fails_the_launch_and_leaves_nothing_behind(tmp_path):
    # Each replica starts a grandchild (like a dataloader worker) and records its pid.
    spec = ReplicaSpec(
        entrypoint=py(
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "open(f\"{os.environ['PIDS_DIR']}/child{os.environ['RANK']}\", 'w').write(str(child.pid))\n"
            "print(f\"rank {os.environ['RANK']} working\", flush=True)\n"
            "time.sleep(60)"
        ),
        env={"PIDS_DIR": str(tmp_path)},
    )
    executor = LocalProcessExecutor(tmp_path / "run", grace_period=2.0)
    handles = executor.launch_replicas(spec, 2)
    # The pid files are written, not created atomically: wait for their content.
    wait_for(lambda: all((tmp_path / f"child{r}").exists() and (tmp_path / f"child{r}").read_text().strip() for r in range(2)))
    wait_for(lambda: "working" in (tmp_path / "run" / "rank1.log").read_text())
    grandchildren = [int((tmp_path / f"child{r}").read_text()) for r in range(2)]

    start = time.monotonic()
    os.kill(handles[1].extras["pid"], signal.SIGKILL)
    results = executor.collect(handles, timeout=60)
    assert time.monotonic() - start < 10

    assert results[1].state is ReplicaState.FAILED
    assert results[1].exit_code == -signal.SIGKILL
    assert "SIGKILL" in results[1].error
    assert "rank 1 working" in results[1].error  # the tail of its log
    assert results[0].state is ReplicaState.CANCELLED
    for pid in [h.extras["pid"] for h in handles] + grandchildren:
        wait_for(lambda pid=pid: not process_alive(pid), timeout=5)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["state"] for r in saved] == ["cancelled", "failed"]


def test_timeout_marks_the_replica_failed(tmp_path):
    spec = ReplicaSpec(entrypoint=py("time.sleep(60)"), timeout=0.5)
    executor = LocalProcessExecutor(tmp_path, grace_period=1.0)
    handles = executor.launch_replicas(spec, 1)
    (result,) = executor.collect(handles, timeout=30)
    assert result.state is ReplicaState.FAILED
    assert "timed out after 0.5 s" in result.error
    assert not process_alive(handles[0].extras["pid"])


def test_cancel_escalates_to_sigkill_after_the_grace_period(tmp_path):
    spec = ReplicaSpec(
        entrypoint=py("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                      "time.sleep(60)")
    )
    executor = LocalProcessExecutor(tmp_path, grace_period=0.3)
    (handle,) = executor.launch_replicas(spec, 1)
    wait_for(lambda: "ready" in (tmp_path / "rank0.log").read_text())
    start = time.monotonic()
    executor.cancel(handle)
    assert 0.25 < time.monotonic() - start < 5
    assert executor.poll(handle).state is ReplicaState.CANCELLED
    assert not process_alive(handle.extras["pid"])


def test_rendezvous_env_and_handles_file(tmp_path):
    spec = ReplicaSpec(entrypoint=py("print(os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'])"))
    executor = LocalProcessExecutor(tmp_path)
    handles = executor.launch_replicas(spec, 2)
    executor.collect(handles, timeout=30)
    lines = {(tmp_path / f"rank{r}.log").read_text().strip() for r in range(2)}
    assert len(lines) == 1  # both ranks agree on the address
    addr, port = lines.pop().split()
    assert addr == "127.0.0.1" and 0 < int(port) < 65536
    saved, meta = load_handles(tmp_path)
    assert saved == handles and meta["backend"] == "local" and meta["world_size"] == 2


def test_missing_executable_raises_and_starts_nothing(tmp_path):
    executor = LocalProcessExecutor(tmp_path)
    try:
        executor.launch_replicas(ReplicaSpec(entrypoint=[str(tmp_path / "no-such-program")]), 2)
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("expected FileNotFoundError")
    assert not executor._procs or not any(p.poll() is None for p in executor._procs.values())
