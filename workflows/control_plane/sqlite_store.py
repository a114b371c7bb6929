"""`SQLiteMetadataStore`: the metadata store of the durable deployment modes.

The semantics are `workflows/control_plane/metadata.py`'s (the in-memory store is the reference
implementation, and tests/workflows/test_metadata.py runs the same cases on both). Here
they live in one table of a SQLite file in WAL mode, so readers never block the writer
and a committed transaction survives a crash of the process. Every operation that
changes state is one `BEGIN IMMEDIATE` transaction, so a batch of refs is committed,
acknowledged or expired whole or not at all, also when the trainer and several rollout
workers share the file.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Optional

from workflows.control_plane.metadata import STATES, SampleRef, StaleWriterError, StoreStatus

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL UNIQUE,
    version INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    prompt_id INTEGER NOT NULL,
    path TEXT,
    worker INTEGER NOT NULL,
    state TEXT NOT NULL,
    step INTEGER
);
CREATE INDEX IF NOT EXISTS samples_queue ON samples (state, version, seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_COLUMNS = "sample_id, version, epoch, prompt_id, path, worker"


class SQLiteMetadataStore:
    """The store semantics in a SQLite file (WAL), safe across threads and processes.

    Args:
        path: the database file (created with its directory).
        timeout: seconds a write waits for another process's transaction.

    Raises:
        sqlite3.Error: the file is not a database, or is locked past `timeout`.
    """

    durable = True

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), one per batch.
        self._conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash (the case we recover
        # from); only a power loss can drop the last transactions.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)

    # One writer transaction at a time per process (the lock) and across processes (IMMEDIATE).
    class _Tx:
        def __init__(self, store: "SQLiteMetadataStore") -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            self.store._conn.execute("BEGIN IMMEDIATE")
            return self.store._conn

        def __exit__(self, exc_type, *_: object) -> None:
            try:
                self.store._conn.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.store._lock.release()

    def _transaction(self) -> "SQLiteMetadataStore._Tx":
        return SQLiteMetadataStore._Tx(self)

    def begin_incarnation(self) -> int:
        with self._transaction() as c:
            c.execute("INSERT INTO counters VALUES ('incarnation', 1) ON CONFLICT(name) DO UPDATE SET value = value + 1")
            return self._incarnation_in(c)

    def current_incarnation(self) -> int:
        with self._lock:
            return self._incarnation_in(self._conn)

    @staticmethod
    def _incarnation_in(c: sqlite3.Connection) -> int:
        row = c.execute("SELECT value FROM counters WHERE name = 'incarnation'").fetchone()
        return row[0] if row else 0

    def commit(self, refs: list[SampleRef], *, incarnation: Optional[int] = None) -> int:
        if not refs:
            return 0
        with self._transaction() as c:
            if incarnation is not None:
                current = self._incarnation_in(c)
                if current != incarnation:
                    raise StaleWriterError(f"incarnation {incarnation} is over; the store is at {current}")
            before = c.total_changes
            c.executemany(
                f"INSERT OR IGNORE INTO samples ({_COLUMNS}, state) VALUES (?, ?, ?, ?, ?, ?, 'queued')",
                [(r.sample_id, r.version, r.epoch, r.prompt_id, r.path, r.worker) for r in refs],
            )
            new = c.total_changes - before
            if new < len(refs):
                c.execute(
                    "INSERT INTO counters VALUES ('duplicates', ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
                    (len(refs) - new, len(refs) - new),
                )
            return new

    def lease(self, count: int) -> list[SampleRef]:
        with self._transaction() as c:
            rows = c.execute(
                f"SELECT seq, {_COLUMNS} FROM samples WHERE state = 'queued' ORDER BY version, seq LIMIT ?", (count,)
            ).fetchall()
            c.executemany("UPDATE samples SET state = 'leased' WHERE seq = ?", [(row[0],) for row in rows])
        return [SampleRef(*row[1:]) for row in rows]

    def _move(self, c: sqlite3.Connection, sample_ids: list[str], state: str, step: int) -> None:
        before = c.total_changes
        c.executemany(
            "UPDATE samples SET state = ?, step = ? WHERE sample_id = ? AND state = 'leased'",
            [(state, step, i) for i in sample_ids],
        )
        if c.total_changes - before != len(set(sample_ids)):
            raise KeyError(f"some of the samples {sample_ids[:5]} are not leased")  # rolls the batch back

    def ack(self, sample_ids: list[str], step: int) -> None:
        with self._transaction() as c:
            self._move(c, sample_ids, "acked", step)

    def expire(self, sample_ids: list[str], step: int) -> None:
        with self._transaction() as c:
            self._move(c, sample_ids, "expired", step)

    def release(self) -> int:
        with self._transaction() as c:
            return c.execute("UPDATE samples SET state = 'queued' WHERE state = 'leased'").rowcount

    def rollback(self, step: int, *, keep_queued: bool = True) -> list[SampleRef]:
        bound = step if keep_queued else -(2**62)
        with self._transaction() as c:
            c.execute(
                "UPDATE samples SET state = 'queued', step = NULL "
                "WHERE state = 'leased' OR (state IN ('acked', 'expired') AND step > ?)",
                (step,),
            )
            rows = c.execute(
                f"SELECT {_COLUMNS} FROM samples WHERE state = 'queued' AND version > ? ORDER BY seq", (bound,)
            ).fetchall()
            c.execute("DELETE FROM samples WHERE state = 'queued' AND version > ?", (bound,))
        return [SampleRef(*row) for row in rows]

    def refs(self, state: Optional[str] = None) -> list[SampleRef]:
        with self._lock:
            query = f"SELECT {_COLUMNS} FROM samples" + (" WHERE state = ?" if state else "") + " ORDER BY seq"
            rows = self._conn.execute(query, (state,) if state else ()).fetchall()
        return [SampleRef(*row) for row in rows]

    def count(self, state: str, *, worker: int) -> int:
        with self._lock:
            query = "SELECT COUNT(*) FROM samples WHERE state = ? AND worker = ?"
            return self._conn.execute(query, (state, worker)).fetchone()[0]

    def acked_steps(self) -> dict[str, int]:
        with self._lock:
            return dict(self._conn.execute("SELECT sample_id, step FROM samples WHERE state = 'acked'").fetchall())

    def status(self) -> StoreStatus:
        with self._lock:
            counts = dict(self._conn.execute("SELECT state, COUNT(*) FROM samples GROUP BY state").fetchall())
            row = self._conn.execute("SELECT value FROM counters WHERE name = 'duplicates'").fetchone()
        return StoreStatus(**{s: counts.get(s, 0) for s in STATES}, duplicates=row[0] if row else 0)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

