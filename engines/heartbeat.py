"""Noticing a lost rank within a bounded time, and saying which one, in one line.

    beat = Heartbeat(store, rank=rank, world_size=world_size, timeout=60.0)
    beat.start()          # a daemon thread: beats, and watches the other ranks' beats

Every rank bumps a counter under `areal/heartbeat/<rank>` in the job's store (the
TCPStore behind the process group) every `interval` seconds and reads everyone else's.
A rank whose counter has not moved for `timeout` seconds of this process's own monotonic
clock is lost (no clock is compared across machines). A store that stops answering means
the node hosting it (the one of rank 0, or torch elastic's agent there) is lost.

Why a thread of our own: a collective with a peer that vanished without closing its
sockets (a power cut, a network partition) blocks until gloo's timeout, and even one that
fails at once (the peer's sockets closed) names a socket address, not a rank. The watcher
names the rank, then ends this process with `LOST_PEER_EXIT_CODE` so that the launcher
(torchrun, Slurm, Ray) sees a failure and the next launch resumes from the last recover
checkpoint. It cannot raise into the main thread, which may be stuck inside C++.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

KEY_PREFIX = "areal/heartbeat/"
# EX_TEMPFAIL (sysexits.h): the job may succeed when started again.
LOST_PEER_EXIT_CODE = 75
# Prefix of the one line a survivor prints; launchers look for it in replica logs.
LOST_LINE_PREFIX = "areal: lost rank"
JOINED_PREFIX = "areal: joined as rank"
# The beat of a rank that stopped on purpose: never reported lost.
DONE = "done"


def _exit_lost(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    # The main thread may be blocked in a collective that never returns; only os._exit
    # ends the process. Reward workers watch their parent and exit with it.
    os._exit(LOST_PEER_EXIT_CODE)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` looks like a collective that failed because another rank went away."""
    try:
        from torch.distributed import DistError
    except ImportError:  # torch without distributed support
        DistError = ()  # noqa: N806
    text = str(exc).lower()
    return isinstance(exc, DistError) or any(
        word in text for word in ("gloo", "nccl", "connection closed by peer", "connection reset", "broken pipe")
    )


class Heartbeat:
    """Beats for this rank and declares a peer lost after `timeout` seconds of silence.

    Args:
        store: a `torch.distributed.Store` every rank reaches (TCPStore).
        rank: this process's global rank; world_size: the number of ranks.
        timeout: seconds without a peer's beat (or without a store answer) before it is
            declared lost; must exceed `interval`.
        interval: seconds between beats; default `timeout / 5` (at most 5 s).
        on_lost: called once with the one-line report; default prints it to stderr and
            ends the process with exit code 75 (`LOST_PEER_EXIT_CODE`).
    Raises:
        ValueError: `timeout <= 0`, or `interval` not in (0, timeout).
    """

    def __init__(
        self,
        store: Any,
        *,
        rank: int,
        world_size: int,
        timeout: float,
        interval: float | None = None,
        on_lost: Callable[[str], None] = _exit_lost,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"heartbeat timeout must be > 0 seconds, got {timeout}")
        interval = min(timeout / 5, 5.0) if interval is None else interval
        if not 0 < interval < timeout:
            raise ValueError(f"heartbeat interval must be in (0, timeout={timeout:g}) seconds, got {interval}")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout, self.interval, self.on_lost = timeout, interval, on_lost
        # Where each rank runs, published once, so the report can name the node.
        self._where = f"node {os.environ.get('GROUP_RANK', '?')} host {socket.gethostname()} pid {os.getpid()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        self._places: dict[int, str] = {}  # rank -> where it runs, as it published

    def start(self) -> Heartbeat:
        self.store.set(f"{KEY_PREFIX}{self.rank}/where", self._where)
        # Which ranks run where, in the node's log: a launcher whose own agent died with
        # the rendezvous host (before this watcher could speak) names the others from it.
        sys.stderr.write(f"{JOINED_PREFIX} {self.rank} of {self.world_size} ({self._where})\n")
        sys.stderr.flush()
        self._beat(0)
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank{self.rank}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and watching (an orderly shutdown, so peers that outlive this
        rank by less than `timeout` do not report it lost)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 1)
        try:
            self.store.set(f"{KEY_PREFIX}{self.rank}", DONE)
        except Exception:
            pass  # the store's host finished first

    def await_verdict(self, exc: BaseException) -> None:
        """When `exc` is a collective's failure (a peer's sockets closed, a gloo/NCCL
        timeout), wait up to `timeout` plus two intervals for this watcher to name the
        lost rank (the default `on_lost` then ends the process); return otherwise, so the
        caller re-raises `exc`."""
        if is_peer_failure(exc) and self._thread is not None and self._thread.is_alive():
            self._thread.join(self.timeout + 2 * self.interval)

    def _beat(self, count: int) -> None:
        self.store.set(f"{KEY_PREFIX}{self.rank}", str(count))

    def _run(self) -> None:
        peers = [r for r in range(self.world_size) if r != self.rank]
        keys = [f"{KEY_PREFIX}{r}" for r in peers]
        seen: dict[int, tuple[bytes | None, float]] = {r: (None, time.monotonic()) for r in peers}
        store_ok_at = time.monotonic()
        host_done = False  # rank 0, whose process hosts the store, ended in order
        count = 0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                count += 1
                self._beat(count)
                # A rank that has not published yet reads as absent; its clock runs from start().
                present = [k for k in keys if self.store.check([k])]
                values = dict(zip(present, self.store.multi_get(present))) if present else {}
                for rank in peers:
                    if rank not in self._places:
                        self._learn_place(rank)
                store_ok_at = now
                host_done = self.rank != 0 and values.get(f"{KEY_PREFIX}0") == DONE.encode()
            except Exception as exc:  # the store's host is gone (or unreachable)
                if host_done:
                    return  # rank 0 finished on purpose and took its store with it: nobody was lost
                if now - store_ok_at >= self.timeout:
                    self._report(0, f"the job's store stopped answering for {now - store_ok_at:.1f} s "
                                    f"({type(exc).__name__}); it lives with rank 0")
                    return
                continue
            for rank, key in zip(peers, keys):
                value = values.get(key)
                last_value, since = seen[rank]
                if value == DONE.encode():
                    continue
                if value is not None and value != last_value:
                    seen[rank] = (value, now)
                elif now - since >= self.timeout:
                    self._report(rank, f"no heartbeat for {now - since:.1f} s (timeout {self.timeout:g} s)")
                    return

    def _learn_place(self, rank: int) -> None:
        # Read while the store is up: the report may come when it is gone with its host.
        key = f"{KEY_PREFIX}{rank}/where"
        if self.store.check([key]):
            self._places[rank] = self.store.get(key).decode()

    def _report(self, rank: int, why: str) -> None:
        where = f" ({self._places[rank]})" if rank in self._places else ""
        self.lost = f"{LOST_LINE_PREFIX} {rank}{where}: {why}; seen by rank {self.rank}"
        self.on_lost(self.lost)
