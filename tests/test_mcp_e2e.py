"""End to end: the real SDK client against ``ops/example_server.py`` processes over HTTP.

Sessions and resumability belong to the handshake protocol versions; the client here
speaks 2025-11-25 (priming events, server-closed SSE streams). Each server process
shares one Redis database and one SQLite store with its restarts and peers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import httpx
import pytest
import redis
from mcp import Client
from mcp.shared.exceptions import MCPError

from sessionq.models import open_store, utcnow
from sessionq.workers.mcp.event_log import format_event_id
from tests.support_mcp import (  # noqa: F401  (fixtures)
    RoundRobin,
    ServerProcess,
    anyio_backend,
    entries,
    mcp_client,
    redis_db,
    servers,
    session_keys,
    text_of,
)

pytestmark = pytest.mark.anyio

TICKS = [f"tick {i}" for i in range(1, 6)]


async def whoami(session: Any) -> dict[str, Any]:
    """The example server's ``whoami`` answer."""
    result = await session.call_tool("whoami", {})
    assert not result.is_error, text_of(result)
    return dict(result.structured_content)


async def wait_for_event(client: redis.Redis, session_id: str, needle: bytes, timeout: float = 20.0) -> None:
    """Wait until the session's Redis log holds an event containing ``needle``."""
    key, _ = session_keys(session_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(needle in fields.get(b"m", b"") for _, fields in entries(client, key)):
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"no event with {needle!r} in {key}")


def read_sse(port: int, session_id: str, last_event_id: str, until: bytes) -> list[dict[str, str]]:
    """GET the MCP endpoint with ``Last-Event-ID`` and return the raw SSE events up to
    the one whose data contains ``until``."""
    headers = {"accept": "text/event-stream", "mcp-session-id": session_id,
               "mcp-protocol-version": "2025-11-25", "last-event-id": last_event_id}
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    with httpx.stream("GET", f"http://127.0.0.1:{port}/mcp", headers=headers, timeout=10.0) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "":
                if current:
                    events.append(current)
                    if until in current.get("data", "").encode():
                        return events
                current = {}
                continue
            name, _, value = line.partition(":")
            current[name] = value.lstrip(" ")
    raise AssertionError(f"stream ended before {until!r}: {events}")


async def test_sse_stream_drop_resumes_with_last_event_id(
    servers: Callable[..., ServerProcess], redis_db: redis.Redis
) -> None:
    # Given a server with a Redis event log and a client on 2025-11-25
    server = servers(retry_ms=200)
    recorder = RoundRobin([server.port])
    logs: list[Any] = []
    async with mcp_client(server.url, transport=recorder, logs=logs) as session:
        session_id = (await whoami(session))["session_id"]

        # When a tool closes the SSE stream before sending its 5 ticks and its result
        result = await session.call_tool("countdown", {"n": 5, "drop_stream": True})

        # Then the client resumed with Last-Event-ID and got every tick once, and the result
        assert text_of(result) == "done 5"
        assert logs == TICKS
        assert any(method == "GET" and last_id for method, last_id in recorder.requests)

        # And a raw resume from that request's priming event replays the stored events
        # without any stored priming event (only the SDK's fresh one after the replay,
        # whose id is the replay's last event: a resumed stream stores no priming row)
        log = entries(redis_db, session_keys(session_id)[0])
        stream = next(f[b"s"] for _, f in log if b"done 5" in f.get(b"m", b""))
        primings = [eid.decode() for eid, f in log if f[b"s"] == stream and b"m" not in f]
        assert len(primings) == 1  # the request's own
        last_event_id = format_event_id(primings[0], stream.decode())
        events = await anyio.to_thread.run_sync(read_sse, server.port, session_id, last_event_id, b"done 5")
        data = [e.get("data", "") for e in events]
        assert "" not in data
        assert [json.loads(d)["params"]["data"] for d in data[:-1]] == TICKS
        assert len({e["id"] for e in events}) == len(events)

    # And once the client ends the session (DELETE), it is closed for good and its log deleted
    store = open_store(server.storage_url)
    try:
        deadline = time.monotonic() + 10
        while store.can_recover(session_id, utcnow()) or redis_db.exists(*session_keys(session_id)):
            assert time.monotonic() < deadline, "an ended session is still recoverable or still has its log"
            await anyio.sleep(0.05)
    finally:
        store.close()


