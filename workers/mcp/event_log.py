"""What the MCP event stores share: event ids, message encoding, the memory fallback
and the replay hand-over.

An event id is ``<position>.<base64url(stream id)>``: the stream is known from the id
alone, so a client resuming after its events expired gets a terminal error for its
request instead of an empty stream it would reconnect to forever. ``position`` is the
Redis entry id (``ms-seq``), ``m<ms>-<seq>`` in the memory fallback, or ``<n>-0`` for
the store's event number.

A replay loses nothing to a tool that is still emitting: every event stored until the
SDK hands the resumed stream over to live delivery is sent by the replay itself
(:class:`Replays`).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import anyio
import mcp.types
from mcp.server.streamable_http import EventCallback, EventMessage
from pydantic import TypeAdapter

from sessionq.models.sealing import PLAIN, Sealer, identity

# Events kept per MCP session (MAX_EVENTS_PER_SESSION).
DEFAULT_MAX_EVENTS = 1000
# Seconds a session's log is kept after its last event (SESSION_TTL).
DEFAULT_TTL = 3600
# Events read per page while replaying (memory stays flat on long logs).
DEFAULT_REPLAY_PAGE = 200
# Sessions the in-memory fallback keeps (least recently written are dropped first).
DEFAULT_MEMORY_SESSIONS = 10_000
# The SDK's stream id of the standalone GET stream (never a request).
GET_STREAM = "_GET_stream"
# JSON-RPC code of the terminal error sent for a request whose events are gone.
LOST_REQUEST_CODE = -32603
# Seconds a replay waits, at its end, for writes of its stream still in flight.
DEFAULT_SETTLE_TIMEOUT = 1.0

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


def encode_message(message: Any, *, compress: bool, sealer: Sealer = PLAIN, where: str = "") -> tuple[bytes, bool]:
    """The stored bytes of a message and whether they are zlib-compressed; sealed at
    rest for the record ``where`` (:func:`event_identity`) when ``sealer`` has keys."""
    raw = message.model_dump_json(by_alias=True, exclude_unset=True).encode()
    if compress:
        raw = zlib.compress(raw)
    return sealer.seal_bytes(raw, where), compress


def decode_message(raw: bytes, *, compressed: bool, sealer: Sealer = PLAIN, where: str = "") -> Any:
    """The message :func:`encode_message` stored (either form, sealed or not, whatever the
    current settings); a sealed one that does not open is a ``SealedValueError``."""
    raw = sealer.open_bytes(raw, where)
    return MESSAGE_ADAPTER.validate_json(zlib.decompress(raw) if compressed else raw)


def event_identity(session_id: str, stream_id: str) -> str:
    """What a sealed event is bound to: its MCP session and stream (the Redis entry id
    is assigned after the event is sealed)."""
    return identity("event", session_id, stream_id)


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

    def answered(self, session_id: str, streams: set[str]) -> set[str]:
        """The streams among ``streams`` whose response (or error) this log holds."""
        log = self._logs.get(session_id)
        return {e.stream_id for e in log.events if e.stream_id in streams and is_final(e.message)} if log else set()

    def open_streams(self, session_id: str) -> set[str]:
        """Request streams of the session primed here and not answered yet."""
        log = self._logs.get(session_id)
        return set(log.open) if log else set()

    def forget_open(self, session_id: str, streams: set[str]) -> None:
        """Stop counting ``streams`` as open (they were answered)."""
        log = self._logs.get(session_id)
        if log is not None:
            log.open -= streams

    def __len__(self) -> int:
        return sum(len(log.events) for log in self._logs.values())

    def _evict(self) -> None:
        deadline = time.monotonic() - self.ttl
        while self._logs:
            oldest_id, oldest = next(iter(self._logs.items()))
            if len(self._logs) <= self.max_sessions and oldest.touched >= deadline:
                return
            del self._logs[oldest_id]


#: An event as a replay handles it: ``(order, event id, message or None for priming)``.
ReplayEvent = tuple[tuple[int, int], str, Any]


class Replay:
    """One replay of a stream: the last event it sent, and its *tail* — the events the
    session's view stored on that stream while the replay ran."""

    def __init__(self, ref: EventRef, last_event_id: str, send_callback: EventCallback) -> None:
        self.stream_id = ref.stream_id
        #: Order and id of the last event sent (at first: the client's ``Last-Event-ID``).
        self.order, self.event_id = ref.order, last_event_id
        self.sent = 0
        self.tail: deque[ReplayEvent] = deque()
        self._send_callback = send_callback

    async def send(self, events: list[ReplayEvent]) -> None:
        """Send, in order, the events that follow the last one sent, skipping priming ones."""
        for order, event_id, message in sorted(events, key=lambda e: e[0]):
            if message is not None and order > self.order:
                await self._send_callback(EventMessage(message, event_id))
                self.order, self.event_id = order, event_id
                self.sent += 1

    async def catch_up(self) -> None:
        """Send what the tail caught until it is empty; nothing is awaited once it is."""
        while self.tail:
            await self.send([self.tail.popleft()])


