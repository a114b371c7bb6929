"""engines/heartbeat.py over a real TCPStore on 127.0.0.1: live ranks are never reported,
a silent one is named within the timeout, a finished one is not, a dead store is."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from engines.heartbeat import LOST_LINE_PREFIX, Heartbeat
from launchers.local import find_free_port


def store(port: int, master: bool, timeout: float = 5.0) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, 3, is_master=master, timeout=timedelta(seconds=timeout),
                         wait_for_workers=False)


class Reports:
    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self.event = threading.Event()

    def __call__(self, line: str) -> None:
        self.lines.append((time.monotonic(), line))
        self.event.set()


def test_a_silent_rank_is_named_within_the_timeout_and_a_finished_one_is_not():
    timeout = 3.0  # generous: the test machine may be busy, and a starved thread must not count as lost
    port = find_free_port()
    server = store(port, True)
    reports = [Reports() for _ in range(3)]
    beats = [Heartbeat(store(port, False), rank=r, world_size=3, timeout=timeout, interval=0.2, on_lost=reports[r])
             for r in range(3)]
    for beat in beats:
        beat.start()
    time.sleep(timeout + 1)  # longer than the timeout: live ranks are not reported
    assert not any(r.lines for r in reports)

    beats[2].stop()  # an orderly end
    beats[1]._stop.set()  # rank 1 falls silent without saying so, as after SIGKILL
    silenced = time.monotonic()
    assert reports[0].event.wait(timeout + 15)
    at, line = reports[0].lines[0]
    assert line.startswith(f"{LOST_LINE_PREFIX} 1 (node ") and "no heartbeat for" in line and "seen by rank 0" in line
    assert at - silenced >= timeout / 2  # not before the timeout (less the beat seen just before the silence)
    assert len(reports[0].lines) == 1  # one line, then the watcher ends; rank 2 finished, so it is not named
    beats[0].stop()
    del server


def test_a_store_that_stops_answering_names_rank_0():
    port = find_free_port()
    server = store(port, True)
    reports = Reports()
    rank0 = Heartbeat(store(port, False), rank=0, world_size=2, timeout=60.0, interval=0.2, on_lost=print).start()
    beat = Heartbeat(store(port, False, timeout=1.0), rank=1, world_size=2, timeout=2.0, interval=0.2,
                     on_lost=reports)
    beat.start()
    time.sleep(0.5)
    rank0._stop.set()
    del server  # the store's host is gone, with rank 0
    assert reports.event.wait(30)
    (_, line), = reports.lines
    assert line.startswith(f"{LOST_LINE_PREFIX} 0 (node ") and "store stopped answering" in line  # where, learnt earlier


def test_a_store_that_goes_after_rank_0_finished_is_no_loss():
    """Rank 0 ends in order (its beat says so) and its process takes the store with it,
    while rank 1 is still finishing: rank 1 must not report rank 0 lost."""
    port = find_free_port()
    server = store(port, True)
    reports = Reports()
    rank0 = Heartbeat(store(port, False), rank=0, world_size=2, timeout=60.0, interval=0.2, on_lost=print).start()
    beat = Heartbeat(store(port, False, timeout=1.0), rank=1, world_size=2, timeout=2.0, interval=0.2,
                     on_lost=reports).start()
    time.sleep(0.5)
    rank0.stop()
    time.sleep(1.0)  # rank 1 reads the finished beat
    del server
    assert not reports.event.wait(6.0)  # three timeouts: nothing is reported
    beat.stop()


def test_bad_timeouts_are_refused():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Heartbeat(None, rank=0, world_size=2, timeout=0)
    with pytest.raises(ValueError, match="interval"):
        Heartbeat(None, rank=0, world_size=2, timeout=1.0, interval=2.0)
