"""Migration, verification, import_records, export/import and backup/restore."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from sessionq.models import (
    AgentState,
    ChatMessage,
    FileRecord,
    NotFound,
    Store,
    TransportSession,
    ValidationError,
    open_store,
)
from sessionq.models.archive_io import backup, export_file, import_file, list_backups, restore
from sessionq.models.kinds import FILES, KINDS
from sessionq.models.sql import SqlStore
from sessionq.models.transfer import migrate, migrate_batch, plan_batches, session_checksum, verify
from sessionq.models.transfer_kinds import migrate_kind_batch, plan_kind_batches
from tests.conftest import T0, make_store, messages, reset_store, session
from tests.support_bulk import fill, fill_kinds

#: Records of each other kind in the ``src`` fixture.
KIND_COUNT = 9
NO_WRITES = {kind.plural: 0 for kind in KINDS}


def sqlite_store(path: Path) -> Store:
    """A migrated SQLite store at ``path``."""
    store = open_store(f"sqlite:///{path}")
    store.upgrade()
    return store


@pytest.fixture
def src(tmp_path: Path) -> Iterator[Store]:
    """A SQLite store holding 30 sessions x 5 messages and 9 records of every other
    kind (files, transport sessions in every status, agent state)."""
    store = sqlite_store(tmp_path / "src.db")
    fill(store, 30, 5)
    fill_kinds(store, KIND_COUNT)
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
        for a, b in pairwise(chain):
            hop = f"{a.backend} -> {b.backend}"
            report = migrate(a, b, batch_size=4, message_chunk=4)
            # Then every hop copies every kind and verifies equal (fields, seq, counts, checksums, digests)
            assert (report.sessions, report.messages) == (30, 150), hop
            assert report.kinds == report.kinds_written == {kind.plural: KIND_COUNT for kind in KINDS}, hop
            result = verify(a, b)
            assert result.equal, (hop, result.differences)
            assert (result.sessions_checked, result.messages_checked) == (30, 150)
            assert {name: c.checked for name, c in result.kinds.items()} == report.kinds
            assert all(c.source_digest == c.destination_digest for c in result.kinds.values()), hop
            # And migrating the same hop again writes nothing
            again = migrate(a, b, batch_size=4)
            assert (again.sessions_written, again.messages_inserted, again.kinds_written) == (0, 0, NO_WRITES), hop
        # And the far end matches the start, checksum for checksum and record for record
        start, end = src.load_session("s0007"), last.load_session("s0007")
        assert end == start
        assert session_checksum(src, start) == session_checksum(last, end)
        assert [m.seq for m in last.load_messages("s0007")] == [1, 2, 3, 4, 5]
        for kind in KINDS:
            assert list(last.iter_kind(kind)) == list(src.iter_kind(kind)), kind.name
        assert {t.status for t in last.iter_transports()} == {"active", "disconnected", "recovered", "expired"}
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
    assert (again.sessions_written, again.messages_inserted, again.kinds_written) == (0, 0, NO_WRITES)
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
    # Then every batch ends where planned
    assert [r.last_session_id for r in results] == [until for _, until in reversed(plan)]
    assert sum(r.sessions for r in results) == 32
    # And so do the batches of the other kinds, run last first too, with records added after planning
    for kind in KINDS:
        kind_plan = list(plan_kind_batches(src, kind, 4))
        assert len(kind_plan) == 3 and kind_plan[0][0] is None, kind.name
        if kind is FILES:
            src.save_file(FileRecord("f0000a", "local", "file:///late", uploaded_at=T0))
        done = [migrate_kind_batch(src, dst, kind, after, 4, until=until) for after, until in reversed(kind_plan)]
        assert [d.last_cursor for d in done] == [until for _, until in reversed(kind_plan)]
    # And the destination equals the source
    result = verify(src, dst)
    assert result.equal, result.differences
    assert result.kinds["files"].checked == KIND_COUNT + 1


def test_verify_reports_every_difference(src: Store, dst: Store) -> None:
    # Given a faithful copy that is then damaged in four ways, and its other kinds in four more
    migrate(src, dst)
    assert isinstance(dst, SqlStore)
    dst.delete_session("s0001")
    dst.save_session(session("s0002", at=T0 + timedelta(days=9), created_at=T0, model="changed"))
    M: Any = dst.m.Message
    M.update(content="tampered").where((M.session == "s0003") & (M.seq == 2)).execute()
    dst.save_session(session("zz-extra"), messages("zz-extra", 1))
    dst.delete_file("f0001")
    dst.put_agent_state(AgentState("a3", "k0003", "changed", mcp_session_id="t0003", updated_at=T0 + timedelta(days=9)))
    dst.register_transport(TransportSession("zz-transport", created_at=T0))
    T_: Any = dst.m.Transport
    T_.update(working_directory="/elsewhere").where(T_.mcp_session_id == "t0005").execute()
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
    assert "files count differs: source 9, destination 8" in text
    assert "file 'f0001': missing in destination" in text
    assert (
        "agent_state ('a3', 'k0003'): differs in value, updated_at (first: source None, destination 'changed')" in text
    )
    assert "transport 'zz-transport': only in destination" in text
    assert "transport 't0005': differs in working_directory (first: source '/srv/5', destination '/elsewhere')" in text
    assert "transports count differs: source 9, destination 10" in text
    assert report.difference_count == 13
    # And the digests of the damaged kinds differ while the checked counts cover the source
    assert {name: c.source_digest == c.destination_digest for name, c in report.kinds.items()} == {
        "files": False, "transports": False, "agent_states": False, "tasks": True, "handles": True,
        "idempotency_entries": True}
    assert {name: c.checked for name, c in report.kinds.items()} == {kind.plural: KIND_COUNT for kind in KINDS}


def test_an_older_copy_migrated_or_restored_again_never_regresses_newer_records(
    src: Store, dst: Store, tmp_path: Path
) -> None:
    # Given a destination migrated from the source, an archive of the source, and a destination that moved on
    migrate(src, dst)
    archive = tmp_path / "old.jsonl"
    export_file(src, archive)
    dst.heartbeat("t0000", T0 + timedelta(days=2))
    dst.mark_disconnected("t0004", T0 + timedelta(days=2))
    dst.save_file(src.load_file("f0002").replace(uploaded_at=T0 + timedelta(days=2), uri="files/v2"))
    dst.put_agent_state(AgentState("a1", "k0001", "newer", updated_at=T0 + timedelta(days=2)))
    dst.save_session(session("s0004", at=T0 + timedelta(days=2), created_at=T0, model="newer"))
    moved_on = {kind.plural: list(dst.iter_kind(kind)) for kind in KINDS}
    # When the older source is migrated again and the older archive restored
    report = migrate(src, dst)
    restored = import_file(dst, archive)
    # Then nothing was written and the newer records stand
    assert (report.sessions_written, report.kinds_written) == (0, NO_WRITES)
    assert (restored.sessions_written, restored.kinds_written, restored.error_count) == (0, NO_WRITES, 0)
    assert {kind.plural: list(dst.iter_kind(kind)) for kind in KINDS} == moved_on
    assert dst.load_transport("t0004").status == "disconnected"
    assert dst.load_session("s0004").model == "newer"
    # And verify shows exactly the records that moved on (a session's fields one by one)
    moved = [line.split(":")[0] for line in verify(src, dst).differences]
    assert moved == ["session 's0004'"] * 3 + ["file 'f0002'", "transport 't0000'", "transport 't0004'",
                                                "agent_state ('a1', 'k0001')"]


def test_import_records_keeps_fields_and_is_idempotent(store: Store) -> None:
    # Given records exported from elsewhere, with their own seq and message_count
    s = session("s1", at=T0 + timedelta(hours=1), created_at=T0, status="archived").replace(message_count=7)
    msgs = [m.replace(seq=seq) for m, seq in zip(messages("s1", 2), (6, 7), strict=False)]
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
        assert exported.kinds == {kind.plural: KIND_COUNT for kind in KINDS}
        # When it is imported into an empty store, twice
        target = sqlite_store(tmp_path / f"{name}.db")
        report = import_file(target, path)
        again = import_file(target, path)
        # Then the stores are equal and the second import changed nothing
        assert (report.sessions_written, report.messages_inserted, report.error_count) == (30, 150, 0)
        assert report.kinds_read == report.kinds_written == exported.kinds
        assert (again.sessions_written, again.messages_inserted, again.kinds_written) == (0, 0, NO_WRITES)
        assert verify(src, target).equal, name
        target.close()


def test_jsonl_header_and_record_shape(src: Store, tmp_path: Path) -> None:
    path = tmp_path / "all.jsonl"
    export_file(src, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    assert (header["format"], header["version"]) == ("sessionq-jsonl", 4)
    assert header["records"] == ["session", "message", "file", "transport", "agent_state", "task", "handle",
                                 "idempotency_entry"]
    assert [json.loads(line)["type"] for line in lines[1:7]] == ["session"] + ["message"] * 5
    assert len(lines) == 1 + 30 + 150 + len(KINDS) * KIND_COUNT
    tail = [json.loads(line)["type"] for line in lines[181:]]
    assert tail == [kind.name for kind in KINDS for _ in range(KIND_COUNT)]


def test_version_1_archives_without_the_other_kinds_still_import(src: Store, tmp_path: Path) -> None:
    # Given archives as version 1 wrote them: sessions and messages only
    export_file(src, tmp_path / "all.jsonl")
    lines = (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0]) | {"version": 1, "records": ["session", "message"]}
    body = [line for line in lines[1:] if json.loads(line)["type"] in ("session", "message")]
    (tmp_path / "v1.jsonl").write_text("\n".join([json.dumps(header), *body]) + "\n", encoding="utf-8")
    export_file(src, tmp_path / "all.json")
    document = json.loads((tmp_path / "all.json").read_text(encoding="utf-8"))
    for kind in KINDS:
        del document[kind.plural]
    (tmp_path / "v1.json").write_text(json.dumps(document | {"version": 1}), encoding="utf-8")
    for name in ("v1.jsonl", "v1.json"):
        # When each is imported into an empty store
        target = sqlite_store(tmp_path / f"{name}.db")
        report = import_file(target, tmp_path / name)
        # Then every session and message lands, and the only differences are the kinds it never held
        assert (report.sessions_written, report.messages_inserted, report.error_count) == (30, 150, 0), name
        assert report.kinds_read == NO_WRITES
        result = verify(src, target)
        assert (result.sessions_checked, result.messages_checked) == (30, 150)
        assert {c.destination for c in result.kinds.values()} == {0}
        kinds_only = (
            "files ", "transports ", "agent_states ", "tasks ", "handles ", "idempotency_entries ", "file ",
            "transport ", "agent_state ", "task ", "handle ", "idempotency_entry "
        )
        assert all(line.startswith(kinds_only) for line in result.differences), result.differences[:3]
        target.close()


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
    # And a bad transport and a broken agent-state line among the other kinds
    transport_line = 1 + 30 + 150 + KIND_COUNT + 2
    bad_transport = json.loads(lines[transport_line])
    assert bad_transport["type"] == "transport"
    lines[transport_line] = json.dumps(bad_transport | {"status": "zombie"})
    lines[transport_line + KIND_COUNT] = '{"type": "agent_state", "agent_id": '
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # When it is imported
    report = import_file(dst, path)
    # Then each bad line is reported with its number, the session's messages are skipped, the rest lands
    assert report.errors[0].startswith("line 41: ") and "role" in report.errors[0]
    assert report.errors[1].startswith("line 51: not JSON")
    assert report.errors[2].startswith(f"line {session_line + 1}: ") and "status" in report.errors[2]
    assert all("skipped" in e for e in report.errors[3:8]) and report.error_count == 10
    assert report.errors[8].startswith(f"line {transport_line + 1}: ") and "status" in report.errors[8]
    assert report.errors[9].startswith(f"line {transport_line + KIND_COUNT + 1}: not JSON")
    assert report.kinds_written == {"files": KIND_COUNT, "transports": KIND_COUNT - 1, "agent_states": KIND_COUNT - 1,
                                    "tasks": KIND_COUNT, "handles": KIND_COUNT, "idempotency_entries": KIND_COUNT}
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
    when = datetime(2026, 3, 1, 10, 0, 0, tzinfo=UTC)
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
        # Then it holds exactly the source, every kind included
        assert (result.sessions_written, result.messages_inserted, result.error_count) == (30, 150, 0)
        assert result.kinds_written == same_second.kinds == {kind.plural: KIND_COUNT for kind in KINDS}
        assert verify(src, mongo).equal
    finally:
        reset_store(mongo)
        mongo.close()


def test_postgresql_copy_import_keeps_hostile_text_exactly(tmp_path: Path) -> None:
    # Given a batch big enough for the COPY path, with tabs, newlines, backslashes and \N in it
    from sessionq.models.sql.copy import DEFAULT_COPY_THRESHOLD

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
        extra = [
            ChatMessage(f"n{i}", "copy", "user", tricky[i % len(tricky)],
                        created_at=T0 + timedelta(seconds=1, microseconds=i), metadata={"j": i}, seq=len(batch) + i + 1)
            for i in range(DEFAULT_COPY_THRESHOLD)
        ]
        # When it is imported twice, then once more overlapping with new messages
        first = pg.import_records([s], batch)
        second = pg.import_records([], batch)
        third = pg.import_records([], batch[-20:] + extra)
        # Then every message comes back exactly, once: the direct COPY and its fallback agree
        inserted = (first.messages_inserted, second.messages_inserted, third.messages_inserted)
        assert inserted == (len(batch), 0, len(extra))
        assert pg.load_messages("copy") == batch + extra
    finally:
        reset_store(pg)
        pg.close()