class Replays:
    """The replays a session view runs, so that none loses an event to a tool that is
    still emitting.

    The SDK registers a resumed stream for live delivery only after
    ``replay_events_after`` returned (and, from protocol 2025-11-25, after it stored and
    sent a priming event), while its message router stores each event before it looks
    for a live stream: an event stored in between would be neither replayed nor
    delivered. So a replay opens its tail before its first read, ``store_event`` hands
    every stored event to the tails of its stream, and the replay sends what its tail
    caught until the tail is empty and returns without awaiting anything in between.
    It first waits for the writes of its stream still in flight (:meth:`writing`): a
    write the replay read in the log but whose writer had not resumed yet would
    otherwise reach the router after the hand-over and be delivered twice.
    The SDK's priming event, which follows in the same step, stores nothing: its id
    is the replay's last event (:meth:`resume_cursor`), a cursor the client may resume
    from, so no round trip to the log delays the hand-over, and a request already
    answered is not primed (marked open) again.
    """

    def __init__(self) -> None:
        self._running: dict[str, list[Replay]] = {}
        # stream id -> (task that replayed it, its cursor), until the SDK's priming event.
        self._resumed: dict[str, tuple[Any, str]] = {}
        # stream id -> writes in flight, and the event a settling replay waits on.
        self._writes: dict[str, int] = {}
        self._settled: dict[str, anyio.Event] = {}

    @contextmanager
    def writing(self, stream_id: str) -> Iterator[None]:
        """Wrap one ``store_event`` write (and its :meth:`stored` call) of ``stream_id``."""
        self._writes[stream_id] = self._writes.get(stream_id, 0) + 1
        try:
            yield
        finally:
            self._writes[stream_id] -= 1
            if not self._writes[stream_id]:
                del self._writes[stream_id]
                settled = self._settled.pop(stream_id, None)
                if settled is not None:
                    settled.set()

    async def finish(self, replay: Replay) -> None:
        """End a replay: send its tail until the tail is empty and no write of its stream
        is in flight (waiting at most :data:`DEFAULT_SETTLE_TIMEOUT` for those; past it
        an event may be delivered twice, never lost). Returns with the tail empty."""
        deadline = anyio.current_time() + DEFAULT_SETTLE_TIMEOUT
        await replay.catch_up()
        while self._writes.get(replay.stream_id) and anyio.current_time() < deadline:
            with anyio.move_on_after(deadline - anyio.current_time()):  # only the wait, never a send
                await self._settled.setdefault(replay.stream_id, anyio.Event()).wait()
            await replay.catch_up()

    @contextmanager
    def start(self, ref: EventRef, last_event_id: str, send_callback: EventCallback) -> Iterator[Replay]:
        """Run one replay of ``ref``'s stream (its tail is open while this is)."""
        replay = Replay(ref, last_event_id, send_callback)
        self._running.setdefault(replay.stream_id, []).append(replay)
        try:
            yield replay
        finally:
            rest = [r for r in self._running.get(replay.stream_id, []) if r is not replay]
            if rest:
                self._running[replay.stream_id] = rest
            else:
                self._running.pop(replay.stream_id, None)
        self._resumed[replay.stream_id] = (anyio.get_current_task().id, replay.event_id)

    def stored(self, stream_id: str, event_id: str, message: Any) -> None:
        """Hand a just-stored event to every replay of its stream."""
        if stream_id in self._resumed and self._resumed[stream_id][0] != anyio.get_current_task().id:
            del self._resumed[stream_id]  # the replay's task moved on without a priming event
        replays = self._running.get(stream_id)
        ref = parse_event_id(event_id) if replays else None
        if ref is not None:
            for replay in replays or ():
                replay.tail.append((ref.order, event_id, message))

    def resume_cursor(self, stream_id: str) -> str | None:
        """For the SDK's priming event of a stream this task has just replayed: the id
        of the replay's last event (``None`` for any other priming event)."""
        entry = self._resumed.pop(stream_id, None)
        return entry[1] if entry is not None and entry[0] == anyio.get_current_task().id else None

    async def store(
        self, stream_id: str, message: Any, append: Callable[[str, Any], Awaitable[str]]
    ) -> str:
        """Store an event through ``append`` and hand it to the replays of its stream,
        returning its id; the SDK's priming event of a stream this task has just replayed
        is not stored (its id is the replay's last event, see :meth:`resume_cursor`)."""
        cursor = self.resume_cursor(stream_id) if message is None else None
        if cursor is not None:
            return cursor
        with self.writing(stream_id):
            event_id = await append(stream_id, message)
            self.stored(stream_id, event_id, message)
        return event_id
