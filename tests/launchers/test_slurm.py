"""`areal launch --backend slurm`: the sbatch script for 2 nodes x 8 GPUs (checked by bash
itself), secrets named but never written, and the submission through `sbatch`."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from areal_cli.main import app
from launchers.executor import ReplicaSpec
from launchers.slurm import SlurmExecutor, slurm_time
from tests.conftest import REPO, areal_cli, cli_env

TOKEN = "hf_QWERTYUIOPASDFGHJKLZXCVBNM123456"


def dry_run(tmp_path, monkeypatch, *flags: str):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return CliRunner().invoke(app, ["launch", "--backend", "slurm", *flags, "--dry-run", "--run-root", str(tmp_path),
                                    "--run-id", "big", "config=smoke", "dataset.batch_size=16"])


def test_the_two_nodes_by_eight_gpus_script(tmp_path, monkeypatch):
    result = dry_run(tmp_path, monkeypatch, "--nnodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj",
                     "--timeout", "7200", "--secret", "HF_TOKEN", "--env", "WANDB_MODE=offline")
    assert result.exit_code == 0, result.output
    script = result.stdout
    assert TOKEN not in result.output
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
    assert directives == {"job-name": "areal-big", "nodes": "2", "ntasks-per-node": "1", "gpus-per-node": "8",
                          "time": "0-02:00:00", "output": f"{(tmp_path / 'big').resolve()}/slurm-%j.out",
                          "export": "ALL", "partition": "gpu", "account": "proj"}
    # The rendezvous is on the job's first node; every node runs one torchrun of 8 ranks.
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    srun = script[script.index("srun "):].replace("\\\n", " ")
    assert srun.split()[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert ('python -m torch.distributed.run --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d '
            '--rdzv-endpoint "$head_node:29400" --rdzv-id "$SLURM_JOB_ID"') in " ".join(srun.split())
    assert srun.split()[-6:] == ["python", "-m", "areal_cli.main", "train", "config=smoke", "dataset.batch_size=16"]
    assert "export WANDB_MODE=offline" in script and "for name in HF_TOKEN; do" in script
    assert not (tmp_path / "big").exists()  # a dry run writes nothing
    bash = shutil.which("bash")
    checked = subprocess.run([bash, "-n"], input=script, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr


def test_world_size_must_match_the_nodes(tmp_path, monkeypatch):
    result = dry_run(tmp_path, monkeypatch, "--nnodes", "2", "--gpus-per-node", "8", "--replicas", "8")
    assert result.exit_code == 2 and "--replicas 8 != --nnodes 2 x --nproc-per-node 8" in result.output


def test_slurm_time_rounds_up_to_minutes():
    assert [slurm_time(s) for s in (1, 60, 61, 3600, 86400 + 90)] == ["0-00:01:00", "0-00:01:00", "0-00:02:00",
                                                                         "0-01:00:00", "1-00:02:00"]


def test_submission_passes_secrets_through_the_environment_only(tmp_path, monkeypatch):
    # No Slurm on this machine: an `sbatch` stand-in on PATH records what it was given,
    # the way sbatch reads it (the script file, and the environment it exports).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\ncp "$2" {tmp_path}/submitted.sh\nprintf %s "$HF_TOKEN" > {tmp_path}/env_token\n'
                      'echo "4242;cluster"\n')
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    executor = SlurmExecutor(tmp_path / "run", nnodes=2, nproc_per_node=8, gpus_per_node=8)
    spec = ReplicaSpec(entrypoint=["python", "-m", "areal_cli.main", "train", "config=smoke"],
                       secrets={"HF_TOKEN": TOKEN})
    [handle] = executor.launch_replicas(spec, 16, run_id="sub")
    assert handle.remote_id == "4242" and handle.extras["log_path"].endswith("slurm-4242.out")
    assert (tmp_path / "env_token").read_text() == TOKEN  # reached sbatch's environment
    submitted = (tmp_path / "submitted.sh").read_text()
    assert TOKEN not in submitted and "HF_TOKEN" in submitted
    assert TOKEN not in (tmp_path / "run" / "handles.json").read_text()
    with pytest.raises(ValueError, match="16 replicas != 2 node"):
        SlurmExecutor(tmp_path, nnodes=2, nproc_per_node=4).script(spec, 16)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("sbatch") is None or shutil.which("sinfo") is None, reason="no Slurm here")
def test_a_smoke_job_on_a_real_single_node_slurm(tmp_path, gsm8k_dir):
    """Needs a running Slurm whose controller and node are on 127.0.0.1 (Debian's
    slurm-wlm with munge; see the README's "Running on a cluster")."""
    from launchers.local import find_free_port

    if subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30, check=False).returncode != 0:
        pytest.skip("Slurm is installed but its controller does not answer")
    env = cli_env()
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"  # `python` in the script: this venv's
    result = subprocess.run(
        areal_cli("launch", "--backend", "slurm", "--nnodes", "1", "--rdzv-endpoint", f"127.0.0.1:{find_free_port()}",
                  "--timeout", "900", "--run-root", str(tmp_path / "l"), "--run-id", "smoke", "config=smoke",
                  f"dataset.path={gsm8k_dir}", f"run_dir={tmp_path / 'run'}"),
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = re.search(r"as Slurm job (\d+)", result.stderr).group(1)
    assert "all 1 replica(s) succeeded" in result.stderr
    out = (tmp_path / "l" / "smoke" / f"slurm-{job_id}.out").read_text()
    assert "done: 2 steps" in out, out[-3000:]

