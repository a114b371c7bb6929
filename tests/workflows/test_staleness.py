"""StalenessManager: the capacity formula, the lifecycle counters and their invariants."""

from __future__ import annotations

import random
import threading

import pytest

from workflows.controller.staleness import RolloutStats, StalenessManager


def make_manager(*, max_concurrent: int = 8, batch: int = 4, offpolicy: int = 0, version: int = 0) -> StalenessManager:
    return StalenessManager(
        max_concurrent_rollouts=max_concurrent,
        consumer_batch_size=batch,
        max_head_offpolicyness=offpolicy,
        version_provider=lambda: version,
    )


def drive(manager: StalenessManager, *, running: int, accepted: int) -> None:
    """Put the manager in a state with the given running and accepted counts."""
    for _ in range(running + accepted):
        manager.on_rollout_enqueued()
        manager.on_rollout_submitted()
    for _ in range(accepted):
        manager.on_rollout_accepted()


@pytest.mark.parametrize(
    "max_concurrent, batch, offpolicy, version, running, accepted, expected",
    [
        # fresh, synchronous: one batch may start
        (8, 4, 0, 0, 0, 0, 4),
        # concurrency is the binding term
        (2, 4, 0, 0, 0, 0, 2),
        (8, 4, 3, 0, 0, 0, 8),
        # staleness term: (0 + 0 + 1) * 4 - (1 + 2) = 1
        (8, 4, 0, 0, 2, 1, 1),
        # one batch consumed and version bumped: (0 + 1 + 1) * 4 - 4 = 4
        (8, 4, 0, 1, 0, 4, 4),
        # off-policyness 2 at version 3: (2 + 3 + 1) * 4 - (20 + 3) = 1; concurrency 5
        (8, 4, 2, 3, 3, 20, 1),
        # exactly full: zero
        (8, 4, 1, 0, 4, 4, 0),
        # concurrency exceeded (e.g. limit lowered on restore): negative
        (2, 4, 4, 0, 3, 0, -1),
        # more accepted than the bound allows (e.g. right after recovery): negative
        (8, 4, 0, 0, 0, 10, -6),
        (16, 1, 0, 5, 0, 0, 6),
    ],
)
def test_capacity_formula(max_concurrent, batch, offpolicy, version, running, accepted, expected):
    manager = make_manager(max_concurrent=max_concurrent, batch=batch, offpolicy=offpolicy, version=version)
    drive(manager, running=running, accepted=accepted)
    assert manager.get_capacity() == expected
    staleness_term = (offpolicy + version + 1) * batch - (accepted + running)
    assert manager.get_staleness_room() == staleness_term


def test_capacity_follows_the_version_provider():
    version = [0]
    manager = StalenessManager(
        max_concurrent_rollouts=100, consumer_batch_size=2, max_head_offpolicyness=1, version_provider=lambda: version[0]
    )
    drive(manager, running=0, accepted=4)
    assert manager.get_capacity() == 0
    version[0] = 3
    assert manager.get_capacity() == (1 + 3 + 1) * 2 - 4


def test_lifecycle_counters_and_snapshot():
    manager = make_manager()
    manager.on_rollout_enqueued()
    manager.on_rollout_enqueued()
    manager.on_rollout_enqueued()
    manager.on_rollout_submitted()
    manager.on_rollout_submitted()
    manager.on_rollout_accepted()
    assert manager.get_stats() == RolloutStats(enqueued=1, running=1, accepted=1, rejected=0)
    manager.on_rollout_rejected()
    manager.on_rollout_expired()
    stats = manager.get_stats()
    assert stats == RolloutStats(enqueued=1, running=0, accepted=0, rejected=2)
    with pytest.raises(AttributeError):
        stats.accepted = 5  # frozen snapshot


@pytest.mark.parametrize(
    "call", ["on_rollout_submitted", "on_rollout_accepted", "on_rollout_rejected", "on_rollout_expired"]
)
def test_counters_never_go_negative(call):
    manager = make_manager()
    with pytest.raises(RuntimeError, match=call):
        getattr(manager, call)()
    assert manager.get_stats() == RolloutStats(0, 0, 0, 0)


def test_version_recovered_resets_accepted():
    version = [0]
    manager = StalenessManager(
        max_concurrent_rollouts=100, consumer_batch_size=4, max_head_offpolicyness=1, version_provider=lambda: version[0]
    )
    # A restored run at version 5 consumed 5 batches: the room is 2 batches, not 7.
    version[0] = 5
    assert manager.get_capacity() == 28
    manager.on_version_recovered(5)
    assert manager.get_stats().accepted == 20
    assert manager.get_capacity() == 8
    with pytest.raises(ValueError):
        manager.on_version_recovered(-1)


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        ({"max_concurrent_rollouts": 0, "consumer_batch_size": 1, "max_head_offpolicyness": 0}, "max_concurrent_rollouts"),
        ({"max_concurrent_rollouts": 1, "consumer_batch_size": 0, "max_head_offpolicyness": 0}, "consumer_batch_size"),
        ({"max_concurrent_rollouts": 1, "consumer_batch_size": 1, "max_head_offpolicyness": -1}, "max_head_offpolicyness"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, setting):
    with pytest.raises(ValueError, match=f"rollout.{setting}"):
        StalenessManager(**kwargs, version_provider=lambda: 0)


def test_eight_threads_hammering_keep_invariants():
    num_threads, iterations = 8, 10_000
    manager = make_manager(max_concurrent=1_000_000, batch=1_000_000)
    start = threading.Barrier(num_threads + 1)
    done = threading.Event()
    accepted_per_thread = [0] * num_threads
    violations: list[RolloutStats] = []

    def worker(index: int) -> None:
        rng = random.Random(index)
        start.wait()
        for _ in range(iterations):
            manager.on_rollout_enqueued()
            manager.on_rollout_submitted()
            manager.get_capacity()
            if rng.random() < 0.7:
                manager.on_rollout_accepted()
                accepted_per_thread[index] += 1
            else:
                manager.on_rollout_rejected()

    def observer() -> None:
        start.wait()
        last_total = 0
        while not done.is_set():
            s = manager.get_stats()
            total = s.enqueued + s.running + s.accepted + s.rejected
            # Every thread has at most one trajectory in flight, and the total only grows.
            if min(s.enqueued, s.running, s.accepted, s.rejected) < 0 or s.enqueued + s.running > num_threads:
                violations.append(s)
            if total < last_total:
                violations.append(s)
            last_total = total

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(num_threads)]
    watcher = threading.Thread(target=observer)
    for t in threads + [watcher]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()

    assert violations == []
    stats = manager.get_stats()
    assert stats.enqueued == 0 and stats.running == 0
    assert stats.accepted == sum(accepted_per_thread)
    assert stats.accepted + stats.rejected == num_threads * iterations
