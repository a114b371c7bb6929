"""workflows/training/shutdown.py: SIGINT / SIGTERM become RunInterrupted, deferred blocks finish
first, and a stop that hangs is forced. Each case runs in a small Python subprocess (the
handlers are process-wide), which imports only the standard library."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env
from workflows.training.shutdown import RunInterrupted


def run_script(body: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess, float]:
    script = "import os, signal, sys, time\nfrom workflows.training import shutdown\n" + textwrap.dedent(body)
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=timeout)
    return result, time.monotonic() - t0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_raises_run_interrupted_and_the_handlers_come_back(sig):
    result, _ = run_script(f"""
        before = signal.getsignal({sig})
        try:
            with shutdown.stop_on_signals():
                with shutdown.stop_on_signals():  # nested: one set of handlers
                    os.kill(os.getpid(), {sig})
                    time.sleep(5)
                    print("not interrupted")
        except KeyboardInterrupt as exc:  # RunInterrupted is one
            print(type(exc).__name__, exc.signum, exc.exit_code)
        print("restored", signal.getsignal({sig}) is before)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [f"RunInterrupted {sig} {128 + sig}", "restored True"]


def test_a_deferred_block_finishes_before_the_stop():
    result, _ = run_script("""
        try:
            with shutdown.stop_on_signals():
                with shutdown.deferred_stop():
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.2)
                    print("block finished", shutdown.stop_requested() == signal.SIGINT)
                print("not reached")
        except shutdown.RunInterrupted as exc:
            print("stopped", exc.signal_name)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["block finished True", "stopped SIGINT"]


def test_a_deferred_block_that_raises_keeps_its_own_error():
    result, _ = run_script("""
        try:
            with shutdown.stop_on_signals():
                with shutdown.deferred_stop():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.1)
                    raise ValueError("the block's own error")
        except ValueError as exc:
            print("kept", exc)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["kept the block's own error"]


def test_a_stop_that_hangs_is_forced_within_the_bound():
    result, elapsed = run_script("""
        shutdown.FORCE_EXIT_AFTER = 1.0
        with shutdown.stop_on_signals(describe=lambda signum: f"described {signum}"):
            with shutdown.deferred_stop():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)  # a cleanup that never ends
    """)
    assert result.returncode == 128 + signal.SIGTERM
    assert elapsed < 10
    assert "still stopping 1 s after the signal; exiting without further cleanup; described 15" in result.stderr


def test_a_second_signal_forces_the_exit_at_once():
    result, elapsed = run_script("""
        with shutdown.stop_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except shutdown.RunInterrupted:
                os.kill(os.getpid(), signal.SIGINT)  # impatient user, during the cleanup
                time.sleep(60)
    """)
    assert result.returncode == 130 and elapsed < 10
    assert "second signal (SIGINT) while stopping" in result.stderr


def test_resume_hint():
    exc = RunInterrupted(signal.SIGINT)
    cmd = ["areal", "train", "config=smoke", "trainer.resume=false", "a.b=x y"]
    assert exc.resume_hint(cmd) == "stopped by SIGINT before training started; nothing was written; start again with: areal train config=smoke 'a.b=x y'"
    exc.run_dir = Path("runs/x")
    assert exc.resume_hint() == "stopped by SIGINT before the first recover checkpoint; nothing to resume in runs/x, a new start begins at step 0"
    exc.recover_step = 7
    assert exc.resume_hint(cmd) == (
        "stopped by SIGINT; the run can be resumed from step 7 (runs/x/checkpoints/recover) with: "
        "areal train config=smoke 'a.b=x y'"
    )
    assert exc.resume_hint().endswith("by starting it again with run_dir=runs/x")
    assert RunInterrupted(signal.SIGTERM).exit_code == 143


# -- a recover checkpoint being written when the signal comes -----------------------------------

SAVE_SCRIPT = """
import json, os, signal, sys, time
from pathlib import Path
from workflows.training import shutdown
from workflows.training.recover import RecoverInfo, find_recover_checkpoint, read_recover_info, save_recover_checkpoint

class Engine:  # writes what a TrainEngine writes; the signal comes in the middle
    def __init__(self, signal_during_save, then_block):
        self.signal_during_save, self.then_block = signal_during_save, then_block
    def save(self, path, adapters_only=False):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"weights")
        if self.signal_during_save:
            os.kill(os.getpid(), signal.SIGTERM)
            if self.then_block:
                time.sleep(60)  # the forced exit hits mid-save
    def save_optimizer_state(self, path):
        path.write_bytes(b"optimizer")

checkpoints = Path(sys.argv[1])
shutdown.FORCE_EXIT_AFTER = 1.0
info = lambda step: RecoverInfo(step=step, total_steps=9, stats_records=step, data_position={}, num_prompts=1)
save_recover_checkpoint(checkpoints, Engine(False, False), info(1))
try:
    with shutdown.stop_on_signals():
        with shutdown.deferred_stop():  # as the trainer saves
            save_recover_checkpoint(checkpoints, Engine(True, sys.argv[2] == "block"), info(2))
            print("saved")
except shutdown.RunInterrupted as exc:
    print("stopped", exc.signal_name, read_recover_info(find_recover_checkpoint(checkpoints)).step)
"""


def test_a_recover_checkpoint_being_written_is_completed_before_the_stop(tmp_path):
    result = subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(tmp_path), "finish"], capture_output=True, text=True,
                            cwd=REPO, env=cli_env(), timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["saved", "stopped SIGTERM 2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recover"]


def test_a_recover_checkpoint_cut_short_by_a_forced_exit_leaves_the_previous_one(tmp_path):
    from workflows.training.checkpoint_files import remove_stale_temporaries
    from workflows.training.recover import find_recover_checkpoint, read_recover_info

    result = subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(tmp_path), "block"], capture_output=True, text=True,
                            cwd=REPO, env=cli_env(), timeout=30)
    assert result.returncode == 143 and "still stopping" in result.stderr
    found = find_recover_checkpoint(tmp_path)
    assert found == tmp_path / "recover" and read_recover_info(found).step == 1
    remove_stale_temporaries(tmp_path)  # what the next start does with the half-written one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recover"]
