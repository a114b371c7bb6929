"""`areal launch --backend ray` on a real local Ray, CPU only, every socket on 127.0.0.1:
two replicas meet over torch.distributed, a killed Ray worker is reported as its rank's
failure with nothing left running, and smoke training matches one process and resumes.

Slow (starting Ray alone takes ~25 s on a busy 2-core machine); skipped without ray
(`make install-ray`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

# Before ray is imported (it reads this then): Ray on 127.0.0.1 only, as RayExecutor sets it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
pytest.importorskip("ray")

from launchers.executor import ReplicaSpec, ReplicaState  # noqa: E402
from launchers.ray_backend import RayExecutor  # noqa: E402
from tests.cli.test_launch_faults import Launch  # noqa: E402
from tests.cli.test_train_async import SIGNAL  # noqa: E402
from tests.conftest import REPO, areal_cli, cli_env  # noqa: E402
from workflows.metrics.stats import read_stats  # noqa: E402

pytestmark = pytest.mark.slow

ALLREDUCE = """
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(os.environ["RANK"]) + 1])
dist.all_reduce(t)
print("rank", os.environ["RANK"], "of", os.environ["WORLD_SIZE"], "local", os.environ["LOCAL_RANK"], "sum", t.item(),
      "master", os.environ["MASTER_ADDR"], flush=True)
dist.destroy_process_group()
time.sleep(float(sys.argv[1]))
"""


def ray_listeners() -> set[str]:
    """Listening addresses of this process's Ray children (gcs_server, raylet, workers, agents)."""
    pids = {p.pid for p in psutil.Process().children(recursive=True)}
    return {c.laddr.ip for c in psutil.net_connections(kind="inet") if c.pid in pids and c.status == "LISTEN"}


def test_replicas_rendezvous_on_loopback_and_a_killed_worker_is_reported(tmp_path):
    executor = RayExecutor(tmp_path, grace_period=1)
    handles = executor.launch_replicas(ReplicaSpec(entrypoint=[sys.executable, "-c", ALLREDUCE, "0"]), 2)
    results = executor.collect(handles, timeout=180)
    assert [r.state for r in results] == [ReplicaState.SUCCEEDED] * 2, [r.error for r in results]
    logs = [(tmp_path / f"rank{r}.log").read_text().strip() for r in (0, 1)]
    assert logs == [f"rank {r} of 2 local {r} sum 3.0 master 127.0.0.1" for r in (0, 1)]

    executor = RayExecutor(tmp_path / "kill", grace_period=1)
    handles = executor.launch_replicas(ReplicaSpec(entrypoint=[sys.executable, "-c", ALLREDUCE, "300"]), 2)
    deadline = time.monotonic() + 120
    while not all((tmp_path / "kill" / f"rank{r}.log").exists() and (tmp_path / "kill" / f"rank{r}.log").read_text()
                  for r in (0, 1)):
        assert time.monotonic() < deadline, "the replicas never got past the rendezvous"
        time.sleep(0.2)
    listeners = ray_listeners()
    assert listeners and listeners <= {"127.0.0.1", "::ffff:127.0.0.1"}, listeners
    replicas = [c for h in handles for c in psutil.Process(h.extras["worker_pid"]).children()]
    assert len(replicas) == 2
    psutil.Process(handles[1].extras["worker_pid"]).send_signal(signal.SIGKILL)
    results = executor.collect(handles, timeout=120)
    assert results[1].state is ReplicaState.FAILED and "the Ray worker of rank 1" in results[1].error
    assert results[0].state is ReplicaState.CANCELLED  # fail_fast
    gone = psutil.wait_procs(replicas, timeout=15)[1]
    assert gone == []  # both training processes ended with their actors


def test_two_ray_replicas_match_one_process_and_resume_after_a_killed_worker(tmp_path, gsm8k_dir):
    common = ["config=smoke", f"dataset.path={gsm8k_dir}", "actor.deterministic=true", "trainer.total_steps=3", *SIGNAL]
    single = subprocess.run(areal_cli("train", f"run_dir={tmp_path / 'single'}", *common), capture_output=True,
                            text=True, cwd=REPO, env=cli_env(), timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = Launch(areal_cli("launch", "--backend", "ray", "--replicas", "2", "--run-root", str(tmp_path / "l"),
                              "--run-id", "dp", f"run_dir={tmp_path / 'dp'}", *common))
    code, stderr = launch.finish()
    assert code == 0 and "all 2 replica(s) succeeded" in stderr, stderr[-3000:]
    one, dp = read_stats(tmp_path / "single" / "stats.jsonl"), read_stats(tmp_path / "dp" / "stats.jsonl")
    assert len(one) == len(dp) == 3
    for a, b in zip(one, dp):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert launch.orphans() == []

    steps = 6
    words = ["config=smoke", f"dataset.path={gsm8k_dir}", f"trainer.total_steps={steps}", "trainer.recover_freq_steps=1",
             f"run_dir={tmp_path / 'run'}"]
    stats = tmp_path / "run" / "stats.jsonl"
    launch = Launch(areal_cli("launch", "--backend", "ray", "--replicas", "2", "--grace-period", "3",
                              "--run-root", str(tmp_path / "l"), "--run-id", "kill", *words))
    launch.wait_until(lambda: stats.exists() and len(stats.read_text().splitlines()) >= 2, "second step")
    [rank1] = [p for p in launch.replicas() if p.environ().get("RANK") == "1"]
    rank1.parent().send_signal(signal.SIGKILL)  # the Ray worker (actor process) running rank 1
    code, stderr = launch.finish()
    assert code == 1 and "rank 1 failed" in stderr and "the Ray worker of rank 1" in stderr, stderr[-3000:]
    assert not [p for p in launch.seen if "areal_cli.main train" in launch.seen[p] and psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

    resumed = Launch(areal_cli("launch", "--backend", "ray", "--replicas", "2", "--run-root", str(tmp_path / "l"),
                               "--run-id", "resume", *words))
    code, stderr = resumed.finish()
    assert code == 0, stderr[-3000:]
    assert "resuming from step" in (tmp_path / "l" / "resume" / "rank0.log").read_text()
    assert [r["step"] for r in read_stats(stats)] == list(range(1, steps + 1))  # each step once, none missing
    assert json.loads((tmp_path / "l" / "resume" / "results.json").read_text())[1]["state"] == "succeeded"
