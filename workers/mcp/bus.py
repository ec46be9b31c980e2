"""Change events across replicas: a ``SubscriptionBus`` on Redis pub/sub (protocol 2026-07-28).

At 2026-07-28 change notifications ride ``subscriptions/listen`` streams, and the
SDK fans them out in-process only (``InMemorySubscriptionBus``). With several
replicas, a ``ctx.notify_resource_updated(uri)`` on replica B must reach a listen
stream held by replica A. :class:`RedisSubscriptionBus` does that:

* ``publish`` delivers to this process's listeners at once, then PUBLISHes the event
  as JSON (``{"o": origin, "m": method, "p": params}``) on
  ``sessionq:mcp:events:<audience>``; every other process on that channel delivers
  it to its own listeners. A process skips its own echoes (``o`` is a random id per
  bus), so local listeners see each event once.
* One reader task per bus (on the event loop of the first subscriber, or the one
  :meth:`start` ran on) holds the subscription. When Redis goes away it reconnects
  with backoff (:data:`DEFAULT_RECONNECT_MIN` doubling to :data:`DEFAULT_RECONNECT_MAX`)
  and, once subscribed again, emits ``ToolsListChanged``, ``PromptsListChanged`` and
  ``ResourcesListChanged`` locally: events are level triggers, so clients refetch
  what may have changed during the gap. ``ResourceUpdated`` events published during
  a gap are lost.
* Delivery is at most once with no replay, as the spec says of listen streams:
  Redis pub/sub stores nothing. A publish while Redis is down reaches local listeners
  only (logged); neither ``publish`` nor a listener ever raises into the SDK.
* :meth:`publish_sync` does the same from code without an event loop (a Dramatiq
  actor, a thread); a tool running as a durable task on a worker publishes through
  the server's bus with the usual ``ctx.notify_*`` calls.

Redis pub/sub ignores the database number of the URL: the audience (the server
name, or ``SESSIONQ_REQUEST_STATE_AUDIENCE``) is what separates services sharing
one Redis. Redis Cluster: pub/sub messages reach every node (sharded pub/sub is not used).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import redis
import redis.asyncio
from mcp.shared.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
    event_from_wire,
)
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from sessionq.models.settings import Settings

logger = logging.getLogger(__name__)

#: Channel prefix; the full channel is ``sessionq:mcp:events:<audience>``.
CHANNEL_PREFIX = "sessionq:mcp:events:"
#: First wait before reconnecting after Redis went away (seconds), doubled per failure.
DEFAULT_RECONNECT_MIN = 0.1
#: Longest wait between reconnection attempts (seconds).
DEFAULT_RECONNECT_MAX = 5.0
# Seconds a PUBLISH may take before the event is given up for remote replicas.
DEFAULT_PUBLISH_TIMEOUT = 1.0
# Seconds one read of the subscription waits before looping (also the health-check cadence).
_READ_TIMEOUT = 1.0
# Seconds start() waits for the first subscription before serving anyway (the reader keeps trying).
DEFAULT_START_TIMEOUT = 2.0

_METHODS: dict[type, str] = {
    ToolsListChanged: "notifications/tools/list_changed",
    PromptsListChanged: "notifications/prompts/list_changed",
    ResourcesListChanged: "notifications/resources/list_changed",
    ResourceUpdated: "notifications/resources/updated",
}
#: What a listener is told after the subscription was lost and is back (level triggers).
GAP_EVENTS: tuple[ServerEvent, ...] = (ToolsListChanged(), PromptsListChanged(), ResourcesListChanged())

Listener = Callable[[ServerEvent], None]


def channel_for(audience: str) -> str:
    """The Redis channel of ``audience``'s events."""
    return CHANNEL_PREFIX + audience


def encode_event(event: ServerEvent, origin: str) -> str:
    """The wire JSON of ``event`` published by ``origin``; ``TypeError`` for anything else."""
    method = _METHODS.get(type(event))
    if method is None:
        raise TypeError(f"not a ServerEvent: {type(event).__name__}")
    params = {"uri": event.uri} if isinstance(event, ResourceUpdated) else {}
    return json.dumps({"o": origin, "m": method, "p": params}, separators=(",", ":"))


