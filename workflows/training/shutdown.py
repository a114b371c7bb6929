"""An orderly stop on SIGINT (Ctrl-C) and SIGTERM, bounded in time.

    with stop_on_signals():          # the training run (areal train)
        ...
        with deferred_stop():        # a step's bookkeeping: stats line, checkpoints
            ...

While `stop_on_signals` is active, the first SIGINT or SIGTERM raises `RunInterrupted`
(a `KeyboardInterrupt`, so `except Exception` does not swallow it) in the main thread,
wherever it is; the `finally` blocks on the way out destroy the rollout thread, the
inference worker and the reward process pool. Inside `deferred_stop` the signal is only
recorded and raised when the block ends, so a step's stats record and its checkpoints are
written completely or not at all (recover checkpoints are atomic in any case, see
workflows/training/recover.py). A second signal, or a stop still running `FORCE_EXIT_AFTER`
seconds after the first, kills the child processes and exits at once with the same
status, so no stop takes longer than that, whatever blocks.

Only stdlib imports: the CLI installs this before it imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Seconds from the first signal to a forced exit. Below the 30 s a user (or the local
# launcher's grace period, see launchers/local.py) should ever have to wait.
FORCE_EXIT_AFTER = 25.0


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run.

    Attributes:
        signum: the signal.
        run_dir: the run directory, once known (set by `run_training`).
        recover_step: the step of the run's last recover checkpoint, or None when there
            is none yet (set by `run_training`).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir: Optional[Path] = None
        self.recover_step: Optional[int] = None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended: 130
        for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def resume_hint(self, command: Optional[Sequence[str]] = None) -> str:
        """One line: what stopped the run and where it can be resumed from.

        Args:
            command: the argv that started the run (e.g. `["areal", "train", ...]`); it is
                quoted into the line, without any `trainer.resume=...` override.
        """
        head = f"stopped by {self.signal_name}"
        again = ""
        if command is not None:
            words = [w for w in command if not w.startswith("trainer.resume=")]
            again = shlex.join(words)
        if self.run_dir is None:
            return f"{head} before training started; nothing was written" + (f"; start again with: {again}" if again else "")
        where = self.run_dir / "checkpoints" / "recover"
        if self.recover_step is None:
            line = f"{head} before the first recover checkpoint; nothing to resume in {self.run_dir}, a new start begins at step 0"
            return line + (f": {again}" if again else "")
        line = f"{head}; the run can be resumed from step {self.recover_step} ({where})"
        return line + (f" with: {again}" if again else f" by starting it again with run_dir={self.run_dir}")


class _StopState:
    """Module-wide: signal handlers are process-wide, so nested `stop_on_signals` share one."""

    def __init__(self) -> None:
        self.depth = 0
        self.previous: dict[int, object] = {}
        self.received: Optional[int] = None  # the first signal
        self.raised = False
        self.deferring = 0
        self.describe: Optional[Callable[[int], str]] = None
        self.watchdog: Optional[threading.Timer] = None

    def handle(self, signum: int, frame) -> None:
        if self.received is not None:
            _force_exit(signum, f"second signal ({signal.Signals(signum).name}) while stopping")
        self.received = signum
        self.watchdog = threading.Timer(
            FORCE_EXIT_AFTER, _force_exit, args=(signum, f"still stopping {FORCE_EXIT_AFTER:.0f} s after the signal")
        )
        self.watchdog.daemon = True
        self.watchdog.start()
        logger.info("%s received: stopping", signal.Signals(signum).name)
        if self.deferring == 0:
            self.raised = True
            raise RunInterrupted(signum)


_state = _StopState()


@contextlib.contextmanager
def stop_on_signals(describe: Optional[Callable[[int], str]] = None) -> Iterator[None]:
    """SIGINT and SIGTERM raise `RunInterrupted` in the main thread while active.

    The previous handlers are restored on exit. Nested uses share the outermost handlers
    (and its state). Outside the main thread nothing is installed (Python delivers
    signals to the main thread only).

    Args:
        describe: `describe(signum)` returns the line printed if the stop has to be forced
            (see the module docstring); the last one given wins.
    """
    main = threading.current_thread() is threading.main_thread()
    if describe is not None:
        _state.describe = describe
    if main and _state.depth == 0:
        _state.received, _state.raised, _state.deferring = None, False, 0
        for sig in STOP_SIGNALS:
            _state.previous[sig] = signal.signal(sig, _state.handle)
    _state.depth += main
    try:
        yield
    finally:
        _state.depth -= main
        if main and _state.depth == 0:
            for sig, handler in _state.previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
            _state.previous.clear()
            # An armed watchdog stays armed: the process is on its way out and must get there.


@contextlib.contextmanager
def deferred_stop() -> Iterator[None]:
    """Hold a stop signal until the block ends; then raise `RunInterrupted`, unless the
    block is already raising an exception (which then goes on, and ends the run)."""
    _state.deferring += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _state.deferring -= 1
        if ok and _state.deferring == 0 and _state.received is not None and not _state.raised:
            _state.raised = True
            raise RunInterrupted(_state.received)


def stop_requested() -> Optional[int]:
    """The signal that asked the run to stop, or None."""
    return _state.received


def _force_exit(signum: int, why: str) -> None:
    """Kill this process's children (the reward workers) and exit now with 128 + signum."""
    line = f"areal: {why}; exiting without further cleanup"
    if _state.describe is not None:
        with contextlib.suppress(Exception):
            line += "; " + _state.describe(signum)
    with contextlib.suppress(Exception):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    with contextlib.suppress(Exception):
        for child in multiprocessing.active_children():
            with contextlib.suppress(Exception):
                child.kill()
    os._exit(128 + signum)
