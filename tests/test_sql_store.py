"""SQL-backend specifics: O(1) appends, schema versions, concurrency, pooling, outages."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import peewee as pw
import pytest

from sessionq.models import ChatMessage, Conflict, StoreUnavailable, open_store
from sessionq.models.sql import SqlStore
from sessionq.models.sql.schema import LATEST_VERSION, MIGRATIONS
from tests.conftest import MYSQL_URL, POSTGRES_URL, T0, make_store, messages, reset_store, service_missing, session


class StatementLog(logging.Handler):
    """Collects the SQL statements Peewee runs (it logs each one at DEBUG)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.statements: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != "peewee":  # the pool ("peewee.pool") logs checkouts, not statements
            return
        sql = record.msg[0] if isinstance(record.msg, tuple) else str(record.msg)
        self.statements.append(sql)


def count_statements(store: SqlStore, action: object) -> list[str]:
    handler = StatementLog()
    logger = logging.getLogger("peewee")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        action()  # type: ignore[operator]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return handler.statements


def test_append_one_message_costs_the_same_statements_at_10000_messages(sql_store: SqlStore) -> None:
    # Given an empty session and a session of 10,000 messages
    sql_store.save_session(session("empty"))
    sql_store.save_session(session("big"), messages("big", 10_000))
    assert sql_store.load_session("big").message_count == 10_000
    # When one message is appended to each
    small = count_statements(sql_store, lambda: sql_store.append_messages("empty", messages("empty", 1)))
    large = count_statements(
        sql_store, lambda: sql_store.append_messages("big", messages("big", 1, start=10_000))
    )
    # Then both cost the same handful of statements, each keyed by the session
    assert len(large) == len(small) <= 6
    assert [s.split()[0] for s in large] == [s.split()[0] for s in small]
    assert all("COUNT(" not in s.upper() for s in large)
    inserts = [s for s in large if s.upper().startswith("INSERT")]
    assert len(inserts) == 1
    assert sql_store.load_session("big").message_count == 10_001
    assert [m.seq for m in sql_store.load_messages("big", after_seq=9_999)] == [10_000, 10_001]


def test_a_batch_of_new_sessions_is_a_constant_number_of_statements(sql_store: SqlStore) -> None:
    writes = [(session(f"s{i}"), messages(f"s{i}", 2)) for i in range(100)]
    statements = count_statements(sql_store, lambda: sql_store.save_sessions(writes))
    if sql_store.backend == "postgresql":
        # one prepared statement (prepared once per connection) inserts the new sessions
        # and their messages; the same round trip carries the BEGIN
        assert [s.split()[:2] for s in statements if not s.upper().startswith(("COMMIT", "PREPARE"))] == [
            ["BEGIN;", "EXECUTE"]]
    else:
        # lock/select sessions, insert sessions, insert messages (+ BEGIN/COMMIT bookkeeping)
        assert len([s for s in statements if s.upper().startswith(("SELECT", "INSERT", "UPDATE"))]) == 3
    assert sql_store.stats().total_messages == 200


def test_postgresql_saves_carry_on_when_prepared_statements_do_not_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a PostgreSQL store that has prepared its save statement on its connection
    from sessionq.models.sql import fast_save

    store = make_store("postgresql", tmp_path)
    reset_store(store)
    assert isinstance(store, SqlStore)
    try:
        store.save_sessions([(session("p0"), messages("p0", 2))])
        # When the server connection forgets it, as behind a transaction-mode pooler
        # (pgbouncer) where the next statement may reach another server connection
        store.database.execute_sql("DEALLOCATE ALL")
        with caplog.at_level(logging.WARNING, logger="sessionq.models.sql.fast_save"):
            store.save_sessions([(session("p1"), messages("p1", 2))])
        # Then the save still lands, once, and the store stops preparing (it says so once)
        assert store.database in fast_save._UNPREPARED
        assert sum("prepared statements do not hold" in r.getMessage() for r in caplog.records) == 1
        statements = count_statements(store, lambda: store.save_sessions([(session("p2"), messages("p2", 3))]))
        assert not any(s.upper().startswith(("PREPARE", "EXECUTE", "BEGIN; EXECUTE")) for s in statements)
        assert [store.load_session(f"p{i}").message_count for i in range(3)] == [2, 2, 3]
        assert store.stats().total_messages == 7
    finally:
        reset_store(store)
        store.close()