def decode_event(data: bytes | str) -> tuple[str, ServerEvent] | None:
    """``(origin, event)`` of a wire message, or ``None`` if it carries none."""
    try:
        message = json.loads(data)
        event = event_from_wire(message["m"], message.get("p"))
        return (str(message["o"]), event) if event is not None else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


class RedisSubscriptionBus:
    """``mcp.server.subscriptions.SubscriptionBus`` over Redis pub/sub (see the module docs).

    ``url`` names the Redis server; ``audience`` the service whose replicas share
    events (the ``MCPServer`` name). Build it before the server
    (``MCPServer(name, subscriptions=bus)``) or let :func:`sessionq.workers.mcp.adopt`
    wire it.
    """

    def __init__(
        self,
        url: str,
        *,
        audience: str,
        reconnect_min: float = DEFAULT_RECONNECT_MIN,
        reconnect_max: float = DEFAULT_RECONNECT_MAX,
        publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT,
    ) -> None:
        if not audience:
            raise ValueError("RedisSubscriptionBus needs an audience (the MCPServer name)")
        self.url = url
        self.audience = audience
        self.channel = channel_for(audience)
        #: This bus's id in published messages (its own echoes are skipped).
        self.origin = uuid.uuid4().hex
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.publish_timeout = publish_timeout
        #: Times the subscription came back after a loss (each emitted :data:`GAP_EVENTS`).
        self.reconnects = 0
        self._listeners: dict[object, tuple[Listener, asyncio.AbstractEventLoop | None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._publisher: redis.asyncio.Redis | None = None
        self._reader: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Event | None = None
        self._sync: redis.Redis | None = None
        self._sync_lock = threading.Lock()
        self._down_logged = False

    @classmethod
    def from_settings(cls, settings: Settings, *, audience: str | None = None) -> RedisSubscriptionBus:
        """A bus on the settings' Redis; the audience is ``audience`` (the server name)
        unless ``SESSIONQ_REQUEST_STATE_AUDIENCE`` is set. ``ValueError`` without Redis."""
        if not settings.redis_url:
            raise ValueError("RedisSubscriptionBus needs REDIS_URL")
        name = settings.request_state_audience or audience
        if not name:
            raise ValueError("RedisSubscriptionBus needs an audience: the server name or "
                             "SESSIONQ_REQUEST_STATE_AUDIENCE")
        return cls(settings.redis_url, audience=name)

    @property
    def connected(self) -> bool:
        """True while the reader holds the subscription."""
        return self._subscribed is not None and self._subscribed.is_set()

    def health(self) -> dict[str, Any]:
        """What health can show: the channel, whether subscribed, reconnections so far."""
        return {"bus": "redis", "channel": self.channel, "connected": self.connected, "reconnects": self.reconnects}

    # -- the SubscriptionBus protocol -------------------------------------------------

    async def publish(self, event: ServerEvent) -> None:
        """Deliver ``event`` here at once, then to every other replica (never raises for Redis)."""
        payload = encode_event(event, self.origin)
        self._deliver(event)
        publisher = self._home_publisher()
        try:
            if publisher is not None:
                await publisher.publish(self.channel, payload)
            else:  # another event loop (a worker thread's): the blocking client, off this loop
                await anyio.to_thread.run_sync(self._publish_blocking, payload)
        except Exception as exc:
            self._publish_failed(exc)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Register ``listener`` (called on the event loop it subscribed from); return
        an idempotent unsubscribe. Starts the reader if it does not run."""
        token = object()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._listeners[token] = (listener, loop)
        if loop is not None:
            self._ensure_reader()

        def unsubscribe() -> None:
            self._listeners.pop(token, None)

        return unsubscribe

    # -- outside the protocol ----------------------------------------------------------

    def publish_sync(self, event: ServerEvent) -> None:
        """:meth:`publish` for code without an event loop (a Dramatiq actor, a thread)."""
        payload = encode_event(event, self.origin)
        self._deliver(event)
        try:
            self._publish_blocking(payload)
        except Exception as exc:
            self._publish_failed(exc)

    async def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> bool:
        """Start the reader on this event loop and wait (up to ``timeout`` s) until it
        is subscribed, so events published right after are not missed. True if it is;
        False if Redis did not answer (the reader keeps trying)."""
        self._ensure_reader()
        assert self._subscribed is not None
        with anyio.move_on_after(timeout):
            await self._subscribed.wait()
        return self.connected

    async def aclose(self) -> None:
        """Stop the reader and close the connections this bus opened."""
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            with contextlib.suppress(Exception):
                await publisher.aclose()
        self.close()

    def close(self) -> None:
        """Close the blocking client (the one :meth:`publish_sync` uses)."""
        with self._sync_lock:
            client, self._sync = self._sync, None
        if client is not None:
            client.close()

    # -- internals ---------------------------------------------------------------------

    def _home(self) -> asyncio.AbstractEventLoop | None:
        """The running loop if it is this bus's home loop (adopting the running loop when
        there is none yet, or the last one was closed); else ``None``."""
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop.is_closed():
            self._loop, self._publisher, self._reader, self._subscribed = loop, None, None, None
        return loop if loop is self._loop else None

    def _home_publisher(self) -> redis.asyncio.Redis | None:
        if self._home() is None:
            return None
        if self._publisher is None:
            self._publisher = redis.asyncio.Redis.from_url(
                self.url, socket_timeout=self.publish_timeout, socket_connect_timeout=self.publish_timeout,
                retry=AsyncRetry(NoBackoff(), 1))
        return self._publisher

    def _publish_blocking(self, payload: str) -> None:
        with self._sync_lock:
            if self._sync is None:
                self._sync = redis.Redis.from_url(
                    self.url, socket_timeout=self.publish_timeout, socket_connect_timeout=self.publish_timeout,
                    retry=Retry(NoBackoff(), 1))
            client = self._sync
        client.publish(self.channel, payload)

    def _publish_failed(self, exc: Exception) -> None:
        logger.warning("event bus: could not publish on %s (other replicas miss this event): %s",
                       self.channel, type(exc).__name__)

    def _deliver(self, event: ServerEvent) -> None:
        """Call every listener: directly on its own loop, through ``call_soon_threadsafe`` otherwise."""
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for listener, loop in list(self._listeners.values()):
            if loop is None or loop is current:
                _call(listener, event)
            elif not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(_call, listener, event)

    def _ensure_reader(self) -> None:
        if self._home() is None:
            return  # the reader runs on the home loop; listeners elsewhere are served through it
        if self._reader is None or self._reader.done():
            self._subscribed = asyncio.Event()
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="sessionq-event-bus")

    async def _read(self) -> None:
        """Hold the subscription; reconnect with backoff; after a gap emit :data:`GAP_EVENTS`."""
        assert self._subscribed is not None
        subscribed = self._subscribed
        delay = self.reconnect_min
        first = True
        client = redis.asyncio.Redis.from_url(self.url, socket_connect_timeout=self.publish_timeout,
                                              retry=AsyncRetry(NoBackoff(), 0))
        try:
            while True:
                pubsub = client.pubsub()
                try:
                    await pubsub.subscribe(self.channel)
                    while True:
                        message = await pubsub.get_message(timeout=_READ_TIMEOUT)
                        if message is None:
                            continue
                        if message["type"] == "subscribe":
                            # Also seen when redis-py reconnected and re-subscribed by itself.
                            subscribed.set()
                            delay = self.reconnect_min
                            if self._down_logged:
                                logger.info("event bus: subscribed to %s again", self.channel)
                                self._down_logged = False
                            if not first:
                                self.reconnects += 1
                                for event in GAP_EVENTS:
                                    self._deliver(event)
                            first = False
                        elif message["type"] == "message":
                            self._receive(message["data"])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    subscribed.clear()
                    first = False  # whatever comes back follows a gap
                    if not self._down_logged:
                        logger.warning("event bus: lost the subscription to %s (%s); reconnecting",
                                       self.channel, type(exc).__name__)
                        self._down_logged = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.reconnect_max)
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
        finally:
            subscribed.clear()
            with contextlib.suppress(Exception):
                await client.aclose()

    def _receive(self, data: bytes | str) -> None:
        decoded = decode_event(data)
        if decoded is None:
            logger.warning("event bus: ignored a message on %s that is not an event", self.channel)
            return
        origin, event = decoded
        if origin != self.origin:
            self._deliver(event)


def _call(listener: Listener, event: ServerEvent) -> None:
    try:
        listener(event)
    except Exception:  # fan-out boundary: one listener must not starve the others
        logger.exception("subscription listener raised; continuing")
