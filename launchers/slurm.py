"""A multi-node job as one Slurm batch job: `srun` starts torchrun on every node.

    areal launch --backend slurm --nnodes 2 --gpus-per-node 8 --partition gpu --account proj \\
        --secret HF_TOKEN config=gsm8k_grpo          # --dry-run prints the script instead

The script (`<run_dir>/job.sbatch`) asks for `nnodes` nodes with one task each, runs
`srun` + `python -m torch.distributed.run` there (launchers/torchrun.py's options), with
the c10d rendezvous on the job's first node, and writes all output to
`<run_dir>/slurm-<jobid>.out` (the run directory must be on a file system the nodes
share, as the training run directory must be for checkpoints). Secrets are never written
into it: it names them, checks they are set, and `sbatch` exports them from the
submitting environment (`--export=ALL`, Slurm's default). One handle per job, rank 0,
`remote_id` the job id; states come from `squeue`, then `sacct` once the job has left
the queue.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launchers.executor import (
    PollingCollect,
    ReplicaHandle,
    ReplicaResult,
    ReplicaSpec,
    ReplicaState,
    ReplicaStatus,
    failure_text,
    redact,
    save_handles,
    tail_lines,
    write_results,
)
from launchers.logs import follow_log
from launchers.torchrun import torchrun_args

DEFAULT_RDZV_PORT = 29400
# squeue / sacct state names (Slurm's JOB STATE CODES) to ours.
_STATES = {
    "PENDING": ReplicaState.PENDING, "CONFIGURING": ReplicaState.PENDING, "REQUEUED": ReplicaState.PENDING,
    "RUNNING": ReplicaState.RUNNING, "COMPLETING": ReplicaState.RUNNING, "SUSPENDED": ReplicaState.RUNNING,
    "COMPLETED": ReplicaState.SUCCEEDED, "CANCELLED": ReplicaState.CANCELLED,
}


def slurm_time(seconds: float) -> str:
    """Seconds as Slurm's `--time` (`D-HH:MM:SS`), rounded up to the minute."""
    minutes = max(1, -(-int(seconds) // 60))
    days, minutes = divmod(minutes, 24 * 60)
    return f"{days}-{minutes // 60:02d}:{minutes % 60:02d}:00"


class SlurmExecutor(PollingCollect):
    """Submits the job with `sbatch` and follows it with `squeue`/`sacct`/`scancel`.

    Args:
        run_dir: where the script, its output and `handles.json` go (shared by the nodes).
        nnodes: nodes; nproc_per_node: ranks per node (usually gpus_per_node).
        gpus_per_node: GPUs asked for per node (`--gpus-per-node`); 0 asks for none.
        partition, account: Slurm's, or None for the cluster's defaults.
        rdzv_port: the port of the rendezvous store on the first node.
        rdzv_endpoint: `HOST:PORT` instead of the first node's name and `rdzv_port`.
        max_restarts, rdzv_timeout: torch elastic's, as `TorchrunExecutor`.
        cpus_per_node: `--cpus-per-task` of the one task per node; None: Slurm's default.
    Raises:
        ValueError: a count out of range.
    """

    backend_name = "slurm"
    supports_inter_replica_network = True

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        nnodes: int,
        nproc_per_node: int = 1,
        gpus_per_node: int = 0,
        partition: str | None = None,
        account: str | None = None,
        rdzv_port: int = DEFAULT_RDZV_PORT,
        rdzv_endpoint: str | None = None,
        max_restarts: int = 0,
        rdzv_timeout: float = 600.0,
        cpus_per_node: int | None = None,
        fail_fast: bool = True,
        poll_interval: float = 10.0,
    ) -> None:
        if gpus_per_node < 0:
            raise ValueError(f"gpus per node must be >= 0, got {gpus_per_node}")
        self.run_dir = Path(run_dir)
        self.nnodes, self.nproc_per_node, self.gpus_per_node = nnodes, nproc_per_node, gpus_per_node
        self.partition, self.account, self.cpus_per_node = partition, account, cpus_per_node
        self.fail_fast, self.poll_interval = fail_fast, poll_interval
        self._torchrun = torchrun_args(
            nnodes=nnodes, nproc_per_node=nproc_per_node, rdzv_endpoint=rdzv_endpoint or f"$head_node:{rdzv_port}",
            rdzv_id="$SLURM_JOB_ID", max_restarts=max_restarts, rdzv_timeout=rdzv_timeout,
        )

    def script(self, spec: ReplicaSpec, n_replicas: int, *, run_id: str = "areal") -> str:
        """The sbatch script; secrets appear by name only.

        Raises:
            ValueError: `n_replicas` is not nnodes x nproc_per_node.
        """
        if n_replicas != self.nnodes * self.nproc_per_node:
            raise ValueError(f"{n_replicas} replicas != {self.nnodes} node(s) x {self.nproc_per_node} per node")
        directives = [
            f"--job-name=areal-{run_id}", f"--nodes={self.nnodes}", "--ntasks-per-node=1",
            f"--time={slurm_time(spec.timeout)}", f"--output={self.run_dir.resolve()}/slurm-%j.out",
            # The submitting shell's environment, secrets included, reaches the job;
            # the script itself only names them.
            "--export=ALL",
        ]
        if self.gpus_per_node:
            directives.insert(3, f"--gpus-per-node={self.gpus_per_node}")
        if self.cpus_per_node:
            directives.insert(3, f"--cpus-per-task={self.cpus_per_node}")
        directives += [f"--partition={self.partition}"] * bool(self.partition)
        directives += [f"--account={self.account}"] * bool(self.account)
        lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "set -euo pipefail", ""]
        if spec.secrets:
            names = " ".join(sorted(spec.secrets))
            lines += [
                f"# Secrets, by name only: {names}",
                f"for name in {names}; do",
                '  [ -n "${!name:-}" ] || { echo "error: $name is not set in the environment sbatch ran in" >&2; exit 2; }',
                "done",
            ]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(spec.env.items())]
        lines += [
            "# The rendezvous store runs on the job's first node.",
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            f"srun --nodes={self.nnodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
            "  python -m torch.distributed.run " + " ".join(_quote(a) for a in self._torchrun) + " --no-python \\",
            "  " + " ".join(shlex.quote(a) for a in spec.entrypoint),
            "",
        ]
        return redact("\n".join(lines), spec.secrets.values())

    def plan(self, spec: ReplicaSpec, n_replicas: int, *, run_id: str = "areal") -> dict[str, Any]:
        return {"script_path": str(self.run_dir / "job.sbatch"), "script": self.script(spec, n_replicas, run_id=run_id)}

    def launch_replicas(self, spec: ReplicaSpec, n_replicas: int, *, run_id: str = "areal") -> list[ReplicaHandle]:
        """Write the script and submit it; one handle, `remote_id` the job id.

        Raises:
            ValueError: as `script`. RuntimeError: sbatch failed (its message, redacted).
            FileNotFoundError: no `sbatch` on PATH.
        """
        plan = self.plan(spec, n_replicas, run_id=run_id)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = Path(plan["script_path"])
        path.write_text(plan["script"])
        done = subprocess.run(["sbatch", "--parsable", str(path)], env={**os.environ, **spec.secrets},
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(redact(f"sbatch failed ({done.returncode}): {done.stderr.strip()}", spec.secrets.values()))
        job_id = done.stdout.strip().split(";")[0]
        handle = ReplicaHandle(self.backend_name, 0, job_id, {
            "script_path": str(path), "log_path": str(self.run_dir.resolve() / f"slurm-{job_id}.out"),
            "nnodes": self.nnodes, "submitted_at": time.time()})
        save_handles(self.run_dir, [handle], backend=self.backend_name, world_size=n_replicas)
        return [handle]

    def poll(self, handle: ReplicaHandle) -> ReplicaStatus:
        # scontrol knows running jobs and, for MinJobAge (300 s by default), ended ones;
        # sacct only where accounting is set up, but for longer.
        fields = dict(re.findall(r"(\w+)=(\S+)", _run(["scontrol", "show", "job", "-o", handle.remote_id])))
        state, exit_code = fields.get("JobState", ""), fields.get("ExitCode", "")
        if not state:
            line = _run(["sacct", "-n", "-X", "-P", "-j", handle.remote_id, "-o", "State,ExitCode"]).strip()
            if not line:
                return ReplicaStatus(ReplicaState.FAILED, None, "job unknown to scontrol and sacct")
            state, _, exit_code = line.splitlines()[0].partition("|")
            state = state.split()[0]
        ours = _STATES.get(state, ReplicaState.FAILED)
        code = int(exit_code.split(":")[0]) if exit_code.split(":")[0].isdigit() else None
        if not ours.terminal:
            return ReplicaStatus(ours)
        return ReplicaStatus(ours, code, "" if ours is ReplicaState.SUCCEEDED else f"Slurm state {state}")

    def stream_logs(self, handle: ReplicaHandle) -> Iterator[str]:
        finished = lambda: self.poll(handle).state.terminal  # noqa: E731
        for line in follow_log(Path(handle.extras["log_path"]), finished, self.poll_interval):
            yield redact(line)

    def cancel(self, handle: ReplicaHandle) -> None:
        _run(["scancel", handle.remote_id])

    def collect(self, handles: list[ReplicaHandle], timeout: float, **kwargs: Any) -> list[ReplicaResult]:
        results = super().collect(handles, timeout, **kwargs)
        write_results(self.run_dir, results)
        return results

    def _failure_detail(self, handle: ReplicaHandle, status: ReplicaStatus) -> str:
        from launchers.torchrun import lost_rank_line

        path = Path(handle.extras["log_path"])
        lost = lost_rank_line(path)
        if lost is not None:
            return f"job {handle.remote_id}: {lost}"
        tail = tail_lines(path.read_text(errors="replace")) if path.exists() else ""
        return redact(failure_text(f"job {handle.remote_id}: {status.message or 'failed'}", tail))


def _quote(arg: str) -> str:
    # Shell variables ($head_node, $SLURM_JOB_ID) must expand: double quotes, not single.
    return f'"{arg}"' if "$" in arg else shlex.quote(arg)


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return done.stdout if done.returncode == 0 else ""
