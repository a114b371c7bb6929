"""What `AsyncTaskRunner` hands back: one `TaskResult` per task, and the error raised
when its queue is full. Kept apart from the runner so that code that only reads results
(the rollout controller's failure accounting) does not depend on the event loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TaskId = int | str
ResultCallback = Callable[["TaskResult"], None]


def last_line(traceback_text: str) -> str:
    """The final non-empty line of a formatted traceback: `ExceptionType: message`."""
    lines = [line.strip() for line in traceback_text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else traceback_text


class TaskQueueFullError(RuntimeError):
    """`AsyncTaskRunner.submit` found `max_queue_size` tasks waiting to start."""


@dataclass(frozen=True)
class TaskResult:
    """What one task produced.

    Attributes:
        task_id: the id `submit` returned.
        data: the coroutine's return value, or None if it raised or was cancelled.
        error: the formatted traceback (or a cancellation note), or None on success.
        cancelled: True if the task was cancelled (by `destroy`) rather than failing.
    """

    task_id: TaskId
    data: Any = None
    error: str | None = None
    cancelled: bool = False

    @property
    def accepted(self) -> bool:
        """True when the task finished without error and returned something other than None."""
        return self.error is None and self.data is not None
