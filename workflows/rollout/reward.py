"""Verifiable reward for math answers, scored with math-verify in a process pool.

math-verify's own timeout uses SIGALRM, which only works on a process's main thread; the
rollout workflow runs on an event-loop thread. So each call runs in a `pebble` process
pool whose per-task timeout kills a stuck worker instead. Every failure (timeout, parse
error, crashed worker) scores 0.0 and is counted; none reaches the training loop.

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
import multiprocessing
import os
import re
import signal
import threading
from dataclasses import dataclass

from pebble import ProcessExpired, ProcessPool

from workflows.config import REWARD_FORMATS

logger = logging.getLogger(__name__)


def math_verify_reward(completion: str, reference: str) -> float:
    """1.0 when the last boxed (or otherwise extracted) answer in `completion` equals
    `reference` mathematically, else 0.0. Runs in a worker process."""
    from math_verify import parse, verify

    # Timeouts are the pool's job (see module docstring); math-verify's signal-based
    # ones are switched off.
    gold = parse(reference, parsing_timeout=None)
    answer = parse(completion, parsing_timeout=None)
    if not gold or not answer:
        return 0.0
    return 1.0 if verify(gold, answer, timeout_seconds=None) else 0.0


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def boxed_math_verify_reward(completion: str, reference: str) -> float:
    """`math_verify_reward`, but only for an answer given in `\\boxed{}` as the prompt's
    instruction asks (rollout.reward_format=boxed): an unboxed answer scores 0.0."""
    if "\\boxed{" not in completion:
        return 0.0
    return math_verify_reward(completion, reference)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number_reward(completion: str, reference: str) -> float:
    """1.0 when the last number written in `completion` equals `reference`
    (rollout.reward_format=number). math-verify alone also accepts an expression that
    evaluates to the answer, so on arithmetic tasks restating the question ("74 + 30 =")
    would score; here only a number counts."""
    found = _NUMBER.findall(completion)
    if not found:
        return 0.0
    return math_verify_reward(found[-1].replace(",", ""), reference)


# rollout.reward_format -> the reward function (top-level, so worker processes can import it).
# The formats are listed once, as REWARD_FORMATS (the key's choices); a format without a
# function here, or a function for no format, fails this module's import.
REWARD_FUNCTIONS = {"any": math_verify_reward, "boxed": boxed_math_verify_reward, "number": final_number_reward}
if set(REWARD_FUNCTIONS) != set(REWARD_FORMATS):
    raise ImportError(
        f"REWARD_FUNCTIONS maps {', '.join(REWARD_FUNCTIONS)} but workflows.config.REWARD_FORMATS lists "
        f"{', '.join(REWARD_FORMATS)}; make them name the same formats"
    )


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


@dataclass
class RewardStats:
    num_scored: int = 0
    num_failed: int = 0  # timeouts, errors and crashed workers, each scored 0.0
    num_timeouts: int = 0
    num_crashes: int = 0  # the worker process died (os._exit, a signal): pebble starts another


class RewardScorer:
    """Scores completions in `num_workers` processes, `timeout` seconds per call.

    `await scorer.ascore(completion, reference)` returns 1.0 or 0.0, never raises.
    """

    def __init__(self, *, num_workers: int = 2, timeout: float = 10.0, reward_fn=math_verify_reward):
        self.timeout = timeout
        self.reward_fn = reward_fn
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

    def score(self, completion: str, reference: str) -> float:
        future = self._schedule(completion, reference)
        concurrent.futures.wait([future])
        return self._settle(future)

    async def ascore(self, completion: str, reference: str) -> float:
        future = self._schedule(completion, reference)
        try:
            await asyncio.wrap_future(future)
        except Exception:  # noqa: BLE001 - `_settle` classifies it
            # Awaited, the asyncio future's exception counts as retrieved: left unretrieved,
            # its finaliser logs from inside whatever the garbage collector interrupts,
            # which in CPython 3.11 can be `compile` (SystemError: AST constructor
            # recursion depth mismatch) after a worker died.
            pass
        return self._settle(future)

    def _schedule(self, completion: str, reference: str) -> concurrent.futures.Future:
        return self._pool.schedule(self.reward_fn, args=(completion, reference), timeout=self.timeout)

    def _settle(self, future: concurrent.futures.Future) -> float:
        try:
            return self._record(float(future.result()), failed=False)
        except concurrent.futures.TimeoutError:
            return self._record(0.0, failed=True, timeout=True, reason=f"timed out after {self.timeout}s")
        except ProcessExpired as exc:
            return self._record(0.0, failed=True, crashed=True, reason=f"the worker process died ({exc})")
        except Exception as exc:  # noqa: BLE001 - any failure of the scorer scores 0
            return self._record(0.0, failed=True, reason=repr(exc))

    def _record(self, value: float, *, failed: bool, timeout: bool = False, crashed: bool = False,
                reason: str = "") -> float:
        with self._lock:
            self.stats.num_scored += 1
            self.stats.num_failed += failed
            self.stats.num_timeouts += timeout
            self.stats.num_crashes += crashed
        if failed:
            logger.warning("reward scored 0.0: %s", reason)
        return value

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=5)
