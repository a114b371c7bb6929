"""Rollout workers started through the launchers' `ServerlessExecutor`.

`deployment_mode=disaggregated` runs `rollout.workers` rollout worker processes beside
the trainer (workflows/control_plane/rollout_worker.py). The trainer's side (workflows/control_plane/rollouts.py)
only needs a `WorkerLauncher`; this adapter gives it one backed by the same executor
`areal launch` uses, so a worker is a replica like any other: its own session (a cancel
reaches everything it started), its log in `<run_dir>/logs/worker<i>-<attempt>/rank0.log`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from launchers.executor import ReplicaSpec, ServerlessExecutor
from launchers.local import LocalProcessExecutor

# Workers live as long as the trainer: it stops them, so no wall-clock limit of its own.
NO_TIMEOUT_S = 365 * 24 * 3600.0


class ExecutorWorkerLauncher:
    """Starts each rollout worker as a one-replica job of a `ServerlessExecutor`.

    Args:
        run_dir: the run's directory (logs go under `<run_dir>/logs/`).
        make_executor: `log_dir -> ServerlessExecutor`; default `LocalProcessExecutor`.
    """

    def __init__(self, run_dir: Path, make_executor=None) -> None:
        self.run_dir = Path(run_dir)
        self.make_executor = make_executor or (lambda log_dir: LocalProcessExecutor(log_dir, grace_period=5.0))
        self.attempts: dict[int, int] = {}

    def start(self, index: int, argv: list[str], env: dict[str, str]) -> tuple[ServerlessExecutor, Any]:
        attempt = self.attempts.get(index, 0)
        self.attempts[index] = attempt + 1
        executor = self.make_executor(self.run_dir / "logs" / f"worker{index}-{attempt}")
        spec = ReplicaSpec(entrypoint=argv, env=env, timeout=NO_TIMEOUT_S, name=f"rollout-worker-{index}")
        return executor, executor.launch_replicas(spec, 1)[0]

    def exit_code(self, handle: tuple[ServerlessExecutor, Any]) -> Optional[int]:
        executor, replica = handle
        status = executor.poll(replica)
        if not status.state.terminal:
            return None
        return status.exit_code if status.exit_code is not None else -1

    def log_tail(self, handle: tuple[ServerlessExecutor, Any]) -> str:
        executor, replica = handle
        tail = getattr(executor, "log_tail", None)
        return tail(replica) if tail is not None else ""

    def stop(self, handle: tuple[ServerlessExecutor, Any]) -> None:
        executor, replica = handle
        executor.cancel(replica)
