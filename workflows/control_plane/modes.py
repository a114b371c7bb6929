"""Deployment modes: where rollouts run, and what the control plane records about them.

| `deployment_mode`    | rollouts run in             | metadata store  | acknowledgement           |
|----------------------|-----------------------------|-----------------|---------------------------|
| `local_colocated`    | the trainer's process       | no-op           | none                      |
| `dataflow_colocated` | the trainer's process       | SQLite          | at the optimizer boundary |
| `disaggregated`      | `rollout.workers` processes | SQLite (shared) | at the optimizer boundary |

The mode changes only the control plane, the store and the acknowledgement policy
(`resolve_control_plane`, the one place that maps one to the other). The trainer, the
prompt loader and the rollout controller are the same code in every mode, so under
`actor.deterministic=true` the loss curve does not depend on the placement
(tests/workflows/test_deployment_modes.py checks it bit for bit).

`metadata_store` overrides the mode's store (`memory` keeps the durable modes' counts
and deduplication without a file); disaggregated workers share the store across
processes, so that mode needs SQLite.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from workflows.config import DEPLOYMENT_MODES, METADATA_STORES
from workflows.control_plane.metadata import (
    InMemoryMetadataStore,
    MetadataStore,
    NoOpMetadataStore,
    SampleRef,
    sample_id_of,
)
from workflows.control_plane.sqlite_store import SQLiteMetadataStore
from workflows.rollout.batch import oldest_version

_DEFAULT_STORE = {"local_colocated": "noop", "dataflow_colocated": "sqlite", "disaggregated": "sqlite"}


def control_dir(run_dir: Path) -> Path:
    """`<run_dir>/control/`: the metadata store of the durable modes."""
    return Path(run_dir) / "control"


def samples_dir(run_dir: Path) -> Path:
    """`<run_dir>/samples/`: trajectories written by disaggregated rollout workers."""
    return Path(run_dir) / "samples"


def store_path(run_dir: Path) -> Path:
    return control_dir(run_dir) / "metadata.sqlite"


def open_store(kind: str, run_dir: Path) -> MetadataStore:
    """A store of `kind` (one of METADATA_STORES); SQLite lives in `<run_dir>/control/`."""
    if kind == "noop":
        return NoOpMetadataStore()
    if kind == "memory":
        return InMemoryMetadataStore()
    if kind == "sqlite":
        return SQLiteMetadataStore(store_path(run_dir))
    raise ValueError(f"metadata_store={kind!r} is not one of {', '.join(METADATA_STORES)}")


def sample_ref(trajectory: dict[str, torch.Tensor], *, path: Optional[str] = None, worker: int = 0) -> SampleRef:
    """The ref of one trajectory (a prompt group; `prompt_id` and `epoch` [n] long, equal
    across the group; `versions` [n, L] long, -1 on prompt tokens)."""
    epoch, prompt_id = int(trajectory["epoch"][0]), int(trajectory["prompt_id"][0])
    version = oldest_version(trajectory["versions"])
    return SampleRef(sample_id_of(epoch, prompt_id), -1 if version is None else int(version), epoch, prompt_id,
                     path=path, worker=worker)


@dataclass
class ControlPlane:
    """The store and the acknowledgement policy of one run.

    Attributes:
        mode: the `deployment_mode`.
        store: where sample refs are committed, leased and acknowledged.
        ack_at_optimizer_step: acknowledge a batch's refs once its optimizer step is
            done (durable modes); False acknowledges nothing (local_colocated).
        run_dir: the run's directory (sample files of disaggregated workers live there).
        store_kind: which of METADATA_STORES `store` is.
    """

    mode: str
    store: MetadataStore
    ack_at_optimizer_step: bool
    run_dir: Path
    store_kind: str
    _leased: list[SampleRef] = field(default_factory=list)

    @property
    def disaggregated(self) -> bool:
        return self.mode == "disaggregated"

    def record(self, trajectories: list[dict[str, torch.Tensor]]) -> None:
        """Colocated modes: commit the trajectories the trainer is about to train, and lease
        them to it (the rollout controller's queue holds the tensors)."""
        if not self.ack_at_optimizer_step:
            return
        refs = [sample_ref(t) for t in trajectories]
        self.store.commit(refs)
        self.leased(self._lease_exactly([r.sample_id for r in refs]))

    def _lease_exactly(self, ids: list[str]) -> list[SampleRef]:
        # Colocated: the queue holds exactly the refs just committed (each is leased in
        # the same step), so leasing len(ids) returns them.
        leased = self.store.lease(len(ids))
        if sorted(r.sample_id for r in leased) != sorted(ids):
            raise RuntimeError(f"the metadata store leased {[r.sample_id for r in leased]} instead of {ids}")
        return leased

    def leased(self, refs: list[SampleRef]) -> None:
        """Remember `refs` as the batch in training, to acknowledge after its step."""
        self._leased.extend(refs)

    def acknowledge(self, step: int) -> None:
        """The optimizer step `step` is done: acknowledge the batch it trained."""
        if self.ack_at_optimizer_step and self._leased:
            self.store.ack([r.sample_id for r in self._leased], step)
        self._leased = []

    def cursor(self) -> Optional[int]:
        """What a recover checkpoint records of the store: samples acknowledged so far
        (None when nothing is acknowledged, local_colocated)."""
        return self.store.status().acked if self.ack_at_optimizer_step else None

    def restore(self, step: int) -> int:
        """After resuming from the recover checkpoint of `step` (the store cursor): undo
        the crashed run's acks, expiries and leases after it, and delete the samples
        generated by versions above it (colocated: every sample not trained by then,
        whose tensors were in the crashed process); returns how many were deleted."""
        dropped = self.store.rollback(step, keep_queued=self.disaggregated)
        for ref in dropped:
            if ref.path:
                Path(ref.path).unlink(missing_ok=True)
        return len(dropped)

    def reset(self) -> None:
        """A fresh start: forget what an earlier run of this directory recorded."""
        self.store.close()
        for path in (control_dir(self.run_dir), samples_dir(self.run_dir)):
            if path.exists():
                shutil.rmtree(path)
        self.store = open_store(self.store_kind, self.run_dir)

    def close(self) -> None:
        self.store.close()


def resolve_control_plane(mode: str, run_dir: Path, metadata_store: Optional[str] = None) -> ControlPlane:
    """The one mapping from a deployment mode to (store, acknowledgement policy).

    Args:
        mode: one of DEPLOYMENT_MODES.
        metadata_store: one of METADATA_STORES, or None for the mode's own.

    Raises:
        ValueError: an unknown mode or store (naming the valid ones), or a disaggregated
            mode without a store its worker processes can share.
    """
    if mode not in DEPLOYMENT_MODES:
        raise ValueError(f"deployment_mode={mode!r} is not one of {', '.join(DEPLOYMENT_MODES)}")
    kind = metadata_store or _DEFAULT_STORE[mode]
    if mode == "disaggregated" and kind != "sqlite":
        raise ValueError(f"deployment_mode=disaggregated shares its store across processes; metadata_store={kind!r} "
                         "cannot, use sqlite (or null)")
    return ControlPlane(mode, open_store(kind, run_dir), ack_at_optimizer_step=kind != "noop",
                        run_dir=Path(run_dir), store_kind=kind)
