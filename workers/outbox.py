"""The outbox: a local SQLite spool for jobs accepted while the broker is unreachable.

The producer writes a job here when Redis does not answer and forwards it once
Redis is back; embedded mode spools jobs it could not finish before shutdown and
runs them on the next start. Rows survive a process restart. Forwarding holds the
SQLite write lock from read to delete, so two processes sharing a file never forward
the same rows twice; a crash between push and delete re-sends a job, which is safe
because every job is idempotent.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

# Rows forwarded per round trip.
DEFAULT_FORWARD_BATCH = 500
# Seconds a connection waits for another process's lock on the file.
DEFAULT_BUSY_TIMEOUT = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    data BLOB NOT NULL,
    spooled_at REAL NOT NULL
)
"""


class Outbox:
    """A durable FIFO of encoded Dramatiq messages, keyed by queue name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(self.path), timeout=DEFAULT_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)

    def put(self, items: Iterable[tuple[str, bytes]]) -> int:
        """Spool ``(queue, data)`` pairs durably (one transaction); return how many."""
        rows = [(queue, data, time.time()) for queue, data in items]
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO outbox (queue, data, spooled_at) VALUES (?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return len(rows)

    def count(self) -> int:
        """Jobs waiting to be forwarded."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def forward(self, send: Callable[[list[tuple[str, bytes]]], None], *, batch: int = DEFAULT_FORWARD_BATCH) -> int:
        """Hand spooled jobs, oldest first, to ``send`` in batches and delete each batch
        once ``send`` returned. Stops at the first exception (re-raised); returns the
        number forwarded so far otherwise."""
        forwarded = 0
        while True:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    rows = self._db.execute(
                        "SELECT id, queue, data FROM outbox ORDER BY id LIMIT ?", (batch,)
                    ).fetchall()
                    if rows:
                        send([(queue, bytes(data)) for _, queue, data in rows])
                        self._db.execute("DELETE FROM outbox WHERE id <= ?", (rows[-1][0],))
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            if not rows:
                return forwarded
            forwarded += len(rows)
            logger.info("forwarded %d spooled job(s) from %s", len(rows), self.path)

    def remove(self, match: Callable[[str, bytes], bool], *, batch: int = DEFAULT_FORWARD_BATCH) -> int:
        """Delete the spooled jobs ``match(queue, data)`` accepts (``forget``); return how
        many. Reads ``batch`` rows at a time under the write lock, like :meth:`forward`."""
        removed = 0
        last = 0
        while True:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    rows = self._db.execute(
                        "SELECT id, queue, data FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
                    ).fetchall()
                    hits = [(row_id,) for row_id, queue, data in rows if match(queue, bytes(data))]
                    self._db.executemany("DELETE FROM outbox WHERE id = ?", hits)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            removed += len(hits)
            if len(rows) < batch:
                return removed
            last = rows[-1][0]

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()
