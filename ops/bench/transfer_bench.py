"""P4: migration SQLite → PostgreSQL (``sessionq.models.transfer.migrate``) vs a raw COPY of the
same rows, and the migrating process's peak RSS at two source sizes.

The raw ceiling is fair: it formats each row with the one-line f-string that the
migration's own specialised formatter writes (``sessionq.models.sql.copy._message_buffer``),
straight from the source's text (no parsing at all), not with the generic ``copy_rows``.
Every run proves its work: the destination holds exactly the source's sessions and
messages afterwards (counted), for the migration and the ceiling alike.

The SQLite sources are built set-based (a recursive CTE, not Python loops) and cached
under ``/tmp/sessionq-bench``. Each migration runs in a fresh child process so that
its ``ru_maxrss`` is its own peak. The raw ceiling reads the same SQLite rows with
``sqlite3`` and streams them into the same PostgreSQL tables with ``COPY`` (10,000
rows per COPY), in the parent.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sessionq.models.sql.copy import _ESCAPES, NULL

from .harness import BENCH_POSTGRES_URL, Result, prove, ratio_result, repeats
from .store_bench import empty, open_bench_store

ROOT = Path(__file__).resolve().parents[2]
WORKDIR = Path(os.environ.get("SESSIONQ_BENCH_WORKDIR", "/tmp/sessionq-bench"))
# Messages per session in the generated sources.
MESSAGES_PER_SESSION = 20
# Goal: peak RSS growth between the small and the large source (MB).
RSS_GROWTH_GOAL_MB = 50.0
# Rows per COPY of the raw ceiling.
RAW_COPY_CHUNK = 10_000


def build_source(messages: int) -> Path:
    """A SQLite store with ``messages`` messages (20 per session, ~220-byte contents), cached."""
    from sessionq.models.sql import SqlStore

    sessions = messages // MESSAGES_PER_SESSION
    path = WORKDIR / f"src-{sessions}x{MESSAGES_PER_SESSION}.db"
    if path.exists():
        # A source cached by an older sessionq gets the tables added since (its rows stay).
        cached = SqlStore(f"sqlite:///{path}")
        try:
            cached.upgrade()
        finally:
            cached.close()
        return path
    WORKDIR.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    store = SqlStore(f"sqlite:///{partial}")
    store.upgrade()
    store.close()
    db = sqlite3.connect(partial)
    stamp = "2026-01-01 00:00:00.000000"
    db.executescript(f"""
        WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {sessions})
        INSERT INTO sessionq_sessions (session_id, model, status, created_at, updated_at, metadata, message_count)
        SELECT printf('bench-%07d', i), 'bench', 'active', '{stamp}', '{stamp}',
               '{{"i":' || i || ',"tag":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}', {MESSAGES_PER_SESSION} FROM s;
        WITH RECURSIVE n(j) AS (SELECT 1 UNION ALL SELECT j + 1 FROM n WHERE j < {MESSAGES_PER_SESSION})
        INSERT INTO sessionq_messages (session_id, message_id, seq, role, content, created_at, metadata)
        SELECT session_id, 'm' || j, j, CASE j % 2 WHEN 0 THEN 'user' ELSE 'assistant' END,
               j || ' ' || replace(hex(zeroblob(16)), '00', 'lorem ipsum '), '{stamp}', '{{"j":' || j || '}}'
        FROM sessionq_sessions, n;
    """)
    db.commit()
    db.close()
    partial.rename(path)
    return path


def child(src: str, dst: str) -> None:
    """Migrate ``src`` into ``dst`` in this process; print rows/s and peak RSS as JSON."""
    from sessionq.models import open_store
    from sessionq.models.sealing import sealer_for
    from sessionq.models.transfer import migrate

    sealer = sealer_for(os.environ.get("SESSIONQ_ENCRYPTION_KEYS"))  # E2: the destination seals
    s, d = open_store(src, sealer=sealer), open_store(dst, sealer=sealer)
    started, cpu = time.perf_counter(), time.process_time()
    report = migrate(s, d, show_progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": report.sessions + report.messages, "seconds": seconds,
                      "cpu_seconds": time.process_time() - cpu,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _migrate(source: Path, destination: str = BENCH_POSTGRES_URL) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    code = "import sys; from ops.bench.transfer_bench import child; child(sys.argv[1], sys.argv[2])"
    out = subprocess.run([sys.executable, "-c", code, f"sqlite:///{source}", destination],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"migration child failed: {out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _session_lines(rows: list[tuple[Any, ...]]) -> io.StringIO:
    """Session rows in COPY text format, one f-string a row (as the migration's formatter)."""
    buf = io.StringIO()
    write = buf.write
    for sid, model, status, created, updated, metadata, count in rows:
        write(f"{sid.translate(_ESCAPES)}\t{model.translate(_ESCAPES)}\t{status}\t{created}\t{updated}\t"
              f"{metadata.translate(_ESCAPES) if metadata is not None else NULL}\t{int(count)}\n")
    buf.seek(0)
    return buf


def _message_lines(rows: list[tuple[Any, ...]]) -> io.StringIO:
    """Message rows in COPY text format: the line ``_message_buffer`` writes, from the source's text."""
    buf = io.StringIO()
    write = buf.write
    for sid, mid, seq, role, content, created, metadata in rows:
        write(f"{sid.translate(_ESCAPES)}\t{mid.translate(_ESCAPES)}\t{int(seq)}\t"
              f"{role.translate(_ESCAPES)}\t{content.translate(_ESCAPES)}\t"
              f"{created if created is not None else NULL}\t"
              f"{metadata.translate(_ESCAPES) if metadata is not None else NULL}\n")
    buf.seek(0)
    return buf


SESSION_COLUMNS = "session_id, model, status, created_at, updated_at, metadata, message_count"
MESSAGE_COLUMNS = "session_id, message_id, seq, role, content, created_at, metadata"


def _raw_copy(store: Any, source: Path) -> float:
    """Rows/s of COPYing the source's rows into the same tables (sqlite3 → psycopg2)."""
    db = store.database
    src = sqlite3.connect(source)
    rows = 0
    started = time.perf_counter()
    with db.atomic():
        cursor = db.cursor()
        for table, columns, lines in (("sessionq_sessions", SESSION_COLUMNS, _session_lines),
                                      ("sessionq_messages", MESSAGE_COLUMNS, _message_lines)):
            reader = src.execute(f"SELECT {columns} FROM {table}")
            while chunk := reader.fetchmany(RAW_COPY_CHUNK):
                cursor.copy_expert(f"COPY {table} ({columns}) FROM STDIN", lines(chunk))
                rows += len(chunk)
    seconds = time.perf_counter() - started
    src.close()
    return rows / seconds


def source_counts(source: Path) -> tuple[int, int]:
    """(sessions, messages) in a SQLite source."""
    src = sqlite3.connect(source)
    try:
        return (src.execute("SELECT count(*) FROM sessionq_sessions").fetchone()[0],
                src.execute("SELECT count(*) FROM sessionq_messages").fetchone()[0])
    finally:
        src.close()


def destination_counts(store: Any) -> tuple[int, int]:
    """(sessions, messages) in the bench database."""
    db = store.database
    return (db.execute_sql("SELECT count(*) FROM sessionq_sessions").fetchone()[0],
            db.execute_sql("SELECT count(*) FROM sessionq_messages").fetchone()[0])


def bench_migrate(*, quick: bool) -> list[Result]:
    """P4: migrate rows/s vs raw COPY; peak RSS of the migration at two source sizes."""
    small_n, large_n = (4_000, 20_000) if quick else (100_000, 1_000_000)
    small, large = build_source(small_n), build_source(large_n)
    store = open_bench_store()
    ours, raw, small_rss = [], [], []
    expected = source_counts(small)
    try:
        for rep in range(repeats(quick)):
            # Alternating order, each on freshly truncated and vacuumed tables.
            for which in (("ours", "raw") if rep % 2 == 0 else ("raw", "ours")):
                empty(store)
                store.database.execute_sql("VACUUM ANALYZE sessionq_sessions, sessionq_messages")
                if which == "ours":
                    outcome = _migrate(small)
                    ours.append(outcome["rows"] / outcome["seconds"])
                    small_rss.append(outcome["peak_rss_mb"])
                else:
                    raw.append(_raw_copy(store, small))
                prove(f"P4 {which}: destination (sessions, messages)", destination_counts(store), expected)
        empty(store)
        big = _migrate(large)
        prove("P4 large migration: destination (sessions, messages)", destination_counts(store), source_counts(large))
        rows = ratio_result("P4", f"migrate SQLite → PostgreSQL ({small_n:,} messages) vs raw COPY of the same rows "
                            "(specialised formatter)", ours, raw, "rows/s", goal_op=">=", goal=0.6,
                            higher_is_better=True, sanity=(0.05, 3.0),
                            proof={"sessions": expected[0], "messages": expected[1], "counted_after_each_run": True})
        base_rss = sorted(small_rss)[len(small_rss) // 2]
        growth = big["peak_rss_mb"] - base_rss
        rss = Result("P4-rss", f"migration peak RSS at {large_n:,} vs {small_n:,} messages",
                     big["peak_rss_mb"], base_rss, "MB", big["peak_rss_mb"] / base_rss,
                     f"growth <= {RSS_GROWTH_GOAL_MB:g} MB", growth <= RSS_GROWTH_GOAL_MB,
                     [big["peak_rss_mb"], *small_rss], sanity=(0.5, 5.0),
                     notes=f"growth {growth:.1f} MB; {large_n:,}-message migration at "
                           f"{big['rows'] / big['seconds']:,.0f} rows/s")
        return [rows, rss]
    finally:
        empty(store)
        store.close()
