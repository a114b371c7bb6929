"""Metadata stores: the same semantics in memory and in SQLite (also across processes),
and a no-op store that retains nothing."""

import multiprocessing

import pytest
import torch

from workflows.control_plane.metadata import (
    InMemoryMetadataStore,
    NoOpMetadataStore,
    SampleRef,
    StaleWriterError,
    sample_id_of,
)
from workflows.control_plane.sqlite_store import SQLiteMetadataStore


def ref(prompt_id, version=0, epoch=0, worker=0):
    return SampleRef(sample_id_of(epoch, prompt_id), version, epoch, prompt_id, path=f"/s/{prompt_id}", worker=worker)


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    s = InMemoryMetadataStore() if request.param == "memory" else SQLiteMetadataStore(tmp_path / "control" / "m.sqlite")
    yield s
    s.close()


def test_commit_deduplicates_by_sample_id(store):
    assert store.commit([ref(1), ref(2)]) == 2
    assert store.commit([ref(2, version=5), ref(3)]) == 1  # the second e0-p2 is ignored
    status = store.status()
    assert (status.queued, status.committed, status.duplicates) == (3, 3, 1)
    assert [r.version for r in store.refs() if r.prompt_id == 2] == [0]


def test_lease_is_oldest_version_first_then_commit_order(store):
    store.commit([ref(1, version=2), ref(2, version=0), ref(3, version=1), ref(4, version=0)])
    assert [r.prompt_id for r in store.lease(3)] == [2, 4, 3]
    assert [r.prompt_id for r in store.lease(3)] == [1]
    assert store.lease(3) == []
    assert store.status().leased == 4


def test_each_sample_is_acknowledged_once(store):
    store.commit([ref(i) for i in range(4)])
    leased = store.lease(2)
    store.ack([r.sample_id for r in leased], step=1)
    with pytest.raises(KeyError):
        store.ack([leased[0].sample_id], step=2)  # already acknowledged
    with pytest.raises(KeyError):
        store.ack([sample_id_of(0, 3)], step=2)  # never leased
    assert store.acked_steps() == {r.sample_id: 1 for r in leased}
    status = store.status()
    assert (status.queued, status.leased, status.acked) == (2, 0, 2)


def test_a_failed_ack_batch_changes_nothing(store):
    store.commit([ref(1), ref(2)])
    store.lease(1)
    with pytest.raises(KeyError):
        store.ack([sample_id_of(0, 1), sample_id_of(0, 2)], step=1)
    assert store.status().acked == 0 and store.status().leased == 1


def test_release_returns_leases_to_the_queue(store):
    store.commit([ref(1), ref(2)])
    store.lease(2)
    assert store.release() == 2
    assert [r.prompt_id for r in store.lease(5)] == [1, 2]


def test_rollback_undoes_everything_after_the_checkpoint(store):
    store.commit([ref(1, 0), ref(2, 0), ref(3, 1), ref(4, 1), ref(5, 2), ref(6, 3)])
    store.ack([r.sample_id for r in store.lease(2)], step=1)  # p1, p2 trained at step 1
    store.ack([r.sample_id for r in store.lease(2)], step=2)  # p3, p4 at step 2
    store.expire([store.lease(1)[0].sample_id], step=3)  # p5 expired at step 3
    store.lease(1)  # p6 leased by the crashed trainer
    dropped = store.rollback(1)
    # Version 2 and 3 samples came from weights the restored trainer (at step 1) has not made.
    assert sorted(r.prompt_id for r in dropped) == [5, 6]
    assert store.acked_steps() == {sample_id_of(0, 1): 1, sample_id_of(0, 2): 1}
    assert sorted(r.prompt_id for r in store.refs("queued")) == [3, 4]
    status = store.status()
    assert (status.leased, status.expired, status.committed) == (0, 0, 4)
    assert store.commit([ref(5, 1)]) == 1  # a dropped prompt can be generated again
    assert sorted(r.prompt_id for r in store.rollback(1, keep_queued=False)) == [3, 4, 5]
    assert store.status().committed == 2


def test_count_agrees_with_refs_by_state_and_worker(store):
    store.commit([ref(i, worker=i % 2) for i in range(6)])  # p0..p5; odd prompts from worker 1
    store.ack([r.sample_id for r in store.lease(2)], step=1)  # p0 (worker 0), p1 (worker 1)
    store.expire([r.sample_id for r in store.lease(3)], step=2)  # p2, p4 (worker 0), p3 (worker 1)
    for state in ("queued", "leased", "acked", "expired"):
        for worker in (0, 1):
            expected = [r for r in store.refs(state) if r.worker == worker]
            assert store.count(state, worker=worker) == len(expected), (state, worker)
    assert (store.count("expired", worker=0), store.count("expired", worker=1), store.count("queued", worker=1)) == (2, 1, 1)
    assert store.count("expired", worker=7) == 0


def test_stale_writers_are_refused(store):
    first = store.begin_incarnation()
    assert store.current_incarnation() == first
    store.commit([ref(1)], incarnation=first)
    second = store.begin_incarnation()
    assert second > first
    with pytest.raises(StaleWriterError):
        store.commit([ref(2), ref(3)], incarnation=first)
    assert store.status().committed == 1  # nothing of the refused batch
    assert store.commit([ref(2)], incarnation=second) == 1


def test_refs_hold_no_tensors():
    with pytest.raises(TypeError, match="never tensors"):
        SampleRef("e0-p1", torch.tensor(3), 0, 1)
    with pytest.raises(TypeError, match="never tensors"):
        SampleRef("e0-p1", 0, 0, 1, path=[1, 2])
    with pytest.raises(TypeError):
        SampleRef("e0-p1", True, 0, 1)


def test_noop_store_retains_nothing():
    store = NoOpMetadataStore()
    assert store.commit([ref(1), ref(1)]) == 2  # no deduplication
    assert store.lease(5) == []  # nothing to reconstruct leases from
    store.ack([sample_id_of(0, 1)], step=1)  # nothing checked
    assert store.status().committed == 0 and store.refs() == [] and store.rollback(0) == []
    assert store.count("queued", worker=0) == 0


def _commit_from_process(path, worker, count):
    store = SQLiteMetadataStore(path)
    for i in range(count):
        store.commit([ref(worker * 1000 + i, version=i % 3, worker=worker)])
    store.close()


def test_sqlite_store_is_shared_by_processes(tmp_path):
    path = tmp_path / "m.sqlite"
    SQLiteMetadataStore(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_commit_from_process, args=(path, w, 50)) for w in range(3)]
    for p in procs:
        p.start()
    trainer = SQLiteMetadataStore(path)
    leased = []
    while any(p.is_alive() for p in procs) or trainer.status().queued:
        batch = trainer.lease(7)
        trainer.ack([r.sample_id for r in batch], step=len(leased))
        leased += batch
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert len(leased) == len({r.sample_id for r in leased}) == 150
    status = trainer.status()
    assert (status.acked, status.committed, status.duplicates) == (150, 150, 0)
    assert SQLiteMetadataStore(path).status() == status  # durable: a new connection sees it all
    trainer.close()
