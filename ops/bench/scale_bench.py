"""P8: the save drain and P3's append with 1M sessions / 10M messages already in
PostgreSQL (tables and indexes far larger than ``shared_buffers``), as ratios to the
same figures on empty tables, measured first in the same run and database.

The rows are generated set-based on the server (``INSERT ... SELECT generate_series``,
100,000 sessions a statement), then vacuumed and analyzed; the database is truncated
afterwards. Each drain proves its own jobs' messages were stored (counted by session
id, not by scanning 10M rows); the generated rows are counted once.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from .harness import Result, prove, ratio_result, repeats
from .queue_bench import WorkerPool, drain
from .store_bench import _append_latency, empty, open_bench_store

# Goal: figures at scale / on empty tables.
SCALE_GOAL = 0.8
MESSAGES_PER_SESSION = 10
CHUNK_SESSIONS = 100_000


def generate(store: Any, sessions: int) -> None:
    """``sessions`` sessions ``g0000000...`` with ``MESSAGES_PER_SESSION`` messages each."""
    from sessionq.models import utcnow

    now = utcnow()
    db = store.database
    for first in range(0, sessions, CHUNK_SESSIONS):
        last = min(first + CHUNK_SESSIONS, sessions) - 1
        with db.atomic():
            db.execute_sql(
                "INSERT INTO sessionq_sessions (session_id, model, status, created_at, updated_at, metadata, "
                "message_count) SELECT 'g' || lpad(g::text, 7, '0'), 'bench-model', 'active', %s, %s, "
                "'{\"client\": \"scale\"}'::jsonb, %s FROM generate_series(%s, %s) g",
                (now, now, MESSAGES_PER_SESSION, first, last))
            db.execute_sql(
                "INSERT INTO sessionq_messages (session_id, message_id, seq, role, content, created_at, metadata) "
                "SELECT 'g' || lpad(s::text, 7, '0'), 'm' || n, n, "
                "CASE WHEN mod(n, 2) = 1 THEN 'user' ELSE 'assistant' END, "
                "'message ' || n || ' of session ' || s || ': ' || repeat('lorem ipsum dolor ', 6), %s, '{}'::jsonb "
                "FROM generate_series(%s, %s) s, generate_series(1, %s) n",
                (now, first, last, MESSAGES_PER_SESSION))
    db.execute_sql("VACUUM ANALYZE sessionq_sessions, sessionq_messages")


def _sizes(store: Any) -> dict[str, Any]:
    row = store.database.execute_sql(
        "SELECT pg_size_pretty(pg_total_relation_size('sessionq_messages')), "
        "pg_size_pretty(pg_indexes_size('sessionq_messages')), current_setting('shared_buffers')").fetchone()
    return {"messages_total": row[0], "messages_indexes": row[1], "shared_buffers": row[2]}


def bench_scale(*, quick: bool) -> list[Result]:
    """P8: save drain and append p50 with 1M sessions / 10M messages vs on empty tables."""
    from sessionq.models import ChatMessage, ChatSession, utcnow

    sessions = 2_000 if quick else 1_000_000
    jobs = 100 if quick else 5_000
    appends = 50 if quick else 300
    store = open_bench_store()
    try:
        with WorkerPool(2) as pool:
            drain(pool, store, "", 50 * pool.processes)  # warm
            calm = [drain(pool, store, "", jobs) for _ in range(repeats(quick))]
            empty(store)
            now = utcnow()
            store.save_session(ChatSession("g-empty", created_at=now),
                               [ChatMessage(f"m{i}", "g-empty", "user", "x", created_at=now)
                                for i in range(MESSAGES_PER_SESSION)])
            calm_append = _append_latency(store, "g-empty", appends, 100) * 1e6
            empty(store)
            started = time.perf_counter()
            generate(store, sessions)
            generated_in = time.perf_counter() - started
            counts = store.database.execute_sql(
                "SELECT (SELECT count(*) FROM sessionq_sessions), (SELECT count(*) FROM sessionq_messages)").fetchone()
            prove("P8 generated (sessions, messages)", tuple(counts), (sessions, sessions * MESSAGES_PER_SESSION))
            sizes = _sizes(store)
            big = [drain(pool, store, "", jobs, keep=True) for _ in range(repeats(quick))]
            middle = f"g{sessions // 2:07d}"
            big_append = _append_latency(store, middle, appends, 100) * 1e6
    finally:
        empty(store)
        store.close()
    notes = (f"{sessions:,} sessions / {sessions * MESSAGES_PER_SESSION:,} messages generated in "
             f"{generated_in:.0f} s; messages table {sizes['messages_total']} (indexes {sizes['messages_indexes']}), "
             f"shared_buffers {sizes['shared_buffers']}; empty-table figures measured first")
    return [
        ratio_result("P8", f"save drain ({jobs:,} jobs, 2 processes) with {sessions:,} sessions / "
                     f"{sessions * MESSAGES_PER_SESSION:,} messages stored vs on empty tables",
                     big, calm, "jobs/s", goal_op=">=", goal=SCALE_GOAL, higher_is_better=True,
                     sanity=(0.05, 5.0), notes=notes,
                     proof={"generated": list(counts), "drain_messages_counted": True}),
        ratio_result("P8-append", f"append 1 message (p50), on empty tables vs with {sessions:,} sessions stored "
                     "(empty/scale: higher is better)", [calm_append], [big_append], "µs", goal_op=">=",
                     goal=SCALE_GOAL, higher_is_better=True, sanity=(0.05, 20.0),
                     notes=f"p50 {statistics.median([calm_append]):,.0f} µs empty, {big_append:,.0f} µs at scale"),
    ]
