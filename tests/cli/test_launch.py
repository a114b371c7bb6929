"""`areal launch`: dry runs for the cloud backends, config checks, a real local launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from areal_cli.main import app

TOKEN = "hf_QWERTYUIOPASDFGHJKLZXCVBNM123456"
ROOT = Path(__file__).resolve().parents[2]


def areal(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "areal_cli.main", *args], cwd=ROOT, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout, check=False,
    )


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return CliRunner()


@pytest.mark.sdk
def test_modal_dry_run_shows_the_submission_with_secrets_redacted(runner, tmp_path):
    pytest.importorskip("modal")
    result = runner.invoke(app, ["launch", "--backend", "modal", "--replicas", "2", "--gpu", "H100:8",
                                 "--modal-clustered", "--secret", "HF_TOKEN", "--run-root", str(tmp_path),
                                 "--run-id", "demo", "--dry-run", "config=smoke", "trainer.total_steps=1"])
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    payload = json.loads(result.stdout)
    assert payload["secrets"] == {"HF_TOKEN": "***"}
    submission = payload["submission"]
    assert submission["function"]["gpu"] == "H100:8" and submission["clustered_size"] == 2
    (spawn,) = submission["spawns"]
    assert spawn["argv"] == ["python", "-m", "areal_cli.main", "train", "config=smoke", "trainer.total_steps=1"]
    assert not (tmp_path / "demo").exists()  # nothing was started or recorded


@pytest.mark.sdk
def test_hf_jobs_dry_run_shows_each_rank_job(runner):
    pytest.importorskip("huggingface_hub")
    result = runner.invoke(app, ["launch", "--backend", "hf-jobs", "--replicas", "2", "--gpu", "a10g-small",
                                 "--image", "ghcr.io/example/areal:latest", "--secret", "HF_TOKEN",
                                 "--env", "WANDB_MODE=offline", "--dry-run", "config=smoke"])
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    jobs = json.loads(result.stdout)["submission"]
    assert [job["env"]["RANK"] for job in jobs] == ["0", "1"]
    assert all(job["secrets"] == {"HF_TOKEN": "***"} and job["flavor"] == "a10g-small" for job in jobs)
    assert all(job["env"]["WANDB_MODE"] == "offline" for job in jobs)
    assert jobs[0]["network_aliases"] == ["master"] and jobs[0]["command"][-1] == "config=smoke"


@pytest.mark.sdk
def test_hf_jobs_bad_flavor_and_missing_image_exit_2(runner):
    pytest.importorskip("huggingface_hub")
    result = runner.invoke(app, ["launch", "--backend", "hf-jobs", "--gpu", "a100-huge", "--image", "x",
                                 "--dry-run", "config=smoke"])
    assert result.exit_code == 2 and "valid flavors" in result.output
    result = runner.invoke(app, ["launch", "--backend", "hf-jobs", "--dry-run", "config=smoke"])
    assert result.exit_code == 2 and "--image" in result.output


def test_config_typo_exits_2_before_any_replica_starts(runner, tmp_path):
    marker = tmp_path / "started"
    result = runner.invoke(app, ["launch", "--replicas", "2", "--run-root", str(tmp_path),
                                 "--entrypoint", f"touch {marker}", "config=smoke", "trainer.totl_steps=3"])
    assert result.exit_code == 2
    assert "did you mean 'total_steps'" in result.output
    assert not marker.exists() and not any(tmp_path.iterdir())


def test_secret_looking_env_and_late_options_are_refused(runner):
    result = runner.invoke(app, ["launch", "--env", "WANDB_API_KEY=abc", "--dry-run", "config=smoke"])
    assert result.exit_code == 2 and "--secret WANDB_API_KEY" in result.output
    result = runner.invoke(app, ["launch", "--env", "TOKENIZERS_PARALLELISM=false", "--dry-run", "config=smoke"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["launch", "config=smoke", "--replicas", "2"])
    assert result.exit_code == 2 and "before the config words" in result.output


def test_local_launch_of_two_replicas_then_status_and_logs(tmp_path):
    entry = f"{sys.executable} -c \"import os; print('replica', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])\""
    launched = areal("launch", "--replicas", "2", "--run-root", str(tmp_path), "--run-id", "two",
                     "--entrypoint", entry, "config=smoke", "trainer.total_steps=1")
    assert launched.returncode == 0, launched.stderr
    assert "all 2 replica(s) succeeded" in launched.stderr
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert [(r["rank"], r["state"], r["exit_code"]) for r in results] == [(0, "succeeded", 0), (1, "succeeded", 0)]
    # Config words reach the replica's argv after the entrypoint.
    log = (tmp_path / "two" / "rank1.log").read_text()
    assert log.strip() == "replica 1 of 2"

    status = areal("launch", "status", "two", "--run-root", str(tmp_path))
    assert status.returncode == 0 and status.stdout.count("succeeded") == 2
    logs = areal("launch", "logs", "two", "--rank", "1", "--run-root", str(tmp_path))
    assert logs.stdout.strip() == "replica 1 of 2"


def test_local_failure_exits_1_and_detached_cancel(tmp_path):
    failing = f"{sys.executable} -c \"import os, sys; print('bad rank', os.environ['RANK']); sys.exit(int(os.environ['RANK']) * 7)\""
    launched = areal("launch", "--replicas", "2", "--no-fail-fast", "--run-root", str(tmp_path), "--run-id", "bad",
                     "--entrypoint", failing, "config=smoke")
    assert launched.returncode == 1
    assert "rank 1 failed" in launched.stderr and "exit code 7" in launched.stderr and "bad rank 1" in launched.stderr

    sleeper = f"{sys.executable} -c \"import time; time.sleep(60)\""
    detached = areal("launch", "--replicas", "2", "--detach", "--grace-period", "1", "--run-root", str(tmp_path),
                     "--run-id", "long", "--entrypoint", sleeper, "config=smoke")
    assert detached.returncode == 0, detached.stderr
    handles = json.loads((tmp_path / "long" / "handles.json").read_text())["handles"]
    pids = [h["extras"]["pid"] for h in handles]
    assert areal("launch", "status", "long", "--run-root", str(tmp_path)).stdout.count("running") == 2
    cancelled = areal("launch", "cancel", "long", "--run-root", str(tmp_path))
    assert cancelled.returncode == 0, cancelled.stderr
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    from tests.launchers.conftest import process_alive

    return process_alive(pid)
