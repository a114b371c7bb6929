"""Scoring completions with the run's reward functions in a process pool.

Reward functions (workflows/rollout/reward_fns.py: the built-ins and the user's own, by
import path) may hang, crash or use signals (math-verify's own timeout uses SIGALRM, which
only works on a process's main thread; the rollout workflow runs on an event-loop
thread). So each call runs in a `pebble` process pool whose per-task timeout kills a
stuck worker instead. A timeout or a crashed worker scores 0.0 and is counted. A function
that raises is a bug to fix, not a wrong answer: the call raises `RewardFunctionError`
naming the function, so the rollout fails, and rollouts that keep failing stop the run
with one line (`rollout.max_consecutive_rejections`, workflows/controller/failures.py)
instead of training on zeros.

Signals. The workers leave the trainer's process group as they start, so a Ctrl-C at the
terminal or a SIGTERM sent to the group (`areal launch` cancelling a replica) reaches only
the trainer, which then stops the pool itself (`close`), instead of killing workers under
a running pool or making them print KeyboardInterrupt tracebacks. They are spawned with
SIGINT and SIGTERM blocked, so one sent to the group while a worker is still starting is
dropped rather than delivered; pebble's own handlers (SIGINT ignored, SIGTERM exits) hold
afterwards. A worker whose trainer died exits when its task pipe closes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import multiprocessing
import os
import re
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from pebble import ProcessExpired, ProcessPool

from workflows.rollout.reward_fns import RewardTerm, call_reward, math_verify_reward, resolve_reward
from workflows.user_code import first_line

logger = logging.getLogger(__name__)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _init_worker() -> None:
    # math-verify warns on every call that its own timeout is off; that is intended.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _leave_process_group()


def _leave_process_group() -> None:
    """In a worker: its own process group, then drop the stop signals sent to the old one
    while it was starting (they were blocked since the spawn) and unblock them."""
    if not hasattr(signal, "pthread_sigmask"):
        return
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    handlers = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # a pending, ignored signal is discarded
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _started(*_: object) -> bool:
    return True


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def _where(exc: BaseException) -> str:
    """` (file, line N)`: the innermost frame of the worker's traceback that pebble
    attaches to an exception it hands back, or "" without one."""
    frames = _FRAME.findall(str(getattr(exc, "traceback", "") or ""))
    return f" ({frames[-1][0]}, line {frames[-1][1]})" if frames else ""


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something other than a finite number; the
    message is one line naming the function (its `reward.fn` entry) and the error."""


@dataclass
class RewardStats:
    num_scored: int = 0  # calls of a reward function (one per function per completion)
    num_failed: int = 0  # timeouts, crashed workers (each scored 0.0) and errors (raised)
    num_timeouts: int = 0
    num_crashes: int = 0  # the worker process died (os._exit, a signal): pebble starts another
    num_errors: int = 0  # the function raised or returned no number: RewardFunctionError
    # Per function (by name): the sum and the count of its values since `take_means`.
    sums: dict[str, list[float]] = field(default_factory=dict)


