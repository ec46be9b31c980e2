"""Each sweep changes exactly the rows it should, boundary times included, and nothing
else — on SQLite, PostgreSQL and MariaDB; a dry run counts the same rows and changes
nothing; the ``sessionq cleanup`` command runs them."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sessionq.models import AgentState, FileRecord, Settings, Store, TransportSession
from sessionq.models.tasks import McpTask
from sessionq.scheduler import SWEEP_KINDS, SweepBook, run_sweep
from tests.conftest import T0, messages, session

NOW = T0 + timedelta(days=100)
US = timedelta(microseconds=1)
SETTINGS = Settings(
    expiry_hours=72, retention_hours=24, stale_heartbeat_seconds=120, grace_minutes=10,
    max_events_per_session=3, session_ttl=3600, sweep_batch_size=2,
)
IDLE_BEFORE = NOW - timedelta(hours=72)
PURGE_BEFORE = IDLE_BEFORE - timedelta(hours=24)
AGGRESSIVE_BEFORE = IDLE_BEFORE - timedelta(hours=1)
STALE_BEFORE = NOW - timedelta(seconds=120)
EVENTS_BEFORE = NOW - timedelta(seconds=3600)

SESSIONS = {  # id: (status, updated_at)
    "active-fresh": ("active", NOW - timedelta(hours=1)),
    "active-at-idle-boundary": ("active", IDLE_BEFORE),
    "active-idle-1": ("active", IDLE_BEFORE - US),
    "active-idle-2": ("active", IDLE_BEFORE - timedelta(hours=2)),
    "active-idle-3": ("active", PURGE_BEFORE),
    "active-ancient": ("active", PURGE_BEFORE - US),
    "expired-at-purge-boundary": ("expired", PURGE_BEFORE),
    "expired-past-retention": ("expired", PURGE_BEFORE - US),
    "expired-at-aggressive-boundary": ("expired", AGGRESSIVE_BEFORE),
    "expired-past-aggressive": ("expired", AGGRESSIVE_BEFORE - US),
    "archived-ancient": ("archived", PURGE_BEFORE - timedelta(days=10)),
}
IDLE = ["active-idle-1", "active-idle-2", "active-idle-3", "active-ancient"]

TRANSPORTS = {  # id: (status, last_heartbeat, grace_expires_at)
    "t-active-fresh": ("active", NOW - timedelta(seconds=10), None),
    "t-active-at-boundary": ("active", STALE_BEFORE, None),
    "t-active-stale": ("active", STALE_BEFORE - US, None),
    "t-recovered-stale": ("recovered", STALE_BEFORE - timedelta(hours=1), None),
    "t-disconnected-at-deadline": ("disconnected", NOW - timedelta(minutes=20), NOW),
    "t-disconnected-past-deadline": ("disconnected", NOW - timedelta(minutes=30), NOW - timedelta(minutes=5)),
    "t-disconnected-before-deadline": ("disconnected", NOW - timedelta(minutes=20), NOW + US),
    "t-expired": ("expired", NOW - timedelta(days=3), NOW - timedelta(days=2)),
}
EXPIRING = {"at-now": NOW, "past": NOW - timedelta(days=1), "just-after": NOW + US, "never": None}


def build(store: Store) -> None:
    """The same mixed data set for every sweep."""
    for sid, (status, at) in SESSIONS.items():
        store.save_session(session(sid, at=at, created_at=at - timedelta(days=1), status=status),
                           messages(sid, 2, at=at - timedelta(seconds=10)))
    for tid, (status, heartbeat, deadline) in TRANSPORTS.items():
        disconnected = None if deadline is None else deadline - timedelta(minutes=10)
        store.register_transport(TransportSession(
            tid, status=status, created_at=T0, last_heartbeat=heartbeat,
            disconnected_at=disconnected, grace_expires_at=deadline,
        ))
    for name, expires in EXPIRING.items():
        store.save_file(FileRecord(f"f-{name}", "gemini", f"files/{name}", size=1, uploaded_at=T0, expires_at=expires))
        store.put_agent_state(AgentState("agent", f"k-{name}", value={"n": name}, updated_at=T0, expires_at=expires))
        # MCP tasks, their lease long gone (without a queue the sweep only deletes expired ones)
        store.create_task(McpTask(f"task-{name}", "tool", created_at=T0, expires_at=expires, lease_until=T0))
    # e1: one event just past the TTL, one exactly at it, then four recent (cap 3);
    # e2: three recent (at the cap); e3: one old event
    store.append_event("e1", "s", {"i": 0}, EVENTS_BEFORE - US)
    store.append_event("e1", "s", {"i": 1}, EVENTS_BEFORE)
    for i in range(4):
        store.append_event("e1", "s", {"i": 2 + i}, NOW - timedelta(minutes=10 - i))
    for i in range(3):
        store.append_event("e2", "s", {"i": i}, NOW - timedelta(minutes=5))
    store.append_event("e3", "s", {"i": 0}, EVENTS_BEFORE - timedelta(days=1))


def snapshot(store: Store) -> dict[str, dict[Any, dict[str, Any]]]:
    """Every row of every table, by primary key."""
    m = store.m  # type: ignore[attr-defined]
    tables: dict[str, dict[Any, dict[str, Any]]] = {}
    for model in [*m.all()[1:], store.mt]:  # type: ignore[attr-defined]
        pk = model._meta.primary_key
        names = pk.field_names if hasattr(pk, "field_names") else [pk.name]
        rows: dict[Any, dict[str, Any]] = {}
        for row in model.select().dicts():
            key = tuple(row[n if n in row else f"{n}_id"] for n in names)
            rows[key[0] if len(key) == 1 else key] = row
        tables[model._meta.table_name.removeprefix("sessionq_")] = rows
    return tables


def checksum(rows: dict[Any, dict[str, Any]]) -> str:
    """A digest of rows, independent of their order."""
    text = "\n".join(sorted(repr((k, sorted(v.items()))) for k, v in rows.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def event_ids(store: Store, mcp_session_id: str) -> list[int]:
    E = store.m.Event  # type: ignore[attr-defined]
    return [e.id for e in E.select().where(E.mcp_session_id == mcp_session_id).order_by(E.id)]


def expected_changes(
    store: Store, kind: str
) -> tuple[dict[str, int], dict[str, set[Any]], dict[str, dict[Any, dict[str, Any]]]]:
    """(counts, deleted keys per table, changed columns per row per table) of one sweep."""
    deleted: dict[str, set[Any]] = {}
    changed: dict[str, dict[Any, dict[str, Any]]] = {}
    if kind in ("expire_sessions", "aggressive_cleanup"):
        purged = {"active-ancient", "expired-past-retention"}
        if kind == "aggressive_cleanup":
            # an hour past expiry: idle ones expired in this same pass go too
            purged |= {"expired-past-aggressive", "expired-at-purge-boundary", "active-idle-2", "active-idle-3"}
        deleted = {"sessions": purged, "messages": {(s, f"m{i}") for s in purged for i in range(2)}}
        changed = {"sessions": {s: {"status": "expired"} for s in IDLE if s not in purged}}
        return {"expired": len(IDLE), "purged": len(purged)}, deleted, changed
    if kind == "transports":
        gone = {"status": "disconnected", "disconnected_at": NOW, "grace_expires_at": NOW + timedelta(minutes=10)}
        changed = {"transports": {
            "t-active-stale": gone, "t-recovered-stale": gone,
            "t-disconnected-at-deadline": {"status": "expired"}, "t-disconnected-past-deadline": {"status": "expired"},
        }}
        return {"disconnected": 2, "expired": 2}, deleted, changed
    if kind == "files":
        return {"deleted": 2}, {"files": {"f-at-now", "f-past"}}, changed
    if kind == "agent_state":
        return {"deleted": 2}, {"agent_state": {("agent", "k-at-now"), ("agent", "k-past")}}, changed
    if kind == "tasks":
        return {"deleted": 2, "dispatched": 0}, {"tasks": {"task-at-now", "task-past"}}, changed
    assert kind == "events"
    e1 = event_ids(store, "e1")
    return {"deleted": 4}, {"events": set(e1[:3]) | set(event_ids(store, "e3"))}, changed


@pytest.mark.parametrize("kind", SWEEP_KINDS)
def test_sweep_changes_exactly_the_rows_it_should(sql_store: Store, kind: str) -> None:
    # Given a store holding rows on both sides of every sweep's boundaries
    build(sql_store)
    before = snapshot(sql_store)
    counts, deleted, changed = expected_changes(sql_store, kind)

    # When the sweep is dry-run, then it counts what it would change and changes nothing
    assert run_sweep(kind, sql_store, SETTINGS, now=NOW, dry_run=True) == counts
    assert snapshot(sql_store) == before

    # When it runs for real (batches of 2)
    book = SweepBook()
    assert run_sweep(kind, sql_store, SETTINGS, now=NOW, book=book) == counts
    after = snapshot(sql_store)

    # Then exactly the expected rows are gone or changed, the way they should be
    for table, rows in before.items():
        gone = deleted.get(table, set())
        edits = changed.get(table, {})
        assert gone <= set(rows) and set(edits) <= set(rows)
        assert set(rows) - set(after[table]) == gone, table
        assert set(after[table]) <= set(rows), table
        for key, columns in edits.items():
            assert after[table][key] == rows[key] | columns, (table, key)
        # ... and every other row is untouched (checksum before == after)
        untouched = {k: v for k, v in rows.items() if k not in gone and k not in edits}
        assert checksum({k: after[table][k] for k in untouched}) == checksum(untouched), table
    # ... the run is in the book, and running again changes nothing (idempotent)
    last = book.last(kind)
    assert last is not None and last.ok and last.counts == counts
    assert set(run_sweep(kind, sql_store, SETTINGS, now=NOW).values()) == {0}
    assert snapshot(sql_store) == after


def test_dry_run_counts_sessions_one_pass_expires_and_purges(sql_store: Store) -> None:
    # Given only an active session idle since before the retention window
    at = PURGE_BEFORE - timedelta(hours=5)
    sql_store.save_session(session("old", at=at, created_at=at), messages("old", 1, at=at - timedelta(seconds=5)))
    # When the expiry sweep is dry-run and then run
    dry = run_sweep("expire_sessions", sql_store, SETTINGS, now=NOW, dry_run=True)
    real = run_sweep("expire_sessions", sql_store, SETTINGS, now=NOW)
    # Then the dry run foresaw that the one pass expires it and purges it
    assert dry == real == {"expired": 1, "purged": 1}


def test_cleanup_command_dry_run_then_real_run(tmp_path: Path) -> None:
    from sessionq.cli import main
    from sessionq.models import open_store

    # Given a SQLite store with the mixed data set
    url = f"sqlite:///{tmp_path / 'c.db'}"
    store = open_store(url)
    store.upgrade()
    build(store)
    before = snapshot(store)
    runner = CliRunner()
    env = {"STORAGE_URL": url, "REDIS_URL": "", "STORAGE_EXPIRY_HOURS": "72", "SESSIONQ_SWEEP_BATCH_SIZE": "2",
           "SESSIONQ_RETENTION_HOURS": "24", "MAX_EVENTS_PER_SESSION": "3", "SESSIONQ_GRACE_MINUTES": "10"}
    # When `sessionq cleanup --dry-run --aggressive` runs (its clock is the real one:
    # every fixture time lies in the past, so everything time-based is due)
    dry = runner.invoke(main, ["cleanup", "--dry-run", "--aggressive"], env=env)
    # Then it prints what each sweep would change, and nothing changed
    assert dry.exit_code == 0, dry.output
    lines = {line.split(":")[0]: line for line in dry.stdout.splitlines()}
    assert set(lines) == {"expire_sessions", "transports", "files", "agent_state", "events", "aggressive_cleanup",
                          "tasks"}
    assert "would change expired=6 purged=10" in lines["expire_sessions"]
    assert "would change deleted=3" in lines["files"]
    assert snapshot(store) == before
    # When one kind runs for real
    real = runner.invoke(main, ["cleanup", "--kind", "files"], env=env)
    # Then only that sweep ran and its rows are gone
    assert real.exit_code == 0, real.output
    assert real.stdout.startswith("files: deleted=3 (")
    assert set(snapshot(store)["files"]) == {"f-never"}
    # ... and an unknown kind is a one-line usage error
    bad = runner.invoke(main, ["cleanup", "--kind", "nope"], env=env)
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    store.close()


def test_sweep_failure_is_recorded_and_raised(tmp_path: Path) -> None:
    from sessionq.models import open_store
    from sessionq.models.errors import StoreError

    # Given a store whose session tables were dropped under it
    store = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    store.upgrade()
    store.m.Session._meta.database.execute_sql("DROP TABLE sessionq_messages")  # type: ignore[attr-defined]
    store.m.Session._meta.database.execute_sql("DROP TABLE sessionq_sessions")  # type: ignore[attr-defined]
    book = SweepBook()
    # When the expiry sweep runs, then the error propagates (so the job retries)
    with pytest.raises(StoreError):
        run_sweep("expire_sessions", store, SETTINGS, now=NOW, book=book)
    # ... and the book records the failure
    last = book.last("expire_sessions")
    assert last is not None and not last.ok and last.consecutive_failures >= 1 and last.error
    store.close()

