"""SIGKILL during `areal launch --replicas 2` of real smoke training: of one replica, of a
reward worker, and of the launcher's whole process group. Each time every process the
launch started is counted until none is left, the exit status is checked, and the run is
resumed to the end (or simply finishes, when only a reward worker died)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.cli.test_resume import num_records
from tests.conftest import REPO, areal_cli, cli_env
from workflows.metrics.stats import read_stats

STEPS = 6


def launch_command(tmp_path, gsm8k_dir, run_id: str) -> list[str]:
    return areal_cli("launch", "--replicas", "2", "--grace-period", "3", "--run-root", str(tmp_path / "launches"),
                     "--run-id", run_id, "config=smoke", f"dataset.path={gsm8k_dir}", f"trainer.total_steps={STEPS}",
                     "trainer.recover_freq_steps=1", "rollout.reward_workers=2", f"run_dir={tmp_path / 'run'}")


class Launch:
    """A running launch, and every process it ever had below it."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.seen: dict[int, str] = {}

    def descendants(self) -> list[psutil.Process]:
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in found:
            try:
                self.seen.setdefault(p.pid, " ".join(p.cmdline())[:120])
            except psutil.Error:
                pass
        return found

    def wait_until(self, predicate, what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.descendants()
            assert self.proc.poll() is None, f"the launch ended before {what}: {self.proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout} s"
            time.sleep(0.05)

    def replicas(self) -> list[psutil.Process]:
        return [p for p in self.descendants() if "areal_cli.main train" in self.seen.get(p.pid, "")]

    def reward_workers(self) -> list[psutil.Process]:
        return [p for p in self.descendants() if "multiprocessing" in self.seen.get(p.pid, "")]

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        _, stderr = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, stderr

    def orphans(self, within: float = 15) -> list[str]:
        """Processes the launch started that are still alive `within` seconds from now."""
        deadline = time.monotonic() + within
        while True:
            alive = [f"{pid}: {cmd}" for pid, cmd in self.seen.items() if psutil.pid_exists(pid)
                     and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)


def started_steps(run_dir) -> int:
    return num_records(run_dir / "stats.jsonl")


def finishes_when_resumed(tmp_path, gsm8k_dir, run_id: str) -> list[dict]:
    resumed = Launch(launch_command(tmp_path, gsm8k_dir, run_id))
    code, stderr = resumed.finish()
    assert code == 0, stderr[-3000:]
    assert "resuming from step" in (tmp_path / "launches" / run_id / "rank0.log").read_text()
    assert resumed.orphans() == []
    stats = read_stats(tmp_path / "run" / "stats.jsonl")
    assert [r["step"] for r in stats] == list(range(1, STEPS + 1))  # each step once, none missing
    return stats


@pytest.mark.slow
def test_sigkill_of_one_replica(tmp_path, gsm8k_dir):
    launch = Launch(launch_command(tmp_path, gsm8k_dir, "kill-replica"))
    launch.wait_until(lambda: started_steps(tmp_path / "run") >= 2, "second step")
    [rank1] = [p for p in launch.replicas() if p.environ().get("RANK") == "1"]
    rank1.send_signal(signal.SIGKILL)
    code, stderr = launch.finish()
    assert code == 1 and "rank 1 failed" in stderr and "SIGKILL" in stderr, stderr[-3000:]
    assert launch.orphans() == []
    assert len(launch.seen) >= 4  # two replicas and their reward workers were watched
    finishes_when_resumed(tmp_path, gsm8k_dir, "kill-replica-2")


@pytest.mark.slow
def test_sigkill_of_a_reward_worker_is_absorbed(tmp_path, gsm8k_dir):
    launch = Launch(launch_command(tmp_path, gsm8k_dir, "kill-reward"))
    launch.wait_until(lambda: started_steps(tmp_path / "run") >= 1 and launch.reward_workers(), "a reward worker")
    victim = launch.reward_workers()[0]
    victim.send_signal(signal.SIGKILL)
    code, stderr = launch.finish()
    assert code == 0, stderr[-3000:]
    assert not psutil.pid_exists(victim.pid) or psutil.Process(victim.pid).status() == psutil.STATUS_ZOMBIE
    assert launch.orphans() == []
    assert [r["step"] for r in read_stats(tmp_path / "run" / "stats.jsonl")] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_sigkill_of_the_whole_process_group(tmp_path, gsm8k_dir):
    launch = Launch(launch_command(tmp_path, gsm8k_dir, "kill-group"))
    launch.wait_until(lambda: started_steps(tmp_path / "run") >= 2 and len(launch.reward_workers()) >= 4,
                      "second step")
    os.killpg(launch.proc.pid, signal.SIGKILL)  # the launcher and every replica (their own group aside)
    code, _ = launch.finish()
    assert code == -signal.SIGKILL
    # Replicas run in process groups of their own and reward workers leave theirs: each
    # must notice its parent is gone and exit.
    assert launch.orphans(within=30) == []
    finishes_when_resumed(tmp_path, gsm8k_dir, "kill-group-2")
