"""Run coroutines on one background event loop and hand their results to a waiting thread.

```
caller thread(s)                      runner thread (asyncio loop)
  submit(coro_fn) ──▶ input queue ──▶ task ──▶ on_result callbacks ──▶ output queue
  wait(count)     ◀── Condition.notify_all ◀───────────────────────────────┘
```

The shape follows AReaL's rollout thread (arXiv 2505.24298, section 5.1; the
`WorkflowExecutor` of AReaL-lite), with two changes: a waiter is woken through a
`threading.Condition` the moment a result is published instead of polling the output
queue on a fixed sleep, and `destroy` cancels tasks still in flight instead of abandoning
them. A task that raises or is cancelled becomes a `TaskResult` with `data=None` and the
traceback in `error`; it is logged (the whole traceback the first time an error occurs,
its last line after that) and counted, and the runner keeps going. `TaskResult` and
`TaskQueueFullError` are in `workflows/controller/task_result.py`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from workflows.controller.task_result import ResultCallback, TaskId, TaskQueueFullError, TaskResult, last_line

logger = logging.getLogger(__name__)


@dataclass
class _Task:
    task_id: TaskId
    coro_fn: Callable[..., Awaitable[Any]]
    args: tuple
    kwargs: dict
    on_result: ResultCallback | None
    handle: asyncio.Task | None = field(default=None, repr=False)


class AsyncTaskRunner:
    """One daemon thread running an asyncio loop that executes submitted coroutines.

    Thread-safety: `submit`, `pause`, `resume`, the queue sizes and counters may be used
    from any thread; `wait` from any thread (results go to whichever waiter takes them).

    Args:
        max_queue_size: most tasks waiting to start (submitted, not yet running); >= 1.
        name: the thread's name (shows up in logs and debuggers).
        on_result: called with every `TaskResult` on the runner thread, after the task's
            own `on_result` and before the result is visible to `wait`, so bookkeeping it
            does is seen by the woken waiter. It must not block; exceptions it raises are
            logged and counted in `num_callback_errors`.

    Raises:
        ValueError: if `max_queue_size < 1`.
    """

    def __init__(
        self,
        *,
        max_queue_size: int,
        name: str = "areal-async-task-runner",
        on_result: ResultCallback | None = None,
    ) -> None:
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.max_queue_size = max_queue_size
        self.name = name
        self._on_result = on_result

        # One lock guards everything shared between threads; the Condition on it is what
        # wakes waiters the moment a result lands.
        self._lock = threading.Lock()
        self._results_ready = threading.Condition(self._lock)
        self._queue: deque[_Task] = deque()
        self._results: deque[TaskResult] = deque()
        self._live_ids: set[Hashable] = set()  # queued, running, or result not yet taken
        self._inflight: dict[Hashable, _Task] = {}  # touched on the loop thread only
        self._auto_ids = itertools.count()
        self._paused = False
        self._started = False
        self._stopping = False
        self._closed = False
        self._wakeup_scheduled = False
        self._logged_errors: set[str] = set()  # last lines of tracebacks already logged in full

        self.num_completed = 0
        self.num_failed = 0
        self.num_cancelled = 0
        self.num_callback_errors = 0

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the loop thread; returns once the loop is running.

        Raises:
            RuntimeError: if called twice.
        """
        with self._lock:
            if self._started:
                raise RuntimeError(f"{self.name}: start() called twice")
            self._started = True
        self._loop = asyncio.new_event_loop()
        running = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(running,), name=self.name, daemon=True)
        self._thread.start()
        running.wait()

    def _run_loop(self, running: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(running.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def destroy(self, timeout: float = 5.0) -> None:
        """Cancel queued and running tasks, stop the loop and join the thread.

        Returns within about `timeout` seconds even if a task ignores cancellation (the
        thread is a daemon and is then left behind, with a warning). Cancelled tasks
        become results with `cancelled=True`; waiters with too few results get
        `RuntimeError`. Safe to call more than once.

        Args:
            timeout: seconds to wait for in-flight tasks to finish cancelling, >= 0.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            first_call = self._started and not self._stopping
            self._stopping = True
            if first_call:
                assert self._loop is not None
                # Scheduled under the lock so a concurrent `submit` either lands before the
                # shutdown drains the queue or sees `_stopping`.
                self._loop.call_soon_threadsafe(self._shutdown, deadline)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                logger.warning(
                    "%s: loop thread still busy %.2f s after destroy(); leaving the daemon thread behind",
                    self.name,
                    timeout,
                )
        with self._lock:
            self._closed = True
            self._results_ready.notify_all()

    def _shutdown(self, deadline: float) -> None:
        with self._lock:
            never_started = list(self._queue)
            self._queue.clear()
        for task in never_started:
            self._publish(task, TaskResult(task.task_id, error="cancelled before start", cancelled=True))
        tasks = [t.handle for t in self._inflight.values() if t.handle is not None]
        for handle in tasks:
            handle.cancel()
        assert self._loop is not None
        self._loop.create_task(self._finish_shutdown(tasks, deadline))

    async def _finish_shutdown(self, tasks: list[asyncio.Task], deadline: float) -> None:
        # Leave a sliver of the budget for the thread to exit and the caller's join.
        grace = max(0.0, deadline - time.monotonic() - 0.02)
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for task in list(self._inflight.values()):
            # Ignored its cancellation: account for it here, since its wrapper never finishes.
            self._inflight.pop(task.task_id, None)
            self._publish(task, TaskResult(task.task_id, error="cancelled; did not stop in time", cancelled=True))
        # Tasks the coroutines started themselves (an inference engine's batching task,
        # say) would otherwise be destroyed pending when the loop closes.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for other in others:
            other.cancel()
        if others:
            await asyncio.wait(others, timeout=max(0.0, deadline - time.monotonic() - 0.01))
        assert self._loop is not None
        self._loop.stop()

    def __enter__(self) -> AsyncTaskRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # ------------------------------------------------------------------ submit

    def submit(
        self,
        coro_fn: Callable[..., Awaitable[Any]],
        *args: Any,
        task_id: TaskId | None = None,
        on_result: ResultCallback | None = None,
        **kwargs: Any,
    ) -> TaskId:
        """Queue `coro_fn(*args, **kwargs)` to run on the loop; thread-safe.

        `task_id` and `on_result` are taken by the runner, not passed to `coro_fn`.

        Args:
            coro_fn: an async function (or any callable returning an awaitable).
            task_id: an id unique among tasks whose results have not been taken by `wait`;
                None assigns the next free integer.
            on_result: called with this task's `TaskResult` on the runner thread, before
                the runner-wide `on_result`.

        Returns:
            The task id.

        Raises:
            TaskQueueFullError: if `max_queue_size` tasks are already waiting to start.
            ValueError: if `task_id` is still in use.
            RuntimeError: if the runner was not started or is being destroyed.
        """
        with self._lock:
            if not self._started or self._stopping:
                raise RuntimeError(f"{self.name}: submit() needs a started runner that is not destroyed")
            if len(self._queue) >= self.max_queue_size:
                raise TaskQueueFullError(
                    f"{self.name}: {len(self._queue)} tasks already wait to start (max_queue_size="
                    f"{self.max_queue_size}); wait() for results or raise the queue size"
                )
            if task_id is None:
                task_id = next(self._auto_ids)
                while task_id in self._live_ids:  # a caller may have used this int explicitly
                    task_id = next(self._auto_ids)
            elif task_id in self._live_ids:
                raise ValueError(f"{self.name}: task id {task_id!r} is already queued, running or unclaimed")
            self._live_ids.add(task_id)
            self._queue.append(_Task(task_id, coro_fn, args, kwargs, on_result))
            self._schedule_start_locked()
        return task_id

    def _schedule_start_locked(self) -> None:
        # One pending wake-up serves any number of submits; this is most of the per-task
        # overhead when many tasks are submitted at once.
        if not self._wakeup_scheduled and not self._paused:
            self._wakeup_scheduled = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._start_queued)

    def _start_queued(self) -> None:
        with self._lock:
            self._wakeup_scheduled = False
            if self._paused or self._stopping:
                return
            ready = list(self._queue)
            self._queue.clear()
        assert self._loop is not None
        for task in ready:
            self._inflight[task.task_id] = task
            task.handle = self._loop.create_task(self._run_task(task))

    async def _run_task(self, task: _Task) -> None:
        try:
            data = await task.coro_fn(*task.args, **task.kwargs)
            result = TaskResult(task.task_id, data=data)
        except asyncio.CancelledError:
            # Swallowed on purpose: the runner owns this task, and turning the cancellation
            # into a result is what lets waiters and bookkeeping see it.
            result = TaskResult(task.task_id, error="cancelled", cancelled=True)
        except Exception:  # noqa: BLE001 - any task failure becomes a result, never a dead loop
            tb = traceback.format_exc()
            last = last_line(tb)
            if last in self._logged_errors:
                logger.warning("%s: task %r failed: %s", self.name, task.task_id, last)
            else:
                if len(self._logged_errors) < 1000:
                    self._logged_errors.add(last)
                logger.warning("%s: task %r failed:\n%s", self.name, task.task_id, tb)
            result = TaskResult(task.task_id, error=tb)
        if self._inflight.pop(task.task_id, None) is not None:
            self._publish(task, result)

    def _publish(self, task: _Task, result: TaskResult) -> None:
        for callback in (task.on_result, self._on_result):
            if callback is None:
                continue
            try:
                callback(result)
            except Exception:
                logger.exception("%s: on_result callback failed for task %r", self.name, task.task_id)
                with self._lock:
                    self.num_callback_errors += 1
        with self._lock:
            if result.cancelled:
                self.num_cancelled += 1
                logger.debug("%s: task %r cancelled", self.name, task.task_id)
            elif result.error is not None:
                self.num_failed += 1
            else:
                self.num_completed += 1
            self._results.append(result)
            self._results_ready.notify_all()

    # ------------------------------------------------------------------ wait

    def wait(self, count: int, timeout: float | None = None) -> list[TaskResult]:
        """Block until `count` results are ready; take and return them in completion order.

        Args:
            count: results to take (>= 0).
            timeout: seconds to wait; None waits indefinitely; 0 only checks.

        Returns:
            `count` results, oldest first. Their task ids become free for reuse.

        Raises:
            ValueError: if `count < 0`.
            TimeoutError: if fewer than `count` results are ready in time. Nothing is
                taken: the ready results stay for the next `wait`.
            RuntimeError: if the runner was destroyed with fewer than `count` results left.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        with self._results_ready:
            self._results_ready.wait_for(lambda: len(self._results) >= count or self._closed, timeout)
            available = len(self._results)
            if available < count:
                if self._closed:
                    raise RuntimeError(f"{self.name}: destroyed with {available} of {count} awaited results")
                raise TimeoutError(f"{self.name}: {available} of {count} results ready after {timeout} s")
            taken = [self._results.popleft() for _ in range(count)]
            for result in taken:
                self._live_ids.discard(result.task_id)
            return taken

    # ------------------------------------------------------------------ flow control

    def pause(self) -> None:
        """Start no new tasks until `resume`; tasks already running continue."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        """Undo `pause`: queued tasks start."""
        with self._lock:
            self._paused = False
            if self._started and not self._stopping and self._queue:
                self._schedule_start_locked()

    @property
    def paused(self) -> bool:
        with self._lock:
            return self._paused

    def get_input_queue_size(self) -> int:
        """Tasks submitted but not started yet."""
        with self._lock:
            return len(self._queue)

    def run(self, coroutine, timeout: float | None = None):
        """Run one coroutine on the loop, outside the task queue and its results, and
        block for its value (it raises what the coroutine raised).

        Raises:
            RuntimeError: before `start` or after `destroy`.
            TimeoutError: not done within `timeout` seconds (it is cancelled).
        """
        if self._loop is None or not self._loop.is_running():
            coroutine.close()
            raise RuntimeError("AsyncTaskRunner.run() needs a started, running runner")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the coroutine did not finish within {timeout} s") from None

    def get_output_queue_size(self) -> int:
        """Results ready and not yet taken by `wait`."""
        with self._lock:
            return len(self._results)

    def get_num_outstanding(self) -> int:
        """Tasks submitted whose results `wait` has not taken yet (queued, running or ready)."""
        with self._lock:
            return len(self._live_ids)

    def get_num_running(self) -> int:
        """Tasks started on the loop and not finished yet (a racy read, for monitoring)."""
        return len(self._inflight)
