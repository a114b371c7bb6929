"""A named mutual-exclusion lock shared by all ranks through a torch.distributed Store.

    store = torch.distributed.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0)
    lock = DistributedLock("weights", store=store, rank=rank)
    with lock:                      # waits up to `timeout` seconds, then TimeoutError
        write_shared_checkpoint()

The lock is one store key. Acquiring is a single `compare_set(key, "", token)`: it
succeeds only if the key is free (absent or empty), atomically on the store's server, so
two ranks can never both win. Releasing is `compare_set(key, token, "")`, which frees the
key only if it still holds this holder's token, so a rank cannot release a lock it does
not hold. Waiters back off exponentially with jitter, keeping the store quiet under
contention. The lock does not expire: a holder that dies keeps it until the job ends.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

_KEY_PREFIX = "areal/lock/"
_FREE = ""


class LockNotOwnedError(RuntimeError):
    """`release()` by a holder that does not hold the lock."""


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Waiting schedule between acquire attempts, in seconds.

    The n-th wait is `min(initial * factor**n, maximum)`, scaled by a random factor in
    [1 - jitter, 1] so that contending ranks do not retry in lockstep.
    """

    initial: float = 0.001
    maximum: float = 0.1
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.factor < 1 or not (0 <= self.jitter < 1):
            raise ValueError(f"invalid Backoff {self}: need 0 < initial <= maximum, factor >= 1, 0 <= jitter < 1")

    def delay(self, attempt: int) -> float:
        base = min(self.initial * self.factor**attempt, self.maximum)
        return base * (1 - self.jitter * random.random())


class DistributedLock:
    """A named lock over a `torch.distributed.Store` (TCPStore, FileStore, ...).

    Args:
        name: what the lock guards; ranks using the same name and store share it.
        store: the job's store, e.g. the one behind `init_process_group`.
        rank: this process's rank (recorded as the holder, for error messages).
        timeout: seconds `with lock:` waits before raising TimeoutError; None waits forever.
        backoff: waiting schedule between attempts.
    """

    def __init__(
        self,
        name: str,
        *,
        store: Any,
        rank: int,
        timeout: float | None = 300.0,
        backoff: Backoff = Backoff(),
    ) -> None:
        if not name:
            raise ValueError("DistributedLock needs a non-empty name")
        self.name = name
        self.store = store
        self.rank = rank
        self.timeout = timeout
        self.backoff = backoff
        self._key = _KEY_PREFIX + name
        self._token: str | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._token is not None

    def holder(self) -> str | None:
        """Who holds the lock now (`"rank <r> pid <p> ..."`), or None when it is free."""
        if not self.store.check([self._key]):
            return None
        value = self.store.get(self._key).decode()
        return value or None

    def acquire(self, timeout: float | None = None, *, backoff: Backoff | None = None) -> None:
        """Wait until this object holds the lock.

        Args:
            timeout: seconds to wait; None uses the constructor's `timeout` (which may be
                None: wait forever). 0 tries once.
            backoff: waiting schedule; default the constructor's.

        Raises:
            TimeoutError: still held by another holder after `timeout` seconds; the message
                names the holder.
            RuntimeError: this object already holds it (the lock is not re-entrant).
        """
        if self._token is not None:
            raise RuntimeError(f"DistributedLock {self.name!r} is already held by this object (not re-entrant)")
        timeout = self.timeout if timeout is None else timeout
        backoff = backoff or self.backoff
        # Unique per acquisition, so a stale release from an earlier hold cannot free a
        # later one.
        token = f"rank {self.rank} pid {os.getpid()} {uuid.uuid4().hex}"
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            if self.store.compare_set(self._key, _FREE, token).decode() == token:
                self._token = token
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"DistributedLock {self.name!r} not acquired by rank {self.rank} within {timeout:g} s; "
                    f"held by {self.holder() or 'nobody (just released)'}"
                )
            delay = backoff.delay(attempt)
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(delay)
            attempt += 1

    def release(self) -> None:
        """Free the lock.

        Raises:
            LockNotOwnedError: this object does not hold the lock (never acquired, already
                released, or another rank holds it).
        """
        if self._token is None:
            raise LockNotOwnedError(
                f"rank {self.rank} cannot release DistributedLock {self.name!r}: it does not hold it "
                f"(holder: {self.holder() or 'nobody'})"
            )
        token, self._token = self._token, None
        current = self.store.compare_set(self._key, token, _FREE).decode()
        if current != _FREE:
            raise LockNotOwnedError(
                f"rank {self.rank} cannot release DistributedLock {self.name!r}: the store says it is held by "
                f"{current!r}, not by this holder"
            )

    def __enter__(self) -> DistributedLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
