from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.launchers.fakes import FakeHfApi, FakeModal


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (no psutil needed on Linux)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
        except OSError:
            return False
    return True


class Backend:
    """One executor under test plus what the contract tests need to know about it."""

    def __init__(self, name: str, tmp_path: Path):
        from launchers import HFJobsExecutor, LocalProcessExecutor, ModalExecutor

        self.name = name
        self.tmp_path = tmp_path
        self.fake = None
        if name == "local":
            self.make = lambda: LocalProcessExecutor(tmp_path / "run", grace_period=2.0, poll_interval=0.02)
        elif name == "modal":
            self.fake = FakeModal(tmp_path / "modal")
            self.make = lambda: ModalExecutor(self.fake, poll_interval=0.02, requirements=["areal"])
        else:
            # The fake returns the SDK's own JobInfo objects.
            pytest.importorskip("huggingface_hub")
            self.fake = FakeHfApi(tmp_path / "hf")
            self.make = lambda: HFJobsExecutor(self.fake, poll_interval=0.02)
        self.executor = self.make()
        # HF Jobs reports no exit code, only a stage.
        self.reports_exit_codes = name != "hf-jobs"

    def spec_kwargs(self) -> dict:
        return {"image": "python:3.11"} if self.name == "hf-jobs" else {}

    def pids(self, handles) -> list[int]:
        if self.name == "local":
            return [int(h.extras["pid"]) for h in handles]
        return self.fake.all_pids()


@pytest.fixture(params=["local", "modal", "hf-jobs"])
def backend(request, tmp_path):
    b = Backend(request.param, tmp_path)
    yield b
    # Nothing a test started may outlive it.
    pids = list(b.executor._procs) if b.name == "local" else b.fake.all_pids()
    for pid in pids:
        try:
            os.killpg(pid, 9)
        except ProcessLookupError:
            pass
