"""How many rollouts may start now without breaking the staleness bound.

The admission rule is AReaL's (Fu et al., "AReaL: A Large-Scale Asynchronous
Reinforcement Learning System for Language Reasoning", arXiv 2505.24298, section 5.1):
at policy version `v` the trainer has consumed `v` batches of `consumer_batch_size`
trajectories, and a trajectory started now will be trained at the latest
`max_head_offpolicyness` versions later, so at most
`(max_head_offpolicyness + v + 1) * consumer_batch_size` trajectories may ever have been
accepted or be running. A second bound keeps at most `max_concurrent_rollouts` running.

This module is pure bookkeeping: no threads are started, nothing is imported from the
model or transport layers. The one lock makes every callback safe to call from the
rollout thread while the trainer thread reads capacity.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RolloutStats:
    """A consistent snapshot of the rollout lifecycle counters (all counts of trajectories).

    - `enqueued`: submitted by the caller, not yet handed to the rollout thread.
    - `running`: handed to the rollout thread, no result yet.
    - `accepted`: finished with a trajectory that passed every filter (cumulative; includes
      trajectories already consumed by the trainer).
    - `rejected`: finished without a usable trajectory (cumulative).
    """

    enqueued: int
    running: int
    accepted: int
    rejected: int


class StalenessManager:
    """Thread-safe counters that turn the staleness bound into an admission capacity.

    Lifecycle of one trajectory: `on_rollout_enqueued` -> `on_rollout_submitted` ->
    `on_rollout_accepted` | `on_rollout_rejected`; an accepted trajectory found too stale
    when the trainer takes it is moved back out with `on_rollout_expired`.

    Args:
        max_concurrent_rollouts: most trajectories running at once (>= 1).
        consumer_batch_size: trajectories the trainer consumes per version (>= 1).
        max_head_offpolicyness: how many versions a trained trajectory may lag the
            trainer (>= 0); 0 is synchronous RL.
        version_provider: returns the current policy version (an int >= 0); called on
            every `get_capacity`, outside the lock.

    Raises:
        ValueError: on an out-of-range argument, naming the `rollout.*` setting.
    """

    def __init__(
        self,
        *,
        max_concurrent_rollouts: int,
        consumer_batch_size: int,
        max_head_offpolicyness: int,
        version_provider: Callable[[], int],
    ) -> None:
        if max_concurrent_rollouts < 1:
            raise ValueError(f"rollout.max_concurrent_rollouts must be >= 1, got {max_concurrent_rollouts}")
        if consumer_batch_size < 1:
            raise ValueError(f"rollout.consumer_batch_size must be >= 1, got {consumer_batch_size}")
        if max_head_offpolicyness < 0:
            raise ValueError(f"rollout.max_head_offpolicyness must be >= 0, got {max_head_offpolicyness}")
        self.max_concurrent_rollouts = max_concurrent_rollouts
        self.consumer_batch_size = consumer_batch_size
        self.max_head_offpolicyness = max_head_offpolicyness
        self._version_provider = version_provider
        self._lock = threading.Lock()
        self._enqueued = 0
        self._running = 0
        self._accepted = 0
        self._rejected = 0

    # ------------------------------------------------------------------ capacity

    def get_capacity(self) -> int:
        """Rollouts that may start now: `min(concurrency room, staleness room)`.

        `concurrency room = max_concurrent_rollouts - running`;
        `staleness room = (max_head_offpolicyness + version + 1) * consumer_batch_size
        - (accepted + running)`. The result may be negative (more is in flight than the
        bound allows, e.g. right after `on_version_recovered`); callers start nothing then.
        """
        version = self._version_provider()
        with self._lock:
            return min(self._concurrency_room(), self._staleness_room(version))

    def get_staleness_room(self) -> int:
        """Only the staleness term of `get_capacity` (may be negative).

        This is how many more trajectories may start before the trainer's next version
        bump, however many run at once; a controller uses it to size its prefetch.
        """
        version = self._version_provider()
        with self._lock:
            return self._staleness_room(version)

    def _concurrency_room(self) -> int:
        return self.max_concurrent_rollouts - self._running

    def _staleness_room(self, version: int) -> int:
        limit = (self.max_head_offpolicyness + version + 1) * self.consumer_batch_size
        return limit - (self._accepted + self._running)

    # ------------------------------------------------------------------ lifecycle

    def on_rollout_enqueued(self) -> None:
        """A trajectory was queued by the caller: `enqueued += 1`."""
        with self._lock:
            self._enqueued += 1

    def on_rollout_submitted(self) -> None:
        """A queued trajectory started: `enqueued -= 1, running += 1`.

        Raises:
            RuntimeError: if nothing is enqueued.
        """
        with self._lock:
            if self._enqueued <= 0:
                raise RuntimeError("on_rollout_submitted() without a matching on_rollout_enqueued()")
            self._enqueued -= 1
            self._running += 1

    def on_rollout_accepted(self) -> None:
        """A running trajectory finished and was kept: `running -= 1, accepted += 1`.

        Raises:
            RuntimeError: if nothing is running.
        """
        with self._lock:
            if self._running <= 0:
                raise RuntimeError("on_rollout_accepted() while no rollout is running")
            self._running -= 1
            self._accepted += 1

    def on_rollout_rejected(self) -> None:
        """A running trajectory finished without a usable result: `running -= 1, rejected += 1`.

        Raises:
            RuntimeError: if nothing is running.
        """
        with self._lock:
            if self._running <= 0:
                raise RuntimeError("on_rollout_rejected() while no rollout is running")
            self._running -= 1
            self._rejected += 1

    def on_rollout_expired(self) -> None:
        """An accepted trajectory was dropped as too stale: `accepted -= 1, rejected += 1`.

        Without this the dropped trajectory would keep occupying one unit of the
        staleness budget that the trainer never consumes, and with
        `max_head_offpolicyness = 0` the next batch could never fill.

        Raises:
            RuntimeError: if nothing has been accepted.
        """
        with self._lock:
            if self._accepted <= 0:
                raise RuntimeError("on_rollout_expired() while no rollout has been accepted")
            self._accepted -= 1
            self._rejected += 1

    def on_version_recovered(self, version: int) -> None:
        """Set `accepted = version * consumer_batch_size` after resuming at `version`.

        A run restored at version `v` has consumed `v` batches; without this the staleness
        room would allow `v` extra batches of stale trajectories.

        Raises:
            ValueError: if `version < 0`.
        """
        if version < 0:
            raise ValueError(f"recovered version must be >= 0, got {version}")
        self.on_accepted_recovered(version * self.consumer_batch_size)

    def on_accepted_recovered(self, accepted: int) -> None:
        """Set `accepted` to what a restarted producer has already delivered (a rollout
        worker's committed, unexpired samples), so its staleness room is what it was.

        Raises:
            ValueError: if `accepted < 0`.
        """
        if accepted < 0:
            raise ValueError(f"recovered accepted count must be >= 0, got {accepted}")
        with self._lock:
            self._accepted = accepted

    def get_stats(self) -> RolloutStats:
        """A consistent snapshot of the four counters (taken under the lock)."""
        with self._lock:
            return RolloutStats(
                enqueued=self._enqueued,
                running=self._running,
                accepted=self._accepted,
                rejected=self._rejected,
            )