class RewardScorer:
    """Scores completions with one or more reward functions in `num_workers` processes,
    `timeout` seconds per call.

    Args:
        reward_fn: a `RewardTerm`, a `reward.fn` entry (a built-in name, an import path)
            or a picklable top-level function; or a list of them, whose values are summed
            with `weights` (default 1.0 each).

    `await scorer.ascore(completion, reference, prompt=..., row=...)` returns the weighted
    sum of the functions' values (a timeout or a crashed worker counts 0.0 for that
    function).

    Raises:
        UserCodeError: (constructor) a reward function that does not load or has the
            wrong signature.
    """

    def __init__(self, *, num_workers: int = 2, timeout: float = 10.0, reward_fn: Any = math_verify_reward,
                 weights: Optional[Sequence[float]] = None):
        entries = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
        weights = [1.0] * len(entries) if weights is None else list(weights)
        self.terms = [e if isinstance(e, RewardTerm) else resolve_reward(e, float(w)) for e, w in zip(entries, weights)]
        self.timeout = timeout
        # spawn, not fork: the parent holds torch threads, and forking a threaded
        # process can deadlock the child.
        self._pool = ProcessPool(
            max_workers=num_workers, context=multiprocessing.get_context("spawn"), initializer=_init_worker
        )
        # Start the workers and pebble's threads now, with the stop signals blocked in this
        # thread: children (and the threads that later replace workers) inherit the mask,
        # see the module docstring. A signal meanwhile is delivered when the mask is restored.
        blocked = hasattr(signal, "pthread_sigmask")
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if blocked else None
        try:
            self._pool.schedule(_started)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self._lock = threading.Lock()
        self.stats = RewardStats()

    def score(self, completion: str, reference: str, *, prompt: Any = None, row: Optional[dict] = None) -> float:
        """`ascore`, blocking.

        Raises:
            RewardFunctionError: a reward function raised or returned no finite number.
        """
        futures = self._schedule(completion, reference, prompt, row)
        concurrent.futures.wait(futures)
        return self._settle(futures)

    async def ascore(self, completion: str, reference: str, *, prompt: Any = None,
                     row: Optional[dict] = None) -> float:
        """The weighted reward of `completion` against `reference`; `prompt` (the row's
        prompt) and `row` (its columns) reach the functions that take them.

        Raises:
            RewardFunctionError: a reward function raised or returned no finite number.
        """
        futures = self._schedule(completion, reference, prompt, row)
        for future in futures:
            try:
                await asyncio.wrap_future(future)
            except Exception:  # noqa: BLE001 - `_settle` classifies it
                # Awaited, the asyncio future's exception counts as retrieved: left unretrieved,
                # its finaliser logs from inside whatever the garbage collector interrupts,
                # which in CPython 3.11 can be `compile` (SystemError: AST constructor
                # recursion depth mismatch) after a worker died.
                pass
        return self._settle(futures)

    def _schedule(self, completion: str, reference: str, prompt: Any, row: Optional[dict]) -> list:
        given = {"prompt": prompt, "row": dict(row) if row is not None else {}}
        return [
            self._pool.schedule(call_reward, args=(term.target, completion, reference,
                                                   {k: given[k] for k in term.keywords}),
                                timeout=term.timeout or self.timeout)
            for term in self.terms
        ]

    def _settle(self, futures: list) -> float:
        total, error = 0.0, None
        for term, future in zip(self.terms, futures):
            try:
                value = self._value(term, future)
            except RewardFunctionError as exc:
                error = error or exc
                continue
            total += term.weight * value
        if error is not None:
            raise error
        return total

    def _value(self, term: RewardTerm, future: concurrent.futures.Future) -> float:
        try:
            raw = future.result()
        except concurrent.futures.TimeoutError:
            return self._record(term, 0.0, failed=True, timeout=True,
                                reason=f"timed out after {term.timeout or self.timeout}s")
        except ProcessExpired as exc:
            return self._record(term, 0.0, failed=True, crashed=True, reason=f"the worker process died ({exc})")
        except Exception as exc:  # noqa: BLE001 - whatever the function raised
            self._record(term, 0.0, failed=True, error=True, reason=first_line(exc))
            raise RewardFunctionError(f"reward.fn {term.name!r} raised {first_line(exc)}{_where(exc)}") from None
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(raw, bool) or not math.isfinite(value):
            self._record(term, 0.0, failed=True, error=True, reason=f"returned {raw!r:.80}")
            raise RewardFunctionError(f"reward.fn {term.name!r} returned {raw!r:.80}, not a finite number")
        return self._record(term, value, failed=False)

    def _record(self, term: RewardTerm, value: float, *, failed: bool, timeout: bool = False, crashed: bool = False,
                error: bool = False, reason: str = "") -> float:
        with self._lock:
            self.stats.num_scored += 1
            self.stats.num_failed += failed
            self.stats.num_timeouts += timeout
            self.stats.num_crashes += crashed
            self.stats.num_errors += error
            if not error:
                sums = self.stats.sums.setdefault(term.name, [0.0, 0])
                sums[0] += value
                sums[1] += 1
        if failed and not error:
            logger.warning("reward.fn %r scored 0.0: %s", term.name, reason)
        return value

    def take_means(self) -> dict[str, float]:
        """Each function's mean value over the calls since the last `take_means`, by name."""
        with self._lock:
            means = {name: total / count for name, (total, count) in self.stats.sums.items() if count}
            self.stats.sums = {}
        return means

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=5)
