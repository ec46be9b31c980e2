"""MongoDB-specific behaviour: concurrent appends, crash repair, documents on the wire."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from sessionq.models import ChatMessage, Store
from sessionq.models.mongo import MongoStore
from sessionq.models.mongo.schema import MESSAGES, SCHEMA, SESSIONS, to_us
from tests.conftest import MONGO_URL, T0, messages, session
from tests.support_bulk import mongo_store  # noqa: F401  (fixture)


def _message(session_id: str, mid: str, second: int = 0) -> ChatMessage:
    return ChatMessage(mid, session_id, "user", f"text {mid}", created_at=T0 + timedelta(seconds=second))


def _run_threads(targets: list[threading.Thread]) -> None:
    for t in targets:
        t.start()
    for t in targets:
        t.join(timeout=120)
        assert not t.is_alive()


def test_concurrent_appends_never_share_a_seq(mongo_store: Store) -> None:
    # Given a session and four workers, each appending its own 6 messages one by one
    mongo_store.save_session(session("s1"))
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(w: int) -> None:
        try:
            start.wait()
            for i in range(6):
                mongo_store.append_messages("s1", [_message("s1", f"w{w}-{i}", i)])
        except BaseException as exc:  # reported below: a thread's assert would vanish
            errors.append(exc)

    # When they run at the same time
    _run_threads([threading.Thread(target=worker, args=(w,)) for w in range(4)])
    # Then every message is stored once, seqs are 1..24 without gaps, and the count matches
    assert errors == []
    stored = mongo_store.load_messages("s1")
    assert sorted(m.seq for m in stored) == list(range(1, 25))
    assert len({m.message_id for m in stored}) == 24
    assert mongo_store.load_session("s1").message_count == 24


def test_concurrent_redeliveries_of_the_same_messages_insert_once(mongo_store: Store) -> None:
    # Given three workers delivering the same overlapping batches to one session
    mongo_store.save_session(session("s1"))
    batch = messages("s1", 5)
    errors: list[BaseException] = []
    start = threading.Barrier(3)
    counts: list[int] = []

    def worker() -> None:
        try:
            start.wait()
            counts.append(mongo_store.append_messages("s1", batch))
            counts.append(mongo_store.append_messages("s1", batch[2:] + messages("s1", 2, start=5)))
        except BaseException as exc:
            errors.append(exc)

    _run_threads([threading.Thread(target=worker) for _ in range(3)])
    # Then exactly 7 messages exist, in a gapless seq order, counted once
    assert errors == []
    assert sum(counts) == 7
    stored = mongo_store.load_messages("s1")
    assert [m.seq for m in stored] == list(range(1, 8))
    assert sorted(m.message_id for m in stored) == sorted(f"m{i}" for i in range(7))
    assert mongo_store.load_session("s1").message_count == 7


def test_redelivery_repairs_counters_after_a_crash_between_insert_and_update(mongo_store: Store) -> None:
    # Given a session whose last append crashed after inserting its messages
    # but before moving the session's counters (simulated by writing the documents directly)
    assert isinstance(mongo_store, MongoStore)
    mongo_store.save_session(session("s1"), messages("s1", 2))
    late = messages("s1", 2, start=2, at=T0 + timedelta(hours=1))
    mongo_store.database[MESSAGES].insert_many([mongo_store._message_doc(m, 3 + i) for i, m in enumerate(late)])
    assert mongo_store.load_session("s1").message_count == 2
    # When the append is redelivered
    assert mongo_store.append_messages("s1", late) == 0
    # Then the counters are repaired from the stored messages
    loaded = mongo_store.load_session("s1")
    assert loaded.message_count == 4
    assert loaded.updated_at == T0 + timedelta(hours=1, seconds=3)


def test_append_after_a_stale_counter_rebases_on_the_stored_seqs(mongo_store: Store) -> None:
    # Given a message stored by a crashed writer at seq 3 while the counter still says 2
    assert isinstance(mongo_store, MongoStore)
    mongo_store.save_session(session("s1"), messages("s1", 2))
    mongo_store.database[MESSAGES].insert_one(mongo_store._message_doc(_message("s1", "ghost"), 3))
    # When another message is appended
    assert mongo_store.append_messages("s1", [_message("s1", "next")]) == 1
    # Then it takes seq 4 and the count covers both
    assert [(m.seq, m.message_id) for m in mongo_store.load_messages("s1")][-2:] == [(3, "ghost"), (4, "next")]
    assert mongo_store.load_session("s1").message_count == 4


def test_documents_are_plain_and_messages_are_separate(mongo_store: Store) -> None:
    # Given a saved session with messages
    assert isinstance(mongo_store, MongoStore)
    mongo_store.save_session(session("s1", metadata={"k": [1, 2]}), messages("s1", 3))
    db = mongo_store.database
    # Then the session document holds no message array, and times are exact microseconds
    doc = db[SESSIONS].find_one({"_id": "s1"})
    assert doc is not None
    assert set(doc) == {"_id", "model", "status", "created_at", "updated_at", "metadata", "message_count"}
    assert doc["created_at"] == to_us(T0)
    assert db[MESSAGES].count_documents({"session_id": "s1"}) == 3
    # And the schema collection records each applied version
    assert sorted(d["_id"] for d in db[SCHEMA].find()) == list(range(1, mongo_store.latest_schema_version() + 1))
    index_names = {ix["name"] for ix in db[MESSAGES].list_indexes()}
    assert {"session_message", "session_seq"} <= index_names


def test_stale_save_loses_even_when_racing_an_insert(mongo_store: Store) -> None:
    # Given a newer save stored first
    newer = session("s1", at=T0 + timedelta(minutes=5), created_at=T0, model="new")
    mongo_store.save_session(newer)
    # When an older save of the same session arrives (its conditional upsert hits the key)
    result = mongo_store.save_session(session("s1", at=T0, model="old"), [_message("s1", "m-late")])
    # Then fields stay, the message is kept, and the session counts as written for the message
    loaded = mongo_store.load_session("s1")
    assert (loaded.model, loaded.updated_at, loaded.message_count) == ("new", T0 + timedelta(minutes=5), 1)
    assert (result.sessions_written, result.messages_inserted) == (1, 1)


def test_unreachable_server_is_store_unavailable() -> None:
    # Given a store pointed at a port nobody listens on
    from pymongo import MongoClient

    from sessionq.models.errors import StoreUnavailable

    client: MongoClient[dict[str, object]] = MongoClient(
        "mongodb://127.0.0.1:1/?retryWrites=false", serverSelectionTimeoutMS=200, connect=False
    )
    dead = MongoStore(client=client, database="nothing")
    # Then operations fail as transient, retryable errors
    import pytest

    with pytest.raises(StoreUnavailable):
        dead.ping()
    with pytest.raises(StoreUnavailable):
        dead.load_session("s1")
    client.close()


def test_stale_save_in_the_middle_of_a_batch_does_not_stop_the_rest(mongo_store: Store) -> None:
    # Given s2 stored with a newer state
    mongo_store.save_session(session("s2", at=T0 + timedelta(hours=1), created_at=T0, model="kept"))
    # When a batch carries new s1, a stale s2 and new s3 (the ordered bulk upsert fails at s2)
    result = mongo_store.save_sessions(
        [(session("s1"), messages("s1", 1)), (session("s2", model="stale"), []), (session("s3"), messages("s3", 2))]
    )
    # Then s1 and s3 are written with their messages and s2 keeps its state
    assert (result.sessions_written, result.messages_inserted) == (2, 3)
    assert mongo_store.load_session("s2").model == "kept"
    assert [s.session_id for s in mongo_store.iter_sessions()] == ["s1", "s2", "s3"]
    assert mongo_store.load_session("s3").message_count == 2


def test_a_delete_racing_a_write_leaves_no_orphan_messages(mongo_store: MongoStore) -> None:
    # Given an append and a save whose session is deleted (by another client) after the
    # write checked the session and before its messages land
    deleter = MongoStore(MONGO_URL)
    try:
        for write in ("append", "save"):
            mongo_store.save_session(session("s1"), messages("s1", 1))
            insert = mongo_store._insert_ordered

            def delete_first(docs: list[Any], _insert: Any = insert) -> list[Any]:
                deleter.delete_session("s1")
                return _insert(docs)

            mongo_store._insert_ordered = delete_first  # type: ignore[method-assign]
            try:
                if write == "append":
                    mongo_store.append_messages("s1", [_message("s1", "late")])
                else:
                    mongo_store.save_session(session("s1", at=T0 + timedelta(minutes=1)), [_message("s1", "late")])
            finally:
                del mongo_store._insert_ordered
            # Then the session and every message of it are gone, as if the write came first
            assert mongo_store.stats().total_sessions == 0
            assert mongo_store._messages.count_documents({"session_id": "s1"}) == 0
    finally:
        deleter.close()
