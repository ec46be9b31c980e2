"""Resuming a request: no event is lost, no request gets two responses.

* Resuming while the tool is still emitting: no event may fall between replay and live.

The real SDK client, on a handshake protocol older than 2025-11-25 (no priming event:
the SDK hands a resumed stream over to live delivery right after the event store's
replay returns), against ``ops/example_server.py`` processes. A transport between them
cuts every SSE response after a few events, the way a proxy or a flaky network does;
the client resumes each time with ``Last-Event-ID`` while the tool logs a tick every
10 ms. Before the fix, ticks written between the replay's last read and the hand-over
were neither replayed nor delivered live (5 of 5 trials lost some).
* Resuming a request that was already answered used to store a new priming event,
  which marked the request open again: after a restart, recovery then appended
  ``request lost`` after its real result, and a replay returned two responses.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import httpx2
import mcp.client.session
import mcp.client.streamable_http
import pytest
import redis
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.streamable_http import EventMessage

from sessionq.workers.mcp import RedisEventStore
from sessionq.workers.mcp.event_log import format_event_id, is_final
from tests.conftest import REDIS_URL
from tests.support_mcp import (  # noqa: F401  (fixtures)
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

# The handshake version the client negotiates: resumable, but without priming events.
LEGACY_VERSION = "2025-06-18"
# Ticks the tool logs, and the pause between two (seconds).
TICKS, PAUSE = 400, 0.01
# SSE events a response carries before the transport cuts it.
EVENTS_PER_CONNECTION = 25
# The blank line that ends an SSE event (sse-starlette writes CRLF line ends).
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class _CutStream(httpx2.AsyncByteStream):
    """An SSE body that ends after ``budget`` events (at an event boundary)."""

    def __init__(self, inner: Any, budget: int, cuts: list[int]) -> None:
        self.inner = inner
        self.budget = budget
        self.cuts = cuts

    async def __aiter__(self) -> AsyncIterator[bytes]:
        left = self.budget
        async for chunk in self.inner:
            ends = [m.end() for m in _EVENT_END.finditer(chunk)]
            if len(ends) < left:
                left -= len(ends)
                yield chunk
                continue
            yield chunk[: ends[left - 1]]
            self.cuts.append(1)
            return

    async def aclose(self) -> None:
        await self.inner.aclose()


class CuttingTransport(httpx2.AsyncBaseTransport):
    """Ends every SSE response after :data:`EVENTS_PER_CONNECTION` events."""

    def __init__(self) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.cuts: list[int] = []
        #: ``Last-Event-ID`` of every resume the client sent.
        self.resumes: list[str] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Forward, and wrap an SSE body so that it ends early."""
        if request.headers.get("last-event-id"):
            self.resumes.append(request.headers["last-event-id"])
        response = await self.inner.handle_async_request(request)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            response.stream = _CutStream(response.stream, EVENTS_PER_CONNECTION, self.cuts)
        return response

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self.inner.aclose()


@asynccontextmanager
async def legacy_client(url: str, transport: CuttingTransport, logs: list[Any]) -> AsyncIterator[ClientSession]:
    """An SDK client session initialized on :data:`LEGACY_VERSION`."""

    async def on_log(params: Any) -> None:
        logs.append(params.data)

    async with (
        httpx2.AsyncClient(transport=transport, timeout=httpx2.Timeout(30.0, read=60.0)) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write, logging_callback=on_log) as session,
    ):
        result = await session.initialize()
        assert result.protocol_version == LEGACY_VERSION
        yield session


@pytest.mark.parametrize("event_log", ["redis", "store"])
async def test_resuming_while_a_tool_emits_loses_no_event(
    event_log: str, servers: Callable[..., ServerProcess], redis_db: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a client on a legacy handshake version that reconnects 50 ms after a drop,
    # and a server whose event log is on Redis or in the store
    monkeypatch.setattr(mcp.client.session, "LATEST_HANDSHAKE_VERSION", LEGACY_VERSION)
    monkeypatch.setattr(mcp.client.streamable_http, "DEFAULT_RECONNECTION_DELAY_MS", 50)
    server = servers(env={} if event_log == "redis" else {"REDIS_URL": ""})
    transport = CuttingTransport()
    logs: list[Any] = []
    async with legacy_client(server.url, transport, logs) as session:
        # When a tool logs a tick every 10 ms while its SSE stream is cut every 25 events
        result = await session.call_tool("countdown", {"n": TICKS, "pause": PAUSE})

    # Then the client resumed many times and got every tick exactly once, in order
    assert text_of(result) == f"done {TICKS}"
    assert len(transport.resumes) >= 5, transport.resumes
    missing = sorted(set(range(1, TICKS + 1)) - {int(str(t).split()[1]) for t in logs})
    assert missing == [], f"{len(missing)} tick(s) lost over {len(transport.resumes)} resumes: {missing[:20]}"
    assert logs == [f"tick {i}" for i in range(1, TICKS + 1)]


def resume_raw(port: int, session_id: str, last_event_id: str) -> list[dict[str, str]]:
    """GET with ``Last-Event-ID`` (protocol 2025-11-25) and return the SSE events up to
    the SDK's priming event that follows the replay (an event with empty data)."""
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
                    if current.get("data", "") == "":
                        return events
                current = {}
                continue
            name, _, value = line.partition(":")
            current[name] = value.lstrip(" ")
    raise AssertionError(f"stream ended before the priming event: {events}")


async def test_an_answered_request_resumed_then_recovered_keeps_one_response(
    servers: Callable[..., ServerProcess], redis_db: redis.Redis,
) -> None:
    # Given a request answered in full (protocol 2025-11-25: it was primed first)
    server = servers(retry_ms=200)
    async with mcp_client(server.url) as session:
        session_id = (await session.call_tool("whoami", {})).structured_content["session_id"]
        assert text_of(await session.call_tool("countdown", {"n": 3})) == "done 3"
        key, open_key = session_keys(session_id)
        log = entries(redis_db, key)
        stream = next(f[b"s"] for _, f in log if b"done 3" in f.get(b"m", b""))
        priming = next(eid.decode() for eid, f in log if f[b"s"] == stream and b"m" not in f)

        # When a client resumes it from its priming event (replay, then the SDK's priming event)
        resumed = await anyio.to_thread.run_sync(
            resume_raw, server.port, session_id, format_event_id(priming, stream.decode()))
        assert "done 3" in resumed[-2]["data"]
        # ... and the server dies and a new process recovers the session
        server.kill()
        servers(port=server.port, retry_ms=200)
        assert (await session.call_tool("whoami", {})).structured_content["recovered"]

        # Then the request was not ended a second time: its log holds one final message
        finals = [f[b"m"] for _, f in entries(redis_db, key)
                  if f[b"s"] == stream and (b'"result"' in f.get(b"m", b"") or b'"error"' in f.get(b"m", b""))]
        assert len(finals) == 1 and b"done 3" in finals[0], finals
        assert not redis_db.sismember(open_key, stream.decode())
        # And a replay from its priming event returns one response for the request id
        replayed: list[Any] = []

        async def collect(event: EventMessage) -> None:
            replayed.append(event.message)

        view = RedisEventStore(url=REDIS_URL).for_session(session_id)
        try:
            await view.replay_events_after(format_event_id(priming, stream.decode()), collect)
        finally:
            await view.aclose()
        assert [type(m).__name__ for m in replayed if is_final(m)] == ["JSONRPCResponse"]
