"""MCP resumability logs: the SDK's ``EventStore`` on Redis Streams or on the Store.

The SDK's stream ids are request ids (``"1"``, ``"2"``, ``"_GET_stream"``): unique only
within one transport. So every event is scoped by its MCP session: a root store
(:class:`RedisEventStore`; :class:`~sessionq.workers.mcp.store_events.StoreEventStore` for the
database) hands out one view per session with ``for_session(mcp_session_id)``, and
only views store or replay events.
:class:`~sessionq.workers.mcp.recovery.RecoverableSessionManager` gives every session its view.

Event ids, message encoding, the memory fallback and the replay hand-over live in
:mod:`sessionq.workers.mcp.event_log`.

Redis layout per MCP session: a stream ``<prefix>:events:<id>`` whose entries are
``{s: stream id, m: JSON message (absent for priming events), z: "1" if zlib'd}`` and a
set ``<prefix>:open:<id>`` of request streams primed but not answered yet (what a
restart loses, see :meth:`RedisEventStore.fail_open_requests`). Writes are ``XADD MAXLEN
~ cap`` and ``EXPIRE`` in one round trip. ``store_event`` never raises (an exception
there would stop the SDK's message router): when Redis fails, events go to a bounded
in-process log (``mode == "memory"``) and Redis is tried again after ``retry_after``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from mcp.server.streamable_http import (
    EventCallback,
    EventId,
    EventMessage,
    EventStore,
    StreamId,
)
from redis import asyncio as aioredis

from sessionq.models.sealing import PLAIN, Sealer

from .event_log import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_REPLAY_PAGE,
    DEFAULT_TTL,
    GET_STREAM,
    EventRef,
    MemoryEventLog,
    Replays,
    decode_message,
    encode_message,
    event_identity,
    format_event_id,
    is_final,
    lost_request_error,
    parse_event_id,
)

logger = logging.getLogger(__name__)

# Key prefix of the per-session Redis keys.
DEFAULT_KEY_PREFIX = "sessionq:mcp"
# Seconds between attempts to go back to Redis after it failed.
DEFAULT_RETRY_AFTER = 30.0
# Seconds to wait for Redis to connect or answer before falling back to memory.
DEFAULT_SOCKET_TIMEOUT = 1.0


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
    sealer: Sealer = PLAIN
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
        sealer: Sealer = PLAIN,
    ) -> None:
        if redis is None and url is None:
            raise ValueError("RedisEventStore needs a redis client or a url")
        if ttl <= 0 or max_events <= 0:
            raise ValueError("ttl and max_events must be positive")
        client = redis or aioredis.Redis.from_url(
            url or "", socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        self._shared = _RedisShared(client, ttl, max_events, compress, key_prefix, retry_after,
                                    MemoryEventLog(max_events=max_events, ttl=ttl), sealer)
        self.session_id: str | None = None
        self._replays = Replays()

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> RedisEventStore:
        """A root store from :class:`~sessionq.models.settings.Settings` (``redis_url``, ``session_ttl``,
        ``max_events_per_session``, ``session_compression``; events sealed at rest with
        ``settings.sealer``)."""
        options: dict[str, Any] = {
            "url": settings.redis_url,
            "ttl": settings.session_ttl,
            "max_events": settings.max_events_per_session,
            "compress": settings.session_compression,
            "sealer": settings.sealer,
        }
        options.update(overrides)
        return cls(**options)

    def for_session(self, session_id: str) -> RedisEventStore:
        """A view of this store that keeps the events of one MCP session."""
        view = object.__new__(RedisEventStore)
        view._shared = self._shared
        view.session_id = session_id
        view._replays = Replays()
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
        """Append an event to this session's log and return its id; never raises.

        The SDK's priming event of a stream just replayed is not stored (see :class:`Replays`).
        """
        return await self._replays.store(stream_id, message, self._append)

    async def _append(self, stream_id: StreamId, message: Any) -> EventId:
        session_id = self._session()
        if self.mode == "redis":
            shared = self._shared
            try:
                fields: list[bytes | str] = ["s", stream_id]
                if message is not None:
                    raw, compressed = encode_message(message, compress=shared.compress, sealer=shared.sealer,
                                                     where=event_identity(session_id, stream_id))
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
            except Exception as exc:  # never raise into the SDK's router (module docs)
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
        with self._replays.start(ref, last_event_id, send_callback) as replay:
            memory_events = [(e.order, format_event_id(f"m{e.order[0]}-{e.order[1]}", e.stream_id), e.message)
                             for e in self.memory.after(session_id, ref.stream_id, ref.order)]
            async for order, event_id, message in self._redis_after(session_id, ref):
                earlier = [e for e in memory_events if e[0] < order]
                memory_events = memory_events[len(earlier):]
                await replay.send([*earlier, (order, event_id, message)])
            await replay.send(memory_events)
            await replay.catch_up()
            if replay.sent == 0 and ref.stream_id != GET_STREAM and not await self._known(session_id, ref):
                reason = "events of this request are no longer available"
                await send_callback(EventMessage(lost_request_error(ref.stream_id, reason), None))
            await self._replays.finish(replay)
        return ref.stream_id

    async def fail_open_requests(self, reason: str = "request lost: the server restarted") -> int:
        """End every request stream primed but not answered with an error event (call it
        when a session is recovered after its process died: those responses never come).
        Returns how many streams were ended.

        Only a request whose response is nowhere in the log is ended: a stream marked
        open although answered (an older version primed resumed streams, or the
        priming and the response went to different logs while Redis failed) would
        otherwise replay two responses for one request id.
        """
        session_id = self._session()
        streams = self.memory.open_streams(session_id)
        try:
            streams |= {s.decode() if isinstance(s, bytes) else str(s)
                        for s in await self.redis.smembers(self.open_key(session_id))}
        except Exception as exc:  # never raise into the SDK's router (module docs)
            self._fall_back(exc)
        answered = await self._answered(session_id, streams) if streams else set()
        for stream_id in sorted(streams - answered):
            await self.store_event(stream_id, lost_request_error(stream_id, reason))
        if answered:
            self.memory.forget_open(session_id, answered)
            try:
                await self.redis.srem(self.open_key(session_id), *answered)
            except Exception as exc:  # the TTL removes it anyway
                self._fall_back(exc)
        return len(streams - answered)

    async def forget(self) -> None:
        """Delete this session's log (the client ended the session: nothing will resume)."""
        try:
            await self.redis.delete(self.key(), self.open_key())
        except Exception as exc:  # the TTL removes it anyway
            self._fall_back(exc)

    async def _answered(self, session_id: str, streams: set[str]) -> set[str]:
        """The streams among ``streams`` whose response (or error) is in the log."""
        answered = self.memory.answered(session_id, streams)
        wanted = {s.encode() for s in streams}
        start = "-"
        while True:
            try:
                rows: Any = await self.redis.xrange(self.key(session_id), min=start, max="+", count=DEFAULT_REPLAY_PAGE)
            except Exception as exc:  # never raise into the SDK's router (module docs)
                self._fall_back(exc)
                return answered
            for _, fields in rows:
                stream = fields.get(b"s")
                if (stream in wanted and b"m" in fields and stream.decode() not in answered
                        and is_final(decode_message(fields[b"m"], compressed=fields.get(b"z") == b"1",
                                                    sealer=self._shared.sealer,
                                                    where=event_identity(session_id, stream.decode())))):
                    answered.add(stream.decode())
            if len(rows) < DEFAULT_REPLAY_PAGE:
                return answered
            start = "(" + rows[-1][0].decode()

    async def _known(self, session_id: str, ref: EventRef) -> bool:
        if ref.in_memory:
            return self.memory.has(session_id, ref.order)
        try:
            rows: Any = await self.redis.xrange(self.key(session_id), min=ref.position, max=ref.position, count=1)
        except Exception as exc:  # never raise into the SDK's router (module docs)
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
            except Exception as exc:  # never raise into the SDK's router (module docs)
                self._fall_back(exc)
                return
            for entry_id, fields in rows:
                if fields.get(b"s") == wanted and b"m" in fields:
                    position = entry_id.decode()
                    major, minor = position.split("-")
                    message = decode_message(fields[b"m"], compressed=fields.get(b"z") == b"1",
                                             sealer=self._shared.sealer,
                                             where=event_identity(session_id, ref.stream_id))
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