@pytest.mark.parametrize("backend", ["postgresql", "mysql", "sqlite"])
def test_a_save_inside_the_callers_transaction_commits_and_rolls_back_with_it(backend: str, tmp_path: Path) -> None:
    store = make_store(backend, tmp_path)
    reset_store(store)
    assert isinstance(store, SqlStore)
    try:
        # Given a caller that saves inside a transaction of its own
        with store.database.atomic():
            store.save_sessions([(session("kept"), messages("kept", 2))])
        with pytest.raises(RuntimeError), store.database.atomic():
            store.save_sessions([(session("undone"), messages("undone", 2))])
            raise RuntimeError("the caller gives up")
        # Then the save is part of it: committed with the first, undone with the second
        assert store.load_session("kept").message_count == 2
        assert [s.session_id for s in store.list_sessions().items] == ["kept"]
    finally:
        reset_store(store)
        store.close()


def _raise_deadlock(store: SqlStore) -> None:
    """Make the server itself report a deadlock (SQLSTATE 40P01 / MySQL error 1213)."""
    if store.backend == "postgresql":
        store.database.execute_sql("DO $$ BEGIN RAISE EXCEPTION 'deadlock' USING ERRCODE = '40P01'; END $$")
    else:
        store.database.execute_sql("SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = 1213, MESSAGE_TEXT = 'deadlock'")


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_a_deadlocked_save_is_retried_and_lands_once(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a store whose first write transaction is chosen as a deadlock victim by the server
    store = make_store(backend, tmp_path)
    reset_store(store)
    assert isinstance(store, SqlStore)
    name = "_write_postgresql" if backend == "postgresql" else "_write_once"
    real = getattr(store, name)
    calls: list[int] = []

    def deadlock_once(*args: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            _raise_deadlock(store)
        return real(*args)

    monkeypatch.setattr(store, name, deadlock_once)
    try:
        # When a session is saved
        store.save_sessions([(session("d1"), messages("d1", 3))])
        # Then the transaction is run again and the save lands once
        assert len(calls) == 2
        assert store.load_session("d1").message_count == 3
        assert store.stats().total_messages == 3
    finally:
        monkeypatch.undo()
        reset_store(store)
        store.close()


def test_concurrent_appends_to_one_session_never_share_a_seq(sql_store: SqlStore) -> None:
    # Given one session and 6 threads each appending 30 messages, half of them duplicates
    sql_store.save_session(session("hot"))
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(30):
                shared = i % 2 == 0
                mid = f"shared-{i}" if shared else f"t{n}-{i}"
                sql_store.append_messages("hot", [ChatMessage(mid, "hot", "user", mid, created_at=T0)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then every distinct message is stored once with a unique, gap-free seq
    assert errors == []
    stored = sql_store.load_messages("hot")
    assert len(stored) == 15 + 6 * 15
    assert [m.seq for m in stored] == list(range(1, len(stored) + 1))
    assert len({m.message_id for m in stored}) == len(stored)
    assert sql_store.load_session("hot").message_count == len(stored)


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a brand-new, empty database on each SQL backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    base = POSTGRES_URL if request.param == "postgresql" else MYSQL_URL
    name = f"sessionq_fresh_{uuid.uuid4().hex[:8]}"
    admin = SqlStore(base, max_pool_size=2)
    try:
        admin.database.execute_sql(f"CREATE DATABASE {name}")
    except pw.OperationalError as exc:
        service_missing(request.param, exc)
    parts = urlsplit(base)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))
    finally:
        admin.database.execute_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


def test_old_and_fresh_databases_both_upgrade_to_latest(fresh_url: str) -> None:
    store = open_store(fresh_url, max_pool_size=2)
    try:
        # Given a database at schema version 1 holding data
        assert store.schema_version() == 0
        assert store.upgrade(target=1) == [1]
        store.save_session(session("old"), messages("old", 2))
        # When it is upgraded
        assert store.upgrade() == [step.version for step in MIGRATIONS if step.version >= 2]
        # Then it is at the latest version, data intact, and upgrade is idempotent
        assert store.schema_version() == LATEST_VERSION
        assert store.upgrade() == []
        assert store.load_session("old").message_count == 2
        event = store.append_event("mcp", "st", {"ok": True}, T0)
        assert store.events_after("mcp", event.event_id) == ("st", [])
    finally:
        store.close()


def test_pool_size_comes_from_configuration() -> None:
    store = SqlStore(POSTGRES_URL, max_pool_size=3)
    assert store.database._max_connections == 3  # type: ignore[attr-defined]
    store.close()


@pytest.mark.parametrize("url", ["postgresql://app:pa55word@127.0.0.1:1/x", "mysql://app:pa55word@127.0.0.1:1/x"])
def test_unreachable_database_is_store_unavailable_without_the_password(url: str) -> None:
    store = open_store(url)
    with pytest.raises(StoreUnavailable) as info:
        store.ping()
    assert "pa55word" not in str(info.value)
    store.close()


def test_late_save_after_many_messages_keeps_updated_at(sql_store: SqlStore) -> None:
    sql_store.save_session(session("s", at=T0 + timedelta(hours=1), created_at=T0), messages("s", 3))
    sql_store.save_session(session("s", at=T0, model="stale"))
    loaded = sql_store.load_session("s")
    assert (loaded.model, loaded.updated_at, loaded.message_count) == ("gpt-test", T0 + timedelta(hours=1), 3)


def test_ids_differing_only_in_case_are_distinct(sql_store: SqlStore) -> None:
    sql_store.save_session(session("Case"), messages("Case", 1))
    sql_store.save_session(session("case", model="other"), messages("case", 2))
    assert sql_store.load_session("Case").message_count == 1
    assert sql_store.load_session("case").model == "other"


def test_mysql_upgrade_makes_old_case_insensitive_ids_distinct() -> None:
    # Given a MySQL database created before version 4, with case-folding id columns
    admin = SqlStore(MYSQL_URL, max_pool_size=2)
    name = f"sessionq_v3_{uuid.uuid4().hex[:8]}"
    admin.database.execute_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    parts = urlsplit(MYSQL_URL)
    store = SqlStore(urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, "")), max_pool_size=2)
    try:
        store.upgrade(target=3)
        db = store.database
        db.execute_sql("ALTER TABLE sessionq_messages DROP FOREIGN KEY sessionq_messages_ibfk_1")
        for table in ("sessionq_sessions", "sessionq_messages"):
            db.execute_sql(f"ALTER TABLE {table} MODIFY session_id VARCHAR(255) COLLATE utf8mb4_unicode_ci NOT NULL")
        db.execute_sql(
            "ALTER TABLE sessionq_messages ADD CONSTRAINT sessionq_messages_ibfk_1 FOREIGN KEY (session_id) "
            "REFERENCES sessionq_sessions (session_id) ON DELETE CASCADE"
        )
        store.save_session(session("OLD"))
        with pytest.raises(Conflict):  # the old collation folds case: "old" collides with "OLD"
            store.save_session(session("old"))
        store.delete_session("OLD")
        store.save_session(session("Old"), messages("Old", 1))
        # When it is upgraded
        assert 4 in store.upgrade()
        # Then ids differing in case are distinct rows, and the old data is intact
        store.save_session(session("old"), messages("old", 2))
        assert (store.load_session("Old").message_count, store.load_session("old").message_count) == (1, 2)
    finally:
        store.close()
        admin.database.execute_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@pytest.mark.parametrize("url", [POSTGRES_URL, MYSQL_URL], ids=["postgresql", "mysql"])
def test_short_lived_threads_do_not_leak_pooled_connections(url: str) -> None:
    # Given a pool of 2 connections
    store = SqlStore(url, max_pool_size=2)
    store.upgrade()
    errors: list[BaseException] = []

    def one_call() -> None:
        try:
            store.stats()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    # When 20 threads, one after another, each make one call and end
    for _ in range(20):
        t = threading.Thread(target=one_call)
        t.start()
        t.join()
    # Then every connection went back to the pool (none is held by a dead thread)
    assert errors == []
    assert store.database._in_use == {}  # type: ignore[attr-defined]
    store.close()
