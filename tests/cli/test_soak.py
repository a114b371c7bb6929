"""Soak: the smoke config for 500 steps with staleness 2, watched from outside. Its RSS,
open file descriptors and threads must stay flat after warm-up; the slopes are printed
(`-s`) and recorded in docs/reliability.md."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import psutil
import pytest

from tests.cli.test_resume import num_records
from tests.conftest import REPO, areal_cli, cli_env

STEPS, WARMUP = 500, 50


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_500_steps_at_staleness_2_leak_no_memory_descriptors_or_threads(tmp_path, gsm8k_dir):
    run_dir = tmp_path / "run"
    argv = areal_cli("train", "config=smoke", f"dataset.path={gsm8k_dir}", f"run_dir={run_dir}",
                     f"trainer.total_steps={STEPS}", "rollout.max_head_offpolicyness=2", "trainer.save_freq_steps=100",
                     "stats_logger.print_every=100")
    proc = subprocess.Popen(argv, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(proc.pid)
    samples = []  # (step, rss MB, open fds, threads)
    start = time.monotonic()
    try:
        while proc.poll() is None:
            assert time.monotonic() - start < 1800, "the soak run did not finish in 30 minutes"
            step = num_records(run_dir / "stats.jsonl")
            try:
                samples.append((step, watched.memory_info().rss / 2**20, watched.num_fds(), watched.num_threads()))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.communicate()[1]
    assert proc.returncode == 0, stderr[-3000:]
    assert num_records(run_dir / "stats.jsonl") == STEPS
    # From warm-up to the last step; the shutdown after it closes files and threads.
    steady = np.array([s for s in samples if WARMUP <= s[0] < STEPS])
    assert len(steady) > 50
    step, rss, fds, threads = steady.T
    rss_slope = np.polyfit(step, rss, 1)[0] * 100  # MB per 100 steps
    fd_slope = np.polyfit(step, fds, 1)[0] * 100
    print(f"\n{STEPS} steps in {time.monotonic() - start:.0f} s; after step {WARMUP}: RSS {rss.min():.0f}-{rss.max():.0f} MB, "
          f"slope {rss_slope:+.2f} MB/100 steps; fds {fds.min():.0f}-{fds.max():.0f} (slope {fd_slope:+.3f}/100 steps); "
          f"threads {threads.min():.0f}-{threads.max():.0f}")
    assert rss_slope < 5.0  # a leak of 10 KB per step would show as 1 MB per 100 steps
    assert fds.max() - fds.min() <= 4 and abs(fd_slope) < 0.5
    assert threads.max() - threads.min() <= 2
