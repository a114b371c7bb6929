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
running. That admission rule alone bounds staleness only when trajectories finish in the
order they started; with long-tailed generation times a slow trajectory can outlive any
number of versions. So the trainer-side `wait` also drops (and counts as rejected) every
accepted trajectory whose oldest generated token is more than `max_head_offpolicyness`
versions behind the current one, which makes the bound hard: every trajectory returned
by `wait` / `prepare_batch` / `rollout_batch` satisfies
`min(versions[versions >= 0]) >= version - max_head_offpolicyness`. To waste as little
generation as possible, ready trajectories are handed out oldest version first.

No hang: rollouts that keep failing would otherwise be replaced by new ones forever. Once
too many fail, in a row or as a share of the recent ones (`workflows/controller/failures.py`
decides), the executor starts no more and `wait` / `prepare_batch` / `rollout_batch`
raise `RolloutFailureError`, naming the count, the reasons and the last error.

Threads: `submit`, `pause`, `resume`, `get_capacity` and `get_stats` are thread-safe.
`wait`, `prepare_batch` and `rollout_batch` consume results and must be called from one
thread at a time (the trainer's).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workflows.api import AcceptFn, RolloutWorkflow, Trajectory
from workflows.config import RolloutConfig
from workflows.controller.failures import FailureTracker, RolloutFailureError
from workflows.controller.staleness import RolloutStats, StalenessManager
from workflows.controller.task_result import TaskQueueFullError, TaskResult
from workflows.controller.task_runner import AsyncTaskRunner
from workflows.rollout.batch import concat_padded_tensors, oldest_version

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    task_id: int
    data: dict
    workflow: RolloutWorkflow
    should_accept: AcceptFn | None


@dataclass
class _Ready:
    trajectory: Trajectory
    oldest_version: int | None  # cached: checked against the version on every wait


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
        # Guards the pending queue and the hand-over to the runner, which happens both on
        # the trainer thread and on the runner thread (each finished rollout frees a slot).
        self._lock = threading.Lock()
        self._pending: deque[_Pending] = deque()
        self._ready: dict[int, _Ready] = {}  # completion order; trainer thread only
        self._task_ids = itertools.count()
        self._failures = FailureTracker(config)  # runner thread, under _lock
        self._paused = False
        self._destroyed = False
        self._runner: AsyncTaskRunner | None = None
        self._data_source: Iterable | None = None
        self._data_iter: Iterator | None = None

    # ------------------------------------------------------------------ lifecycle

    def initialize(self) -> None:
        """Start the rollout thread (and create the dump directory).

        Raises:
            RuntimeError: if called twice.
        """
        if self._runner is not None:
            raise RuntimeError("WorkflowExecutor.initialize() called twice")
        if self.trajectory_dump_dir is not None:
            self.trajectory_dump_dir.mkdir(parents=True, exist_ok=True)
        # Only admitted rollouts reach the runner, so its queue never holds more than
        # max_concurrent_rollouts; the +1 is slack, not a second bound.
        self._runner = AsyncTaskRunner(
            max_queue_size=self.config.max_concurrent_rollouts + 1,
            name="areal-rollout",
            on_result=self._on_result,
        )
        self._runner.start()

    def destroy(self) -> None:
        """Cancel in-flight rollouts (counted as rejected) and stop the rollout thread.

        Returns within about `destroy_timeout` seconds. Queued, never-started data is
        dropped and stays counted as `enqueued`.
        """
        with self._lock:
            self._destroyed = True
        if self._runner is not None:
            self._runner.destroy(self.destroy_timeout)

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
        task_id = self._enqueue(data, workflow, should_accept, bounded=True)
        self._flush()
        return task_id

    def _enqueue(self, data: dict, workflow: RolloutWorkflow, should_accept: AcceptFn | None, *, bounded: bool) -> int:
        with self._lock:
            if self._runner is None or self._destroyed:
                raise RuntimeError("WorkflowExecutor needs initialize() and no destroy() before submitting")
            if bounded and len(self._pending) >= self.config.queue_size:
                raise TaskQueueFullError(
                    f"{len(self._pending)} episodes already wait to start (rollout.queue_size="
                    f"{self.config.queue_size}); wait() for results or raise rollout.queue_size"
                )
            task_id = next(self._task_ids)
            self._pending.append(_Pending(task_id, data, workflow, should_accept))
            self.staleness_manager.on_rollout_enqueued()
        return task_id

    def _flush(self) -> None:
        """Hand pending episodes to the runner while there is capacity (any thread)."""
        with self._lock:
            if self._runner is None:
                return
            while self._pending and not self._paused and not self._destroyed and self._failures.failure is None:
                if self.staleness_manager.get_capacity() <= 0:
                    break
                item = self._pending.popleft()
                self.staleness_manager.on_rollout_submitted()
                self._runner.submit(
                    self._run_episode, item.workflow, item.data, item.should_accept, task_id=item.task_id
                )

    async def _run_episode(self, workflow: RolloutWorkflow, data: dict, should_accept: AcceptFn | None) -> Trajectory | None:
        trajectory = await workflow.arun_episode(self.inference_engine, data)
        if trajectory is None:
            self._count_rejection("none")
            return None
        if not isinstance(trajectory, dict):
            raise TypeError(f"arun_episode must return a dict of tensors or None, got {type(trajectory).__name__}")
        if should_accept is not None and not should_accept(trajectory):
            self._count_rejection("should_accept")
            return None
        if self.group_filter is not None and not self.group_filter(trajectory):
            self._count_filtered()
            return None
        return trajectory

    def _count_filtered(self) -> None:
        with self._lock:
            self._failures.on_filtered()

    def _count_rejection(self, reason: str, error: str | None = None) -> None:
        with self._lock:
            self._failures.on_rejected(reason, error)

    def _on_result(self, result: TaskResult) -> None:
        # Runs on the runner thread before the result is visible to `wait`, so a woken
        # trainer already sees the updated counters.
        if result.accepted:
            self.staleness_manager.on_rollout_accepted()
            with self._lock:
                self._failures.on_accepted()
        else:
            self.staleness_manager.on_rollout_rejected()
            if result.error is not None:
                self._count_rejection("cancelled" if result.cancelled else "error", None if result.cancelled else result.error)
        # Refill from here rather than from the trainer thread: the trainer may be busy
        # in a training step, and a free slot should not sit idle until it returns.
        self._flush()

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
            self._raise_if_failed()
            self._drain()
            self._expire_stale()
            if len(self._ready) >= count:
                return self._take(self._oldest_first(count))
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
        self._raise_if_failed()
        ids = [self._enqueue(item, workflow, should_accept, bounded=False) for item in data]
        self._flush()
        outstanding = set(ids)
        while outstanding:
            for result in self._pull(None, wanted=len(outstanding)):
                outstanding.discard(result.task_id)
        self._raise_if_failed()
        self._expire_stale()
        mine = [task_id for task_id in ids if task_id in self._ready]
        return self._take(mine) if mine else {}

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
            self._raise_if_failed()
            self._refill(dataloader, workflow, should_accept)
            self._flush()
            # Take what finished meanwhile even when enough is ready: the oldest-first pick
            # must see a straggler that just came back, or it would expire in the runner's queue.
            self._drain()
            self._expire_stale()
            if len(self._ready) >= self.consumer_batch_size:
                return self._take_each(self._oldest_first(self.consumer_batch_size))
            self._pull(deadline, wanted=self.consumer_batch_size, can_refill=True)

    @property
    def num_ready(self) -> int:
        """Accepted trajectories waiting for the consumer (trainer thread only)."""
        return len(self._ready)

    def _refill(self, dataloader: Iterable[list[dict]], workflow: RolloutWorkflow, should_accept: AcceptFn | None) -> None:
        if self._data_source is not dataloader:
            self._data_source = dataloader
            self._data_iter = iter(dataloader)
        room = min(self.staleness_manager.get_staleness_room(), self.config.queue_size)
        while len(self._pending) < room:
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
                self._enqueue(item, workflow, should_accept, bounded=False)

    def _pull(self, deadline: float | None, *, wanted: int, can_refill: bool = False) -> list[TaskResult]:
        """Block for at least one result from the runner; move accepted ones to `_ready`.

        With `can_refill` (the caller draws more data when this returns), returns [] at
        once when nothing is pending or in flight but the staleness bound lets more start:
        every rollout may have finished, rejected, since the caller last refilled.
        """
        runner = self._require_runner()
        self._flush()
        self._raise_if_failed()
        if not self._check_progress_possible(wanted, can_refill=can_refill):
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
                trajectory = result.data
                versions = trajectory.get("versions")
                oldest = oldest_version(versions) if isinstance(versions, torch.Tensor) else None
                self._ready[result.task_id] = _Ready(trajectory, oldest)  # type: ignore[index]

    def _raise_if_failed(self) -> None:
        with self._lock:
            failure = self._failures.failure
        if failure is not None:
            raise failure.copy()

    @property
    def failure(self) -> RolloutFailureError | None:
        """The `RolloutFailureError` this executor has stopped on, or None."""
        with self._lock:
            return self._failures.failure

    def _check_progress_possible(self, wanted: int, *, can_refill: bool = False) -> bool:
        """True when a result can still arrive; False when none can but the caller may
        refill (`can_refill` and staleness room left). Raises when no progress is possible."""
        runner = self._require_runner()
        # Under the lock no flush can move pending work to the runner, and with nothing
        # outstanding no result can arrive to trigger one, so the answer cannot go stale.
        with self._lock:
            if runner.get_num_outstanding() > 0 or self._paused:
                return True
            if not self._pending:
                if can_refill and self.staleness_manager.get_staleness_room() > 0:
                    return False
                raise RuntimeError(
                    f"waiting for {wanted} trajectories with {len(self._ready)} ready and no rollout pending or running"
                )
            if self.staleness_manager.get_capacity() <= 0:
                stats = self.staleness_manager.get_stats()
                raise RuntimeError(
                    f"{len(self._pending)} rollouts are queued but capacity is exhausted at version "
                    f"{self.inference_engine.get_version()} ({stats}); with {len(self._ready)} of {wanted} ready "
                    "they can never start. Raise rollout.max_head_offpolicyness or the consumer batch size, "
                    "or use a separate executor for evaluation"
                )
        return True

    def _oldest_first(self, count: int) -> list[int]:
        # Earliest deadline first: a trajectory expires `max_head_offpolicyness` versions
        # after its oldest token, so taking the oldest first minimises expiries (EDF is
        # optimal for meeting deadlines). In completion order a straggler would queue
        # behind a full staleness window of fresh trajectories and expire there.
        # Trajectories without versions never expire and go last; ties keep completion order.
        def deadline(item: tuple[int, _Ready]) -> float:
            oldest = item[1].oldest_version
            return float("inf") if oldest is None else oldest

        return [task_id for task_id, _ in sorted(self._ready.items(), key=deadline)[:count]]

    def _expire_stale(self) -> None:
        version = self.inference_engine.get_version()
        bound = version - self.config.max_head_offpolicyness
        for task_id, ready in list(self._ready.items()):
            if ready.oldest_version is not None and ready.oldest_version < bound:
                del self._ready[task_id]
                self.staleness_manager.on_rollout_expired()
                self._count_rejection("expired")
                logger.info(
                    "dropped rollout %d: oldest token from version %d, trainer at %d (max_head_offpolicyness=%d)",
                    task_id,
                    ready.oldest_version,
                    version,
                    self.config.max_head_offpolicyness,
                )

    def _take(self, task_ids: list[int]) -> dict[str, torch.Tensor]:
        return concat_padded_tensors(self._take_each(task_ids))

    def _take_each(self, task_ids: list[int]) -> list[Trajectory]:
        trajectories = [self._ready.pop(task_id).trajectory for task_id in task_ids]
        if self.trajectory_dump_dir is not None:
            self._dump(task_ids, trajectories)
        return trajectories

    def _dump(self, task_ids: list[int], trajectories: list[Trajectory]) -> None:
        version = self.inference_engine.get_version()
        assert self.trajectory_dump_dir is not None
        with open(self.trajectory_dump_dir / f"{version}.jsonl", "a", encoding="utf-8") as f:
            for task_id, trajectory in zip(task_ids, trajectories):
                for record in _sample_records(trajectory):
                    f.write(json.dumps({"version": version, "task_id": task_id, **record}) + "\n")

    # ------------------------------------------------------------------ control and stats

    def pause(self) -> None:
        """Start no new rollouts (e.g. during a weight update); running ones continue."""
        runner = self._require_runner()
        with self._lock:
            self._paused = True
            runner.pause()

    def resume(self) -> None:
        """Undo `pause` and start whatever capacity allows."""
        runner = self._require_runner()
        with self._lock:
            self._paused = False
            runner.resume()
        self._flush()

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
        with self._lock:
            return dict(self._failures.rejections)

    @property
    def num_expired(self) -> int:
        """Accepted trajectories dropped for exceeding `max_head_offpolicyness`."""
        with self._lock:
            return self._failures.rejections["expired"]

    def _require_runner(self) -> AsyncTaskRunner:
        if self._runner is None:
            raise RuntimeError("call WorkflowExecutor.initialize() first")
        return self._runner


def _sample_records(trajectory: Trajectory) -> Iterator[dict]:
    """One JSON-ready dict per sample: token ids (padding stripped), versions, loss mask, reward."""
    input_ids = trajectory["input_ids"]
    mask = trajectory.get("attention_mask")
    for i in range(input_ids.shape[0]):
        keep = mask[i].bool() if mask is not None else torch.ones_like(input_ids[i], dtype=torch.bool)
        record: dict[str, Any] = {"input_ids": input_ids[i][keep].tolist()}
        for key in ("versions", "loss_mask"):
            if key in trajectory:
                record[key] = trajectory[key][i][keep].tolist()
        if "rewards" in trajectory:
            record["reward"] = float(trajectory["rewards"][i])
        yield record
