"""Migration, verification, import_records, export/import and backup/restore."""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest

from models import ChatMessage, NotFound, Store, ValidationError, open_store
from models.archive_io import backup, export_file, import_file, list_backups, restore
from models.sql import SqlStore
from models.transfer import migrate, migrate_batch, plan_batches, session_checksum, verify
from tests.conftest import T0, make_store, messages, reset_store, session
from tests.support_bulk import fill


def sqlite_store(path: Path) -> Store:
    """A migrated SQLite store at ``path``."""
    store = open_store(f"sqlite:///{path}")
    store.upgrade()
    return store


@pytest.fixture
def src(tmp_path: Path) -> Iterator[Store]:
    """A SQLite store holding 30 sessions x 5 messages."""
    store = sqlite_store(tmp_path / "src.db")
    fill(store, 30, 5)
    yield store
    store.close()


@pytest.fixture
def dst(tmp_path: Path) -> Iterator[Store]:
    """An empty SQLite store."""
    store = sqlite_store(tmp_path / "dst.db")
    yield store
    store.close()


def test_migrate_chain_sqlite_postgresql_mongodb_mysql_sqlite(src: Store, tmp_path: Path) -> None:
    # Given the source and a clean store on every server backend
    servers = [make_store(name, tmp_path) for name in ("postgresql", "mongodb", "mysql")]
    last = sqlite_store(tmp_path / "last.db")
    chain = [src, *servers, last]
    try:
        for store in servers:
            reset_store(store)
        # When each store is migrated into the next, in small batches
        for a, b in zip(chain, chain[1:]):
            report = migrate(a, b, batch_size=7, message_chunk=4)
            # Then every hop copies everything and verifies equal (fields, seq, counts, checksums)
            assert (report.sessions, report.messages) == (30, 150), f"{a.backend} -> {b.backend}"
            result = verify(a, b)
            assert result.equal, (a.backend, b.backend, result.differences)
            assert (result.sessions_checked, result.messages_checked) == (30, 150)
        # And the far end matches the start, checksum for checksum
        start, end = src.load_session("s0007"), last.load_session("s0007")
        assert end == start
        assert session_checksum(src, start) == session_checksum(last, end)
        assert [m.seq for m in last.load_messages("s0007")] == [1, 2, 3, 4, 5]
    finally:
        for store in servers:
            reset_store(store)
            store.close()
        last.close()


def test_rerun_and_half_done_batch_insert_no_duplicates(src: Store, dst: Store) -> None:
    # Given a destination holding a half-finished batch: sessions written, some messages missing
    first = src.list_sessions(limit=4).items
    dst.import_records(first, [])
    dst.import_records([], src.load_messages(first[0].session_id, limit=2))
    # When the whole migration runs, and then runs again
    report = migrate(src, dst, batch_size=4)
    again = migrate(src, dst, batch_size=4)
    # Then the missing messages were filled in exactly once and the re-run inserted nothing
    assert report.messages_inserted == 148
    assert (again.sessions_written, again.messages_inserted) == (0, 0)
    assert dst.stats().total_messages == 150
    assert verify(src, dst).equal


def test_batches_planned_up_front_can_run_in_any_order(src: Store, dst: Store) -> None:
    # Given the batches of a migration in batches of 4 sessions, planned up front
    plan = list(plan_batches(src, 4))
    assert len(plan) == 8 and plan[0] == (None, "s0003") and plan[-1] == ("s0027", "s0029")
    # And sessions added to the source after planning, inside the first batches' ranges
    src.save_session(session("s0000a"), messages("s0000a", 2))
    src.save_session(session("s0005a"), messages("s0005a", 1))
    # When each batch runs independently, last first (as fanned-out jobs might)
    results = [migrate_batch(src, dst, after, 4, until=until) for after, until in reversed(plan)]
    # Then every batch ends where planned and the destination equals the source
    assert [r.last_session_id for r in results] == [until for _, until in reversed(plan)]
    assert sum(r.sessions for r in results) == 32
    assert verify(src, dst).equal


