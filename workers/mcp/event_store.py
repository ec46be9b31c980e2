"""MCP resumability logs: the SDK's ``EventStore`` on Redis Streams or on the Store.

The SDK's stream ids are request ids (``"1"``, ``"2"``, ``"_GET_stream"``): unique only
within one transport. So every event is scoped by its MCP session: a root store
(:class:`RedisEventStore`; :class:`~sessionq.workers.mcp.store_events.StoreEventStore` for the
database) hands out one view per session with ``for_session(mcp_session_id)``, and
only views store or replay events.
:class:`~sessionq.workers.mcp.recovery.RecoverableSessionManager` gives every session its view.

An event id is ``<position>.<base64url(stream id)>``: the stream is known from the id
alone, so a client resuming after its events expired gets a terminal error for its
request instead of an empty stream it would reconnect to forever.

Redis layout per MCP session: a stream ``<prefix>:events:<id>`` whose entries are
``{s: stream id, m: JSON message (absent for priming events), z: "1" if zlib'd}`` and a
set ``<prefix>:open:<id>`` of request streams primed but not answered yet (what a
restart loses, see :meth:`RedisEventStore.fail_open_requests`). Writes are ``XADD MAXLEN
~ cap`` and ``EXPIRE`` in one round trip. ``store_event`` never raises (an exception
there would stop the SDK's message router): when Redis fails, events go to a bounded
in-process log (``mode == "memory"``) and Redis is tried again after ``retry_after``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import mcp.types
from mcp.server.streamable_http import (
    EventCallback,
    EventId,
    EventMessage,
    EventStore,
    StreamId,
)
from pydantic import TypeAdapter
from redis import asyncio as aioredis

logger = logging.getLogger(__name__)

# Key prefix of the per-session Redis keys.
DEFAULT_KEY_PREFIX = "sessionq:mcp"
# Events kept per MCP session (MAX_EVENTS_PER_SESSION).
DEFAULT_MAX_EVENTS = 1000
# Seconds a session's log is kept after its last event (SESSION_TTL).
DEFAULT_TTL = 3600
# Seconds between attempts to go back to Redis after it failed.
DEFAULT_RETRY_AFTER = 30.0
# Seconds to wait for Redis to connect or answer before falling back to memory.
DEFAULT_SOCKET_TIMEOUT = 1.0
# Events read per page while replaying (memory stays flat on long logs).
DEFAULT_REPLAY_PAGE = 200
# Sessions the in-memory fallback keeps (least recently written are dropped first).
DEFAULT_MEMORY_SESSIONS = 10_000
# The SDK's stream id of the standalone GET stream (never a request).
GET_STREAM = "_GET_stream"
# JSON-RPC code of the terminal error sent for a request whose events are gone.
LOST_REQUEST_CODE = -32603

# 1.x passes a RootModel, 2.x a plain union member; one adapter parses both.
MESSAGE_ADAPTER: TypeAdapter[Any] = (
    getattr(mcp.types, "jsonrpc_message_adapter", None) or TypeAdapter(mcp.types.JSONRPCMessage)
)
_POSITION = re.compile(r"^(m?)(\d+)-(\d+)$")


class EventRef(NamedTuple):
    """A parsed event id: where the event sits and which stream it belongs to."""

    order: tuple[int, int]
    stream_id: str
    in_memory: bool

    @property
    def position(self) -> str:
        """The Redis entry id (``ms-seq``) of the event, or its memory equivalent."""
        return f"{self.order[0]}-{self.order[1]}"


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def format_event_id(position: str, stream_id: str) -> str:
    """``<position>.<base64url(stream id)>`` (visible ASCII, safe in an SSE ``id:``)."""
    return f"{position}.{_b64(stream_id)}"


def parse_event_id(event_id: str) -> EventRef | None:
    """The :class:`EventRef` of an id this module made, or ``None`` for anything else."""
    position, _, encoded = event_id.partition(".")
    match = _POSITION.match(position)
    if not match or not encoded:
        return None
    try:
        stream_id = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return EventRef((int(match[2]), int(match[3])), stream_id, bool(match[1]))


def encode_message(message: Any, *, compress: bool) -> tuple[bytes, bool]:
    """The stored bytes of a message and whether they are zlib-compressed."""
    raw = message.model_dump_json(by_alias=True, exclude_unset=True).encode()
    return (zlib.compress(raw), True) if compress else (raw, False)


def decode_message(raw: bytes, *, compressed: bool) -> Any:
    """The message :func:`encode_message` stored (either form, whatever the current setting)."""
    return MESSAGE_ADAPTER.validate_json(zlib.decompress(raw) if compressed else raw)


def is_final(message: Any) -> bool:
    """True for a response or error: the last event of a request's stream."""
    inner = getattr(message, "root", message)
    return isinstance(inner, mcp.types.JSONRPCResponse | mcp.types.JSONRPCError)


