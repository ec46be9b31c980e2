"""The Store contract, run against every backend (see conftest ``store``)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sessionq.models import (
    AgentState,
    ChatMessage,
    Conflict,
    FileRecord,
    NotFound,
    SessionQuery,
    Store,
    TransportSession,
    ValidationError,
)
from sessionq.models.handles import StateHandle
from sessionq.models.idempotency import IdempotencyEntry
from sessionq.models.tasks import McpTask, new_task_id
from tests.conftest import T0, messages, session


def test_schema_is_at_latest_version_and_upgrade_is_idempotent(store: Store) -> None:
    version = store.schema_version()
    assert version >= 1
    assert store.upgrade() == []
    assert store.schema_version() == version


def test_save_and_load_round_trip(store: Store) -> None:
    # Given a session with unicode metadata and three messages
    s = session("s1", metadata={"user": "zoë", "tags": ["a", "b"], "nested": {"n": 1.5, "ok": True, "none": None}})
    # When it is saved
    result = store.save_session(s, messages("s1", 3))
    # Then it loads back exactly, with a maintained message count and ordered seqs
    assert result.messages_inserted == 3
    loaded = store.load_session("s1")
    assert loaded == s.replace(message_count=3, updated_at=T0 + timedelta(seconds=2))
    stored = store.load_messages("s1")
    assert [(m.seq, m.message_id, m.role, m.content) for m in stored] == [
        (1, "m0", "user", "message 0"),
        (2, "m1", "assistant", "message 1"),
        (3, "m2", "user", "message 2"),
    ]
    assert stored[1].created_at == T0 + timedelta(seconds=1)


def test_load_missing_session_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="nope"):
        store.load_session("nope")


def test_redelivered_save_and_append_insert_nothing(store: Store) -> None:
    # Given a session saved with two messages
    store.save_session(session("s1"), messages("s1", 2))
    # When the same save and an append are each delivered twice
    again = store.save_session(session("s1"), messages("s1", 2))
    first = store.append_messages("s1", messages("s1", 2, start=2))
    second = store.append_messages("s1", messages("s1", 2, start=2))
    # Then each message is stored exactly once
    assert again.messages_inserted == 0
    assert (first, second) == (2, 0)
    assert [m.message_id for m in store.load_messages("s1")] == ["m0", "m1", "m2", "m3"]
    assert store.load_session("s1").message_count == 4


def test_stale_save_never_regresses_but_its_messages_are_kept(store: Store) -> None:
    # Given a session saved at T0+60s with model "new"
    store.save_session(session("s1", at=T0 + timedelta(seconds=60), created_at=T0, model="new"), messages("s1", 1))
    # When an older save (T0+10s, model "old") with another message arrives late
    late = [ChatMessage("late", "s1", "user", "late one", created_at=T0 + timedelta(seconds=5))]
    store.save_session(session("s1", at=T0 + timedelta(seconds=10), created_at=T0, model="old"), late)
    # Then the newer state wins and messages are the union
    loaded = store.load_session("s1")
    assert loaded.model == "new"
    assert loaded.updated_at == T0 + timedelta(seconds=60)
    assert {m.message_id for m in store.load_messages("s1")} == {"m0", "late"}
    assert loaded.message_count == 2


def test_newer_save_updates_fields(store: Store) -> None:
    store.save_session(session("s1", model="a", metadata={"v": 1}))
    store.save_session(session("s1", at=T0 + timedelta(minutes=1), created_at=T0, model="b", metadata={"v": 2}))
    loaded = store.load_session("s1")
    assert (loaded.model, loaded.metadata, loaded.created_at) == ("b", {"v": 2}, T0)


def test_append_to_missing_session_is_not_found_and_changes_nothing(store: Store) -> None:
    store.save_session(session("other"), messages("other", 1))
    with pytest.raises(NotFound):
        store.append_messages("ghost", messages("ghost", 1))
    assert store.stats().total_sessions == 1
    assert store.stats().total_messages == 1


def test_append_moves_updated_at_forward_only(store: Store) -> None:
    store.save_session(session("s1", at=T0 + timedelta(hours=1), created_at=T0))
    store.append_messages("s1", messages("s1", 1))  # message older than the session's updated_at
    assert store.load_session("s1").updated_at == T0 + timedelta(hours=1)
    store.append_messages("s1", messages("s1", 1, start=1, at=T0 + timedelta(hours=2)))
    assert store.load_session("s1").updated_at == T0 + timedelta(hours=2, seconds=1)


def test_message_of_another_session_is_rejected(store: Store) -> None:
    store.save_session(session("s1"))
    with pytest.raises(ValidationError, match="belongs to session"):
        store.append_messages("s1", messages("s2", 1))
    assert store.load_messages("s1") == []


def test_batch_save_of_many_sessions_and_repeated_ids(store: Store) -> None:
    writes = [(session(f"s{i}"), messages(f"s{i}", 2)) for i in range(20)]
    writes.append((session("s3", at=T0 + timedelta(minutes=5), created_at=T0, model="later"), messages("s3", 3)))
    result = store.save_sessions(writes)
    assert result.messages_inserted == 41
    assert store.load_session("s3").model == "later"
    assert store.load_session("s3").message_count == 3
    assert store.stats().total_sessions == 20


def test_batch_of_resaves_with_full_histories_inserts_only_the_new_messages(store: Store) -> None:
    # Given five stored sessions with ten messages each
    for i in range(5):
        store.save_session(session(f"r{i}"), messages(f"r{i}", 10))
    # When one batch re-saves each with its whole history plus two new messages (a later
    # save, so its fields win), and the batch is delivered again
    writes = [(session(f"r{i}", at=T0 + timedelta(minutes=i + 1), created_at=T0, model=f"m{i}"),
               messages(f"r{i}", 12)) for i in range(5)]
    assert store.save_sessions(writes).messages_inserted == 10
    assert store.save_sessions(writes).messages_inserted == 0
    # Then every session holds its twelve messages once, in order, and the new fields
    for i in range(5):
        loaded = store.load_session(f"r{i}")
        assert (loaded.model, loaded.message_count) == (f"m{i}", 12)
        assert loaded.updated_at == T0 + timedelta(minutes=i + 1)
        assert [(m.message_id, m.seq) for m in store.load_messages(f"r{i}")] == [(f"m{j}", j + 1) for j in range(12)]


def test_batch_mixing_new_and_stored_sessions_is_idempotent(store: Store) -> None:
    # Given two stored sessions, one last active ten minutes after T0
    store.save_session(session("old"), messages("old", 2))
    store.save_session(session("newer", at=T0 + timedelta(minutes=10), created_at=T0), messages("newer", 1))
    hostile = "'; DROP TABLE sessionq_sessions; -- \\\" %s %% {} 🎉 \n\t"
    meta = {"q": "' OR 1=1 --", "k🎉": [1, None, 2.5, {"n": True}]}
    writes = [
        # a new session, with a repeated message id (the first one wins)
        (session("fresh", metadata=meta), [ChatMessage("h", "fresh", "user", hostile, created_at=T0),
                                           ChatMessage("h", "fresh", "user", "ignored", created_at=T0)]),
        # a newer save of a stored session: its fields win, one message is new
        (session("old", at=T0 + timedelta(minutes=1), created_at=T0, model="m2"), messages("old", 3)),
        # a stale save: its fields lose, its new message is kept
        (session("newer", model="stale"), messages("newer", 2)),
        # a second, later save of the new session in the same batch
        (session("fresh", at=T0 + timedelta(minutes=2), created_at=T0, model="later", metadata=meta),
         messages("fresh", 1)),
    ]
    # When the batch is saved, and then delivered again
    assert store.save_sessions(writes).messages_inserted == 4
    assert store.save_sessions(writes).messages_inserted == 0
    # Then each session holds exactly the merged state, nothing twice
    fresh = store.load_session("fresh")
    assert (fresh.model, fresh.metadata, fresh.message_count) == ("later", meta, 2)
    assert fresh.updated_at == T0 + timedelta(minutes=2)
    assert [(m.message_id, m.seq, m.content) for m in store.load_messages("fresh")] == [
        ("h", 1, hostile), ("m0", 2, "message 0")]
    old = store.load_session("old")
    assert (old.model, old.message_count, old.updated_at) == ("m2", 3, T0 + timedelta(minutes=1))
    newer = store.load_session("newer")
    assert (newer.model, newer.message_count, newer.updated_at) == ("gpt-test", 2, T0 + timedelta(minutes=10))
    assert [m.seq for m in store.load_messages("newer")] == [1, 2]
    assert store.stats().total_messages == 7

def test_list_sessions_filters_and_keyset_pages(store: Store) -> None:
    for i in range(7):
        store.save_session(session(f"s{i}", at=T0 + timedelta(hours=i), created_at=T0))
    store.archive_session("s6", T0)
    page = store.list_sessions(limit=3)
    assert [s.session_id for s in page.items] == ["s0", "s1", "s2"]
    rest = list(store.iter_sessions(page_size=2))
    assert [s.session_id for s in rest] == [f"s{i}" for i in range(7)]
    assert [s.session_id for s in store.iter_sessions(status="archived")] == ["s6"]
    before = store.list_sessions(updated_before=T0 + timedelta(hours=2))
    assert [s.session_id for s in before.items] == ["s0", "s1"]
    after = store.list_sessions(updated_after=T0 + timedelta(hours=4), status="active")
    assert [s.session_id for s in after.items] == ["s5"]
    assert after.next_cursor is None


def _search_all(store: Store, query: SessionQuery, page_size: int, scan: int = 1000) -> list[str]:
    out: list[str] = []
    cursor: str | None = None
    while True:
        page = store.search_sessions(query, limit=page_size, cursor=cursor, scan_limit=scan)
        assert len(page.items) <= page_size
        out.extend(s.session_id for s in page.items)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def test_search_sessions_filters_newest_first_in_keyset_pages(store: Store) -> None:
    # Ten sessions; two pairs share an updated_at, so the id breaks ties across pages.
    times = [0, 1, 1, 2, 3, 3, 4, 5, 6, 7]
    for i, hour in enumerate(times):
        metadata: dict[str, object] = {"team": "ops" if i % 2 else "dev", "n": i}
        if i == 9:
            metadata["team"] = ["ops"]  # an array holding the value is not the value
        store.save_session(session(f"{'ab' if i < 5 else 'ac'}-{i}", at=T0 + timedelta(hours=hour), created_at=T0,
                                   model="m-big" if i >= 7 else "m-small", metadata=metadata))
    store.archive_session("ab-1", T0)  # archived, updated_at stays (T0 is older)
    store.archive_session("ac-8", T0)
    everything = [s.session_id for s in sorted(store.iter_sessions(), key=lambda s: (s.updated_at, s.session_id),
                                                 reverse=True)]
    for size in (1, 2, 3, 10, 50):
        assert _search_all(store, SessionQuery(), size) == everything
    assert _search_all(store, SessionQuery(id_prefix="ab"), 2) == ["ab-4", "ab-3", "ab-2", "ab-1", "ab-0"]
    assert _search_all(store, SessionQuery(id_prefix="a"), 4) == everything
    assert _search_all(store, SessionQuery(id_prefix="AB"), 4) == []  # case-sensitive
    assert _search_all(store, SessionQuery(status="archived"), 1) == ["ac-8", "ab-1"]
    assert _search_all(store, SessionQuery(model="m-big"), 1) == ["ac-9", "ac-8", "ac-7"]
    assert _search_all(store, SessionQuery(metadata=(("team", "ops"),)), 2) == ["ac-7", "ac-5", "ab-3", "ab-1"]
    assert _search_all(store, SessionQuery(metadata=(("team", "ops"), ("n", "3"))), 2) == []  # n is a number
    window = SessionQuery(updated_after=T0 + timedelta(hours=1), updated_before=T0 + timedelta(hours=5))
    assert _search_all(store, window, 2) == ["ac-6", "ac-5", "ab-4", "ab-3"]
    both = SessionQuery(status="active", id_prefix="ac", metadata=(("team", "dev"),), updated_after=T0)
    assert _search_all(store, both, 1) == ["ac-6"]
    # A page examines a bounded number of sessions per status: rare matches come in short
    # (even empty) pages with a cursor, and reading on still finds each match exactly once.
    rare = SessionQuery(metadata=(("team", "ops"),))
    for size, scan in ((1, 1), (3, 2)):
        assert _search_all(store, rare, size, scan) == ["ac-7", "ac-5", "ab-3", "ab-1"]
        assert _search_all(store, SessionQuery(), size, scan) == everything
        assert _search_all(store, window, size, scan) == ["ac-6", "ac-5", "ab-4", "ab-3"]
    # The three newest active sessions hold one m-small: a short page, and more after it.
    short = store.search_sessions(SessionQuery(model="m-small"), limit=2, scan_limit=3)
    assert [s.session_id for s in short.items] == ["ac-6"] and short.next_cursor is not None
    rest = store.search_sessions(SessionQuery(model="m-small"), limit=10, cursor=short.next_cursor)
    assert [s.session_id for s in rest.items] == ["ac-5", "ab-4", "ab-3", "ab-2", "ab-1", "ab-0"]


def test_search_sessions_rejects_bad_queries(store: Store) -> None:
    with pytest.raises(ValidationError):
        SessionQuery(status="gone")
    with pytest.raises(ValidationError):
        SessionQuery(metadata=(("a.b", "x"),))
    with pytest.raises(ValidationError):
        store.search_sessions(SessionQuery(), cursor="not-a-cursor")


def test_load_messages_pages_by_seq(store: Store) -> None:
    store.save_session(session("s1"), messages("s1", 10))
    assert [m.seq for m in store.load_messages("s1", after_seq=4, limit=3)] == [5, 6, 7]
    assert [m.seq for m in store.iter_messages("s1", page_size=4)] == list(range(1, 11))


def test_messages_of_many_sessions_stream_grouped_in_seq_order(store: Store) -> None:
    # Given three sessions with 5, 0 and 7 messages (ids chosen to sort differently from saves)
    store.save_sessions([(session("b"), messages("b", 5)), (session("a"), []), (session("Z"), messages("Z", 7))])
    # When their messages are streamed in pages smaller than a session, ids repeated and unknown
    got = list(store.iter_messages_of(["b", "a", "Z", "b", "missing"], page_size=3))
    # Then each message comes once, each session's together and in seq order
    assert sorted((m.session_id, m.seq) for m in got) == [
        *(("Z", i) for i in range(1, 8)), *(("b", i) for i in range(1, 6))
    ]
    groups = [m.session_id for i, m in enumerate(got) if i == 0 or got[i - 1].session_id != m.session_id]
    assert sorted(groups) == ["Z", "b"]
    for sid in ("Z", "b"):
        assert [m.seq for m in got if m.session_id == sid] == list(range(1, 6 if sid == "b" else 8))
    assert [m.content for m in got if m.session_id == "b"] == [m.content for m in store.load_messages("b")]
    assert list(store.iter_messages_of([])) == []


def test_delete_session_cascades_to_messages(store: Store) -> None:
    store.save_session(session("s1"), messages("s1", 3))
    store.save_session(session("s2"), messages("s2", 1))
    assert store.delete_session("s1") is True
    assert store.delete_session("s1") is False
    assert store.load_messages("s1") == []
    assert store.stats().total_messages == 1


def test_archive_is_idempotent_and_never_moves_time_back(store: Store) -> None:
    store.save_session(session("s1", at=T0 + timedelta(hours=1), created_at=T0))
    archived = store.archive_session("s1", T0)
    assert (archived.status, archived.updated_at) == ("archived", T0 + timedelta(hours=1))
    assert store.archive_session("s1", T0 + timedelta(hours=2)).updated_at == T0 + timedelta(hours=2)
    with pytest.raises(NotFound):
        store.archive_session("ghost", T0)


def test_file_records_and_expiry(store: Store) -> None:
    keep = FileRecord("f-keep", "gemini", "files/keep", size=10, uploaded_at=T0, expires_at=T0 + timedelta(days=2))
    gone = FileRecord("f-gone", "gemini", "files/gone", size=5, uploaded_at=T0, expires_at=T0 + timedelta(hours=1))
    forever = FileRecord("f-forever", "local", "file:///x", uploaded_at=T0)
    for record in (keep, gone, forever):
        store.save_file(record)
    store.save_file(keep.replace(display_name="renamed"))
    assert store.load_file("f-keep").display_name == "renamed"
    assert store.delete_expired_files(T0 + timedelta(hours=1), batch_size=1) == 1
    assert store.stats().total_files == 2
    with pytest.raises(NotFound):
        store.load_file("f-gone")
    assert store.delete_file("f-forever") is True
    assert store.delete_file("f-forever") is False


def test_transport_lifecycle_heartbeat_disconnect_recover(store: Store) -> None:
    ts = TransportSession("mcp-1", created_at=T0, working_directory="/srv", transport_state={"k": 1})
    store.register_transport(ts)
    # Re-registering updates saved state only
    again = store.register_transport(ts.replace(agent_context={"a": 2}, status="expired", recovery_attempts=9))
    assert (again.status, again.recovery_attempts, again.agent_context) == ("active", 0, {"a": 2})
    assert store.heartbeat("mcp-1", T0 + timedelta(seconds=30)) is True
    assert store.heartbeat("mcp-1", T0 + timedelta(seconds=10)) is True  # stale beat: no regression
    assert store.load_transport("mcp-1").last_heartbeat == T0 + timedelta(seconds=30)
    # A disconnect older than the last heartbeat is stale
    assert store.mark_disconnected("mcp-1", T0 + timedelta(seconds=20)) is False
    assert store.mark_disconnected("mcp-1", T0 + timedelta(minutes=1)) is True
    assert store.mark_disconnected("mcp-1", T0 + timedelta(minutes=2)) is True  # idempotent
    loaded = store.load_transport("mcp-1")
    assert loaded.status == "disconnected"
    assert loaded.grace_expires_at == T0 + timedelta(minutes=11)
    assert store.can_recover("mcp-1", T0 + timedelta(minutes=5)) is True
    assert store.can_recover("mcp-1", T0 + timedelta(minutes=11)) is False
    recovered = store.recover("mcp-1", T0 + timedelta(minutes=5))
    assert (recovered.status, recovered.recovery_attempts, recovered.transport_state) == ("recovered", 1, {"k": 1})
    assert recovered.working_directory == "/srv"
    assert store.load_transport("mcp-1") == recovered
    assert store.can_recover("unknown", T0) is False
    with pytest.raises(NotFound):
        store.recover("unknown", T0)


def test_recovery_attempts_are_capped(store: Store) -> None:
    store.register_transport(TransportSession("mcp-2", created_at=T0))
    for attempt in range(3):
        assert store.recover("mcp-2", T0 + timedelta(seconds=attempt)).recovery_attempts == attempt + 1
    assert store.can_recover("mcp-2", T0 + timedelta(seconds=5)) is False
    with pytest.raises(Conflict, match="3 of 3"):
        store.recover("mcp-2", T0 + timedelta(seconds=5))


def test_heartbeat_revives_disconnected_but_not_expired(store: Store) -> None:
    store.register_transport(TransportSession("mcp-3", created_at=T0))
    store.mark_disconnected("mcp-3", T0 + timedelta(minutes=1))
    assert store.heartbeat("mcp-3", T0 + timedelta(minutes=2)) is True
    assert store.load_transport("mcp-3").status == "active"
    store.mark_disconnected("mcp-3", T0 + timedelta(minutes=3))
    assert store.expire_transports(T0 + timedelta(minutes=13)) == 1
    assert store.heartbeat("mcp-3", T0 + timedelta(minutes=14)) is False
    assert store.load_transport("mcp-3").status == "expired"
    assert store.heartbeat("ghost", T0) is False


def test_transport_sweeps_respect_boundaries(store: Store) -> None:
    for i, beat in enumerate([0, 60, 119, 120, 121]):
        store.register_transport(TransportSession(f"t{i}", created_at=T0 + timedelta(seconds=beat)))
    # Live sessions silent since before T0+120s are marked disconnected at T0+5min
    now = T0 + timedelta(minutes=5)
    assert store.disconnect_stale_transports(T0 + timedelta(seconds=120), now, batch_size=2) == 3
    statuses = {t: store.load_transport(t).status for t in ("t0", "t1", "t2", "t3", "t4")}
    assert statuses == {
        "t0": "disconnected", "t1": "disconnected", "t2": "disconnected", "t3": "active", "t4": "active"
    }
    # Their grace ends at now + 10 min, inclusive
    assert store.expire_transports(now + timedelta(minutes=10) - timedelta(microseconds=1)) == 0
    assert store.expire_transports(now + timedelta(minutes=10)) == 3
    assert store.stats().transports_by_status == {"expired": 3, "active": 2}


def test_agent_state_put_get_expiry(store: Store) -> None:
    state = AgentState("agent", "plan", {"steps": [1, 2]}, mcp_session_id="mcp-1", updated_at=T0)
    assert store.put_agent_state(state) is True
    assert store.get_agent_state("agent", "plan", T0) == state
    # An older write loses; a newer one wins
    assert store.put_agent_state(state.replace(value="old", updated_at=T0 - timedelta(seconds=1))) is False
    newer = state.replace(value=42, updated_at=T0 + timedelta(seconds=1), expires_at=T0 + timedelta(hours=1))
    assert store.put_agent_state(newer) is True
    assert store.get_agent_state("agent", "plan", T0) == newer
    assert store.get_agent_state("agent", "plan", T0 + timedelta(hours=1)) is None
    store.put_agent_state(AgentState("agent", "keep", "x", updated_at=T0))
    assert store.delete_expired_agent_state(T0 + timedelta(hours=1)) == 1
    assert store.get_agent_state("agent", "keep", T0) is not None
    assert store.stats().agent_states == 1


def test_event_log_append_replay_and_trim(store: Store) -> None:
    prime = store.append_event("mcp-1", "stream-a", None, T0)
    first = store.append_event("mcp-1", "stream-a", {"jsonrpc": "2.0", "method": "n", "params": {"$schema": "x"}}, T0)
    store.append_event("mcp-1", "stream-b", {"jsonrpc": "2.0", "id": 9}, T0)
    second = store.append_event("mcp-1", "stream-a", {"jsonrpc": "2.0", "id": 1}, T0 + timedelta(seconds=1))
    store.append_event("mcp-2", "stream-a", {"other": True}, T0)
    assert int(prime.event_id) < int(first.event_id) < int(second.event_id)
    replay = store.events_after("mcp-1", prime.event_id)
    assert replay is not None
    stream, events = replay
    assert stream == "stream-a"
    assert [e.message for e in events] == [first.message, second.message]
    assert store.events_after("mcp-2", prime.event_id) is None  # scoped per MCP session
    assert store.events_after("mcp-1", "not-an-id") is None
    # Trim: keep the newest 2 events per session, and nothing before T0+1s
    assert store.trim_events(max_per_session=2, created_before=T0 - timedelta(days=1)) == 2
    assert store.stats().stream_events == 3
    assert store.trim_events(max_per_session=10, created_before=T0 + timedelta(seconds=1)) == 2


def test_expire_and_purge_sweeps_change_exactly_the_right_rows(store: Store) -> None:
    cutoff = T0 + timedelta(hours=10)
    store.save_session(session("idle", at=cutoff - timedelta(microseconds=1), created_at=T0), messages("idle", 2))
    store.save_session(session("boundary", at=cutoff, created_at=T0))
    store.save_session(session("fresh", at=cutoff + timedelta(hours=1), created_at=T0))
    store.save_session(session("archived-old", at=T0))
    store.archive_session("archived-old", T0)
    assert store.expire_idle_sessions(cutoff, batch_size=1) == 1
    statuses = {s.session_id: s.status for s in store.iter_sessions()}
    assert statuses == {"idle": "expired", "boundary": "active", "fresh": "active", "archived-old": "archived"}
    assert store.purge_expired_sessions(cutoff - timedelta(hours=1)) == 0
    assert store.purge_expired_sessions(cutoff) == 1
    assert store.load_messages("idle") == []
    assert store.stats().to_json()["total_sessions"] == 3


def test_sweeps_on_empty_store_return_zero(store: Store) -> None:
    assert store.expire_idle_sessions(T0) == 0
    assert store.purge_expired_sessions(T0) == 0
    assert store.expire_transports(T0) == 0
    assert store.delete_expired_files(T0) == 0
    assert store.delete_expired_agent_state(T0) == 0
    assert store.trim_events(max_per_session=1, created_before=T0) == 0


def test_hostile_values_are_stored_exactly(store: Store) -> None:
    # Given content with SQL metacharacters, unicode and 1 MB of text
    tricky = [
        "'; DROP TABLE sessionq_sessions; --",
        "\\\" \\' %s %% {}",
        "emoji 🎉 and rtl עברית and combining é",
        "x" * (1024 * 1024),
    ]
    store.save_session(session("s1", metadata={"q": "' OR 1=1 --", "k🎉": "v"}))
    store.append_messages(
        "s1", [ChatMessage(f"m{i}", "s1", "user", text, created_at=T0) for i, text in enumerate(tricky)]
    )
    # Then every byte comes back, and nothing else changed
    assert [m.content for m in store.load_messages("s1")] == tricky
    assert store.load_session("s1").metadata == {"q": "' OR 1=1 --", "k🎉": "v"}
    assert store.stats().total_sessions == 1


def test_stats_counts(store: Store) -> None:
    store.save_session(session("a"), messages("a", 2))
    store.save_session(session("b"), messages("b", 3))
    store.archive_session("b", T0)
    store.save_file(FileRecord("f", "p", "u", uploaded_at=T0))
    stats = store.stats().to_json()
    assert stats["total_sessions"] == 2
    assert stats["active_sessions"] == 1
    assert stats["archived_sessions"] == 1
    assert stats["expired_sessions"] == 0
    assert stats["total_messages"] == 5
    assert stats["total_files"] == 1


def test_dry_run_sweeps_count_without_changing(store: Store) -> None:
    # Given one idle session, one expired file, one expired agent key and 3 events over a cap of 1
    store.save_session(session("idle"), messages("idle", 1))
    store.save_file(FileRecord("f", "p", "u", uploaded_at=T0, expires_at=T0))
    store.put_agent_state(AgentState("a", "k", 1, updated_at=T0, expires_at=T0))
    store.register_transport(TransportSession("t", created_at=T0))
    for i in range(3):
        store.append_event("mcp", "s", {"i": i}, T0 + timedelta(seconds=i))
    before = store.stats()
    later = T0 + timedelta(days=1)
    # When every sweep runs as a dry run, Then each counts what it would change...
    assert store.expire_idle_sessions(later, dry_run=True) == 1
    assert store.disconnect_stale_transports(later, later, dry_run=True) == 1
    assert store.delete_expired_files(later, dry_run=True) == 1
    assert store.delete_expired_agent_state(later, dry_run=True) == 1
    assert store.trim_events(max_per_session=1, created_before=T0, dry_run=True) == 2
    assert store.trim_events(max_per_session=5, created_before=T0 + timedelta(seconds=2), dry_run=True) == 2
    # ... and nothing changed
    assert store.stats() == before
    assert store.load_session("idle").status == "active"


def test_clear_deletes_every_record_and_keeps_the_schema(store: Store) -> None:
    # Given a store holding a record of every kind
    store.save_session(session("s1"), messages("s1", 3))
    store.save_file(FileRecord("f", "p", "u", uploaded_at=T0))
    store.register_transport(TransportSession("t", created_at=T0))
    store.put_agent_state(AgentState("a", "k", 1, updated_at=T0))
    store.append_event("mcp", "s", {"i": 1}, T0)
    store.create_task(McpTask(task_id=new_task_id(), tool="t", owner=None, arguments={}, created_at=T0,
                              expires_at=T0 + timedelta(hours=1)))
    store.create_handle(StateHandle(handle_id="bsk_1", kind="basket", created_at=T0))
    store.claim_idempotency(IdempotencyEntry("e", "k", "t", "d", T0 + timedelta(hours=1), created_at=T0), T0)
    assert (store.stats().handles, store.stats().idempotency_entries) == (1, 1)
    version = store.schema_version()
    # When it is cleared
    store.clear()
    # Then nothing is left, the schema stays at its version, and the store is usable at once
    assert store.stats().to_json() == {
        "total_sessions": 0, "active_sessions": 0, "archived_sessions": 0, "expired_sessions": 0,
        "total_messages": 0, "total_files": 0, "transport_sessions": {}, "agent_states": 0, "stream_events": 0,
        "tasks": 0, "handles": 0, "idempotency_entries": 0,
    }
    assert store.schema_version() == version and store.upgrade() == []
    assert store.save_session(session("s1"), messages("s1", 2)).messages_inserted == 2
    assert [m.seq for m in store.load_messages("s1")] == [1, 2]