def test_verify_reports_every_difference(src: Store, dst: Store) -> None:
    # Given a faithful copy that is then damaged in four ways
    migrate(src, dst)
    assert isinstance(dst, SqlStore)
    dst.delete_session("s0001")
    dst.save_session(session("s0002", at=T0 + timedelta(days=9), created_at=T0, model="changed"))
    M: Any = dst.m.Message
    M.update(content="tampered").where((M.session == "s0003") & (M.seq == 2)).execute()
    dst.save_session(session("zz-extra"), messages("zz-extra", 1))
    # When the stores are verified
    report = verify(src, dst)
    # Then each difference is reported
    text = "\n".join(report.differences)
    assert not report.equal
    assert "'s0001': missing in destination" in text
    assert "'s0002': model differs" in text
    assert "'s0003': 1 message(s) differ; first: seq 2 ('m1') differs in content" in text
    assert "'zz-extra': only in destination" in text
    assert "message count differs" in text


def test_import_records_keeps_fields_and_is_idempotent(store: Store) -> None:
    # Given records exported from elsewhere, with their own seq and message_count
    s = session("s1", at=T0 + timedelta(hours=1), created_at=T0, status="archived").replace(message_count=7)
    msgs = [m.replace(seq=seq) for m, seq in zip(messages("s1", 2), (6, 7))]
    # When imported twice
    first = store.import_records([s], msgs)
    second = store.import_records([s], msgs)
    # Then they are stored exactly as given, once
    assert (first.sessions_written, first.messages_inserted) == (1, 2)
    assert (second.sessions_written, second.messages_inserted) == (0, 0)
    assert store.load_session("s1") == s
    assert [(m.seq, m.message_id) for m in store.load_messages("s1")] == [(6, "m0"), (7, "m1")]
    # And an older copy never replaces it while a newer one does
    assert store.import_records([s.replace(model="old", updated_at=T0)], []).sessions_written == 0
    newer = s.replace(model="new", updated_at=T0 + timedelta(hours=2))
    assert store.import_records([newer], []).sessions_written == 1
    assert store.load_session("s1").model == "new"
    # And a message whose seq is taken, or whose session is unknown, or without seq, is refused or skipped
    clash = ChatMessage("other", "s1", "user", "x", created_at=T0, seq=6)
    assert store.import_records([], [clash]).messages_inserted == 0
    with pytest.raises(NotFound):
        store.import_records([], [clash.replace(session_id="ghost")])
    with pytest.raises(ValidationError, match="seq"):
        store.import_records([], [clash.replace(message_id="n", seq=0)])


def test_export_import_round_trip_in_both_formats(src: Store, tmp_path: Path) -> None:
    for name in ("all.jsonl", "all.json", "all.jsonl.gz", "all.json.gz"):
        # Given an export of the source
        path = tmp_path / name
        exported = export_file(src, path)
        assert (exported.sessions, exported.messages) == (30, 150)
        # When it is imported into an empty store, twice
        target = sqlite_store(tmp_path / f"{name}.db")
        report = import_file(target, path)
        again = import_file(target, path)
        # Then the stores are equal and the second import changed nothing
        assert (report.sessions_written, report.messages_inserted, report.error_count) == (30, 150, 0)
        assert (again.sessions_written, again.messages_inserted) == (0, 0)
        assert verify(src, target).equal, name
        target.close()