async def test_server_killed_and_restarted_client_keeps_its_session(
    servers: Callable[..., ServerProcess], redis_db: redis.Redis
) -> None:
    # Given a client in a session with a server that will be killed (SSE retry 3 s)
    server = servers(retry_ms=3000)
    recorder = RoundRobin([server.port])
    logs: list[Any] = []
    async with mcp_client(server.url, transport=recorder, logs=logs) as session:
        before = await whoami(session)
        outcome: dict[str, Any] = {}

        async def call() -> None:
            outcome["result"] = await session.call_tool("countdown", {"n": 5, "drop_stream": True})

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            # When the server has stored a tool's events while the client was away,
            # then dies (SIGKILL) and a new process starts on the same port
            await wait_for_event(redis_db, before["session_id"], b'"done 5"')
            server.kill()
            restarted = servers(port=server.port, retry_ms=3000)

        # Then the client resumed on the new process: it got the missed events and result
        assert text_of(outcome["result"]) == "done 5"
        assert logs == TICKS
        # ... and it calls tools in the same session, recovered once, no re-initialize
        after = await whoami(session)
        assert after["session_id"] == before["session_id"]
        assert (before["pid"], after["pid"]) == (server.pid, restarted.pid)
        assert after["recovered"] and after["recovery_attempts"] == 1
        assert await session.call_tool("remember", {"key": "k", "value": "v"})
        assert text_of(await session.call_tool("recall", {"key": "k"})) == "v"
        assert set(recorder.seen_session_ids) == {before["session_id"]}


