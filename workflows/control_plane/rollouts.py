"""Where the trainer's batches come from, and where its new weights go, per deployment mode.

The trainer loop (workflows/training/trainer.py) asks its rollouts for a batch, trains it,
acknowledges it through the control plane, and hands the new weights back:

    batch, info = rollouts.next_batch()          # [B*n, L] tensors, as the executor returns them
    ... train ...; control.acknowledge(step)     # the optimizer boundary
    info = rollouts.update_weights(engine, step, batch)

- `ColocatedRollouts` (local_colocated, dataflow_colocated): the rollout controller
  (workflows/controller/executor.py) runs in this process over an inference engine (in-process or
  servers); the control plane records each batch's refs.
- `DisaggregatedRollouts`: rollout workers (workflows/control_plane/rollout_worker.py) run the same
  controller in their own processes and commit refs to the shared SQLite store; this
  side leases the oldest fresh refs, reads their safetensors files, expires any staler
  than `rollout.max_head_offpolicyness`, and publishes weights as versioned directories
  (engines/weights.py) that the workers load between rollouts.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from engines.weights import publish_weights
from workflows.control_plane.modes import ControlPlane
from workflows.control_plane.samples import read_sample
from workflows.rollout.batch import concat_padded_tensors

logger = logging.getLogger(__name__)

WORKER_ENV = "AREAL_ROLLOUT_WORKER"  # "<index>/<count>"
TRAINER_PID_ENV = "AREAL_TRAINER_PID"


def weights_root(run_dir: Path) -> Path:
    """`<run_dir>/weights/published/`: the versions disaggregated workers load."""
    return Path(run_dir) / "weights" / "published"


def weight_sync_agreement(engine, inference, batch: dict[str, torch.Tensor], temperature: float) -> dict:
    """After a weight update on inference servers: the largest, over servers, mean
    |server logprob - trainer logprob| (nats per token) of the batch's first sequence,
    scored teacher-forced by both with the weights just sent. It checks the weight sync
    itself, whatever the staleness (trained tokens may all come from older weights);
    about 0.01-0.03 when the trainer computes in bf16, ~1e-5 in float32 (docs/benchmarks.md).
    """
    length = int(batch["attention_mask"][0].sum())
    ids = batch["input_ids"][0, :length]
    scored = inference.score_tokens(ids.tolist(), temperature)
    if not scored:
        return {}
    ours = engine.compute_logp({"input_ids": ids[None], "attention_mask": torch.ones(1, length, dtype=torch.long)})[0, 1:]
    diffs = [float((ours - torch.tensor(server)).abs().mean()) for server in scored]
    return {"server_logprob_abs_diff": max(diffs)}


class ColocatedRollouts:
    """The rollout controller in the trainer's process.

    Args:
        executor: the `WorkflowExecutor`.
        loader, workflow: what `executor.prepare_trajectories` draws and runs.
        inference: the inference engine the workflow generates with.
        control: the run's control plane (records each batch's refs).
        temperature: the sampling temperature (the weight-sync check on servers scores with it).
    """

    def __init__(self, executor, loader, workflow, inference, control: ControlPlane, temperature: float) -> None:
        self.executor, self.loader, self.workflow, self.inference = executor, loader, workflow, inference
        self.control, self.temperature = control, temperature

    def start(self, version: int) -> None:
        self.executor.initialize()
        # Before any rollout starts: the staleness capacity counts the batches already trained.
        self.executor.staleness_manager.on_version_recovered(version)

    def next_batch(self) -> tuple[dict[str, torch.Tensor], dict]:
        tokens_before = self.inference.num_generated_tokens
        trajectories = self.executor.prepare_trajectories(self.loader, self.workflow)
        self.control.record(trajectories)
        if self.inference.shares_weights and self.executor.get_stats().running:
            # The sampler decodes from the policy itself; a rollout running now would read
            # weights while they change (the staleness bound 0 must leave none running).
            raise RuntimeError("a rollout is still running while the shared policy trains")
        return concat_padded_tensors(trajectories), {"gen_tokens": self.inference.num_generated_tokens - tokens_before}

    def update_weights(self, engine, step: int, batch: dict[str, torch.Tensor]) -> dict:
        """No rollout starts while the sampler's weights change; requests in flight finish
        with the weights they started with, or, with interruptible generation on servers,
        are aborted here and finished with the new ones (each token's version says which)."""
        extra = {}
        self.executor.pause()
        self.inference.pause()
        with engine.engine_lock:
            engine.upload_weights(self.inference, version=step)
        engine.set_version(step)
        self.inference.set_version(step)
        if hasattr(self.inference, "score_tokens"):
            # Before rollouts resume: an idle server answers at once, a busy one only after
            # the requests it is decoding.
            extra.update(weight_sync_agreement(engine, self.inference, batch, self.temperature))
        self.inference.resume()
        self.executor.resume()
        return extra

    def stats(self) -> dict:
        rollout = self.executor.get_stats()
        # rollouts_rejected counts failures and trajectories expired as staler than the
        # bound alike; rollouts_expired says how many of them were the latter.
        rejections = self.executor.rejection_counts
        return {"rollouts_accepted": rollout.accepted, "rollouts_rejected": rollout.rejected,
                "rollouts_expired": rejections.get("expired", 0), "rollouts_running": rollout.running,
                "capacity": self.executor.get_capacity(), "groups_filtered": rejections.get("filtered", 0)}

    def close(self) -> None:
        self.executor.destroy()


class WorkerLauncher(Protocol):
    """Starts and watches rollout worker processes (areal_cli/workers.py adapts the
    launchers' `ServerlessExecutor` to this)."""

    def start(self, index: int, argv: list[str], env: dict[str, str]) -> Any: ...

    def exit_code(self, handle: Any) -> Optional[int]:
        """None while the worker runs; its exit status once it has ended."""
        ...

    def log_tail(self, handle: Any) -> str: ...

    def stop(self, handle: Any) -> None: ...


class RolloutWorkers:
    """`count` rollout workers, restarted when one dies (at most `max_restarts` in all).

    Raises (from `check`):
        RuntimeError: a worker ended and no restart is left; names its exit status and
            ends with the tail of its log.
    """

    def __init__(self, launcher: WorkerLauncher, run_dir: Path, count: int, max_restarts: int) -> None:
        self.launcher, self.run_dir, self.count, self.max_restarts = launcher, Path(run_dir), count, max_restarts
        self.handles: list[Any] = []
        self.restarts = 0

    def _start(self, index: int) -> Any:
        argv = [sys.executable, "-m", "workflows.control_plane.rollout_worker", str(self.run_dir / "config.yaml")]
        env = {WORKER_ENV: f"{index}/{self.count}", TRAINER_PID_ENV: str(os.getpid())}
        return self.launcher.start(index, argv, env)

    def start(self) -> None:
        self.handles = [self._start(i) for i in range(self.count)]

    def check(self) -> None:
        """Restart any worker that has ended (its uncommitted rollouts are generated again)."""
        for index, handle in enumerate(self.handles):
            code = self.launcher.exit_code(handle)
            if code is None:
                continue
            if self.restarts >= self.max_restarts:
                raise RuntimeError(
                    f"rollout worker {index} exited with status {code} and rollout.worker_restarts="
                    f"{self.max_restarts} restarts are used up; its log ends:\n{self.launcher.log_tail(handle)}"
                )
            self.restarts += 1
            logger.warning("rollout worker %d exited with status %s; restarting it (%d of %d restarts)",
                           index, code, self.restarts, self.max_restarts)
            self.handles[index] = self._start(index)

    def stop(self) -> None:
        for handle in self.handles:
            self.launcher.stop(handle)
        self.handles = []


class DisaggregatedRollouts:
    """Batches leased from the store that rollout workers fill (see the module docstring).

    Args:
        control: the run's control plane (disaggregated: a SQLite store).
        workers: the rollout workers to start, watch and stop.
        policy: the trainer's model, published for the workers.
        batch_size: prompt groups per step (the consumer batch size).
        max_head_offpolicyness: the staleness bound, enforced again on lease.
        total_steps: no weights are published after the last step (nothing would use them).
        poll_interval: seconds between looks at the store while a batch is short.
    """

    def __init__(self, control: ControlPlane, workers: RolloutWorkers, policy, *, batch_size: int,
                 max_head_offpolicyness: int, total_steps: int, poll_interval: float = 0.05) -> None:
        self.control, self.workers, self.policy = control, workers, policy
        self.batch_size, self.max_head_offpolicyness, self.total_steps = batch_size, max_head_offpolicyness, total_steps
        self.poll_interval = poll_interval
        self.weights_dir = weights_root(control.run_dir)
        self.version = 0
        self.num_expired = 0
        self.shares_weights = False

    def start(self, version: int) -> None:
        """Publish `version` (removing any later one a crashed run left), then start the workers."""
        self.version = version
        self.control.store.begin_incarnation()
        publish_weights(self.policy, self.weights_dir, version, keep=3)
        self.workers.start()

    def next_batch(self) -> tuple[dict[str, torch.Tensor], dict]:
        refs = []
        waited_since, last_report = time.monotonic(), time.monotonic()
        while len(refs) < self.batch_size:
            self.workers.check()
            leased = self.control.store.lease(self.batch_size - len(refs))
            bound = self.version - self.max_head_offpolicyness
            stale = [r for r in leased if r.version < bound]
            if stale:
                self.control.store.expire([r.sample_id for r in stale], self.version + 1)
                self.num_expired += len(stale)
            refs += [r for r in leased if r.version >= bound]
            if len(refs) < self.batch_size:
                if time.monotonic() - last_report > 60:
                    last_report = time.monotonic()
                    logger.info("waiting %.0f s for rollout workers: %d of %d samples (%s)",
                                last_report - waited_since, len(refs), self.batch_size, self.control.store.status())
                time.sleep(self.poll_interval)
        self.control.leased(refs)
        batch = concat_padded_tensors([read_sample(r.path) for r in refs])
        return batch, {"gen_tokens": int(batch["loss_mask"].sum())}

    def update_weights(self, engine, step: int, batch: dict[str, torch.Tensor]) -> dict:
        engine.set_version(step)
        self.version = step
        if step < self.total_steps:
            with engine.engine_lock:
                publish_weights(self.policy, self.weights_dir, step, keep=3)
        return {}

    def stats(self) -> dict:
        status = self.control.store.status()
        return {"rollouts_accepted": status.committed - status.expired, "rollouts_rejected": status.expired,
                "samples_queued": status.queued, "worker_restarts": self.workers.restarts}

    def close(self) -> None:
        self.workers.stop()
