"""The MCP event stores against real Redis and real stores, and the transport registry."""

from __future__ import annotations

import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from mcp.server.streamable_http import EventMessage
from mcp.types import (
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCResponse,
    jsonrpc_message_adapter,
)

from sessionq.models import Store, open_store
from sessionq.workers.errors import InvalidPayload
from sessionq.workers.mcp import (
    RedisEventStore,
    SessionRegistry,
    StoreEventStore,
    apply_transport_job,
)
from sessionq.workers.mcp import store_events as store_events_module
from sessionq.workers.mcp.event_log import GET_STREAM, parse_event_id
from tests.conftest import REDIS_URL, SQL_BACKENDS, T0, make_store, reset_store
from tests.support_mcp import (  # noqa: F401  (fixtures)
    anyio_backend,
    dead_redis_url,
    entries,
    free_port,
    redis_db,
)

pytestmark = pytest.mark.anyio


def note(i: int) -> Any:
    """A server notification carrying ``i``."""
    return jsonrpc_message_adapter.validate_python(
        {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": f"n{i}"}}
    )


def response(request_id: int) -> Any:
    """A response to request ``request_id``."""
    return jsonrpc_message_adapter.validate_python({"jsonrpc": "2.0", "id": request_id, "result": {}})


class Collector:
    """A ``send_callback`` that records what a replay sent."""

    def __init__(self) -> None:
        self.events: list[EventMessage] = []

    async def __call__(self, event: EventMessage) -> None:
        self.events.append(event)

    @property
    def data(self) -> list[Any]:
        """The ``data`` of each replayed notification (``"response"`` for responses, ``"error"`` for errors)."""
        out: list[Any] = []
        for e in self.events:
            if isinstance(e.message, JSONRPCNotification):
                out.append(e.message.params["data"] if e.message.params else None)
            elif isinstance(e.message, JSONRPCResponse):
                out.append("response")
            elif isinstance(e.message, JSONRPCError):
                out.append("error")
        return out


@pytest.fixture
async def redis_store(redis_db: redis.Redis) -> Any:
    """A root Redis event store on the test database."""
    store = RedisEventStore(url=REDIS_URL, ttl=600, max_events=1000)
    yield store
    await store.aclose()


@pytest.fixture(params=["redis", *SQL_BACKENDS])
async def any_store(request: pytest.FixtureRequest, redis_db: redis.Redis, tmp_path: Path) -> Any:
    """Each event store kind: Redis, and the Store one on every SQL backend."""
    if request.param == "redis":
        root = RedisEventStore(url=REDIS_URL)
        yield root
        await root.aclose()
        return
    store = make_store(request.param, tmp_path)
    reset_store(store)
    yield StoreEventStore(store)
    reset_store(store)
    store.close()


async def test_replay_sends_the_events_after_the_id_on_that_stream_only(any_store: Any) -> None:
    # Given a session whose request 1 stream was primed, then got 3 notifications and a
    # response, interleaved with events of request 2 and the GET stream
    view = any_store.for_session("sess-a")
    priming = await view.store_event("1", None)
    first = await view.store_event("1", note(1))
    await view.store_event("2", None)
    await view.store_event("2", note(99))
    await view.store_event("1", note(2))
    await view.store_event(GET_STREAM, note(98))
    await view.store_event("1", None)  # a resumed stream is primed again
    await view.store_event("1", note(3))
    last = await view.store_event("1", response(1))

    # When the client resumes after the priming event, and later after the first notification
    from_priming, from_first, from_last = Collector(), Collector(), Collector()
    stream = await view.replay_events_after(priming, from_priming)
    await view.replay_events_after(first, from_first)
    await view.replay_events_after(last, from_last)

    # Then it gets every later event of its stream once, in order, and no priming event
    assert stream == "1"
    assert from_priming.data == ["n1", "n2", "n3", "response"]
    assert from_first.data == ["n2", "n3", "response"]
    assert from_last.data == []
    assert all(e.message is not None and e.event_id for e in from_priming.events)
    assert from_priming.events[-1].event_id == last
    assert [parse_event_id(e.event_id or "") is not None for e in from_priming.events] == [True] * 4


async def test_events_stored_while_a_replay_sends_are_replayed_too(any_store: Any) -> None:
    # Given a request stream with two notifications, and a tool still emitting: each
    # time the replay hands an event to the client, the server stores the next one
    view = any_store.for_session("sess-live")
    priming = await view.store_event("1", None)
    await view.store_event("1", note(1))
    await view.store_event("1", note(2))
    emitted = iter([note(3), note(4), response(1)])

    class Emitting(Collector):
        async def __call__(self, event: EventMessage) -> None:
            await super().__call__(event)
            following = next(emitted, None)
            if following is not None:
                await view.store_event("1", following)

    # When the client resumes from the priming event
    got = Emitting()
    await view.replay_events_after(priming, got)

    # Then the replay also sent what was stored while it ran (the SDK hands the stream
    # over to live delivery only when the replay returns), each event once
    assert got.data == ["n1", "n2", "n3", "n4", "response"]


async def test_the_priming_event_of_a_resumed_stream_is_the_replays_last_event(any_store: Any) -> None:
    # Given an answered request
    view = any_store.for_session("sess-resumed")
    priming = await view.store_event("1", None)
    await view.store_event("1", note(1))
    last = await view.store_event("1", response(1))

    # When a client resumes it and the SDK primes the resumed stream right after the replay
    got = Collector()
    assert await view.replay_events_after(priming, got) == "1"
    cursor = await view.store_event("1", None)

    # Then the priming id is the replay's last event, nothing is stored for it, and a
    # resume from it replays nothing
    assert cursor == last
    again = Collector()
    await view.replay_events_after(cursor, again)
    assert again.data == []
    # And a priming event that follows no replay is stored as before
    fresh = await view.store_event("2", None)
    assert fresh not in (cursor, last) and parse_event_id(fresh) is not None


async def test_sessions_do_not_see_each_others_events(any_store: Any) -> None:
    # Given two sessions that both use stream "1" (stream ids are per transport)
    a, b = any_store.for_session("sess-a"), any_store.for_session("sess-b")
    a_priming = await a.store_event("1", None)
    b_priming = await b.store_event("1", None)
    await a.store_event("1", note(1))
    await b.store_event("1", note(2))

    # When each replays from its own priming event, and B tries A's event id
    got_a, got_b, stolen = Collector(), Collector(), Collector()
    await a.replay_events_after(a_priming, got_a)
    await b.replay_events_after(b_priming, got_b)
    await b.replay_events_after(a_priming, stolen)

    # Then each sees only its own events; A's id replays nothing of A's to B
    assert got_a.data == ["n1"]
    assert got_b.data == ["n2"]
    assert "n1" not in stolen.data


async def test_unknown_or_foreign_ids_replay_nothing(any_store: Any) -> None:
    # Given a session with events
    view = any_store.for_session("sess-a")
    await view.store_event("1", note(1))
    got = Collector()

    # When ids that this store did not make are replayed
    results = [await view.replay_events_after(bad, got) for bad in ("", "garbage", "1-0", "12.!!", "x-1.MQ")]

    # Then nothing is sent and no stream is claimed
    assert results == [None] * 5
    assert got.events == []


async def test_a_request_whose_events_are_gone_gets_a_terminal_error(any_store: Any) -> None:
    # Given a well-formed id of request 7 whose events this session no longer has
    view = any_store.for_session("sess-a")
    await view.store_event("1", note(1))
    gone = "1-0.Nw" if isinstance(any_store, RedisEventStore) else "999999-0.Nw"
    got = Collector()

    # When the client resumes from it
    stream = await view.replay_events_after(gone, got)

    # Then its request ends with an error instead of an empty stream it would retry forever
    assert stream == "7"
    assert got.data == ["error"]
    assert isinstance(got.events[0].message, JSONRPCError) and got.events[0].message.id == 7


async def test_the_root_store_refuses_unscoped_events(redis_store: RedisEventStore) -> None:
    # Given the root store (shared by every session)
    # When it is asked to store an event directly
    # Then it refuses: it could not keep sessions apart
    with pytest.raises(RuntimeError, match="for_session"):
        await redis_store.store_event("1", note(1))


async def test_redis_log_is_capped(redis_db: redis.Redis) -> None:
    # Given a store that keeps about 50 events per session
    root = RedisEventStore(url=REDIS_URL, max_events=50)
    view = root.for_session("sess-cap")
    first = await view.store_event("1", note(0))

    # When 600 events are written
    for i in range(1, 600):
        last = await view.store_event("1", note(i))

    # Then the stream was trimmed (MAXLEN ~: whole nodes, so at least 50 stay), the
    # oldest event is gone and the newest are still replayable
    length = redis_db.xlen(view.key())
    assert 50 <= length < 600
    first_ref = parse_event_id(first)
    assert first_ref is not None
    assert entries(redis_db, view.key(), first_ref.position, first_ref.position) == []
    got = Collector()
    await view.replay_events_after(last, got)
    assert got.events == []
    await root.aclose()


async def test_redis_log_expires_and_each_write_refreshes_it(redis_db: redis.Redis) -> None:
    # Given a store with a 100 s TTL and a session log about to expire
    root = RedisEventStore(url=REDIS_URL, ttl=100)
    view = root.for_session("sess-ttl")
    await view.store_event("1", None)
    assert 0 < redis_db.ttl(view.key()) <= 100
    assert 0 < redis_db.ttl(view.open_key()) <= 100
    redis_db.expire(view.key(), 5)

    # When another event is written
    await view.store_event("1", note(1))

    # Then the TTL is back to the full 100 s
    assert redis_db.ttl(view.key()) > 50
    await root.aclose()


async def test_compressed_events_are_zlib_and_mixed_logs_replay(redis_db: redis.Redis) -> None:
    # Given a session written first without, then with compression (the setting changed)
    plain = RedisEventStore(url=REDIS_URL, compress=False).for_session("sess-z")
    packed = RedisEventStore(url=REDIS_URL, compress=True).for_session("sess-z")
    priming = await plain.store_event("1", None)
    await plain.store_event("1", note(1))
    await packed.store_event("1", note(2))

    # When the raw entries are read and the log is replayed
    log = entries(redis_db, packed.key())
    got = Collector()
    await packed.replay_events_after(priming, got)

    # Then the compressed entry is zlib data flagged "z", and both replay
    assert log[2][1][b"z"] == b"1"
    assert b"n2" in zlib.decompress(log[2][1][b"m"])
    assert b"z" not in log[1][1]
    assert got.data == ["n1", "n2"]
    await plain.aclose()
    await packed.aclose()


async def test_fails_over_to_memory_when_redis_is_down() -> None:
    # Given a store whose Redis does not answer
    root = RedisEventStore(url=dead_redis_url(), socket_timeout=0.5)
    a, b = root.for_session("sess-a"), root.for_session("sess-b")
    assert root.mode == "redis"

    # When events are stored and replayed
    priming = await a.store_event("1", None)
    await a.store_event("1", note(1))
    await b.store_event("1", note(2))
    await a.store_event("1", response(1))
    got = Collector()
    stream = await a.replay_events_after(priming, got)

    # Then nothing raised, the events went to memory (and health says so), scoped per session
    assert root.mode == "memory"
    assert priming.startswith("m")
    assert stream == "1"
    assert got.data == ["n1", "response"]
    assert len(root.memory) == 4
    await root.aclose()


async def test_open_requests_are_ended_on_recovery(redis_db: redis.Redis) -> None:
    # Given a session with request 1 answered and request 2 primed but never answered
    # (its process died)
    view = RedisEventStore(url=REDIS_URL).for_session("sess-lost")
    await view.store_event("1", None)
    await view.store_event("1", response(1))
    lost = await view.store_event("2", None)
    await view.store_event(GET_STREAM, None)

    # When the session is recovered and the client resumes request 2
    ended = await view.fail_open_requests()
    got = Collector()
    await view.replay_events_after(lost, got)

    # Then only request 2 is ended, with an error the client receives
    assert ended == 1
    assert got.data == ["error"]
    assert await view.fail_open_requests() == 0
    await view.aclose()


async def test_a_request_with_a_response_is_never_ended_on_recovery(
    redis_db: redis.Redis,
) -> None:
    # Given request 1 answered although still marked open (an older version primed a
    # resumed stream again; or its priming and its response went to different logs)
    view = RedisEventStore(url=REDIS_URL).for_session("sess-answered")
    priming = await view.store_event("1", None)
    await view.store_event("1", response(1))
    redis_db.sadd(view.open_key(), "1")

    # When the session is recovered
    ended = await view.fail_open_requests()

    # Then the request is not ended, its mark is gone, and a replay has one response
    got = Collector()
    await view.replay_events_after(priming, got)
    assert ended == 0 and not redis_db.sismember(view.open_key(), "1")
    assert got.data == ["response"]
    await view.aclose()


async def test_store_event_log_pages_through_long_replays(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a store-backed log longer than a replay page
    monkeypatch.setattr(store_events_module, "DEFAULT_REPLAY_PAGE", 3)
    view = StoreEventStore(store).for_session("sess-page")
    priming = await view.store_event("1", None)
    for i in range(8):
        await view.store_event("1", note(i))

    # When the client resumes from the priming event
    got = Collector()
    await view.replay_events_after(priming, got)

    # Then every event arrives once, in order
    assert got.data == [f"n{i}" for i in range(8)]


# -- transport registry --------------------------------------------------------------


class Clock:
    """A settable clock for the registry."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> Any:
        return self.now


async def test_registry_register_heartbeat_disconnect_recover(store: Store) -> None:
    # Given a registry on a store with the default sender (direct writes in a thread)
    clock = Clock()
    registry = SessionRegistry(store, clock=clock, max_attempts=2)

    # When a session is registered with state, heartbeats, then disconnects
    await registry.register("mcp-1", transport_state={"protocol_version": "2025-11-25"}, working_directory="/w",
                            agent_context={"agent": "a"}, conversation_state={"turn": 3})
    clock.now = T0 + timedelta(seconds=30)
    await registry.heartbeat("mcp-1")
    clock.now = T0 + timedelta(seconds=40)
    await registry.disconnect("mcp-1")

    # Then it is recoverable within grace, recovery returns the saved state and counts
    loaded = await registry.load("mcp-1")
    assert loaded is not None and loaded.status == "disconnected"
    assert loaded.last_heartbeat == T0 + timedelta(seconds=30)
    assert await registry.can_recover("mcp-1")
    recovered = await registry.recover("mcp-1")
    assert recovered is not None
    assert recovered.recovery_attempts == 1
    assert recovered.transport_state == {"protocol_version": "2025-11-25"}
    assert (recovered.working_directory, recovered.agent_context, recovered.conversation_state) == (
        "/w", {"agent": "a"}, {"turn": 3})
    # ... and out of attempts after the cap
    assert await registry.recover("mcp-1") is not None
    assert await registry.recover("mcp-1") is None
    assert not await registry.can_recover("mcp-1")
    assert await registry.recover("unknown") is None


async def test_registry_past_grace_is_not_recoverable(store: Store) -> None:
    # Given a session disconnected 11 minutes ago (grace is 10)
    clock = Clock()
    registry = SessionRegistry(store, clock=clock)
    await registry.register("mcp-1")
    await registry.disconnect("mcp-1")
    clock.now = T0 + timedelta(minutes=11)

    # When recovery is attempted / Then it is refused
    assert not await registry.can_recover("mcp-1")
    assert await registry.recover("mcp-1") is None


async def test_registry_sends_jobs_through_an_injected_sender(store: Store) -> None:
    # Given a registry whose writes go to a queue (a sync and an async sender)
    sent: list[tuple[str, dict[str, Any]]] = []

    async def async_send(name: str, payload: dict[str, Any]) -> None:
        sent.append((name, payload))

    def sync_send(name: str, payload: dict[str, Any]) -> None:
        sent.append((name, payload))

    for sid, send in (("mcp-sync", sync_send), ("mcp-async", async_send)):
        sent.clear()
        registry = SessionRegistry(store, send=send, clock=Clock())

        # When it registers, heartbeats and disconnects
        await registry.register(sid)
        await registry.heartbeat(sid)
        await registry.disconnect(sid, grace=timedelta(0))

        # Then jobs went out and nothing touched the store yet; a worker applying them
        # (twice: at-least-once) gets the same result
        assert [name for name, _ in sent] == ["register_transport", "heartbeat", "mark_disconnected"]
        assert await registry.load(sid) is None
        for _ in range(2):
            for name, payload in sent:
                apply_transport_job(store, name, payload)
        loaded = store.load_transport(sid)
        assert loaded.status == "disconnected" and loaded.grace_expires_at == loaded.disconnected_at
        assert not store.can_recover(sid, T0 + timedelta(seconds=1))


async def test_transport_jobs_reject_bad_payloads(store: Store) -> None:
    # Given payloads a foreign producer got wrong / When applied / Then a clear InvalidPayload
    cases: list[tuple[str, dict[str, Any]]] = [
        ("heartbeat", {"mcp_session_id": "x"}),
        ("heartbeat", {"mcp_session_id": "x", "at": "yesterday"}),
        ("heartbeat", {"mcp_session_id": "x", "at": "2026-01-01T00:00:00"}),
        ("mark_disconnected", {"mcp_session_id": "x", "at": T0.isoformat(), "grace_seconds": -1}),
        ("register_transport", {"mcp_session_id": ""}),
        ("register_transport", {"session": {"mcp_session_id": "x"}}),
        ("nope", {"mcp_session_id": "x"}),
        ("heartbeat", {"mcp_session_id": ""}),
    ]
    for name, payload in cases:
        with pytest.raises(InvalidPayload):
            apply_transport_job(store, name, payload)


async def test_agent_state_expires(store: Store) -> None:
    # Given an agent value kept for 5 minutes
    clock = Clock()
    registry = SessionRegistry(store, clock=clock)
    await registry.put_agent_state("agent-1", "plan", {"steps": [1, 2]}, mcp_session_id="mcp-1",
                                   ttl=timedelta(minutes=5))

    # When it is read before and after its expiry
    before = await registry.get_agent_state("agent-1", "plan")
    clock.now = T0 + timedelta(minutes=6)
    after = await registry.get_agent_state("agent-1", "plan", default="gone")

    # Then it is there, then gone
    assert before == {"steps": [1, 2]}
    assert after == "gone"



async def test_store_event_log_fails_over_to_memory_when_the_store_is_down() -> None:
    # Given a store-backed log whose PostgreSQL does not answer (nothing listens on its port)
    store = open_store(f"postgresql://postgres@127.0.0.1:{free_port()}/sessionq")
    root = StoreEventStore(store)
    view = root.for_session("sess-down")

    # When events are stored and replayed
    priming = await view.store_event("1", None)
    await view.store_event("1", note(1))
    got = Collector()
    await view.replay_events_after(priming, got)

    # Then nothing raised, health says memory, and the events replay from memory
    assert root.mode == "memory"
    assert priming.startswith("m")
    assert got.data == ["n1"]
    store.close()