async def test_a_request_cut_by_a_crash_ends_with_an_error_and_the_session_goes_on(
    servers: Callable[..., ServerProcess], redis_db: redis.Redis
) -> None:
    # Given a client waiting on a slow tool (a tick every 0.5 s) when the server dies
    server = servers(retry_ms=1500)
    async with mcp_client(server.url) as session:
        session_id = (await whoami(session))["session_id"]
        outcome: dict[str, Any] = {}

        async def call() -> None:
            try:
                outcome["result"] = await session.call_tool("countdown", {"n": 100, "pause": 0.5})
            except MCPError as exc:
                outcome["error"] = str(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await wait_for_event(redis_db, session_id, b'"tick 1"')
            # When it is killed mid-request and a new process recovers the session
            server.kill()
            servers(port=server.port)

        # Then the cut request ends with an error instead of hanging or looping ...
        assert "request lost" in outcome.get("error", ""), outcome
        # ... and the session carries on
        assert (await whoami(session))["session_id"] == session_id


async def test_two_instances_without_sticky_routing_share_a_session(
    servers: Callable[..., ServerProcess], redis_db: redis.Redis
) -> None:
    # Given two instances on one Redis and store, and a balancer that alternates requests
    first, second = servers(), servers()
    balancer = RoundRobin([first.port, second.port])
    logs: list[Any] = []
    async with mcp_client(first.url, transport=balancer, logs=logs) as session:
        # When the client initialized on one instance keeps calling tools
        answers = [await whoami(session) for _ in range(4)]
        result = await session.call_tool("countdown", {"n": 5})

        # Then both instances served the same session, and tool calls worked on each
        assert {a["session_id"] for a in answers} == {answers[0]["session_id"]}
        assert {a["pid"] for a in answers} == {first.pid, second.pid}
        assert text_of(result) == "done 5" and logs == TICKS
        assert set(balancer.seen_session_ids) == {answers[0]["session_id"]}


async def test_heartbeats_then_a_clean_shutdown_opens_the_grace_window(
    servers: Callable[..., ServerProcess], redis_db: redis.Redis
) -> None:
    # Given a server that heartbeats every second and a client in a session
    server = servers(env={"SESSIONQ_HEARTBEAT_SECONDS": "1"})
    store = open_store(server.storage_url)
    try:
        async with mcp_client(server.url) as session:
            session_id = (await whoami(session))["session_id"]
            registered = store.load_transport(session_id)
            assert registered.status == "active"
            assert (registered.transport_state or {}).get("protocol_version") == "2025-11-25"

            # When time passes, then the server is stopped cleanly (SIGTERM)
            deadline = time.monotonic() + 20
            while store.load_transport(session_id).last_heartbeat == registered.last_heartbeat:
                assert time.monotonic() < deadline, "no heartbeat arrived"
                await anyio.sleep(0.2)
            server.stop()

            # Then the session was marked disconnected with a 10-minute grace window ...
            stopped = store.load_transport(session_id)
            assert stopped.status == "disconnected"
            assert stopped.disconnected_at and stopped.grace_expires_at
            assert stopped.grace_expires_at - stopped.disconnected_at == timedelta(minutes=10)

            # ... within which the restarted server takes the session back
            restarted = servers(port=server.port)
            after = await whoami(session)
            assert (after["session_id"], after["pid"], after["recovered"]) == (session_id, restarted.pid, True)
    finally:
        store.close()


@pytest.mark.parametrize("why", ["past grace", "out of attempts"])
async def test_unrecoverable_session_gets_404_and_the_client_reinitializes(
    why: str, servers: Callable[..., ServerProcess], redis_db: redis.Redis
) -> None:
    # Given a client in a session whose server dies
    server = servers()
    async with mcp_client(server.url) as session:
        session_id = (await whoami(session))["session_id"]
        server.kill()

        # ... and whose record is past its grace window, or out of recovery attempts
        store = open_store(server.storage_url)
        try:
            if why == "past grace":
                assert store.mark_disconnected(session_id, utcnow(), timedelta(milliseconds=1))
                await anyio.sleep(0.01)
            else:
                for _ in range(3):
                    store.recover(session_id, utcnow())
            assert not store.can_recover(session_id, utcnow())
        finally:
            store.close()

        # When a new process serves the next request of that session
        restarted = servers(port=server.port)

        # Then it is the SDK's normal 404 ...
        with pytest.raises(MCPError):
            await session.call_tool("whoami", {})
        async with httpx.AsyncClient() as http:
            raw = await http.post(restarted.url, json={"jsonrpc": "2.0", "id": 9, "method": "tools/list"},
                                  headers={"mcp-session-id": session_id, "mcp-protocol-version": "2025-11-25",
                                           "accept": "application/json, text/event-stream"})
        assert raw.status_code == 404

    # ... and the client re-initializes into a new session
    async with mcp_client(restarted.url) as fresh:
        again = await whoami(fresh)
        assert again["session_id"] != session_id and again["pid"] == restarted.pid
        assert not again["recovered"]


async def test_sessionless_clients_are_untouched(
    servers: Callable[..., ServerProcess], redis_db: redis.Redis
) -> None:
    # Given a server with the integration and a client on the sessionless 2026-07-28 protocol
    server = servers()

    # When it calls a tool
    async with Client(server.url) as client:
        result = await client.call_tool("whoami", {})

    # Then it works, with no session, no registry record and no event log
    assert result.structured_content["session_id"] is None
    store = open_store(server.storage_url)
    try:
        assert store.stats().transports_by_status == {}
    finally:
        store.close()
    # (the replica's own ring report, sessionq:mcp:replica*, is not session state)
    keys: list[bytes] = redis_db.keys("sessionq:mcp:*")  # type: ignore[assignment]
    assert [k for k in keys if not k.startswith(b"sessionq:mcp:replica")] == []
