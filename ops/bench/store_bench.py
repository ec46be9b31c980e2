"""Store benchmarks on PostgreSQL: P3 (append cost vs session length), P5 (purge vs raw DELETE)."""

from __future__ import annotations

import time
from datetime import timedelta

from sessionq.models import ChatMessage, ChatSession, utcnow
from sessionq.models.sql import SqlStore

from .harness import BENCH_POSTGRES_URL, Result, prove, ratio_result, repeats


def open_bench_store(url: str = BENCH_POSTGRES_URL) -> SqlStore:
    """A migrated, emptied PostgreSQL store for benchmarks (creates the database if needed)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    admin = SqlStore(urlunsplit((parts.scheme, parts.netloc, "/postgres", "", "")), max_pool_size=1)
    name = parts.path.lstrip("/")
    exists = admin.database.execute_sql("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    if not exists:
        admin.database.execute_sql(f'CREATE DATABASE "{name}"')
    admin.close()
    store = SqlStore(url, max_pool_size=8)
    store.upgrade()
    empty(store)
    return store


def empty(store: SqlStore) -> None:
    """Delete every row (TRUNCATE is fine here: the benchmark owns its database)."""
    tables = ", ".join(m._meta.table_name for m in store.m.all()[1:])
    store.database.execute_sql(f"TRUNCATE {tables} CASCADE")


def _append_latency(store: SqlStore, session_id: str, count: int, start: int) -> float:
    samples = []
    now = utcnow()
    for i in range(start, start + count):
        message = ChatMessage(f"m{i}", session_id, "user", f"appended {i}", created_at=now)
        t = time.perf_counter()
        store.append_messages(session_id, [message])
        samples.append(time.perf_counter() - t)
    samples.sort()
    return samples[len(samples) // 2]


def count_messages(store: SqlStore, session_id: str | None = None) -> int:
    """Messages stored (in one session, or in all)."""
    if session_id is None:
        return int(store.database.execute_sql("SELECT count(*) FROM sessionq_messages").fetchone()[0])
    return int(store.database.execute_sql(
        "SELECT count(*) FROM sessionq_messages WHERE session_id = %s", (session_id,)).fetchone()[0])


def bench_append_cost(*, quick: bool) -> Result:
    """P3: p50 cost of appending one message to a 10,000-message session vs an empty one.

    The baseline is a fresh empty session in every repetition (not one that the
    previous repetitions filled), and the message counts are checked afterwards.
    """
    store = open_bench_store()
    try:
        now = utcnow()
        existing = 1_000 if quick else 10_000
        big = [ChatMessage(f"m{i}", "big", "user", f"message {i} " * 8, created_at=now) for i in range(existing)]
        store.save_session(ChatSession("big", created_at=now), big)
        appends = 100 if quick else 300
        ours, base = [], []
        for rep in range(repeats(quick)):
            baseline = f"empty-{rep}"
            store.save_session(ChatSession(baseline, created_at=now))
            base.append(_append_latency(store, baseline, appends, 0))
            prove(f"P3 messages in {baseline}", count_messages(store, baseline), appends)
            ours.append(_append_latency(store, "big", appends, existing + rep * appends))
            prove("P3 messages in big", count_messages(store, "big"), existing + (rep + 1) * appends)
        return ratio_result(
            "P3", f"append 1 message at {existing:,} existing vs at 0 (p50, fresh baseline session each time)",
            [x * 1e6 for x in ours], [x * 1e6 for x in base], "µs",
            goal_op="<=", goal=1.2, higher_is_better=False, sanity=(0.2, 5.0),
            proof={"messages_in_big": existing + repeats(quick) * appends, "baseline_sessions": repeats(quick)},
        )
    finally:
        empty(store)
        store.close()


def _seed_expired(store: SqlStore, sessions: int, per_session: int) -> None:
    """Insert expired sessions with messages set-based (generate_series), not through Python."""
    old = utcnow() - timedelta(days=30)
    db = store.database
    db.execute_sql(
        "INSERT INTO sessionq_sessions (session_id, model, status, created_at, updated_at, metadata, message_count) "
        "SELECT 'x' || g, 'm', 'expired', %s, %s, '{}'::jsonb, %s FROM generate_series(1, %s) g",
        (old, old, per_session, sessions),
    )
    db.execute_sql(
        "INSERT INTO sessionq_messages (session_id, message_id, seq, role, content, created_at, metadata) "
        "SELECT 'x' || s, 'm' || n, n, 'user', 'content ' || n, %s, '{}'::jsonb "
        "FROM generate_series(1, %s) s, generate_series(1, %s) n",
        (old, sessions, per_session),
    )
    db.execute_sql("ANALYZE sessionq_sessions; ANALYZE sessionq_messages")


def _row_counts(store: SqlStore) -> tuple[int, int]:
    db = store.database
    return (int(db.execute_sql("SELECT count(*) FROM sessionq_sessions").fetchone()[0]), count_messages(store))


def bench_purge(*, quick: bool) -> Result:
    """P5: rows/s of the batched purge sweep vs one raw DELETE of the same rows."""
    store = open_bench_store()
    sessions = 5_000 if quick else 100_000
    per_session = 2 if quick else 4
    rows = sessions * (1 + per_session)
    cutoff = utcnow() - timedelta(days=1)
    ours, raw = [], []
    try:
        for rep in range(repeats(quick)):
            # Each run on truncated, vacuumed tables holding only its own rows; the order alternates.
            for which in (("ours", "raw") if rep % 2 == 0 else ("raw", "ours")):
                empty(store)
                store.database.execute_sql("VACUUM sessionq_sessions, sessionq_messages")
                _seed_expired(store, sessions, per_session)
                prove(f"P5 {which}: seeded rows", _row_counts(store), (sessions, sessions * per_session))
                t = time.perf_counter()
                if which == "ours":
                    purged = store.purge_expired_sessions(cutoff, batch_size=1000)
                    ours.append(rows / (time.perf_counter() - t))
                    prove("P5 sessions purged", purged, sessions)
                else:
                    with store.database.atomic():
                        store.database.execute_sql(
                            "DELETE FROM sessionq_sessions WHERE status = 'expired' AND updated_at < %s", (cutoff,)
                        )
                    raw.append(rows / (time.perf_counter() - t))
                prove(f"P5 {which}: rows left", _row_counts(store), (0, 0))
        return ratio_result(
            "P5",
            f"purge {sessions:,} expired sessions + {sessions * per_session:,} messages, "
            "batches of 1000 vs one DELETE",
            ours, raw, "rows/s", goal_op=">=", goal=0.5, higher_is_better=True, sanity=(0.02, 5.0),
            proof={"rows_deleted_per_run": rows, "rows_left": 0},
        )
    finally:
        empty(store)
        store.close()
