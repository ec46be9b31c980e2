"""Seed-era stores (the seed document's exact DDL on SQLite and PostgreSQL, its document
structure on the MongoDB-compatible server) as sources of migrate, verify, export-all
and backup, through the real CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from sessionq.cli import main
from sessionq.errors import ValidationError
from sessionq.models import Store, open_store
from sessionq.models.legacy.records import derived_message_id
from tests.support_legacy import (
    BASE,
    NASTY,
    build_mongo,
    build_postgres,
    build_sqlite,
    legacy_source,  # noqa: F401  (fixture)
    seed_rows,
)

LEGACY_BACKENDS = ["sqlite", "postgresql", "mongodb"]
SUMMARY = "sessions source=4 destination=4, messages source=6 destination=6, files source=2 destination=2"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def migrate(source: str, dest: str, tmp_path: Path, *extra: str) -> Result:
    return cli("migrate", "--from", source, "--to", dest, "--checkpoint", str(tmp_path / "ck.json"),
               "--no-progress", *extra)


def utc(naive: datetime, shift: timedelta = timedelta(0)) -> datetime:
    return (naive - shift).replace(tzinfo=UTC)


def assert_seed_data(store: Store, shift: timedelta = timedelta(0)) -> None:
    """The destination holds exactly :func:`seed_rows`, times read ``shift`` ahead of UTC."""
    rows = seed_rows()
    sessions = {s.session_id: s for s in store.iter_sessions()}
    assert sorted(sessions) == sorted(r[0] for r in rows["chat_sessions"])
    active = sessions["s-active"]
    assert (active.model, active.status, active.message_count) == ("gemini-2.5-flash", "active", 3)
    assert active.metadata == {"user": "zoë", "tags": ["a", "b"], "q": "it's"}
    assert active.created_at == utc(BASE, shift) and active.updated_at == utc(BASE + timedelta(minutes=5), shift)
    assert [sessions[s].status for s in ("s-archived", "s-expired", "s-Robert')")] == ["archived", "expired", "active"]
    # The wrong message_count (5) is not carried: the messages found are
    assert sessions["s-archived"].message_count == 2 and sessions["s-expired"].message_count == 0
    messages = store.load_messages("s-active")
    assert [(m.seq, m.message_id, m.role) for m in messages] == [
        (1, "msg-1", "user"), (2, "msg-2", "assistant"), (3, "msg-3", "user")]
    assert messages[1].content == NASTY and messages[2].content == "日本語のテキスト"
    assert messages[0].metadata == {"lang": "en"} and messages[1].metadata == {}
    assert messages[0].created_at == utc(BASE + timedelta(seconds=1), shift)
    assert [m.message_id for m in store.load_messages("s-archived")] == ["a-1", "a-2"]
    assert store.load_messages("s-Robert')")[0].content == "%s ? ; --"
    first, second = store.load_file("file-1"), store.load_file("file-2")
    assert (first.provider_name, first.uri, first.display_name, first.size, first.mime_type) == (
        "gemini", "https://generativelanguage.googleapis.com/v1beta/files/abc123", "report.pdf", 2048,
        "application/pdf")
    assert first.metadata == {"purpose": "rag", "gemini_file_name": "files/abc123"}
    assert first.uploaded_at == utc(BASE, shift) and first.expires_at == utc(BASE + timedelta(hours=48), shift)
    assert (second.size, second.mime_type, second.display_name) == (0, "application/octet-stream", "nötes 'x'.txt")


@pytest.mark.parametrize("legacy_source", LEGACY_BACKENDS, indirect=True)
def test_migrate_a_seed_store_to_every_backend_twice(legacy_source: str, store: Store, tmp_path: Path) -> None:
    # Given a seed-era store (every status, unicode and SQL metacharacters, files, a wrong
    # message_count) and an empty sessionq store on any backend
    dest = store.location
    # When it is migrated with --verify (its layout detected)
    first = migrate(legacy_source, dest, tmp_path, "--verify")
    # Then everything arrives, verify finds the stores equal, and the wrong count is a note
    assert first.exit_code == 0, first.output
    assert "migrated 4 sessions, 6 messages, 2 files" in first.stdout
    assert "4 sessions written, 6 messages inserted, 2 files written" in first.stdout
    assert f"EQUAL: {SUMMARY}" in first.stdout
    assert "note: chat_sessions 's-archived': message_count says 5, 2 message(s) found" in first.stderr
    assert "bad row" not in first.stderr
    assert_seed_data(store)
    # And a second run (in pages of one session and one file) adds nothing
    second = migrate(legacy_source, dest, tmp_path, "--verify", "--batch-size", "1")
    assert second.exit_code == 0, second.output
    assert "0 sessions written, 0 messages inserted, 0 files written" in second.stdout
    assert f"EQUAL: {SUMMARY}" in second.stdout
    assert_seed_data(store)
    # And `sessionq verify` against the seed-era store agrees on its own
    check = cli("verify", "--from", legacy_source, "--to", dest)
    assert check.exit_code == 0 and check.stdout.startswith("EQUAL"), check.output


@pytest.mark.parametrize("legacy_source", ["postgresql-jsonb"], indirect=True)
def test_jsonb_metadata_reads_like_json_text(legacy_source: str, tmp_path: Path) -> None:
    # Given the seed's PostgreSQL tables with JSONB metadata: when migrated to SQLite
    dest = f"sqlite:///{tmp_path / 'dest.db'}"
    done = migrate(legacy_source, dest, tmp_path, "--verify", "--from-layout", "legacy")
    # Then the metadata objects are the same as from JSON text
    assert done.exit_code == 0, done.output
    with open_store(dest) as store:
        assert_seed_data(store)


@pytest.mark.parametrize("legacy_source", LEGACY_BACKENDS, indirect=True)
def test_naive_times_are_read_in_the_legacy_zone(legacy_source: str, tmp_path: Path) -> None:
    # Given the seed's naive times, written in Berlin (UTC+2 on 2025-10-16)
    dest = f"sqlite:///{tmp_path / 'dest.db'}"
    # When migrated with --legacy-tz Europe/Berlin
    done = migrate(legacy_source, dest, tmp_path, "--legacy-tz", "Europe/Berlin", "--verify")
    # Then every time is two hours earlier in UTC than the wall time, and verify (read
    # with the same zone) agrees
    assert done.exit_code == 0, done.output
    with open_store(dest) as store:
        assert_seed_data(store, shift=timedelta(hours=2))
    # And the same store verified without the zone differs (UTC is the default reading)
    plain = cli("verify", "--from", legacy_source, "--to", dest)
    assert plain.exit_code == 1 and "created_at differs" in plain.stdout


def _bad_rows() -> dict[str, list[tuple[Any, ...]]]:
    rows = seed_rows()
    at = BASE
    rows["chat_sessions"] += [
        ("bad-status", "m", at, at, 0, None, "deleted"),
        ("bad-json", "m", at, at, 0, "{not json", "active"),
        ("x" * 300, "m", at, at, 0, None, "active"),
    ]
    rows["chat_messages"] += [
        ("bad-role", "s-expired", "robot", "beep", at, None),
        ("y" * 256, "s-expired", "user", "long id", at + timedelta(seconds=1), None),
        ("ok-after", "s-expired", "user", "kept", at + timedelta(seconds=2), None),
        ("orphan-of-bad", "bad-status", "user", "never read", at, None),
    ]
    rows["uploaded_files"] += [("bad-file", "files/x", "", "x", 1, None, at, at, None)]
    return rows


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_bad_rows_are_named_and_the_rest_migrates(backend: str, tmp_path: Path) -> None:
    # Given a seed-era store with rows sessionq refuses: an unknown status, metadata that
    # is not JSON, an id too long, an unknown role, a message id too long, a file without URI
    source = build_sqlite(tmp_path / "bad.db", _bad_rows()) if backend == "sqlite" else build_postgres(_bad_rows())
    dest = f"sqlite:///{tmp_path / 'dest.db'}"
    for attempt in range(2):
        # When it is migrated (twice)
        done = migrate(source, dest, tmp_path, "--batch-size", "2")
        # Then each bad row is named by table and key, the run exits 1
        assert done.exit_code == 1, done.output
        errors = done.stderr
        assert "bad row: chat_sessions 'bad-status': status must be one of active, archived, expired" in errors
        assert "bad row: chat_sessions 'bad-json': metadata is not valid JSON" in errors
        assert f"bad row: chat_sessions '{'x' * 100}" in errors and "session_id is 300 characters long" in errors
        assert "bad row: chat_messages 'bad-role': role must be one of" in errors
        assert "message_id is 256 characters long" in errors
        assert "bad row: uploaded_files 'bad-file': uri must not be empty" in errors
        assert "Traceback" not in done.output
        # And the rest is migrated (nothing more the second time)
        written = 4 if attempt == 0 else 0
        assert "migrated 4 sessions, 7 messages, 2 files" in done.stdout
        assert f"{written} sessions written, {written and 7} messages inserted" in done.stdout
        with open_store(dest) as store:
            assert sorted(s.session_id for s in store.iter_sessions()) == [
                "s-Robert')", "s-active", "s-archived", "s-expired"]
            kept = store.load_messages("s-expired")
            # the bad rows leave gaps in seq: fixing them and migrating again puts them in place
            assert [(m.seq, m.message_id) for m in kept] == [(3, "ok-after")]
            assert store.load_session("s-expired").message_count == 3
            assert [f.file_id for f in store.iter_files()] == ["file-1", "file-2"]


def test_bad_documents_on_mongodb(tmp_path: Path) -> None:
    # Given seed-era documents, one whose messages are not an array and one with a bad message
    at = BASE
    extra = [
        {"_id": "bad-messages", "model": "m", "created_at": at, "updated_at": at, "messages": "oops"},
        {"_id": "half-bad", "model": "m", "created_at": at, "updated_at": at, "message_count": 2,
         "messages": [{"role": "robot", "content": "x", "created_at": at},
                      {"message_id": "fine", "role": "user", "content": "y", "created_at": at}]},
    ]
    source = build_mongo("sessions", extra=extra)
    dest = f"sqlite:///{tmp_path / 'dest.db'}"
    # When migrated (in pages of one session)
    done = migrate(source, dest, tmp_path, "--batch-size", "1")
    # Then both are named by collection and key, and the rest is migrated
    assert done.exit_code == 1, done.output
    assert "bad row: sessions 'bad-messages': messages must be an array" in done.stderr
    assert "bad row: sessions.messages 'half-bad/#1': role must be one of" in done.stderr
    with open_store(dest) as store:
        assert [(m.seq, m.message_id) for m in store.load_messages("half-bad")] == [(2, "fine")]
        assert store.stats().total_sessions == 5


def test_another_collection_name(tmp_path: Path) -> None:
    # Given seed-era documents in a collection of another name
    source = build_mongo("gemini_sessions")
    dest = f"sqlite:///{tmp_path / 'dest.db'}"
    # When migrated without naming it: neither layout is found, one line says so
    missing = migrate(source, dest, tmp_path)
    assert missing.exit_code == 1 and "has neither layout" in missing.output
    assert "chat_sessions, chat_messages, uploaded_files" in missing.output and "--legacy-collection" in missing.output
    # And with --legacy-collection it migrates
    done = migrate(source, dest, tmp_path, "--legacy-collection", "gemini_sessions", "--verify")
    assert done.exit_code == 0, done.output
    with open_store(dest) as store:
        assert_seed_data(store)


def test_layout_detection_and_overrides(tmp_path: Path) -> None:
    legacy = build_sqlite(tmp_path / "legacy.db")
    dest = f"sqlite:///{tmp_path / 'dest.db'}"
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    # A store with neither layout: one line naming both
    neither = migrate(empty, dest, tmp_path)
    assert neither.exit_code == 1 and neither.output.count("\n") == 1, neither.output
    assert "has neither layout: no sessionq schema" in neither.output and "chat_sessions" in neither.output
    # --from-layout sessionq on a seed-era store: it has the seed-era tables, not sessionq's
    forced = migrate(legacy, dest, tmp_path, "--from-layout", "sessionq")
    assert forced.exit_code == 1 and "holds the seed-era tables" in forced.output
    # --from-layout legacy on a sessionq store: no seed-era tables
    assert migrate(legacy, dest, tmp_path).exit_code == 0
    wrong = migrate(dest, f"sqlite:///{tmp_path / 'other.db'}", tmp_path, "--from-layout", "legacy")
    assert wrong.exit_code == 1 and "no seed-era tables or collection found" in wrong.output
    # And the sessionq store (now with sessionq tables) is detected as sessionq
    again = migrate(dest, f"sqlite:///{tmp_path / 'other.db'}", tmp_path, "--verify")
    assert again.exit_code == 0 and "EQUAL" in again.stdout, again.output
    # A zone that does not exist: one line
    zone = migrate(legacy, dest, tmp_path, "--legacy-tz", "Mars/Olympus")
    assert zone.exit_code == 2 and "unknown time zone 'Mars/Olympus'" in zone.output
    assert "Traceback" not in zone.output
    # The seed-era store is never written: the writes sessionq would make are refused
    from sessionq.models.legacy import open_source

    with open_source(legacy) as source, pytest.raises(ValidationError, match="sessionq reads it and never writes it"):
        source.upgrade()


def test_resumed_migration_picks_up_what_was_added(tmp_path: Path) -> None:
    # Given a seed-era SQLite store migrated in batches of one session with a checkpoint
    path = tmp_path / "legacy.db"
    source = build_sqlite(path)
    dest = f"sqlite:///{tmp_path / 'dest.db'}"
    assert migrate(source, dest, tmp_path, "--batch-size", "1").exit_code == 0
    # When the seed system keeps writing (a new session, a new message of an old one)
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO chat_sessions VALUES ('t-new', 'm', ?, ?, 1, NULL, 'active')",
                     ["2025-10-17T10:00:00", "2025-10-17T10:00:00"])
        conn.execute("INSERT INTO chat_messages VALUES ('n-1', 't-new', 'user', 'late', ?, NULL)",
                     ["2025-10-17T10:00:00"])
        conn.execute("INSERT INTO chat_messages VALUES ('msg-4', 's-active', 'assistant', 'more', ?, NULL)",
                     ["2025-10-17T10:00:01"])
    conn.close()
    # And the migration is resumed
    done = migrate(source, dest, tmp_path, "--batch-size", "1", "--resume")
    # Then the new session arrives; a full run picks up the appended message too, and it converges
    assert done.exit_code == 0, done.output
    full = migrate(source, dest, tmp_path, "--verify")
    assert full.exit_code == 0 and "EQUAL" in full.stdout, full.output
    with open_store(dest) as store:
        assert [m.message_id for m in store.load_messages("s-active")][-1] == "msg-4"
        assert store.load_session("t-new").message_count == 1


def test_export_all_and_backup_read_a_seed_store(tmp_path: Path) -> None:
    # Given a seed-era SQLite store configured as the store
    source = build_sqlite(tmp_path / "legacy.db")
    out = tmp_path / "all.jsonl"
    # When it is exported and backed up
    exported = cli("--storage-url", source, "export-all", "-o", str(out))
    assert exported.exit_code == 0, exported.output
    assert "exported 4 sessions, 6 messages, 2 files" in exported.stdout
    backed = cli("--storage-url", source, "backup", "--dir", str(tmp_path / "bk"), "--from-layout", "legacy")
    assert backed.exit_code == 0 and "4 sessions, 6 messages, 2 files" in backed.stdout, backed.output
    # Then each imports into sessionq with every field
    for n, path in enumerate([out, *sorted((tmp_path / "bk").iterdir())]):
        dest = f"sqlite:///{tmp_path / f'dest{n}.db'}"
        done = cli("--storage-url", dest, "import", str(path))
        assert done.exit_code == 0, done.output
        with open_store(dest) as store:
            assert_seed_data(store)
    # And a command that would make sessionq's schema in the configured SQLite file
    # refuses to add it beside the seed-era tables, in one line
    stats = cli("--storage-url", source, "stats")
    assert stats.exit_code == 1 and "holds the seed-era tables (chat_sessions, chat_messages, uploaded_files)" in (
        stats.output), stats.output
    assert f"sessionq migrate --from {source} --to URL" in stats.output
    # And the seed-era file itself was not given sessionq tables
    import sqlite3

    with sqlite3.connect(tmp_path / "legacy.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert tables == {"chat_sessions", "chat_messages", "uploaded_files"}


def test_derived_message_ids_are_stable() -> None:
    # The documented rule: sha256 over session id, position and content
    one = derived_message_id("abc-123", 1, "Hello!")
    assert one == derived_message_id("abc-123", 1, "Hello!") and one.startswith("legacy-") and len(one) == 39
    assert len({one, derived_message_id("abc-123", 2, "Hello!"), derived_message_id("abc-124", 1, "Hello!"),
                derived_message_id("abc-123", 1, "Hello?")}) == 4
    assert json.dumps(one).isascii()



def test_fan_out_refuses_a_seed_store(tmp_path: Path) -> None:
    # Given a seed-era store (detected) and a broker: --fan-out says why it cannot, in one line
    legacy = build_sqlite(tmp_path / "legacy.db")
    done = cli("--redis-url", "redis://127.0.0.1:1/0", "migrate", "--from", legacy, "--to",
               f"sqlite:///{tmp_path / 'dest.db'}", "--fan-out")
    assert done.exit_code == 1 and "--fan-out reads sessionq stores only" in done.output, done.output


@pytest.mark.parametrize("legacy_source", LEGACY_BACKENDS, indirect=True)
def test_a_seed_store_as_the_store_says_to_migrate_it(legacy_source: str) -> None:
    # Given a seed-era store configured as sessionq's store: when a command needs sessionq's schema
    done = cli("--storage-url", legacy_source, "stats")
    # Then one line says what it holds and to migrate it (not to upgrade it, which would
    # put sessionq's tables beside the seed system's)
    assert done.exit_code == 1 and done.output.count("\n") == 1, done.output
    assert "holds the seed-era tables (chat_sessions" in done.output and "sessionq migrate --from" in done.output
