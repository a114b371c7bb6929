"""No hang, ever, through the real CLI: rollouts that keep failing stop the run with one
line and leave the last recover checkpoint intact; SIGINT / SIGTERM at a random moment
stop it within 30 s with no process left behind, and the next start resumes from the last
recover checkpoint. Every subprocess has a timeout, so a hang fails the test."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time

import psutil
import pytest

from tests.conftest import REPO, areal_cli, cli_env
from workflows.metrics.stats import read_stats
from workflows.training.recover import is_complete

STOP_BOUND_S = 30.0  # the promise: a signal to exit


def command(run_dir, gsm8k_dir, *overrides):
    return areal_cli("train", "config=smoke", f"dataset.path={gsm8k_dir}", f"run_dir={run_dir}", *overrides)


def stats_steps(run_dir) -> list[int]:
    try:
        return [r["step"] for r in read_stats(run_dir / "stats.jsonl")]
    except FileNotFoundError:
        return []


def test_rollouts_that_keep_failing_stop_the_run_and_keep_the_checkpoint(tmp_path, gsm8k_dir):
    """From policy version 1 on every generation raises: step 1 trains and writes its recover
    checkpoint, then the rollouts of step 2 all fail."""
    env = {**cli_env(), "AREAL_FAULT_GENERATE_FROM_VERSION": "1"}
    cmd = command(tmp_path, gsm8k_dir, "trainer.total_steps=5", "trainer.recover_freq_steps=1", "rollout.max_consecutive_rejections=8")
    t0 = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    elapsed = time.monotonic() - t0
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: 8 rollouts in a row were rejected and none accepted \(8 raised\); last error: RuntimeError: injected "
        r"generation failure at policy version 1 \(AREAL_FAULT_GENERATE_FROM_VERSION=1\); fix the cause, or raise "
        r"rollout\.max_consecutive_rejections if so many rejections are expected; the run stopped at step 2 of 5 without "
        r"saving; its last recover checkpoint \(step 1\) is intact in .*checkpoints/recover",
        last,
    ), last
    # The first failure's traceback is logged once; the others are one line each; no crash.
    assert result.stderr.count("Traceback") == 1, result.stderr[-4000:]
    # Nothing saved on the way out: the checkpoint of step 1, no final checkpoint.
    recover = tmp_path / "checkpoints" / "recover"
    assert is_complete(recover) and json.loads((recover / "meta.json").read_text())["step"] == 1
    assert not (tmp_path / "checkpoints" / "step_5").exists()
    assert stats_steps(tmp_path) == [1]
    print(f"rollout failure: exit 1 after {elapsed:.1f} s")


def start(run_dir, gsm8k_dir, *overrides, out) -> subprocess.Popen:
    """A training run in its own process group (as a shell starts a foreground job)."""
    return subprocess.Popen(
        command(run_dir, gsm8k_dir, *overrides), stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env=cli_env(), start_new_session=True,
    )


def wait_for(predicate, proc, what, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (rc={proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    left = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def interrupt(proc: subprocess.Popen, sig: int) -> tuple[float, int, list[psutil.Process]]:
    """Signal the run's whole process group (what Ctrl-C at a terminal does); returns the
    seconds to exit, the exit status and the processes of the run still alive 5 s later."""
    descendants = psutil.Process(proc.pid).children(recursive=True)
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)
    try:
        rc = proc.wait(timeout=STOP_BOUND_S + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"still running {STOP_BOUND_S + 30:.0f} s after {signal.Signals(sig).name}")
    seconds = time.monotonic() - t0
    # The reward workers, the resource tracker: gone with the trainer (allow them a moment).
    deadline = time.monotonic() + 5
    while (left := alive(descendants + group_members(proc.pid))) and time.monotonic() < deadline:
        time.sleep(0.05)
    return seconds, rc, left


def stop_line(text: str, sig: int) -> int | None:
    """The step the stop line names as the resume point (None: no checkpoint yet)."""
    name = signal.Signals(sig).name
    last = text.strip().splitlines()[-1]
    match = re.fullmatch(rf"stopped by {name}; the run can be resumed from step (\d+) \(.*checkpoints/recover\) with: areal train .*", last)
    if match:
        return int(match.group(1))
    assert last.startswith(f"stopped by {name} before the first recover checkpoint"), last
    return None


def check_clean_stop(log_path, sig, seconds, rc, left) -> int | None:
    text = log_path.read_text()
    assert rc == 128 + sig, text[-3000:]
    assert seconds < STOP_BOUND_S, text[-3000:]
    assert left == [], [(p.pid, p.cmdline()) for p in left]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    return stop_line(text, sig)


def resume_to_end(run_dir, gsm8k_dir, from_step: int, *overrides) -> None:
    """Start again: it must resume from `from_step` and leave every step logged once."""
    result = subprocess.run(
        command(run_dir, gsm8k_dir, f"trainer.total_steps={from_step + 1}", *overrides),
        capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"resuming from step {from_step} (checkpoints/recover)" in result.stdout
    assert stats_steps(run_dir) == list(range(1, from_step + 2))


ASYNC_RUN = ["trainer.total_steps=200", "trainer.recover_freq_steps=1", "rollout.max_head_offpolicyness=2"]


def run_and_interrupt(run_dir, gsm8k_dir, log, sig, *, after_step: int, max_delay: float, rng) -> tuple[int, float]:
    """Start the asynchronous run, wait until it logs a step after `after_step`, signal its
    process group at a random moment within `max_delay` s, check the stop; returns the
    resume step its stop line names and the seconds from signal to exit."""
    with open(log, "w") as out:
        proc = start(run_dir, gsm8k_dir, *ASYNC_RUN, out=out)
        try:
            wait_for(lambda: len(stats_steps(run_dir)) > after_step, proc, f"a step after {after_step}")
            time.sleep(rng.uniform(0, max_delay))
            seconds, rc, left = interrupt(proc, sig)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    step = check_clean_stop(log, sig, seconds, rc, left)
    # Each logged step's recover checkpoint is written with its record (a signal waits).
    assert step is not None and step > after_step
    if after_step:
        assert f"resuming from step {after_step} (checkpoints/recover)" in log.read_text()
    print(f"{signal.Signals(sig).name}: exit {rc} after {seconds:.2f} s, resumable from step {step}, processes left: {len(left)}")
    return step, seconds


def test_sigterm_and_sigint_stop_within_30s_and_each_next_start_resumes(tmp_path, gsm8k_dir):
    """SIGTERM, then (after the restart resumed) SIGINT, each at a random moment of the
    asynchronous run; the third start resumes and finishes, every step logged once."""
    run_dir, rng = tmp_path / "run", random.Random()
    step = run_and_interrupt(run_dir, gsm8k_dir, tmp_path / "log1", signal.SIGTERM, after_step=0, max_delay=2, rng=rng)[0]
    step = run_and_interrupt(run_dir, gsm8k_dir, tmp_path / "log2", signal.SIGINT, after_step=step, max_delay=2, rng=rng)[0]
    resume_to_end(run_dir, gsm8k_dir, step, *ASYNC_RUN[1:])


@pytest.mark.slow
def test_random_sigints_of_one_run_each_resume(tmp_path, gsm8k_dir):
    """Five SIGINTs at random moments of the same asynchronous run (staleness 2), each
    next start resuming from the step the stop line named; then the run finishes with every
    step logged once and no prompt trained twice. Prints the figures."""
    run_dir, rng = tmp_path / "run", random.Random()
    step, figures = 0, []
    for attempt in range(5):
        step, seconds = run_and_interrupt(run_dir, gsm8k_dir, tmp_path / f"log{attempt}", signal.SIGINT, after_step=step, max_delay=4, rng=rng)
        figures.append((round(seconds, 2), step))
    resume_to_end(run_dir, gsm8k_dir, step, *ASYNC_RUN[1:])
    records = read_stats(run_dir / "stats.jsonl")
    trained = [(e, i) for r in records for e, i in zip(r["prompt_epochs"], r["prompt_ids"])]
    assert len(trained) == len(set(trained))
    print("SIGINT -> exit seconds:", [s for s, _ in figures], "max", max(s for s, _ in figures), "resumable from steps:", [n for _, n in figures])


@pytest.mark.slow
@pytest.mark.parametrize("delay", [1.0, 5.0])
def test_signal_during_startup_exits_cleanly(tmp_path, gsm8k_dir, delay):
    """Before any checkpoint (importing, loading the model, the first step): 130, one line."""
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = start(tmp_path / "run", gsm8k_dir, *ASYNC_RUN, out=out)
        try:
            time.sleep(delay)
            seconds, rc, left = interrupt(proc, signal.SIGINT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    assert rc == 130 and seconds < STOP_BOUND_S and left == [], text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert re.match(r"stopped by SIGINT (before training started|before the first recover checkpoint|; the run can be resumed)",
                    text.strip().splitlines()[-1])