def lost_request_error(stream_id: str, reason: str) -> Any:
    """A JSON-RPC error that ends a request stream whose response will never come
    (the client maps it onto its own request id)."""
    request_id: int | str = int(stream_id) if stream_id.lstrip("-").isdigit() else stream_id
    return MESSAGE_ADAPTER.validate_python(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": LOST_REQUEST_CODE, "message": reason}}
    )


@dataclass
class _MemoryEvent:
    order: tuple[int, int]
    stream_id: str
    message: Any


@dataclass
class _MemoryLog:
    events: deque[_MemoryEvent]
    open: set[str] = field(default_factory=set)
    touched: float = field(default_factory=time.monotonic)


class MemoryEventLog:
    """The bounded in-process log used while the real one is down (one per root store)."""

    def __init__(self, *, max_events: int, ttl: float, max_sessions: int = DEFAULT_MEMORY_SESSIONS) -> None:
        self.max_events = max_events
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._logs: OrderedDict[str, _MemoryLog] = OrderedDict()
        self._last: tuple[int, int] = (0, 0)

    def append(self, session_id: str, stream_id: str, message: Any) -> str:
        """Store one event; return its id (``m<ms>-<seq>.<stream>``, ordered like Redis ids)."""
        now_ms = int(time.time() * 1000)
        order = (now_ms, 0) if now_ms > self._last[0] else (self._last[0], self._last[1] + 1)
        self._last = order
        log = self._logs.pop(session_id, None) or _MemoryLog(deque(maxlen=self.max_events))
        log.events.append(_MemoryEvent(order, stream_id, message))
        if message is None and stream_id != GET_STREAM:
            log.open.add(stream_id)
        elif is_final(message):
            log.open.discard(stream_id)
        log.touched = time.monotonic()
        self._logs[session_id] = log
        self._evict()
        return format_event_id(f"m{order[0]}-{order[1]}", stream_id)

    def has(self, session_id: str, order: tuple[int, int]) -> bool:
        """True if the session's log still holds the event at ``order``."""
        log = self._logs.get(session_id)
        return log is not None and any(e.order == order for e in log.events)

    def after(self, session_id: str, stream_id: str, order: tuple[int, int]) -> list[_MemoryEvent]:
        """The session's events of ``stream_id`` ordered after ``order`` (priming ones too)."""
        log = self._logs.get(session_id)
        if log is None:
            return []
        return [e for e in log.events if e.stream_id == stream_id and e.order > order]

    def open_streams(self, session_id: str) -> set[str]:
        """Request streams of the session primed here and not answered yet."""
        log = self._logs.get(session_id)
        return set(log.open) if log else set()

    def __len__(self) -> int:
        return sum(len(log.events) for log in self._logs.values())

    def _evict(self) -> None:
        deadline = time.monotonic() - self.ttl
        while self._logs:
            oldest_id, oldest = next(iter(self._logs.items()))
            if len(self._logs) <= self.max_sessions and oldest.touched >= deadline:
                return
            del self._logs[oldest_id]


async def send_replayable(events: list[tuple[tuple[int, int], str, Any]], send_callback: EventCallback) -> int:
    """Send ``(order, event id, message)`` events in order, skipping priming ones; return how many."""
    sent = 0
    for _, event_id, message in sorted(events, key=lambda e: e[0]):
        if message is not None:
            await send_callback(EventMessage(message, event_id))
            sent += 1
    return sent


@dataclass
class _RedisShared:
    """What every session view of one root store shares."""

    redis: aioredis.Redis
    ttl: int
    max_events: int
    compress: bool
    key_prefix: str
    retry_after: float
    memory: MemoryEventLog
    down_until: float = 0.0
    store_script: Any = None