def test_jsonl_header_and_record_shape(src: Store, tmp_path: Path) -> None:
    path = tmp_path / "all.jsonl"
    export_file(src, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    assert (header["format"], header["version"]) == ("sessionq-jsonl", 1)
    assert [json.loads(line)["type"] for line in lines[1:7]] == ["session"] + ["message"] * 5
    assert len(lines) == 1 + 30 + 150


def test_import_reports_bad_lines_by_number_and_imports_the_rest(src: Store, dst: Store, tmp_path: Path) -> None:
    # Given an export with a broken line, an invalid message and an invalid session in the middle
    path = tmp_path / "all.jsonl"
    export_file(src, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    bad_message = json.loads(lines[40])
    assert bad_message["type"] == "message"
    bad_message["role"] = "villain"
    lines[40] = json.dumps(bad_message)
    lines[50] = '{"type": "message", "session_id": '
    session_line = next(i for i in range(60, 80) if json.loads(lines[i])["type"] == "session")
    bad_session = json.loads(lines[session_line]) | {"status": "zombie"}
    lines[session_line] = json.dumps(bad_session)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # When it is imported
    report = import_file(dst, path)
    # Then each bad line is reported with its number, the session's messages are skipped, the rest lands
    assert report.errors[0].startswith("line 41: ") and "role" in report.errors[0]
    assert report.errors[1].startswith("line 51: not JSON")
    assert report.errors[2].startswith(f"line {session_line + 1}: ") and "status" in report.errors[2]
    assert all("skipped" in e for e in report.errors[3:]) and report.error_count == 8
    assert dst.stats().total_sessions == 29
    stored = sum(len(dst.load_messages(s.session_id)) for s in dst.iter_sessions())
    assert stored == report.messages_inserted == 150 - 2 - 5  # two bad message lines, five skipped
    assert not dst.load_messages(bad_session["session_id"])


def test_plain_json_single_session_and_errors(dst: Store, tmp_path: Path) -> None:
    # Given a single-session export without seq or message_count, and a file that is not an export
    single = {
        "session_id": "one",
        "model": "m",
        "created_at": T0.isoformat(),
        "updated_at": T0.isoformat(),
        "status": "active",
        "metadata": {"a": 1},
        "messages": [
            {"message_id": "x", "role": "user", "content": "hi", "created_at": T0.isoformat()},
            {"message_id": "y", "role": "assistant", "content": "yo", "created_at": T0.isoformat()},
        ],
    }
    (tmp_path / "one.json").write_text(json.dumps(single), encoding="utf-8")
    (tmp_path / "bad.json").write_text('{"hello": 1}', encoding="utf-8")
    # When they are imported
    report = import_file(dst, tmp_path / "one.json")
    # Then seqs follow the file's order and the count is the number of messages
    assert report.error_count == 0
    assert dst.load_session("one").message_count == 2
    assert [(m.seq, m.message_id) for m in dst.load_messages("one")] == [(1, "x"), (2, "y")]
    with pytest.raises(ValidationError, match="sessions"):
        import_file(dst, tmp_path / "bad.json")


def test_backup_rotation_and_restore_into_another_backend(src: Store, tmp_path: Path) -> None:
    # Given four backups a minute apart, two in the same second, keeping 3
    when = datetime(2026, 3, 1, 10, 0, 0, tzinfo=timezone.utc)
    directory = tmp_path / "backups"
    reports = [backup(src, directory, keep=3, now=when + timedelta(minutes=i)) for i in range(3)]
    same_second = backup(src, directory, keep=3, now=when + timedelta(minutes=2))
    # Then the oldest is gone and the newest are kept in order
    names = [p.name for p in list_backups(directory)]
    assert names == [
        "sessionq-backup-20260301T100100Z.jsonl.gz",
        "sessionq-backup-20260301T100200Z.jsonl.gz",
        "sessionq-backup-20260301T100200Z-1.jsonl.gz",
    ]
    assert same_second.removed == [reports[0].path]
    with gzip.open(same_second.path, "rt", encoding="utf-8") as fp:
        assert json.loads(fp.readline())["format"] == "sessionq-jsonl"
    # When the newest backup is restored into MongoDB
    mongo = make_store("mongodb", tmp_path)
    reset_store(mongo)
    try:
        result = restore(mongo, same_second.path)
        # Then it holds exactly the source
        assert (result.sessions_written, result.messages_inserted, result.error_count) == (30, 150, 0)
        assert verify(src, mongo).equal
    finally:
        reset_store(mongo)
        mongo.close()


def test_postgresql_copy_import_keeps_hostile_text_exactly(tmp_path: Path) -> None:
    # Given a batch big enough for the COPY path, with tabs, newlines, backslashes and \N in it
    from models.sql_copy import DEFAULT_COPY_THRESHOLD

    pg = make_store("postgresql", tmp_path)
    reset_store(pg)
    tricky = ["tab\there", "line\nbreak\r\n", "back\\slash \\N", "\\", "emoji 🎉 \u2028", ""]
    s = session("copy", at=T0).replace(message_count=DEFAULT_COPY_THRESHOLD + 10)
    batch = [
        ChatMessage(f"m{i}", "copy", "tool", tricky[i % len(tricky)], created_at=T0 + timedelta(microseconds=i),
                    metadata={"k\t": "v\n", "i": i}, seq=i + 1)
        for i in range(DEFAULT_COPY_THRESHOLD + 10)
    ]
    try:
        # When it is imported twice
        first = pg.import_records([s], batch)
        second = pg.import_records([], batch)
        # Then every message comes back exactly, once
        assert (first.messages_inserted, second.messages_inserted) == (len(batch), 0)
        assert pg.load_messages("copy") == batch
    finally:
        reset_store(pg)
        pg.close()
