"""A purge of 100,000 expired sessions with their messages on PostgreSQL runs inside the
database in bounded batches: the worker's memory stays flat (issue #4)."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest

from sessionq.models import Settings, Store
from sessionq.scheduler import run_sweep
from tests.conftest import T0, make_store, messages, reset_store, session

SESSIONS = 100_000
MESSAGES_PER_SESSION = 2
BATCH = 1000
# Peak RSS growth allowed during the purge: far below what loading 100k sessions and
# 200k messages into Python would take, far above what one batch of keys takes.
MAX_RSS_GROWTH = 50 * 2**20
# Peak of Python allocations during the purge (100k rows as tuples would be ~25 MiB).
MAX_TRACED = 10 * 2**20
NOW = T0 + timedelta(days=30)


@pytest.fixture
def pg_store(tmp_path: Path) -> Iterator[Store]:
    """The PostgreSQL store, emptied before and after (the rows are many)."""
    store = make_store("postgresql", tmp_path)
    reset_store(store)
    yield store
    reset_store(store)
    store.close()


class _PeakRss(threading.Thread):
    """Samples this process's RSS every few milliseconds and keeps the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.process, self.stop = psutil.Process(), threading.Event()
        self.peak = self.process.memory_info().rss

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)


@pytest.mark.slow
def test_purging_100k_expired_sessions_runs_in_batches_with_flat_memory(pg_store: Store) -> None:
    db: Any = pg_store.database  # type: ignore[attr-defined]
    expired_at = NOW - timedelta(days=10)
    # Given 100k expired sessions with 2 messages each, inserted set-based by the database
    started = time.perf_counter()
    with db.atomic():
        db.execute_sql(
            "INSERT INTO sessionq_sessions "
            "(session_id, model, status, created_at, updated_at, metadata, message_count) "
            "SELECT 'bulk-' || g, 'gpt-test', 'expired', %s, %s, '{}'::jsonb, %s FROM generate_series(1, %s) AS g",
            (expired_at - timedelta(days=1), expired_at, MESSAGES_PER_SESSION, SESSIONS),
        )
        db.execute_sql(
            "INSERT INTO sessionq_messages (session_id, message_id, seq, role, content, created_at, metadata) "
            "SELECT 'bulk-' || g, 'm' || k, k, 'user', repeat('x', 200), %s, '{}'::jsonb "
            "FROM generate_series(1, %s) AS g CROSS JOIN generate_series(1, %s) AS k",
            (expired_at, SESSIONS, MESSAGES_PER_SESSION),
        )
    inserted_in = time.perf_counter() - started
    # Fresh planner statistics, as after any bulk load: statistics left from an earlier
    # state of these tables once made this purge take over 300 s on a developer database
    db.execute_sql("ANALYZE sessionq_sessions, sessionq_messages")
    # ... and a few live sessions that must survive
    for i in range(5):
        live = f"live-{i}"
        pg_store.save_session(session(live, at=NOW - timedelta(hours=1)),
                              messages(live, 3, at=NOW - timedelta(hours=2)))
    # ... with every statement the store sends counted
    statements: list[str] = []
    execute_sql = db.execute_sql

    def counting(sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        statements.append(sql)
        return execute_sql(sql, params, *args, **kwargs)

    db.execute_sql = counting
    settings = Settings(sweep_batch_size=BATCH, expiry_hours=72, retention_hours=24)

    # When the expiry sweep purges them, with memory watched
    sampler = _PeakRss()
    tracemalloc.start()
    baseline = sampler.process.memory_info().rss
    sampler.start()
    started = time.perf_counter()
    try:
        counts = run_sweep("expire_sessions", pg_store, settings, now=NOW)
    finally:
        duration = time.perf_counter() - started
        sampler.stop.set()
        sampler.join()
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        db.execute_sql = execute_sql
    growth = sampler.peak - baseline

    # Then every expired session and its messages are gone, and the live ones remain
    assert counts == {"expired": 0, "purged": SESSIONS}
    stats = pg_store.stats()
    assert stats.sessions_by_status == {"active": 5}
    assert db.execute_sql("SELECT COUNT(*) FROM sessionq_messages").fetchone()[0] == 15
    # ... done in bounded batches: one DELETE per 1000 sessions, plus the final short one
    deletes = [s for s in statements if s.lstrip().upper().startswith("DELETE")]
    assert len(deletes) == SESSIONS // BATCH + 1
    assert all("LIMIT" in s.upper() for s in deletes)
    # ... without the rows ever coming into Python: memory stays flat
    print(
        f"\npurge of {SESSIONS} sessions + {SESSIONS * MESSAGES_PER_SESSION} messages: {duration:.2f}s "
        f"in {len(deletes)} DELETE batches; peak RSS growth {growth / 2**20:.1f} MiB, "
        f"tracemalloc peak {traced_peak / 2**20:.2f} MiB (insert took {inserted_in:.2f}s)"
    )
    assert growth < MAX_RSS_GROWTH, f"RSS grew {growth / 2**20:.1f} MiB"
    assert traced_peak < MAX_TRACED, f"Python allocations peaked at {traced_peak / 2**20:.1f} MiB"
