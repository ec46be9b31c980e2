"""The Store's part of ``forget`` on every backend: tombstones, receipts, and the bulk
deletes the erasure uses (delete_kind, delete_events, sessions_with_metadata)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from sessionq.models import AgentState, FileRecord, Store, TransportSession, WriteResult, utcnow
from sessionq.models.erasure import ForgetReceipt, Selector
from sessionq.models.errors import NotFound, ValidationError
from sessionq.models.kinds import AGENT_STATES, FILES, TASKS, TRANSPORTS
from sessionq.models.tasks import McpTask
from tests.conftest import T0, make_store, messages, reset_store, session


def test_tombstones_are_found_in_one_batch_until_they_expire(store: Store) -> None:
    # Given two sessions tombstoned for an hour
    until = T0 + timedelta(hours=1)
    assert store.put_tombstones(["s1", "s2", "s1"], T0, until) == 2
    # When a batch of ids is checked / Then only the tombstoned live ones come back
    assert store.forgotten_among(["s1", "s2", "s3"], T0) == {"s1", "s2"}
    assert store.forgotten_among([], T0) == set()
    assert store.forgotten_among(["s1"], until) == set()  # expires_at is exclusive
    # ... and many ids at once (more than one chunk) cost no error
    assert store.forgotten_among([f"x{i}" for i in range(1200)] + ["s2"], T0) == {"s2"}


def test_a_tombstone_only_ever_moves_to_a_later_expiry(store: Store) -> None:
    store.put_tombstones(["s1"], T0, T0 + timedelta(hours=2))
    # When the same session is forgotten again with a shorter window
    store.put_tombstones(["s1"], T0 + timedelta(minutes=1), T0 + timedelta(hours=1))
    # Then the longer window stands
    assert store.load_tombstone("s1").expires_at == T0 + timedelta(hours=2)
    # ... and a longer one extends it
    store.put_tombstones(["s1"], T0 + timedelta(minutes=2), T0 + timedelta(hours=3))
    tomb = store.load_tombstone("s1")
    assert (tomb.forgotten_at, tomb.expires_at) == (T0 + timedelta(minutes=2), T0 + timedelta(hours=3))
    with pytest.raises(NotFound):
        store.load_tombstone("nope")


def test_the_sweep_deletes_expired_tombstones_only(store: Store) -> None:
    store.put_tombstones(["old1", "old2"], T0, T0 + timedelta(hours=1))
    store.put_tombstones(["live"], T0, T0 + timedelta(hours=5))
    at = T0 + timedelta(hours=2)
    assert store.delete_expired_tombstones(at, dry_run=True) == 2
    assert store.delete_expired_tombstones(at, batch_size=1) == 2
    assert store.delete_expired_tombstones(at) == 0
    assert store.forgotten_among(["old1", "live"], T0) == {"live"}


def test_a_receipt_round_trips_and_is_replaced_under_its_id(store: Store) -> None:
    receipt = ForgetReceipt(
        "fr-1", Selector(key="user", value="u-1").to_receipt(),
        {"sessions": {"found": 2, "removed": 2}, "messages": {"found": 7, "removed": 7}},
        tombstones=2, tombstone_until=T0 + timedelta(days=7), created_at=T0, finished_at=T0 + timedelta(seconds=1),
    )
    store.save_receipt(receipt)
    assert store.load_receipt("fr-1") == receipt
    # A later run under the same id adds its counts
    later = receipt.replace(places={"sessions": {"found": 0, "removed": 0}, "files": {"found": 1, "removed": 1}})
    store.save_receipt(receipt.merged(later))
    loaded = store.load_receipt("fr-1")
    assert loaded.places["sessions"] == {"found": 2, "removed": 2}
    assert loaded.places["files"] == {"found": 1, "removed": 1}
    assert "u-1" not in str(loaded.to_json())
    with pytest.raises(NotFound):
        store.load_receipt("fr-unknown")


def test_a_receipt_with_unknown_places_or_bad_counts_is_refused() -> None:
    with pytest.raises(ValidationError, match="unknown erasure place"):
        ForgetReceipt("fr-1", {"session_id": "s"}, {"content": {"found": 1, "removed": 1}})
    with pytest.raises(ValidationError, match="non-negative"):
        ForgetReceipt("fr-1", {"session_id": "s"}, {"sessions": {"found": -1, "removed": 0}})


def test_delete_kind_removes_exactly_the_given_keys_of_every_kind(store: Store) -> None:
    # Given two records of each kind
    for i in (1, 2):
        store.save_file(FileRecord(f"f{i}", "p", f"file:///{i}", uploaded_at=T0))
        store.register_transport(TransportSession(f"t{i}", created_at=T0))
        store.put_agent_state(AgentState("a", f"k{i}", i, updated_at=T0))
        store.create_task(McpTask(f"task{i}", "tool", created_at=T0))
    # When one of each (and an unknown key) is deleted
    assert store.delete_kind(FILES, [("f1",), ("nope",)]) == 1
    assert store.delete_kind(TRANSPORTS, [("t1",)]) == 1
    assert store.delete_kind(AGENT_STATES, [("a", "k1"), ("a", "k9")]) == 1
    assert store.delete_kind(TASKS, [("task1",)]) == 1
    assert store.delete_kind(FILES, []) == 0
    # Then the other one of each is still there
    assert [f.file_id for f in store.iter_files()] == ["f2"]
    assert [t.mcp_session_id for t in store.iter_transports()] == ["t2"]
    assert [a.key for a in store.iter_agent_states()] == ["k2"]
    assert [t.task_id for t in store.iter_kind(TASKS)] == ["task2"]


def test_delete_events_removes_the_logs_of_the_given_sessions(store: Store) -> None:
    for mcp in ("t1", "t1", "t2"):
        store.append_event(mcp, "1", {"jsonrpc": "2.0", "id": 1, "result": {}}, T0)
    assert store.delete_events(["t1", "t9"]) == 2
    assert store.stats().stream_events == 1


def test_sessions_with_metadata_matches_text_and_json_values(store: Store) -> None:
    store.save_session(session("s1", metadata={"user": "u-1"}), messages("s1", 1))
    store.save_session(session("s2", metadata={"user": "u-2", "n": 42}))
    store.save_session(session("s3", metadata={"user": 42}))
    assert list(store.sessions_with_metadata("user", "u-1")) == ["s1"]
    assert sorted(store.sessions_with_metadata("user", "42")) == ["s3"]
    assert list(store.sessions_with_metadata("n", "42", page_size=1)) == ["s2"]
    assert list(store.sessions_with_metadata("missing", "x")) == []


def test_save_unless_forgotten_refuses_only_tombstoned_sessions(store: Store) -> None:
    # Given a tombstoned session, a stored one and a new one
    store.put_tombstones(["gone"], T0, utcnow() + timedelta(hours=1))
    store.save_session(session("stored"), messages("stored", 1))
    writes = [(session("gone"), messages("gone", 2)), (session("stored"), messages("stored", 2)),
              (session("new"), messages("new", 1))]
    # When the batch is saved unless forgotten
    result, refused = store.save_sessions_unless_forgotten(writes, utcnow())
    # Then the tombstoned one is refused and not written, the others are
    assert refused == {"gone"}
    assert result == WriteResult(2, 2)
    with pytest.raises(NotFound):
        store.load_session("gone")
    assert [store.load_session(s).message_count for s in ("stored", "new")] == [2, 1]


def test_postgresql_refuses_forgotten_saves_without_prepared_statements(tmp_path: Path) -> None:
    from sessionq.models.sql import SqlStore, fast_save

    store = make_store("postgresql", tmp_path)
    reset_store(store)
    assert isinstance(store, SqlStore)
    try:
        # Given a store behind a pooler where prepared statements do not hold
        fast_save._UNPREPARED.add(store.database)
        store.put_tombstones(["gone"], T0, utcnow() + timedelta(hours=1))
        # When a batch with a forgotten session is saved / Then the same refusal holds
        result, refused = store.save_sessions_unless_forgotten(
            [(session("gone"), messages("gone", 1)), (session("new"), messages("new", 1))], utcnow())
        assert (result, refused) == (WriteResult(1, 1), {"gone"})
        assert store.stats().total_sessions == 1
    finally:
        fast_save._UNPREPARED.discard(store.database)
        reset_store(store)
        store.close()
