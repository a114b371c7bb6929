"""The rollout controller: keeps generation running while the trainer learns.

```
trainer thread                                   runner thread (asyncio loop)
  prepare_batch ─▶ pending queue ─(capacity)─▶ AsyncTaskRunner ─▶ workflow.arun_episode
       ▲              ▲  StalenessManager            │                 (engine, data)
       │              └──── refill on each result ◀──┤ on_result: accepted / rejected
       └── ready trajectories (staleness-checked) ◀──┘
```

Algorithm: AReaL's asynchronous RL controller (Fu et al., arXiv 2505.24298, section 5.1).
A rollout may start only while the `StalenessManager` reports capacity: at most
`max_concurrent_rollouts` run at once, and at most
`(max_head_offpolicyness + version + 1) * consumer_batch_size` are ever accepted or
running. The trainer-side `wait` also drops (and counts as rejected) every accepted
trajectory whose oldest generated token is more than `max_head_offpolicyness` versions
behind the current one, which makes the bound hard even with long-tailed generation
times: every trajectory returned by `wait` / `prepare_batch` / `rollout_batch` satisfies
`min(versions[versions >= 0]) >= version - max_head_offpolicyness`. Ready trajectories
are handed out oldest version first.

No hang: rollouts that keep failing would otherwise be replaced by new ones forever. Once
too many fail, in a row or as a share of the recent ones (`workflows/controller/failures.py`
decides), the executor starts no more and `wait` / `prepare_batch` / `rollout_batch`
raise `RolloutFailureError`, naming the count, the reasons and the last error.

Parts: the pending queue, its hand-over to the runner and the accounting of each
rollout's outcome are `Admission` (workflows/controller/admission.py); the ready
trajectories, oldest first and expired when too stale, are `ReadyTrajectories`
(workflows/controller/ready.py). This module drives both for the trainer.

Threads: `submit`, `pause`, `resume`, `get_capacity` and `get_stats` are thread-safe.
`wait`, `prepare_batch` and `rollout_batch` consume results and must be called from one
thread at a time (the trainer's).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from workflows.api import AcceptFn, RolloutWorkflow, Trajectory
from workflows.config import RolloutConfig
from workflows.controller.admission import Admission
from workflows.controller.failures import RolloutFailureError
from workflows.controller.ready import ReadyTrajectories, dump_trajectories
from workflows.controller.staleness import RolloutStats, StalenessManager
from workflows.controller.task_result import TaskResult
from workflows.controller.task_runner import AsyncTaskRunner
from workflows.rollout.batch import concat_padded_tensors


class WorkflowExecutor:
    """Submits episodes to a background event loop within the staleness bound.

    Args:
        config: `rollout.*` settings (`max_concurrent_rollouts`, `consumer_batch_size`,
            `max_head_offpolicyness`, `queue_size`, `max_consecutive_rejections`).
        inference_engine: passed to every `workflow.arun_episode`; must have
            `get_version() -> int`, the policy version the trainer has reached.
        consumer_batch_size: trajectories per training step, used when
            `config.consumer_batch_size` is None (it then means the dataloader's batch size).
        trajectory_dump_dir: if set, every trajectory returned to the trainer is appended
            to `<dir>/<version>.jsonl`, one line per sample.
        group_filter: called with every trajectory that passed `should_accept`; False
            drops it as "filtered" (dynamic sampling: a group without reward variance),
            which frees its slot for the next prompt without counting as a failure. After
            `rollout.max_consecutive_filtered` in a row the executor stops as on failures.
        destroy_timeout: seconds `destroy` waits for in-flight rollouts to cancel.

    Raises:
        ValueError: if no consumer batch size is given, if it contradicts
            `config.consumer_batch_size`, or a setting is out of range.
    """

    def __init__(
        self,
        config: RolloutConfig,
        inference_engine: Any,
        *,
        consumer_batch_size: int | None = None,
        trajectory_dump_dir: str | Path | None = None,
        destroy_timeout: float = 5.0,
        group_filter: AcceptFn | None = None,
    ) -> None:
        if config.consumer_batch_size is None and consumer_batch_size is None:
            raise ValueError("set rollout.consumer_batch_size or pass consumer_batch_size= (the dataloader batch size)")
        if (
            config.consumer_batch_size is not None
            and consumer_batch_size is not None
            and config.consumer_batch_size != consumer_batch_size
        ):
            raise ValueError(
                f"rollout.consumer_batch_size={config.consumer_batch_size} contradicts consumer_batch_size="
                f"{consumer_batch_size}; set only one"
            )
        if config.queue_size < 1:
            raise ValueError(f"rollout.queue_size must be >= 1, got {config.queue_size}")
        self.config = config
        self.inference_engine = inference_engine
        self.consumer_batch_size: int = (
            config.consumer_batch_size if config.consumer_batch_size is not None else consumer_batch_size
        )  # type: ignore[assignment]
        self.trajectory_dump_dir = Path(trajectory_dump_dir) if trajectory_dump_dir is not None else None
        self.destroy_timeout = destroy_timeout
        self.group_filter = group_filter
        self.staleness_manager = StalenessManager(
            max_concurrent_rollouts=config.max_concurrent_rollouts,
            consumer_batch_size=self.consumer_batch_size,
            max_head_offpolicyness=config.max_head_offpolicyness,
            version_provider=inference_engine.get_version,
        )
        self._admission = Admission(config, self.staleness_manager, inference_engine, group_filter)
        self._ready = ReadyTrajectories()  # trainer thread only

    # ------------------------------------------------------------------ lifecycle

    def initialize(self) -> None:
        """Start the rollout thread (and create the dump directory).

        Raises:
            RuntimeError: if called twice.
        """
        if self._admission.runner is not None:
            raise RuntimeError("WorkflowExecutor.initialize() called twice")
        if self.trajectory_dump_dir is not None:
            self.trajectory_dump_dir.mkdir(parents=True, exist_ok=True)
        # Only admitted rollouts reach the runner, so its queue never holds more than
        # max_concurrent_rollouts; the +1 is slack, not a second bound.
        runner = AsyncTaskRunner(
            max_queue_size=self.config.max_concurrent_rollouts + 1,
            name="areal-rollout",
            on_result=self._admission.on_result,
        )
        self._admission.runner = runner
        runner.start()

    def destroy(self) -> None:
        """Cancel in-flight rollouts (counted as rejected) and stop the rollout thread.

        Returns within about `destroy_timeout` seconds. Queued, never-started data is
        dropped and stays counted as `enqueued`.
        """
        self._admission.close()
        if self._admission.runner is not None:
            self._admission.runner.destroy(self.destroy_timeout)

    def __enter__(self) -> WorkflowExecutor:
        self.initialize()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # ------------------------------------------------------------------ submission

    def submit(self, data: dict, workflow: RolloutWorkflow, should_accept: AcceptFn | None = None) -> int:
        """Queue one episode; it starts as soon as the staleness manager has capacity.

        Args:
            data: passed to `workflow.arun_episode(engine, data)`.
            workflow: any object with `async arun_episode(engine, data)`.
            should_accept: called on the runner thread with the trajectory; False rejects it.

        Returns:
            The rollout's task id.

        Raises:
            TaskQueueFullError: if `rollout.queue_size` episodes already wait to start.
            RuntimeError: before `initialize` or after `destroy`.
        """
        task_id = self._admission.enqueue(data, workflow, should_accept, bounded=True)
        self._admission.flush()
        return task_id

    # ------------------------------------------------------------------ consumption

    def wait(self, count: int, timeout: float | None = None) -> dict[str, torch.Tensor]:
        """Block until `count` accepted, fresh trajectories are ready; return them batched.

        Trajectories come oldest policy version first (ties in completion order),
        concatenated along dim 0 with 2-D tensors right-padded along dim 1 (`versions`
        with -1, the rest with 0).

        Args:
            count: trajectories (episodes, not samples) to return; >= 1.
            timeout: seconds; None waits indefinitely.

        Returns:
            `{key: [sum of samples, max L] or [sum of samples]}`.

        Raises:
            ValueError: if `count < 1`.
            TimeoutError: if not enough are ready in time; nothing is lost, the ready
                trajectories stay for the next call.
            RuntimeError: before `initialize`, or when `count` can never be reached
                (nothing in flight, and nothing pending that capacity lets start).
            RolloutFailureError: `rollout.max_consecutive_rejections` rollouts in a row
                were rejected (then on every later call too).
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._admission.raise_if_failed()
            self._drain()
            self._expire_stale()
            if len(self._ready) >= count:
                return concat_padded_tensors(self._take_each(self._ready.oldest_first(count)))
            self._pull(deadline, wanted=count)

    def rollout_batch(
        self, data: list[dict], workflow: RolloutWorkflow, should_accept: AcceptFn | None = None
    ) -> dict[str, torch.Tensor]:
        """Run one episode per item and wait for all of them (synchronous rollout).

        Rejected episodes are left out, so the batch may hold fewer than `len(data)`
        episodes; all rejected gives `{}`. Episodes are returned in the order of `data`.
        The items bypass `rollout.queue_size` but still start only within capacity.

        Raises:
            RuntimeError: if capacity can never admit them all (e.g. more episodes than
                the staleness bound allows at this version), or before `initialize`.
            RolloutFailureError: as in `wait`.
        """
        self._admission.raise_if_failed()
        ids = [self._admission.enqueue(item, workflow, should_accept, bounded=False) for item in data]
        self._admission.flush()
        outstanding = set(ids)
        while outstanding:
            for result in self._pull(None, wanted=len(outstanding)):
                outstanding.discard(result.task_id)
        self._admission.raise_if_failed()
        self._expire_stale()
        mine = [task_id for task_id in ids if task_id in self._ready]
        return concat_padded_tensors(self._take_each(mine)) if mine else {}

    def prepare_batch(
        self,
        dataloader: Iterable[list[dict]],
        workflow: RolloutWorkflow,
        should_accept: AcceptFn | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return the next `consumer_batch_size` trajectories, keeping rollouts in flight.

        Data is drawn from `dataloader` (each item a list of data dicts), re-iterated at
        each epoch end, and queued up to the staleness room — the number of rollouts that
        may still start before the next version bump — so that the runner thread can
        start one the moment a concurrency slot frees, even while the trainer is busy.
        Rollouts still running when this returns continue into the next call; that is the
        asynchrony. With `max_head_offpolicyness = 0` this is synchronous RL.

        Args:
            dataloader: re-iterable; the same object across calls keeps its position.
            timeout: seconds; None waits indefinitely.

        Returns:
            The trajectories concatenated as in `wait`.

        Raises:
            ValueError: if the dataloader yields nothing.
            TypeError: if a dataloader item is not a list of dicts.
            TimeoutError: as in `wait`.
            RolloutFailureError: as in `wait`.
        """
        return concat_padded_tensors(self.prepare_trajectories(dataloader, workflow, should_accept, timeout=timeout))

    def prepare_trajectories(
        self,
        dataloader: Iterable[list[dict]],
        workflow: RolloutWorkflow,
        should_accept: AcceptFn | None = None,
        *,
        timeout: float | None = None,
    ) -> list[Trajectory]:
        """`prepare_batch`, with the trajectories returned one by one (oldest version
        first), for a caller that stores each on its own (a disaggregated rollout worker)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._admission.raise_if_failed()
            self._admission.refill(dataloader, workflow, should_accept)
            self._admission.flush()
            # Take what finished meanwhile even when enough is ready: the oldest-first pick
            # must see a straggler that just came back, or it would expire in the runner's queue.
            self._drain()
            self._expire_stale()
            if len(self._ready) >= self.consumer_batch_size:
                return self._take_each(self._ready.oldest_first(self.consumer_batch_size))
            self._pull(deadline, wanted=self.consumer_batch_size, can_refill=True)

    @property
    def num_ready(self) -> int:
        """Accepted trajectories waiting for the consumer (trainer thread only)."""
        return len(self._ready)

    def _pull(self, deadline: float | None, *, wanted: int, can_refill: bool = False) -> list[TaskResult]:
        """Block for at least one result from the runner; move accepted ones to `_ready`.

        With `can_refill` (the caller draws more data when this returns), returns [] at
        once when nothing is pending or in flight but the staleness bound lets more start:
        every rollout may have finished, rejected, since the caller last refilled.
        """
        runner = self._require_runner()
        self._admission.flush()
        self._admission.raise_if_failed()
        if not self._admission.check_progress_possible(wanted, len(self._ready), can_refill=can_refill):
            return []
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"{len(self._ready)} of {wanted} trajectories ready when the timeout expired")
        try:
            results = runner.wait(1, timeout=remaining)
        except TimeoutError:
            raise TimeoutError(f"{len(self._ready)} of {wanted} trajectories ready when the timeout expired") from None
        self._ingest(results)
        return results + self._drain()

    def _drain(self) -> list[TaskResult]:
        """Take every result the runner already has, without blocking."""
        runner = self._require_runner()
        available = runner.get_output_queue_size()
        # Only this (consumer) thread takes results, so `available` cannot shrink meanwhile.
        results = runner.wait(available, timeout=0) if available else []
        self._ingest(results)
        return results

    def _ingest(self, results: list[TaskResult]) -> None:
        for result in results:
            if result.accepted:
                self._ready.add(result.task_id, result.data)  # type: ignore[arg-type]

    @property
    def failure(self) -> RolloutFailureError | None:
        """The `RolloutFailureError` this executor has stopped on, or None."""
        return self._admission.failure

    def _expire_stale(self) -> None:
        for _ in self._ready.expire(self.inference_engine.get_version(), self.config.max_head_offpolicyness):
            self.staleness_manager.on_rollout_expired()
            self._admission.count_rejection("expired")

    def _take_each(self, task_ids: list[int]) -> list[Trajectory]:
        trajectories = self._ready.take(task_ids)
        if self.trajectory_dump_dir is not None:
            version = self.inference_engine.get_version()
            dump_trajectories(self.trajectory_dump_dir / f"{version}.jsonl", version, task_ids, trajectories)
        return trajectories

    # ------------------------------------------------------------------ control and stats

    def pause(self) -> None:
        """Start no new rollouts (e.g. during a weight update); running ones continue."""
        self._require_runner()
        self._admission.pause()

    def resume(self) -> None:
        """Undo `pause` and start whatever capacity allows."""
        self._require_runner()
        self._admission.resume()

    def run_outside_bound(self, coroutine, timeout: float | None = None):
        """Run `coroutine` (e.g. an evaluation using the inference engine) on the rollout
        loop, so it shares the engine's batching and HTTP sessions, but outside the
        staleness accounting; blocks for its value. Raises what `AsyncTaskRunner.run` raises."""
        return self._require_runner().run(coroutine, timeout)

    def get_capacity(self) -> int:
        """`StalenessManager.get_capacity()`: rollouts that may start now (may be negative)."""
        return self.staleness_manager.get_capacity()

    def get_stats(self) -> RolloutStats:
        """Snapshot of the lifecycle counters; expired trajectories count as rejected."""
        return self.staleness_manager.get_stats()

    @property
    def rejection_counts(self) -> dict[str, int]:
        """Rejections by reason: none, should_accept, error, cancelled, expired, filtered."""
        return self._admission.rejections()

    @property
    def num_expired(self) -> int:
        """Accepted trajectories dropped for exceeding `max_head_offpolicyness`."""
        return self._admission.rejections().get("expired", 0)

    def _require_runner(self) -> AsyncTaskRunner:
        if self._admission.runner is None:
            raise RuntimeError("call WorkflowExecutor.initialize() first")
        return self._admission.runner
