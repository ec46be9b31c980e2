"""RedisSubscriptionBus on a real Redis (in-process buses; the cross-process story is
tests/test_mcp_replicas.py), and what adopt_server() wires into a real MCPServer."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import redis
from mcp.server.mcpserver import MCPServer
from mcp.server.request_state import RequestStateBoundary
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.shared.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
)

from sessionq.errors import ConfigError
from sessionq.models import Settings
from sessionq.models.keyring import fingerprint, generate_key
from sessionq.workers.mcp import RedisSubscriptionBus, SessionqTasks, TaskPolicy, adopt_server
from sessionq.workers.mcp.bus import GAP_EVENTS, channel_for, decode_event, encode_event
from sessionq.workers.mcp.tasks import TASKS_EXTENSION
from tests.conftest import REDIS_URL
from tests.support_mcp import anyio_backend, dead_redis_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.anyio

EVENTS: list[ServerEvent] = [ToolsListChanged(), PromptsListChanged(), ResourcesListChanged(),
                             ResourceUpdated(uri="file:///a b?c=d#é")]


def audience() -> str:
    """A channel of this test alone (pub/sub ignores the database number)."""
    return f"bus-test-{uuid.uuid4().hex[:8]}"


async def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


def test_every_event_survives_the_wire_and_nothing_else_is_an_event() -> None:
    for event in EVENTS:
        assert decode_event(encode_event(event, "me")) == ("me", event)
    for junk in (b"", b"{", b"[]", b'{"o": "x"}', b'{"o": "x", "m": "notifications/message", "p": {}}',
                 b'{"o": "x", "m": "notifications/resources/updated", "p": {"uri": 7}}'):
        assert decode_event(junk) is None
    with pytest.raises(TypeError):
        encode_event("tools", "me")  # type: ignore[arg-type]
    assert channel_for("svc") == "sessionq:mcp:events:svc"


async def test_events_reach_the_other_bus_once_and_each_bus_skips_its_own_echo() -> None:
    name = audience()
    here, there = RedisSubscriptionBus(REDIS_URL, audience=name), RedisSubscriptionBus(REDIS_URL, audience=name)
    elsewhere = RedisSubscriptionBus(REDIS_URL, audience=audience())
    seen_here: list[ServerEvent] = []
    seen_there: list[ServerEvent] = []
    seen_elsewhere: list[ServerEvent] = []
    try:
        here.subscribe(seen_here.append)
        there.subscribe(seen_there.append)
        elsewhere.subscribe(seen_elsewhere.append)
        assert await here.start() and await there.start() and await elsewhere.start()
        # When one bus publishes every kind of event
        for event in EVENTS:
            await here.publish(event)
        # Then its own listener had each at once, and the other bus's listener gets each once, in order
        assert seen_here == EVENTS
        await wait_for(lambda: len(seen_there) == len(EVENTS))
        await anyio.sleep(0.2)  # time for an echo or a duplicate to arrive, if one were sent
        assert seen_there == EVENTS and seen_here == EVENTS
        # And a bus of another audience hears nothing
        assert seen_elsewhere == []
    finally:
        for bus in (here, there, elsewhere):
            await bus.aclose()


async def test_a_raising_listener_is_skipped_and_unsubscribe_is_idempotent() -> None:
    bus = RedisSubscriptionBus(REDIS_URL, audience=audience())
    seen: list[ServerEvent] = []

    def broken(event: ServerEvent) -> None:
        raise RuntimeError("listener bug")

    try:
        bus.subscribe(broken)
        unsubscribe = bus.subscribe(seen.append)
        await bus.publish(ToolsListChanged())  # does not raise
        assert seen == [ToolsListChanged()]
        unsubscribe()
        unsubscribe()
        await bus.publish(ToolsListChanged())
        assert seen == [ToolsListChanged()]
    finally:
        await bus.aclose()


async def test_publishing_without_redis_still_reaches_local_listeners_and_never_raises() -> None:
    bus = RedisSubscriptionBus(dead_redis_url(), audience=audience(), publish_timeout=0.5)
    seen: list[ServerEvent] = []
    try:
        bus.subscribe(seen.append)
        assert not await bus.start(timeout=0.5)
        started = time.monotonic()
        await bus.publish(ResourceUpdated(uri="note://1"))
        bus.publish_sync(ResourceUpdated(uri="note://2"))
        assert seen == [ResourceUpdated(uri="note://1"), ResourceUpdated(uri="note://2")]
        assert time.monotonic() - started < 5
        assert bus.health()["connected"] is False
    finally:
        await bus.aclose()


async def test_a_plain_thread_publishes_like_a_worker_job_does(redis_client: redis.Redis) -> None:
    name = audience()
    listening = RedisSubscriptionBus(REDIS_URL, audience=name)
    seen: list[ServerEvent] = []
    try:
        listening.subscribe(seen.append)
        assert await listening.start()
        # Given a bus built from settings in code with no event loop (a Dramatiq actor)
        settings = Settings(redis_url=REDIS_URL, request_state_audience=name)
        job_bus = RedisSubscriptionBus.from_settings(settings, audience="ignored: the setting wins")
        local: list[ServerEvent] = []

        def job() -> None:
            job_bus.subscribe(local.append)  # a listener outside any loop is called in the publishing thread
            job_bus.publish_sync(ResourceUpdated(uri="note://from-a-job"))
            job_bus.close()

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        thread.join(10)
        # Then the listening bus (another process's, as far as Redis knows) gets the event
        await wait_for(lambda: seen == [ResourceUpdated(uri="note://from-a-job")])
        assert local == [ResourceUpdated(uri="note://from-a-job")]
        assert redis_client.pubsub_numsub(channel_for(name)) == [(channel_for(name).encode(), 1)]
    finally:
        await listening.aclose()
    with pytest.raises(ValueError, match="REDIS_URL"):
        RedisSubscriptionBus.from_settings(Settings(), audience="x")


async def test_listeners_on_another_event_loop_are_called_on_their_own_loop() -> None:
    name = audience()
    bus = RedisSubscriptionBus(REDIS_URL, audience=name)
    publisher = RedisSubscriptionBus(REDIS_URL, audience=name)
    seen: list[tuple[ServerEvent, int]] = []
    try:
        assert await bus.start()
        ready, done = threading.Event(), threading.Event()

        def other_loop() -> None:
            async def main() -> None:
                bus.subscribe(lambda event: seen.append((event, threading.get_ident())))
                ready.set()
                with anyio.move_on_after(10):
                    while not seen:
                        await anyio.sleep(0.01)
                done.set()

            anyio.run(main)

        thread = threading.Thread(target=other_loop, daemon=True)
        thread.start()
        assert await anyio.to_thread.run_sync(ready.wait, 5)
        await publisher.publish(PromptsListChanged())
        assert await anyio.to_thread.run_sync(done.wait, 5)
        thread.join(5)
        assert seen == [(PromptsListChanged(), thread.ident)]
    finally:
        await bus.aclose()
        await publisher.aclose()


def test_gap_events_are_the_list_changed_level_triggers() -> None:
    assert set(GAP_EVENTS) == {ToolsListChanged(), PromptsListChanged(), ResourcesListChanged()}


# -- adopt_server ---------------------------------------------------------------------------


def boundary(server: MCPServer) -> RequestStateBoundary:
    return next(m for m in server.middleware if isinstance(m, RequestStateBoundary))


async def test_adopt_server_wires_bus_ring_and_tasks_once(tmp_path: Any) -> None:
    keys = f"{generate_key()},{generate_key()}"
    settings = Settings(storage_url=f"sqlite:///{tmp_path}/s.db", redis_url=REDIS_URL, request_state_keys=keys,
                        request_state_ttl=30)
    server = MCPServer(audience())
    sdk_boundary = boundary(server)

    @server.tool()
    def slow() -> str:
        """A task tool."""
        return "ok"

    adoption = adopt_server(server, settings, tasks={"slow": TaskPolicy(mode="required")})
    try:
        # The bus is the server's (tools' ctx.notify_*) and the listen handler's
        assert isinstance(adoption.bus, RedisSubscriptionBus) and server._subscriptions is adoption.bus
        handler = server._lowlevel_server.get_request_handler("subscriptions/listen")
        assert handler is not None and handler.handler._bus is adoption.bus  # type: ignore[attr-defined]
        assert adoption.bus.channel == f"sessionq:mcp:events:{server.name}"
        # The SDK's per-process boundary is replaced by one on the ring, audience = server name
        new_boundary = boundary(server)
        assert new_boundary is not sdk_boundary and new_boundary._audience == server.name
        assert new_boundary._security.ttl == 30
        assert adoption.fingerprints == tuple(fingerprint(k.encode()) for k in keys.split(","))
        assert not adoption.ephemeral
        # Tasks: the extension is applied, bound and advertised
        assert isinstance(adoption.tasks, SessionqTasks) and adoption.tasks.server is server
        assert TASKS_EXTENSION in server._lowlevel_server.extensions
        # A second adoption changes nothing
        assert adopt_server(server, settings, tasks={"slow": TaskPolicy()}) is adoption
        assert boundary(server) is new_boundary
    finally:
        await adoption.bus.aclose()  # type: ignore[attr-defined]
        assert adoption.store is not None
        adoption.store.close()


def test_adopt_server_refuses_what_would_break_retries(tmp_path: Any) -> None:
    settings = Settings(storage_url=f"sqlite:///{tmp_path}/s.db", request_state_keys=generate_key())
    # A shared ring on a nameless server: every unnamed service would open every other's state
    with pytest.raises(ConfigError, match="needs a server name"):
        adopt_server(MCPServer(), settings)
    # ... unless an audience is configured
    named = Settings(storage_url=settings.storage_url, request_state_keys=settings.request_state_keys,
                     request_state_audience="billing")
    assert adopt_server(MCPServer(), named).audience == "billing"
    # Without Redis the server keeps its in-process bus; without keys it gets a per-process key
    embedded = adopt_server(MCPServer("solo"), Settings(storage_url=settings.storage_url))
    assert isinstance(embedded.bus, InMemorySubscriptionBus)
    assert embedded.ephemeral and len(embedded.fingerprints) == 1
    # Tools for tasks go to one SessionqTasks: not a second one next to the server's own
    tasks = SessionqTasks.from_settings(Settings(storage_url=settings.storage_url), tools={})
    server = tasks.bind(MCPServer("has-tasks", extensions=[tasks]))
    with pytest.raises(ValueError, match="already has a SessionqTasks"):
        adopt_server(server, Settings(storage_url=settings.storage_url), tasks={"x": TaskPolicy()})
    assert adopt_server(server, Settings(storage_url=settings.storage_url)).tasks is tasks
