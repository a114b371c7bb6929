"""Metadata stores: where the control plane records which samples exist and who trained them.

A *sample* here is one finished rollout, a prompt group of `gconfig.n_samples`
completions (one trajectory of the rollout controller). The store holds a `SampleRef`
to it, never its tensors: an id, the policy version of its oldest generated token, its
(epoch, prompt id), the file that holds the tensors (disaggregated mode) and the worker
that wrote it. Each ref moves through

    commit ─▶ queued ─lease─▶ leased ─ack(step)─▶ acked
                 ▲              │  └──expire──▶ expired (too stale to train)
                 └──release / rollback(step)────┘

Three stores share the interface (`MetadataStore`):

- `NoOpMetadataStore` (deployment_mode=local_colocated) retains nothing. It gives up
  everything the others provide: `status()` reads zero, a commit is never deduplicated,
  and after a crash there is nothing to reconstruct leases from (the rollout controller's
  in-memory queue is the only record, and the recover checkpoint's data position says
  what was trained). In exchange it costs a function call per operation.
- `InMemoryMetadataStore`: the full semantics in one process's memory (tests, and a
  colocated run that wants deduplication and counts without a file).
- `SQLiteMetadataStore` (workflows/control_plane/sqlite_store.py): the same semantics in a SQLite
  file in WAL mode, one transaction per commit or ack batch, shared by processes on one
  machine (the trainer and its rollout workers).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from typing import Optional, Protocol

STATES = ("queued", "leased", "acked", "expired")


class StaleWriterError(RuntimeError):
    """A commit from a rollout worker of an earlier trainer incarnation (one that crashed
    and was restarted): its samples may come from weights the restored trainer has not
    produced, so they are refused."""


@dataclass(frozen=True)
class SampleRef:
    """A reference to one stored sample (a prompt group); plain values only.

    Attributes:
        sample_id: unique per (epoch, prompt): `sample_id_of(epoch, prompt_id)`.
        version: policy version of the oldest generated token (the staleness key).
        epoch, prompt_id: which prompt of which epoch the group answers.
        path: file with the tensors (safetensors), or None when they stay in memory.
        worker: index of the rollout worker that generated it (0 when colocated).

    Raises:
        TypeError: a field holds anything but str / int / None (a tensor, a list...):
            metadata holds references, never data.
    """

    sample_id: str
    version: int
    epoch: int
    prompt_id: int
    path: Optional[str] = None
    worker: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            plain = isinstance(value, str) if f.name in ("sample_id", "path") else isinstance(value, int)
            if not (plain or (value is None and f.name == "path")) or isinstance(value, bool):
                raise TypeError(
                    f"SampleRef.{f.name} must be a plain {'str' if f.name in ('sample_id', 'path') else 'int'}, "
                    f"got {type(value).__name__}: metadata holds references (ids, paths, versions), never tensors"
                )


def sample_id_of(epoch: int, prompt_id: int) -> str:
    """The id of the sample answering `prompt_id` in `epoch`: one per prompt and epoch, so a
    regenerated group (after a crash) deduplicates against the first."""
    return f"e{int(epoch)}-p{int(prompt_id)}"


@dataclass(frozen=True)
class StoreStatus:
    """Counts by state; `duplicates` counts commits refused because the id existed."""

    queued: int = 0
    leased: int = 0
    acked: int = 0
    expired: int = 0
    duplicates: int = 0

    @property
    def committed(self) -> int:
        return self.queued + self.leased + self.acked + self.expired


class MetadataStore(Protocol):
    """What the control plane needs from a store (see the module docstring)."""

    durable: bool  # survives the process (a restart can reconstruct leases from it)

    def commit(self, refs: list[SampleRef], *, incarnation: Optional[int] = None) -> int:
        """Record `refs` as queued, skipping ids already present; returns how many were new.
        With `incarnation`, in the same transaction: raise StaleWriterError (committing
        nothing) unless it is still the store's current one."""
        ...

    def begin_incarnation(self) -> int:
        """A (re)started trainer takes over: returns the new incarnation number; commits
        tagged with an older one are refused from now on."""
        ...

    def current_incarnation(self) -> int:
        """The incarnation a rollout worker tags its commits with (0 before any)."""
        ...

    def lease(self, count: int) -> list[SampleRef]:
        """Up to `count` queued refs, oldest version first (then commit order), now leased."""
        ...

    def ack(self, sample_ids: list[str], step: int) -> None:
        """Mark leased refs trained at global `step`. Raises KeyError for an id not leased."""
        ...

    def expire(self, sample_ids: list[str], step: int) -> None:
        """Mark leased refs too stale to train at global `step`; never leased again."""
        ...

    def release(self) -> int:
        """Return every leased ref to the queue; returns how many."""
        ...

    def rollback(self, step: int, *, keep_queued: bool = True) -> list[SampleRef]:
        """Undo what a crashed trainer did after its checkpoint at `step`: acks and
        expiries after `step`, and leases, return to the queue; refs generated by a
        version above `step` (weights the restored trainer has not produced yet) are
        deleted and returned, so their prompts are generated again. Without
        `keep_queued` every ref not acknowledged by `step` is deleted (colocated modes:
        the tensors were in the crashed process)."""
        ...

    def refs(self, state: Optional[str] = None) -> list[SampleRef]:
        """Every ref (in commit order), or those in `state`."""
        ...

    def count(self, state: str, *, worker: int) -> int:
        """How many of `worker`'s refs are in `state` (one of STATES), without reading
        them (a rollout worker asks this on every poll; `status` counts all workers)."""
        ...

    def acked_steps(self) -> dict[str, int]:
        """`{sample_id: step}` of every acked ref."""
        ...

    def status(self) -> StoreStatus: ...

    def close(self) -> None: ...


