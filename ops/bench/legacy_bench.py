"""L1: migrating a seed-era SQLite store (the seed document's tables) into PostgreSQL vs
migrating the same data from a sessionq SQLite store (P4's path), rows/s.

Both sources hold the same sessions and messages (P4's generated source, cached under
``/tmp/sessionq-bench``; the seed-era copy is made from it with one ``INSERT ... SELECT``
per table into :data:`~sessionq.models.legacy.sql.SEED_DDL`). Each migration runs in a
fresh child process (``sessionq.models.transfer.migrate`` through ``open_pair``, so the
seed-era source is detected as the CLI detects it), into the same emptied PostgreSQL
store; afterwards the destination's counts are checked against the source's. The ratio is
seed-era rows/s over sessionq rows/s (goal: at least 0.5 — reading the seed's layout,
validating every row and numbering messages costs at most half the speed).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from .harness import BENCH_POSTGRES_URL, DEFAULT_REPEATS, Result, ratio_result
from .store_bench import empty, open_bench_store
from .transfer_bench import ROOT, build_source

# Goal: seed-era migration rows/s over sessionq migration rows/s.
LEGACY_RATIO_GOAL = 0.5


def build_legacy_source(messages: int) -> Path:
    """A seed-era SQLite copy of P4's source of ``messages`` messages, cached."""
    from sessionq.models.legacy.sql import SEED_DDL

    source = build_source(messages)
    path = source.with_name(f"legacy-{source.name}")
    if path.exists():
        return path
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    db = sqlite3.connect(partial)
    db.executescript(SEED_DDL)
    db.execute("ATTACH DATABASE ? AS src", (str(source),))
    db.executescript("""
        INSERT INTO chat_sessions (session_id, model, created_at, updated_at, message_count, metadata, status)
        SELECT session_id, model, replace(created_at, ' ', 'T'), replace(updated_at, ' ', 'T'), message_count,
               metadata, status FROM src.sessionq_sessions;
        INSERT INTO chat_messages (message_id, session_id, role, content, created_at, metadata)
        SELECT session_id || '/' || message_id, session_id, role, content,
               strftime('%Y-%m-%dT%H:%M:%f', created_at, '+' || seq || ' seconds'), metadata
        FROM src.sessionq_messages;
    """)
    db.commit()
    db.execute("DETACH DATABASE src")
    db.close()
    partial.rename(path)
    return path


def child(src: str, dst: str) -> None:
    """Migrate ``src`` (its layout detected) into ``dst`` in this process; print rows/s as JSON."""
    from sessionq.models.transfer import migrate, open_pair

    with open_pair(src, dst) as (s, d):
        started = time.perf_counter()
        report = migrate(s, d, show_progress=False)
        seconds = time.perf_counter() - started
        counts = d.stats()
    print(json.dumps({"rows": report.sessions + report.messages, "seconds": seconds, "sessions": counts.total_sessions,
                      "messages": counts.total_messages, "kind": type(s).__name__}))


def _migrate(source: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    code = "import sys; from ops.bench.legacy_bench import child; child(sys.argv[1], sys.argv[2])"
    out = subprocess.run([sys.executable, "-c", code, f"sqlite:///{source}", BENCH_POSTGRES_URL],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"migration child failed: {out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _proved(outcome: dict[str, float], messages: int, kind: str) -> float:
    """Rows/s, once the destination is shown to hold every session and message."""
    sessions = messages // 20
    if outcome["kind"] != kind or (outcome["sessions"], outcome["messages"]) != (sessions, messages):
        raise RuntimeError(f"{kind} migration incomplete: {outcome}")
    return outcome["rows"] / outcome["seconds"]


def bench_legacy_migrate(*, quick: bool) -> Result:
    """L1: seed-era SQLite → PostgreSQL vs sessionq SQLite → PostgreSQL, same data, rows/s."""
    messages = 4_000 if quick else 100_000
    ours_source, theirs_source = build_legacy_source(messages), build_source(messages)
    store = open_bench_store()
    legacy, sessionq = [], []
    try:
        for _ in range(DEFAULT_REPEATS):
            empty(store)
            legacy.append(_proved(_migrate(ours_source), messages, "LegacySqlStore"))
            empty(store)
            sessionq.append(_proved(_migrate(theirs_source), messages, "SqlStore"))
        return ratio_result(
            "L1", f"migrate seed-era SQLite → PostgreSQL ({messages:,} messages) vs the same from sessionq SQLite",
            legacy, sessionq, "rows/s", goal_op=">=", goal=LEGACY_RATIO_GOAL, higher_is_better=True,
        )
    finally:
        empty(store)
        store.close()
