"""Following a replica's log file while another process writes it (the local, Slurm and
Ray executors' `stream_logs`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path


def follow_log(path: Path, finished: Callable[[], bool], interval: float) -> Iterator[str]:
    """The lines of the file at `path`, each once it is complete, until `finished()` is
    true; then the rest, an unterminated last line included. The file may not exist yet.
    `interval` is the pause between reads, seconds.

    `finished()` is read before the file on each round, so whatever was written before
    the writer ended is read after it: no line is lost at the end."""
    offset, partial = 0, ""
    while True:
        done = finished()
        if path.exists():
            with open(path, errors="replace") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            *lines, partial = (partial + chunk).split("\n")
            yield from lines
        if done:
            if partial:
                yield partial
            return
        time.sleep(interval)
