"""Failure accounting for the rollout controller: when to stop starting rollouts.

Rollouts that keep failing would otherwise be replaced by new ones forever, and a run
would spin without a word. Two limits stop it, whichever trips first:

- a streak: `rollout.max_consecutive_rejections` rollouts in a row rejected (raised,
  returned None, or failed `should_accept`) with none accepted in between;
- a rate: more than `rollout.max_failure_rate` of the last `rollout.failure_rate_window`
  finished rollouts failed, which catches a backend that fails a share of its requests
  without ever failing a long streak.

Groups dropped by dynamic sampling (`filtered`) are no failure of the rollout and have a
streak limit of their own, `rollout.max_consecutive_filtered`. Staleness expiries and
cancellations count as rejections but towards neither limit.
"""

from __future__ import annotations

import logging
from collections import Counter, deque

from workflows.config import RolloutConfig
from workflows.controller.task_result import last_line

logger = logging.getLogger(__name__)

# Rejections that count towards the limits, as the message words them.
FAILURE_REASONS = {"error": "raised", "none": "returned None", "should_accept": "failed should_accept"}
FILTERED = "filtered"


class RolloutFailureError(RuntimeError):
    """The rollout controller stopped: too many rollouts failed (see the module docstring).

    Attributes:
        count: rollouts rejected in a row, or failed within the window.
        reasons: `{reason: count}` over that streak or window; reasons are the keys of
            `FAILURE_REASONS`, or `FILTERED`.
        last_error: the last line of the last traceback (`ValueError: ...`), or None
            when no rollout raised.
        window, max_rate: set when the failure rate tripped rather than a streak.
        context: appended to the message when set (the trainer says where the run stopped).
    """

    def __init__(self, count: int, reasons: dict[str, int], last_error: str | None, window: int | None = None,
                 max_rate: float | None = None) -> None:
        self.count = count
        self.reasons = dict(reasons)
        self.last_error = last_error
        self.window = window
        self.max_rate = max_rate
        self.context: str | None = None
        super().__init__(count, self.reasons, last_error)

    def copy(self) -> RolloutFailureError:
        """A fresh exception with the same figures, so tracebacks do not pile up on one object."""
        return RolloutFailureError(self.count, self.reasons, self.last_error, self.window, self.max_rate)

    def __str__(self) -> str:
        if set(self.reasons) == {FILTERED}:
            message = (f"{self.count} prompt groups in a row had all-equal rewards and were dropped by dynamic sampling, "
                       "none kept; the task is too hard or too easy for this model: change the data or the model, "
                       "raise rollout.max_consecutive_filtered, or set actor.dynamic_sampling=false")
            return message + (f"; {self.context}" if self.context else "")
        reasons = ", ".join(f"{n} {FAILURE_REASONS.get(r, r)}" for r, n in sorted(self.reasons.items(), key=lambda x: -x[1]))
        if self.window is not None:
            message = (f"{self.count} of the last {self.window} rollouts failed ({reasons}), more than "
                       f"rollout.max_failure_rate={self.max_rate:g} of them")
            limit = "rollout.max_failure_rate"
        else:
            message = f"{self.count} rollouts in a row were rejected and none accepted ({reasons})"
            limit = "rollout.max_consecutive_rejections"
        if self.last_error:
            message += f"; last error: {self.last_error}"
        message += f"; fix the cause, or raise {limit} if so many rejections are expected"
        return message + (f"; {self.context}" if self.context else "")


class FailureTracker:
    """Counts every finished rollout's outcome and latches the first limit it breaks.

    Not thread-safe: the executor calls it under its own lock.

    Raises:
        ValueError: if `rollout.max_consecutive_rejections`, `max_failure_rate` or
            `failure_rate_window` is out of range.
    """

    def __init__(self, config: RolloutConfig) -> None:
        if config.max_consecutive_rejections < 1:
            raise ValueError(f"rollout.max_consecutive_rejections must be >= 1, got {config.max_consecutive_rejections}")
        if not 0 < config.max_failure_rate <= 1 or config.failure_rate_window < 1:
            raise ValueError("rollout.max_failure_rate must be in (0, 1] and rollout.failure_rate_window >= 1, got "
                             f"{config.max_failure_rate} and {config.failure_rate_window}")
        self.config = config
        self.rejections: Counter[str] = Counter()  # every rejection by reason, failures or not
        self.failure: RolloutFailureError | None = None  # latched once a limit trips
        self._streak: Counter[str] = Counter()
        self._streak_error: str | None = None
        self._filtered_streak = 0
        # Outcomes of the last `failure_rate_window` finished rollouts: a failure reason,
        # or None for an accepted one; `_window_failures` keeps their running count.
        self._outcomes: deque[str | None] = deque(maxlen=config.failure_rate_window)
        self._window_failures: Counter[str] = Counter()
        self._last_error: str | None = None  # of any failed rollout, kept across accepted ones

    def on_accepted(self) -> None:
        self._streak.clear()
        self._streak_error = None
        self._filtered_streak = 0
        self._record_outcome(None)

    def on_filtered(self) -> None:
        self.rejections[FILTERED] += 1
        self._filtered_streak += 1
        if self.failure is None and self._filtered_streak >= self.config.max_consecutive_filtered:
            self.failure = RolloutFailureError(self._filtered_streak, {FILTERED: self._filtered_streak}, None)
            logger.warning("%d prompt groups in a row were filtered: starting no more", self._filtered_streak)

    def on_rejected(self, reason: str, error: str | None = None) -> None:
        """Count a rejection; `error` is the traceback of a rollout that raised."""
        self.rejections[reason] += 1
        if reason not in FAILURE_REASONS:
            return  # expired, cancelled: not the rollout's failure
        self._streak[reason] += 1
        if error is not None:
            self._streak_error = self._last_error = last_line(error)
        count = self._streak.total()
        if self.failure is None and count >= self.config.max_consecutive_rejections:
            self.failure = RolloutFailureError(count, dict(self._streak), self._streak_error)
            logger.warning("%d rollouts in a row were rejected: starting no more", count)
        self._record_outcome(reason)

    def _record_outcome(self, reason: str | None) -> None:
        window = self._outcomes.maxlen
        if len(self._outcomes) == window and self._outcomes[0] is not None:
            self._window_failures[self._outcomes[0]] -= 1  # about to drop out of the window
        self._outcomes.append(reason)
        if reason is not None:
            self._window_failures[reason] += 1
        count = self._window_failures.total()
        if self.failure is None and len(self._outcomes) == window and count > self.config.max_failure_rate * window:
            failed = {r: n for r, n in self._window_failures.items() if n > 0}
            self.failure = RolloutFailureError(count, failed, self._last_error, window=window,
                                               max_rate=self.config.max_failure_rate)
            logger.warning("%d of the last %d rollouts failed: starting no more", count, window)