# One event in one command: XADD (MAXLEN ~), EXPIRE, and the open-request set update.
# KEYS = stream, open set; ARGV = max events, ttl, stream id, "add"/"rem"/"", field pairs.
# (A script instead of a pipeline: redis-py's asyncio pipeline machinery cost more per
# event than the round trip itself; see ops/bench/events_bench.py.)
_STORE_EVENT_LUA = """
local xadd = {KEYS[1], 'MAXLEN', '~', ARGV[1], '*'}
for i = 5, #ARGV do xadd[#xadd + 1] = ARGV[i] end
local id = redis.call('XADD', unpack(xadd))
redis.call('EXPIRE', KEYS[1], ARGV[2])
if ARGV[4] == 'add' then
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
elseif ARGV[4] == 'rem' then
  redis.call('SREM', KEYS[2], ARGV[3])
end
return id
"""


class RedisEventStore(EventStore):
    """MCP events on Redis Streams, one stream per MCP session, with a memory fallback.

    Build the root with a ready ``redis`` asyncio client or a ``url``; hand
    :meth:`for_session` views to the SDK (the root refuses to store events, since it
    cannot tell sessions apart).
    """

    def __init__(
        self,
        *,
        redis: aioredis.Redis | None = None,
        url: str | None = None,
        ttl: int = DEFAULT_TTL,
        max_events: int = DEFAULT_MAX_EVENTS,
        compress: bool = False,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        retry_after: float = DEFAULT_RETRY_AFTER,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    ) -> None:
        if redis is None and url is None:
            raise ValueError("RedisEventStore needs a redis client or a url")
        if ttl <= 0 or max_events <= 0:
            raise ValueError("ttl and max_events must be positive")
        client = redis or aioredis.Redis.from_url(
            url or "", socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        self._shared = _RedisShared(client, ttl, max_events, compress, key_prefix, retry_after,
                                    MemoryEventLog(max_events=max_events, ttl=ttl))
        self.session_id: str | None = None

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> RedisEventStore:
        """A root store from :class:`~sessionq.models.settings.Settings` (``redis_url``, ``session_ttl``,
        ``max_events_per_session``, ``session_compression``)."""
        options: dict[str, Any] = {
            "url": settings.redis_url,
            "ttl": settings.session_ttl,
            "max_events": settings.max_events_per_session,
            "compress": settings.session_compression,
        }
        options.update(overrides)
        return cls(**options)

    def for_session(self, session_id: str) -> RedisEventStore:
        """A view of this store that keeps the events of one MCP session."""
        view = object.__new__(RedisEventStore)
        view._shared = self._shared
        view.session_id = session_id
        return view

    @property
    def redis(self) -> aioredis.Redis:
        """The Redis client (shared by every view)."""
        return self._shared.redis

    @property
    def memory(self) -> MemoryEventLog:
        """The in-process fallback log."""
        return self._shared.memory

    @property
    def mode(self) -> str:
        """``"redis"`` while Redis answers, ``"memory"`` while events go to the fallback."""
        return "memory" if self._shared.down_until > time.monotonic() else "redis"

    def key(self, session_id: str | None = None) -> str:
        """The Redis stream holding a session's events."""
        return f"{self._shared.key_prefix}:events:{session_id or self._session()}"

    def open_key(self, session_id: str | None = None) -> str:
        """The Redis set of a session's request streams not answered yet."""
        return f"{self._shared.key_prefix}:open:{session_id or self._session()}"

    async def aclose(self) -> None:
        """Close the Redis connection pool (shared by every view)."""
        await self._shared.redis.aclose()

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        """Append an event to this session's log and return its id; never raises."""
        session_id = self._session()
        if self.mode == "redis":
            shared = self._shared
            try:
                fields: list[bytes | str] = ["s", stream_id]
                if message is not None:
                    raw, compressed = encode_message(message, compress=shared.compress)
                    fields += ["m", raw]
                    if compressed:
                        fields += ["z", "1"]
                if message is None and stream_id != GET_STREAM:
                    open_op = "add"
                elif message is not None and is_final(message):
                    open_op = "rem"
                else:
                    open_op = ""
                if shared.store_script is None:
                    shared.store_script = self.redis.register_script(_STORE_EVENT_LUA)
                entry = await shared.store_script(
                    keys=[self.key(session_id), self.open_key(session_id)],
                    args=[shared.max_events, shared.ttl, stream_id, open_op, *fields],
                )
                return format_event_id(entry.decode() if isinstance(entry, bytes) else str(entry), stream_id)
            except Exception as exc:  # noqa: BLE001 - never raise into the SDK's router (module docs)
                self._fall_back(exc)
        return self.memory.append(session_id, stream_id, message)

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        """Send this session's events that follow ``last_event_id`` on its stream, in order.

        Priming events are skipped. A request stream whose events are gone (expired,
        trimmed) gets a terminal error so the client stops waiting. ``None`` for an id
        this store did not make.
        """
        session_id = self._session()
        ref = parse_event_id(last_event_id)
        if ref is None:
            return None
        sent = 0
        memory_events = [(e.order, format_event_id(f"m{e.order[0]}-{e.order[1]}", e.stream_id), e.message)
                         for e in self.memory.after(session_id, ref.stream_id, ref.order)]
        pending: list[tuple[tuple[int, int], str, Any]] = []
        async for order, event_id, message in self._redis_after(session_id, ref):
            while memory_events and memory_events[0][0] < order:
                pending.append(memory_events.pop(0))
            pending.append((order, event_id, message))
            sent += await send_replayable(pending, send_callback)
            pending = []
        sent += await send_replayable(memory_events, send_callback)
        if sent == 0 and ref.stream_id != GET_STREAM and not await self._known(session_id, ref):
            reason = "events of this request are no longer available"
            await send_callback(EventMessage(lost_request_error(ref.stream_id, reason), None))
        return ref.stream_id

    async def fail_open_requests(self, reason: str = "request lost: the server restarted") -> int:
        """End every request stream primed but not answered with an error event (call it
        when a session is recovered after its process died: those responses never come).
        Returns how many streams were ended."""
        session_id = self._session()
        streams = self.memory.open_streams(session_id)
        try:
            streams |= {s.decode() if isinstance(s, bytes) else str(s)
                        for s in await self.redis.smembers(self.open_key(session_id))}
        except Exception as exc:  # noqa: BLE001 - never raise into the SDK's router (module docs)
            self._fall_back(exc)
        for stream_id in sorted(streams):
            await self.store_event(stream_id, lost_request_error(stream_id, reason))
        return len(streams)

    async def forget(self) -> None:
        """Delete this session's log (the client ended the session: nothing will resume)."""
        try:
            await self.redis.delete(self.key(), self.open_key())
        except Exception as exc:  # noqa: BLE001 - the TTL removes it anyway
            self._fall_back(exc)

    async def _known(self, session_id: str, ref: EventRef) -> bool:
        if ref.in_memory:
            return self.memory.has(session_id, ref.order)
        try:
            rows: Any = await self.redis.xrange(self.key(session_id), min=ref.position, max=ref.position, count=1)
        except Exception as exc:  # noqa: BLE001 - never raise into the SDK's router (module docs)
            self._fall_back(exc)
            return True
        return bool(rows)

    async def _redis_after(self, session_id: str, ref: EventRef) -> AsyncIterator[tuple[tuple[int, int], str, Any]]:
        start = ref.position
        key = self.key(session_id)
        wanted = ref.stream_id.encode()
        while True:
            try:
                rows: Any = await self.redis.xrange(key, min=f"({start}", max="+", count=DEFAULT_REPLAY_PAGE)
            except Exception as exc:  # noqa: BLE001 - never raise into the SDK's router (module docs)
                self._fall_back(exc)
                return
            for entry_id, fields in rows:
                if fields.get(b"s") == wanted and b"m" in fields:
                    position = entry_id.decode()
                    major, minor = position.split("-")
                    message = decode_message(fields[b"m"], compressed=fields.get(b"z") == b"1")
                    yield (int(major), int(minor)), format_event_id(position, ref.stream_id), message
            if len(rows) < DEFAULT_REPLAY_PAGE:
                return
            start = rows[-1][0].decode()

    def _fall_back(self, exc: BaseException) -> None:
        shared = self._shared
        if shared.down_until <= time.monotonic():
            logger.warning("Redis event store unavailable (%s: %s); keeping MCP events in memory for %.0fs",
                           type(exc).__name__, exc, shared.retry_after)
        shared.down_until = time.monotonic() + shared.retry_after

    def _session(self) -> str:
        if self.session_id is None:
            raise RuntimeError("use event_store.for_session(mcp_session_id): stream ids are only unique per session")
        return self.session_id
