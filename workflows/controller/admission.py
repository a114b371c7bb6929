"""Admission: the rollouts waiting to start, their hand-over to the runner while the
staleness manager reports capacity, and the accounting of how each one ended.

An episode is queued (`enqueue`, or `refill` from a dataloader up to the staleness
room), started on the runner as soon as capacity allows (`flush`, from any thread: the
trainer's when it submits, the runner's on every finished rollout, so that a free slot
does not sit idle while the trainer is busy), and accounted for when it ends
(`on_result`): accepted or rejected for the `StalenessManager`, by reason for the
`FailureTracker`, whose verdict stops further starts (workflows/controller/failures.py).
`WorkflowExecutor` (workflows/controller/executor.py) drives it and owns the ready
trajectories.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from workflows.api import AcceptFn, RolloutWorkflow, Trajectory
from workflows.config import RolloutConfig
from workflows.controller.failures import FailureTracker, RolloutFailureError
from workflows.controller.staleness import StalenessManager
from workflows.controller.task_result import TaskQueueFullError, TaskResult
from workflows.controller.task_runner import AsyncTaskRunner


@dataclass
class PendingEpisode:
    task_id: int
    data: dict
    workflow: RolloutWorkflow
    should_accept: AcceptFn | None


class Admission:
    """The pending queue of a rollout controller and its hand-over to `runner`.

    Thread-safety: one lock guards the queue, the flags and the failure tracker, so
    everything but `refill` (the consumer thread's: it owns the dataloader iterator) may
    be called from any thread.

    Args:
        config: `rollout.*` settings (`queue_size` and the failure limits).
        staleness_manager: decides the capacity; told of every enqueue, start and outcome.
        inference_engine: passed to every `workflow.arun_episode`; `get_version()` names
            the policy version in error messages.
        group_filter: as `WorkflowExecutor`'s: False drops an accepted trajectory as
            "filtered".

    `runner` is None until the controller has started one and set it here.
    """

    def __init__(
        self,
        config: RolloutConfig,
        staleness_manager: StalenessManager,
        inference_engine: Any,
        group_filter: AcceptFn | None,
    ) -> None:
        self.config = config
        self.staleness_manager = staleness_manager
        self.inference_engine = inference_engine
        self.group_filter = group_filter
        # Guards the pending queue and the hand-over to the runner, which happens both on
        # the trainer thread and on the runner thread (each finished rollout frees a slot).
        self.lock = threading.Lock()
        self.pending: deque[PendingEpisode] = deque()
        self.failures = FailureTracker(config)  # runner thread, under lock
        self.paused = False
        self.destroyed = False
        self.runner: AsyncTaskRunner | None = None
        self._task_ids = itertools.count()
        self._data_source: Iterable | None = None  # consumer thread only, as _data_iter
        self._data_iter: Iterator | None = None

    def enqueue(self, data: dict, workflow: RolloutWorkflow, should_accept: AcceptFn | None, *, bounded: bool) -> int:
        """Queue one episode; returns its task id.

        Raises:
            TaskQueueFullError: if `bounded` and `rollout.queue_size` episodes already wait.
            RuntimeError: with no runner yet, or after `close`.
        """
        with self.lock:
            if self.runner is None or self.destroyed:
                raise RuntimeError("WorkflowExecutor needs initialize() and no destroy() before submitting")
            if bounded and len(self.pending) >= self.config.queue_size:
                raise TaskQueueFullError(
                    f"{len(self.pending)} episodes already wait to start (rollout.queue_size="
                    f"{self.config.queue_size}); wait() for results or raise rollout.queue_size"
                )
            task_id = next(self._task_ids)
            self.pending.append(PendingEpisode(task_id, data, workflow, should_accept))
            self.staleness_manager.on_rollout_enqueued()
        return task_id

    def refill(self, dataloader: Iterable[list[dict]], workflow: RolloutWorkflow, should_accept: AcceptFn | None) -> None:
        """Queue data from `dataloader` (re-iterated at each epoch end) until as many
        episodes wait as the staleness room, at most `rollout.queue_size`.

        Raises:
            ValueError: if the dataloader yields nothing.
            TypeError: if a dataloader item is not a list of dicts.
        """
        if self._data_source is not dataloader:
            self._data_source = dataloader
            self._data_iter = iter(dataloader)
        room = min(self.staleness_manager.get_staleness_room(), self.config.queue_size)
        while len(self.pending) < room:
            assert self._data_iter is not None
            try:
                items = next(self._data_iter)
            except StopIteration:
                self._data_iter = iter(dataloader)
                try:
                    items = next(self._data_iter)
                except StopIteration:
                    raise ValueError("the dataloader yields no data") from None
            if not isinstance(items, (list, tuple)):
                raise TypeError(f"dataloader items must be lists of data dicts, got {type(items).__name__}")
            for item in items:
                self.enqueue(item, workflow, should_accept, bounded=False)

    def flush(self) -> None:
        """Hand pending episodes to the runner while there is capacity (any thread)."""
        with self.lock:
            if self.runner is None:
                return
            while self.pending and not self.paused and not self.destroyed and self.failures.failure is None:
                if self.staleness_manager.get_capacity() <= 0:
                    break
                item = self.pending.popleft()
                self.staleness_manager.on_rollout_submitted()
                self.runner.submit(self._run_episode, item.workflow, item.data, item.should_accept, task_id=item.task_id)

    async def _run_episode(self, workflow: RolloutWorkflow, data: dict, should_accept: AcceptFn | None) -> Trajectory | None:
        trajectory = await workflow.arun_episode(self.inference_engine, data)
        if trajectory is None:
            self.count_rejection("none")
            return None
        if not isinstance(trajectory, dict):
            raise TypeError(f"arun_episode must return a dict of tensors or None, got {type(trajectory).__name__}")
        if should_accept is not None and not should_accept(trajectory):
            self.count_rejection("should_accept")
            return None
        if self.group_filter is not None and not self.group_filter(trajectory):
            with self.lock:
                self.failures.on_filtered()
            return None
        return trajectory

    def count_rejection(self, reason: str, error: str | None = None) -> None:
        """Count one rejected rollout by `reason` (see `WorkflowExecutor.rejection_counts`)."""
        with self.lock:
            self.failures.on_rejected(reason, error)

    def on_result(self, result: TaskResult) -> None:
        """The runner's `on_result`: account for a finished rollout, then refill."""
        # Runs on the runner thread before the result is visible to `wait`, so a woken
        # trainer already sees the updated counters.
        if result.accepted:
            self.staleness_manager.on_rollout_accepted()
            with self.lock:
                self.failures.on_accepted()
        else:
            self.staleness_manager.on_rollout_rejected()
            if result.error is not None:
                self.count_rejection("cancelled" if result.cancelled else "error", None if result.cancelled else result.error)
        # Refill from here rather than from the trainer thread: the trainer may be busy
        # in a training step, and a free slot should not sit idle until it returns.
        self.flush()

    @property
    def failure(self) -> RolloutFailureError | None:
        """The `RolloutFailureError` the failure tracker has stopped on, or None."""
        with self.lock:
            return self.failures.failure

    def raise_if_failed(self) -> None:
        """Raise (a copy of) `failure` if there is one."""
        failure = self.failure
        if failure is not None:
            raise failure.copy()

    def rejections(self) -> dict[str, int]:
        """A copy of the rejection counts by reason."""
        with self.lock:
            return dict(self.failures.rejections)

    def pause(self) -> None:
        """Start no more episodes; the runner starts none of its queued tasks either."""
        assert self.runner is not None
        with self.lock:
            self.paused = True
            self.runner.pause()

    def resume(self) -> None:
        """Undo `pause` and start whatever capacity allows."""
        assert self.runner is not None
        with self.lock:
            self.paused = False
            self.runner.resume()
        self.flush()

    def close(self) -> None:
        """Refuse further episodes and start no queued ones."""
        with self.lock:
            self.destroyed = True

    def check_progress_possible(self, wanted: int, num_ready: int, *, can_refill: bool = False) -> bool:
        """True when a result can still arrive; False when none can but the caller may
        refill (`can_refill` and staleness room left).

        Raises:
            RuntimeError: when no progress is possible: nothing pending or running, or
                episodes pending that the capacity can never admit.
        """
        assert self.runner is not None
        # Under the lock no flush can move pending work to the runner, and with nothing
        # outstanding no result can arrive to trigger one, so the answer cannot go stale.
        with self.lock:
            if self.runner.get_num_outstanding() > 0 or self.paused:
                return True
            if not self.pending:
                if can_refill and self.staleness_manager.get_staleness_room() > 0:
                    return False
                raise RuntimeError(
                    f"waiting for {wanted} trajectories with {num_ready} ready and no rollout pending or running"
                )
            if self.staleness_manager.get_capacity() <= 0:
                stats = self.staleness_manager.get_stats()
                raise RuntimeError(
                    f"{len(self.pending)} rollouts are queued but capacity is exhausted at version "
                    f"{self.inference_engine.get_version()} ({stats}); with {num_ready} of {wanted} ready "
                    "they can never start. Raise rollout.max_head_offpolicyness or the consumer batch size, "
                    "or use a separate executor for evaluation"
                )
        return True
