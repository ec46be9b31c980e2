"""MCP resumability logs in the sessionq store (SQL or MongoDB) through the Store contract.

For deployments that want the log in the database rather than on Redis; same event
ids, replay (losing nothing to a tool still emitting, see
:class:`~sessionq.workers.mcp.event_store.Replays`) and memory fallback as
:mod:`sessionq.workers.mcp.event_store`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio
from mcp.server.streamable_http import (
    EventCallback,
    EventId,
    EventMessage,
    EventStore,
    StreamId,
)

from sessionq.models.store import Store

from .event_log import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_REPLAY_PAGE,
    DEFAULT_TTL,
    GET_STREAM,
    MESSAGE_ADAPTER,
    EventRef,
    MemoryEventLog,
    Replay,
    Replays,
    encode_message,
    format_event_id,
    lost_request_error,
    parse_event_id,
)

logger = logging.getLogger(__name__)


class StoreEventStore(EventStore):
    """MCP events in the database through the Store contract (``append_event`` /
    ``events_after``); the scheduler's event-trim sweep bounds the log. Falls back to
    memory, like :class:`RedisEventStore`, while the store fails."""

    def __init__(self, store: Store, *, max_events: int = DEFAULT_MAX_EVENTS, ttl: int = DEFAULT_TTL) -> None:
        self.store = store
        self.memory = MemoryEventLog(max_events=max_events, ttl=ttl)
        self.session_id: str | None = None
        self._health = {"failing": False}
        self._replays = Replays()

    def for_session(self, session_id: str) -> StoreEventStore:
        """A view of this store that keeps the events of one MCP session."""
        view = object.__new__(StoreEventStore)
        view.__dict__.update(self.__dict__)
        view.session_id = session_id
        view._replays = Replays()
        return view

    @property
    def mode(self) -> str:
        """``"store"``, or ``"memory"`` after the last write failed."""
        return "memory" if self._health["failing"] else "store"

    async def store_event(self, stream_id: StreamId, message: Any) -> EventId:
        """Append an event to this session's log (in a worker thread); never raises.

        The SDK's priming event of a stream just replayed is not stored (see
        :class:`~sessionq.workers.mcp.event_store.Replays`).
        """
        return await self._replays.store(stream_id, message, self._append)

    async def _append(self, stream_id: StreamId, message: Any) -> EventId:
        session_id = self._session()
        try:
            payload = None if message is None else json.loads(encode_message(message, compress=False)[0])
            event = await anyio.to_thread.run_sync(
                self.store.append_event, session_id, stream_id, payload, datetime.now(UTC)
            )
            self._health["failing"] = False
            return format_event_id(f"{event.event_id}-0", stream_id)
        except Exception as exc:  # never raise into the SDK's router (module docs)
            if not self._health["failing"]:
                logger.warning("store event log unavailable (%s: %s); keeping MCP events in memory",
                               type(exc).__name__, exc)
            self._health["failing"] = True
            return self.memory.append(session_id, stream_id, message)

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        """Send this session's events that follow ``last_event_id`` on its stream, page by page."""
        session_id = self._session()
        ref = parse_event_id(last_event_id)
        if ref is None:
            return None
        with self._replays.start(ref, last_event_id, send_callback) as replay:
            if ref.in_memory:
                await replay.send([(e.order, format_event_id(f"m{e.order[0]}-{e.order[1]}", e.stream_id), e.message)
                                   for e in self.memory.after(session_id, ref.stream_id, ref.order)])
                await self._replays.finish(replay)
                return ref.stream_id
            known = await self._replay_stored(session_id, ref, replay)
            await replay.catch_up()
            if not known and ref.stream_id != GET_STREAM:
                reason = "events of this request are no longer available"
                await send_callback(EventMessage(lost_request_error(ref.stream_id, reason), None))
            await self._replays.finish(replay)
        return ref.stream_id

    async def _replay_stored(self, session_id: str, ref: EventRef, replay: Replay) -> bool:
        """Send the stored events after ``ref``, page by page; return whether ``ref`` is known."""
        cursor, known = str(ref.order[0]), False
        while True:
            try:
                found = await anyio.to_thread.run_sync(
                    partial(self.store.events_after, session_id, cursor, limit=DEFAULT_REPLAY_PAGE)
                )
            except Exception as exc:  # never raise into the SDK's router (module docs)
                logger.warning("cannot replay MCP events: %s", exc)
                return True
            if found is None:
                return known
            known = True
            _, page = found
            await replay.send([
                ((int(event.event_id), 0), format_event_id(f"{event.event_id}-0", ref.stream_id),
                 None if event.message is None else MESSAGE_ADAPTER.validate_python(event.message))
                for event in page
            ])
            if len(page) < DEFAULT_REPLAY_PAGE:
                return known
            cursor = page[-1].event_id

    def _session(self) -> str:
        if self.session_id is None:
            raise RuntimeError("use event_store.for_session(mcp_session_id): stream ids are only unique per session")
        return self.session_id
