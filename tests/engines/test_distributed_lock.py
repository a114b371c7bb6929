"""DistributedLock with two real processes contending over a real TCPStore (gloo group)."""

from __future__ import annotations

import datetime
import itertools
import json
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from engines.distributed_lock import Backoff, DistributedLock, LockNotOwnedError

WORLD_SIZE = 2
ITERATIONS = 25
HOST = "127.0.0.1"


def _worker(rank: int, port: int, out_dir: str) -> None:
    timeout = datetime.timedelta(seconds=30)
    store = dist.TCPStore(HOST, port, None, False, timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=WORLD_SIZE,
                            timeout=timeout)
    report: dict = {"intervals": []}
    try:
        lock = DistributedLock("critical", store=store, rank=rank, timeout=20)
        dist.barrier()
        for _ in range(ITERATIONS):
            with lock:
                enter = time.monotonic()
                # A read-modify-write that loses updates unless the lock excludes the other rank.
                count = int(store.get("counter"))
                time.sleep(0.001)
                store.set("counter", str(count + 1))
                report["intervals"].append((enter, time.monotonic()))
        dist.barrier()

        # A rank that does not hold the lock cannot release it, nor take it while held.
        other = DistributedLock("guarded", store=store, rank=rank)
        if rank == 0:
            other.acquire(timeout=5)
        dist.barrier()
        if rank == 1:
            try:
                other.release()
            except LockNotOwnedError as exc:
                report["release_refused"] = str(exc)
            try:
                other.acquire(timeout=0.2, backoff=Backoff(initial=0.01, maximum=0.05))
            except TimeoutError as exc:
                report["acquire_timed_out"] = str(exc)
        dist.barrier()

        # An exception inside `with` still releases the lock.
        if rank == 0:
            other.release()
            try:
                with DistributedLock("raising", store=store, rank=rank):
                    raise ValueError("boom")
            except ValueError:
                pass
        dist.barrier()
        if rank == 1:
            raising = DistributedLock("raising", store=store, rank=rank)
            raising.acquire(timeout=2)
            report["acquired_after_exception"] = True
            raising.release()
        dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def test_two_ranks_never_hold_the_lock_at_once(tmp_path):
    # The test process hosts the store; port 0 lets the OS pick a free port.
    store = dist.TCPStore(HOST, 0, None, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    store.set("counter", "0")
    mp.spawn(_worker, args=(store.port, str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert int(store.get("counter")) == WORLD_SIZE * ITERATIONS  # no lost update
    intervals = sorted(tuple(i) for r in reports for i in r["intervals"])
    assert len(intervals) == WORLD_SIZE * ITERATIONS
    for (_, end), (next_start, _) in itertools.pairwise(intervals):
        assert end <= next_start, "two ranks were inside the critical section at once"
    assert "rank 1 cannot release" in reports[1]["release_refused"]
    assert "held by rank 0" in reports[1]["acquire_timed_out"]
    assert reports[1]["acquired_after_exception"]


class _DictStore:
    """The three Store methods the lock uses, for single-process unit tests."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        current = self.data.get(key)
        if (current is None and expected == "") or current == expected.encode():
            self.data[key] = desired.encode()
            return desired.encode()
        return current if current is not None else expected.encode()

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def get(self, key: str) -> bytes:
        return self.data[key]


def test_not_reentrant_and_release_twice_refused():
    lock = DistributedLock("x", store=_DictStore(), rank=0)
    lock.acquire(timeout=0)
    assert lock.held and lock.holder().startswith("rank 0 pid")
    with pytest.raises(RuntimeError, match="not re-entrant"):
        lock.acquire(timeout=0)
    lock.release()
    assert lock.holder() is None
    with pytest.raises(LockNotOwnedError):
        lock.release()


def test_bad_backoff_is_refused():
    with pytest.raises(ValueError, match="Backoff"):
        Backoff(initial=1.0, maximum=0.5)