class NoOpMetadataStore:
    """Retains nothing; every operation is free (see the module docstring for what that gives up)."""

    durable = False

    def commit(self, refs: list[SampleRef], *, incarnation: Optional[int] = None) -> int:
        return len(refs)

    def begin_incarnation(self) -> int:
        return 0

    def current_incarnation(self) -> int:
        return 0

    def lease(self, count: int) -> list[SampleRef]:
        return []

    def ack(self, sample_ids: list[str], step: int) -> None:
        pass

    def expire(self, sample_ids: list[str], step: int) -> None:
        pass

    def release(self) -> int:
        return 0

    def rollback(self, step: int, *, keep_queued: bool = True) -> list[SampleRef]:
        return []

    def refs(self, state: Optional[str] = None) -> list[SampleRef]:
        return []

    def count(self, state: str, *, worker: int) -> int:
        return 0

    def acked_steps(self) -> dict[str, int]:
        return {}

    def status(self) -> StoreStatus:
        return StoreStatus()

    def close(self) -> None:
        pass


class InMemoryMetadataStore:
    """The full store semantics in a dict, thread-safe; lost with the process."""

    durable = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[str, SampleRef] = {}  # insertion order = commit order
        self._state: dict[str, str] = {}
        self._step: dict[str, int] = {}
        self._duplicates = 0
        self._incarnation = 0

    def begin_incarnation(self) -> int:
        with self._lock:
            self._incarnation += 1
            return self._incarnation

    def current_incarnation(self) -> int:
        with self._lock:
            return self._incarnation

    def commit(self, refs: list[SampleRef], *, incarnation: Optional[int] = None) -> int:
        with self._lock:
            if incarnation is not None and incarnation != self._incarnation:
                raise StaleWriterError(f"incarnation {incarnation} is over; the store is at {self._incarnation}")
            new = 0
            for ref in refs:
                if ref.sample_id in self._refs:
                    self._duplicates += 1
                    continue
                self._refs[ref.sample_id] = ref
                self._state[ref.sample_id] = "queued"
                new += 1
            return new

    def lease(self, count: int) -> list[SampleRef]:
        with self._lock:
            queued = [r for r in self._refs.values() if self._state[r.sample_id] == "queued"]
            # sorted() is stable: ties stay in commit order.
            chosen = sorted(queued, key=lambda r: r.version)[:count]
            for ref in chosen:
                self._state[ref.sample_id] = "leased"
            return chosen

    def _move(self, sample_ids: list[str], state: str, step: int) -> None:
        missing = [i for i in sample_ids if self._state.get(i) != "leased"]
        if missing:
            raise KeyError(f"samples not leased: {missing[:5]} (states: {[self._state.get(i) for i in missing[:5]]})")
        for i in sample_ids:
            self._state[i] = state
            self._step[i] = step

    def ack(self, sample_ids: list[str], step: int) -> None:
        with self._lock:
            self._move(sample_ids, "acked", step)

    def expire(self, sample_ids: list[str], step: int) -> None:
        with self._lock:
            self._move(sample_ids, "expired", step)

    def release(self) -> int:
        with self._lock:
            leased = [i for i, s in self._state.items() if s == "leased"]
            for i in leased:
                self._state[i] = "queued"
            return len(leased)

    def rollback(self, step: int, *, keep_queued: bool = True) -> list[SampleRef]:
        with self._lock:
            for i, s in list(self._state.items()):
                if s == "leased" or (s in ("acked", "expired") and self._step[i] > step):
                    self._state[i] = "queued"
                    self._step.pop(i, None)
            dropped = [r for r in self._refs.values()
                       if self._state[r.sample_id] == "queued" and (r.version > step or not keep_queued)]
            for ref in dropped:
                del self._refs[ref.sample_id], self._state[ref.sample_id]
            return dropped

    def refs(self, state: Optional[str] = None) -> list[SampleRef]:
        with self._lock:
            return [r for r in self._refs.values() if state is None or self._state[r.sample_id] == state]

    def count(self, state: str, *, worker: int) -> int:
        with self._lock:
            return sum(1 for r in self._refs.values() if r.worker == worker and self._state[r.sample_id] == state)

    def acked_steps(self) -> dict[str, int]:
        with self._lock:
            return {i: step for i, step in self._step.items() if self._state[i] == "acked"}

    def status(self) -> StoreStatus:
        with self._lock:
            counts = {s: 0 for s in STATES}
            for s in self._state.values():
                counts[s] += 1
            return StoreStatus(**counts, duplicates=self._duplicates)

    def close(self) -> None:
        pass
