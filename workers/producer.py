"""The producer API: how an MCP server fires jobs without waiting for the database.

>>> from workers.producer import Producer
>>> producer = Producer()                      # REDIS_URL etc. from the environment
>>> producer.save_session({"session_id": "s1", "model": "m", "messages": [...]})
'5d1c...'                                       # the Dramatiq message id
>>> producer.heartbeat("mcp-session-id", buffered=True)   # microseconds, pipelined
>>> producer.close()                            # flush the buffer on shutdown

* Every payload is validated before it is enqueued (``workers.payloads``): a bad one
  raises :class:`~workers.errors.InvalidPayload` here and is never sent.
* ``send`` pushes the job to Redis and returns its message id.
* ``send_nowait`` (``buffered=True`` on the helpers) appends to an in-memory buffer and
  returns; a background thread pipelines the buffer to Redis, a burst at a time (it
  lets jobs gather for ``DEFAULT_LINGER``, 2 ms). ``flush``/``close`` wait for it
  (``close`` is also registered with ``atexit``).
* The outbox: when Redis is unreachable, jobs are spooled to a SQLite file
  (``settings.outbox_path``) and forwarded, oldest first, once Redis answers again —
  also by the next producer started on the same file after a restart.
* With no queue URL (embedded mode) jobs go to the in-process broker.

Jobs are written to Redis exactly as docs/wire-contract.md describes (HSET + RPUSH,
atomically), the same keys a non-Python producer writes; the Python producer does the
two writes in one Lua script call per queue (one command, one reply), also for a whole
buffered batch, packed by hand and sent on a connection of its own (see ``_push``).

The hot jobs (save, append, heartbeat) are validated by a plain path that accepts only
plainly valid payloads and returns what ``payloads.normalize`` would; everything else
goes through ``normalize`` (see ``_plain_save``).
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import json
import logging
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import redis

from models import AgentState, ChatMessage, ChatSession, FileRecord, Settings, TransportSession, utcnow
from models.errors import ValidationError
from models.records import MAX_MODEL_LENGTH, MESSAGE_ROLES, SESSION_STATUSES
from models.validation import DEFAULT_MAX_CONTENT_BYTES, DEFAULT_MAX_ID_LENGTH, check_datetime, check_json_object

from . import payloads
from .errors import InvalidPayload, ProducerError
from .outbox import Outbox

logger = logging.getLogger(__name__)

# Seconds to wait for a Redis connection before spooling to the outbox instead.
DEFAULT_CONNECT_TIMEOUT = 1.0
# Seconds to wait for a Redis reply.
DEFAULT_SOCKET_TIMEOUT = 5.0
# Jobs per pipelined round trip of the background flusher.
DEFAULT_PIPELINE_BATCH = 1000
# Seconds the flusher lets buffered jobs gather before a round trip (cut short by flush
# and close): one wake-up and one push per burst, not per job, so that a busy caller
# neither pays for waking the flusher nor waits for the GIL behind it on every call.
DEFAULT_LINGER = 0.002
# Seconds between attempts to forward the outbox while Redis is down (doubling, capped).
DEFAULT_RETRY_INTERVAL = 0.5
DEFAULT_MAX_RETRY_INTERVAL = 5.0
# Key prefix of Dramatiq's keys (the broker's namespace).
DEFAULT_NAMESPACE = "dramatiq"
# Largest encoded job accepted (bigger sessions: send the messages in several appends).
DEFAULT_MAX_JOB_BYTES = 16 * 1024 * 1024

_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)


# Encoded messages end with their (empty) options, so that the Redis id can be
# appended to the bytes at push time instead of decoding and re-encoding the JSON.
_OPTIONS_TAIL = b'"options":{}}'
# Atomic HSET + RPUSH of (redis id, message) pairs: KEYS = hash, list; ARGV = id, body, ...
# (the same writes as the MULTI of docs/wire-contract.md, in one command and one reply).
_ENQUEUE_LUA = """
for i = 1, #ARGV, 2 do
  redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('rpush', KEYS[2], ARGV[i])
end
return #ARGV / 2
"""
_ENQUEUE_SHA = hashlib.sha1(_ENQUEUE_LUA.encode()).hexdigest()


# The message encoder: ``json.dumps(message, separators=(",", ":"))``, with the C
# encoder built once (no circular-reference markers: a validated payload is a tree).
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_MAKE_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODER = (
    None if _MAKE_C_ENCODER is None
    else _MAKE_C_ENCODER(None, None, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
)


def _encode(message: Any) -> str:
    return _ENCODER.encode(message) if _C_ENCODER is None else "".join(_C_ENCODER(message, 0))


# Random bytes for UUIDs, drawn from os.urandom a block at a time (one system call per
# 256 ids); reset in a forked child so that parent and child never share ids.
_RANDOM_BLOCK = 16 * 256


class _RandomBlock:
    lock = threading.Lock()
    block = b""
    at = 0

    #: Ids made ahead by the flusher between its round trips (taken by any thread).
    ready: collections.deque[str] = collections.deque()

    @classmethod
    def reset(cls) -> None:
        cls.lock, cls.block, cls.at = threading.Lock(), b"", 0
        cls.ready.clear()


os.register_at_fork(after_in_child=_RandomBlock.reset)

# Bodies up to this size are copied into the packed command; bigger ones are sent as is.
_PACK_COPY_LIMIT = 16 * 1024


# Ids the flusher keeps made ahead, and makes at most per round.
_READY_IDS, _READY_IDS_STEP = 256, 32


def _uuid4() -> str:
    """A fresh UUID 4 string: one made ahead by the flusher, else a new one."""
    try:
        return _RandomBlock.ready.popleft()
    except IndexError:
        return _new_uuid4()


def _make_ids_ahead() -> None:
    """Top up the ids made ahead (a few at a time: the flusher holds the GIL meanwhile)."""
    ready = _RandomBlock.ready
    for _ in range(min(_READY_IDS - len(ready), _READY_IDS_STEP)):
        ready.append(_new_uuid4())


def _new_uuid4() -> str:
    """Like ``str(uuid.uuid4())`` (os.urandom bytes, version and variant bits set),
    without building a :class:`uuid.UUID` or a system call per id."""
    with _RandomBlock.lock:
        at = _RandomBlock.at
        if at >= len(_RandomBlock.block):
            _RandomBlock.block, at = os.urandom(_RANDOM_BLOCK), 0
        _RandomBlock.at = at + 16
        raw = bytearray(_RandomBlock.block[at:at + 16])
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _bulk(data: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


# -- the plain path: common, plainly valid payloads canonicalised without records ----------
#
# ``payloads.normalize`` builds the records (which validate) and turns them back into
# JSON; for the hot jobs the producer first tries the functions below, which accept
# only payloads made of exact built-in types that pass every check with room to spare,
# and return exactly what ``normalize`` returns for them (tests/test_producer_plain.py
# compares both). Anything else -- a bad payload included -- returns None and goes
# through ``normalize``, which raises the specific error. Only fields ``payloads``
# still accepts are handled here. One difference, on purpose: a job's defaulted
# timestamps ("now") are one clock reading, not one per record microseconds apart.
_MISSING: Any = object()
_PLAIN_SAVE_FIELDS = payloads._SESSION_FIELDS & {
    "session_id", "model", "created_at", "updated_at", "status", "metadata", "messages"}
_PLAIN_MESSAGE_FIELDS = payloads._MESSAGE_FIELDS & {
    "message_id", "session_id", "role", "content", "created_at", "metadata"}
_PLAIN_APPEND_FIELDS = {"session_id", "messages"}
_PLAIN_EVENT_FIELDS = {"mcp_session_id", "at"}


def _plain_id(value: Any) -> bool:
    return (type(value) is str and 0 < len(value) <= DEFAULT_MAX_ID_LENGTH and value.isascii()
            and value.isprintable() and " " not in value)


def _plain_text(value: Any, max_bytes: int) -> bool:
    return type(value) is str and len(value) <= max_bytes and value.isascii() and "\x00" not in value


class _Clock:
    #: (a whole second since the epoch, its ISO 8601 text up to the seconds).
    second: tuple[int, str] = (-1, "")


def _now_iso() -> str:
    """``utcnow().isoformat()``, the date and time formatted once a second."""
    ns = time.time_ns()
    second, micro = ns // 1_000_000_000, ns // 1000 % 1_000_000  # datetime.now floors too
    cached, text = _Clock.second
    if cached != second:
        text = datetime.fromtimestamp(second, timezone.utc).isoformat()[:-6]  # without +00:00
        _Clock.second = (second, text)
    return f"{text}.{micro:06d}+00:00" if micro else f"{text}+00:00"  # isoformat drops .000000


def _plain_time(value: Any, now_iso: str) -> datetime | None:
    try:
        at = check_datetime("at", value)
    except ValidationError:
        return None
    return None if at > datetime.fromisoformat(now_iso) + payloads.DEFAULT_MAX_FUTURE_SKEW else at


def _plain_metadata(value: Any) -> dict[str, Any] | None:
    try:
        return check_json_object("metadata", value)
    except ValidationError:
        return None


def _plain_messages(session_id: str, items: Any, now_iso: str) -> list[dict[str, Any]] | None:
    if type(items) is not list or len(items) > payloads.DEFAULT_MAX_MESSAGES_PER_JOB:
        return None
    out: list[dict[str, Any]] = []
    for item in items:
        if type(item) is not dict or not item.keys() <= _PLAIN_MESSAGE_FIELDS:
            return None
        message_id, role, content = item.get("message_id"), item.get("role"), item.get("content")
        if (not _plain_id(message_id) or type(role) is not str or role not in MESSAGE_ROLES
                or not _plain_text(content, DEFAULT_MAX_CONTENT_BYTES)
                or (item.get("session_id", session_id) is not session_id
                    and (type(item["session_id"]) is not str or item["session_id"] != session_id))):
            return None
        created = item.get("created_at", _MISSING)
        if created is _MISSING:
            created_iso = now_iso
        else:
            created = _plain_time(created, now_iso)
            if created is None:
                return None
            created_iso = created.isoformat()
        metadata = _plain_metadata(item.get("metadata"))
        if metadata is None:
            return None
        message = {"message_id": message_id, "role": role, "content": content, "created_at": created_iso}
        if metadata:
            message["metadata"] = metadata
        out.append(message)
    return out


def _plain_save(payload: Any) -> dict[str, Any] | None:
    if type(payload) is not dict or not payload.keys() <= _PLAIN_SAVE_FIELDS:
        return None
    session_id: str = payload.get("session_id")  # type: ignore[assignment]  # checked next
    model, status = payload.get("model", ""), payload.get("status", "active")
    if (not _plain_id(session_id) or not _plain_text(model, MAX_MODEL_LENGTH)
            or type(status) is not str or status not in SESSION_STATUSES):
        return None
    now_iso = _now_iso()
    created = payload.get("created_at", _MISSING)
    if created is _MISSING:
        created_iso = now_iso
    else:
        created = _plain_time(created, now_iso)
        if created is None:
            return None
        created_iso = created.isoformat()
    updated = payload.get("updated_at")
    if updated is None:
        updated_iso = created_iso
    else:
        updated = _plain_time(updated, now_iso)
        if updated is None or updated < datetime.fromisoformat(created_iso):
            return None
        updated_iso = updated.isoformat()
    metadata = _plain_metadata(payload.get("metadata"))
    messages = _plain_messages(session_id, payload.get("messages", []), now_iso)
    if metadata is None or messages is None:
        return None
    return {"session_id": session_id, "model": model, "created_at": created_iso,
            "updated_at": updated_iso, "status": status, "metadata": metadata, "messages": messages}


def _plain_append(payload: Any) -> dict[str, Any] | None:
    if type(payload) is not dict or payload.keys() != _PLAIN_APPEND_FIELDS or not _plain_id(payload["session_id"]):
        return None
    messages = _plain_messages(payload["session_id"], payload["messages"], _now_iso())
    return None if messages is None else {"session_id": payload["session_id"], "messages": messages}


def _plain_heartbeat(payload: Any) -> dict[str, Any] | None:
    if type(payload) is not dict or payload.keys() != _PLAIN_EVENT_FIELDS or not _plain_id(payload["mcp_session_id"]):
        return None
    at = _plain_time(payload["at"], _now_iso())
    return None if at is None else {"mcp_session_id": payload["mcp_session_id"], "at": at.isoformat()}


_PLAIN = {"save_session": _plain_save, "append_messages": _plain_append, "heartbeat": _plain_heartbeat}


class _Job(NamedTuple):
    """A validated job: its queue, message id and message JSON (no Redis id), encoded
    once -- by the caller, or for a buffered plain job by the flusher (``deferred``)."""

    queue_name: str
    message_id: str
    body: bytes
    #: (actor name, canonical argument, timestamp in ms) of a job not encoded yet.
    deferred: tuple[str, Any, int] | None = None

    def encoded(self) -> bytes:
        """The message JSON."""
        if self.deferred is None:
            return self.body
        actor_name, arg, timestamp = self.deferred
        return _message_text(actor_name, arg, self.message_id, timestamp).encode("ascii")


_NOT_CONTAINERS = frozenset({str, int, float, bool, type(None)})
# Bytes of JSON per character of a string at most (an astral character: two \uXXXX).
_JSON_BYTES_PER_CHAR = 12


def _flat_bound(document: dict[str, Any]) -> int:
    """An upper bound of the JSON size of a checked document whose values are all
    scalars (-1 if one is a container, which the caller could still change)."""
    size = 2
    for key, value in document.items():
        kind = type(value)
        if kind not in _NOT_CONTAINERS:
            return -1
        size += _JSON_BYTES_PER_CHAR * (len(key) + (len(value) if kind is str else 3)) + 8
    return size


def _deferred_bound(actor_name: str, arg: dict[str, Any]) -> int:
    """An upper bound of the encoded size of a plain path's argument, or -1 if encoding
    it later could see the caller's changes (nested containers in metadata).

    Every container of a plain argument is the plain path's own, except the values of
    the metadata copies: with scalar values only, the argument is a snapshot.
    """
    size = 256
    for message in arg.get("messages", ()):
        meta = _flat_bound(message["metadata"]) if "metadata" in message else 0
        if meta < 0:
            return -1
        size += meta + _JSON_BYTES_PER_CHAR * (len(message["message_id"]) + len(message["content"])) + 128
    if "metadata" in arg:
        meta = _flat_bound(arg["metadata"])
        if meta < 0:
            return -1
        size += meta
    for key in ("session_id", "model", "mcp_session_id"):
        if key in arg:
            size += _JSON_BYTES_PER_CHAR * len(arg[key])
    return size


# Per actor: the encoded message up to its argument. Messages are encoded in the key
# order queue_name, actor_name, args, kwargs, message_id, message_timestamp, options.
_ENVELOPE_HEADS = {
    actor: _encode({"queue_name": queue, "actor_name": actor})[:-1] + ',"args":['
    for actor, queue in payloads.ACTOR_QUEUES.items()
}


def _message_text(actor_name: str, arg: Any, message_id: str, timestamp: int) -> str:
    """The encoded message (only the argument goes through the encoder: the envelope is
    the same for every job but its id and timestamp)."""
    return (f'{_ENVELOPE_HEADS[actor_name]}{_encode(arg)}],"kwargs":{{}},"message_id":"{message_id}",'
            f'"message_timestamp":{timestamp},"options":{{}}}}')


def _encoded_message(actor_name: str, arg: Any) -> tuple[str, str]:
    """A new message id and the encoded message."""
    message_id = _uuid4()
    return message_id, _message_text(actor_name, arg, message_id, int(time.time() * 1000))


def _with_redis_id(data: bytes, redis_id: str) -> bytes:
    """The message JSON with ``options.redis_message_id`` set (fast path for our own encoding)."""
    if data.endswith(_OPTIONS_TAIL):
        return data[:-3] + b'{"redis_message_id":"' + redis_id.encode() + b'"}}'
    message = json.loads(data)  # spooled by an older version: any key order
    message.setdefault("options", {})["redis_message_id"] = redis_id
    return json.dumps(message, separators=(",", ":")).encode()


class Producer:
    """Validate and enqueue jobs; see the module docs. Thread-safe."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        url: str | None = None,
        outbox_path: str | Path | None = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self.settings = settings or Settings.load()
        self.url = url or self.settings.queue_url
        self.namespace = namespace
        self.outbox_path = Path(outbox_path or self.settings.outbox_path)
        self._outbox: Outbox | None = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._buffer: collections.deque[_Job] = collections.deque()
        self._inflight = 0
        # True while the flusher waits for an empty buffer to fill (it needs a notify);
        # _flush_waiters counts flush() calls waiting (the flusher then does not linger).
        self._flusher_idle = False
        self._flush_waiters = 0
        self._flusher: threading.Thread | None = None
        self._forwarder: threading.Thread | None = None
        self._closed = False
        self._down = False
        # Why the last buffered batch could be neither pushed nor spooled (cleared on success).
        self._failure: BaseException | None = None
        self._broker: Any = None
        self._client: redis.Redis | None = None
        if self.url is None or not self.url.startswith(("redis://", "rediss://", "unix://")):
            from .broker import build_broker, get_broker, get_settings

            self._broker = get_broker() if self.url == get_settings().queue_url else build_broker(self.settings)
        else:
            self._client = redis.Redis.from_url(
                self.url, socket_connect_timeout=DEFAULT_CONNECT_TIMEOUT, socket_timeout=DEFAULT_SOCKET_TIMEOUT
            )
            # Per queue: the packed EVALSHA command up to its first job (see _enqueue_on).
            self._heads: dict[str, bytes] = {}
        # The producer's own connection (pushes take the pool's only while it is busy).
        self._conn: Any = None
        self._conn_pid = 0
        self._conn_lock = threading.Lock()
        # True once the connection's current socket carried a push.
        self._conn_proven = False
        if self.outbox_path.exists() and self._get_outbox().count():
            self._down = True
            self._start_forwarder()
        atexit.register(self.close)

    # -- sending ---------------------------------------------------------------

    def send(self, actor_name: str, *args: Any) -> str:
        """Validate and enqueue one job now; return its message id.

        If Redis is unreachable the job is spooled to the outbox (still accepted).
        Raises :class:`InvalidPayload` for a bad payload.
        """
        job = self._build(actor_name, args)
        self._deliver([job])
        return job.message_id

    def send_nowait(self, actor_name: str, *args: Any) -> str:
        """Validate a job and buffer it for the background flusher; return its message id.

        Raises :class:`ProducerError` while buffered jobs can be neither pushed nor
        spooled (the buffer would only grow): the job is not accepted.
        """
        job = self._build(actor_name, args, buffered=True)
        with self._cond:
            if self._closed:
                raise ProducerError("producer is closed")
            if self._failure is not None:
                raise ProducerError(
                    f"job not accepted: {len(self._buffer)} buffered job(s) cannot be delivered: {self._failure}"
                )
            self._buffer.append(job)
            if self._flusher_idle:  # otherwise the flusher comes back for the buffer by itself
                self._flusher_idle = False
                self._cond.notify_all()
        if self._flusher is None:
            self._start_flusher()
        return job.message_id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every buffered job is in Redis or the outbox; False on timeout.

        Raises :class:`ProducerError` if buffered jobs can be neither pushed nor spooled
        (they stay buffered; :meth:`close` tries to spool them once more).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()  # a lingering flusher goes at once
            try:
                while self._buffer or self._inflight:
                    if self._failure is not None and not self._inflight:
                        raise ProducerError(f"{len(self._buffer)} buffered job(s) not delivered: {self._failure}")
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
            finally:
                self._flush_waiters -= 1
        return True

    def pending(self) -> int:
        """Jobs accepted but not yet in the broker (buffered plus spooled)."""
        spooled = self._get_outbox().count() if self.outbox_path.exists() else 0
        with self._lock:
            return len(self._buffer) + self._inflight + spooled

    def forward_outbox(self) -> int:
        """Forward spooled jobs now; return how many (raises if Redis is still down)."""
        if not self.outbox_path.exists():
            return 0
        count = self._get_outbox().forward(self._push)
        self._down = False
        return count

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush the buffer (spooling what Redis does not take) and stop background threads.

        Raises :class:`ProducerError` if accepted jobs can be neither pushed nor spooled.
        """
        if self._closed:
            return
        try:
            self.flush(timeout)
        except ProducerError:
            pass  # the leftover is spooled below, which says why if it still cannot be
        with self._cond:
            self._closed = True
            leftover = list(self._buffer)
            self._buffer.clear()
            self._cond.notify_all()
        try:
            if leftover:
                try:
                    self._spool(leftover)
                except ProducerError as exc:
                    raise ProducerError(f"{len(leftover)} accepted job(s) not delivered: {exc}") from exc
        finally:
            if self._client is not None:
                # A push in progress (the outbox forwarder retrying) drops it when done.
                if self._conn_lock.acquire(blocking=False):
                    try:
                        self._drop_connection()
                    finally:
                        self._conn_lock.release()
                self._client.close()

    # -- job helpers -------------------------------------------------------------

    def _send(self, buffered: bool, actor_name: str, arg: Any) -> str:
        return self.send_nowait(actor_name, arg) if buffered else self.send(actor_name, arg)

    def save_session(
        self,
        session: ChatSession | Mapping[str, Any],
        messages: Sequence[ChatMessage | Mapping[str, Any]] = (),
        *,
        buffered: bool = False,
    ) -> str:
        """Save a session (record or export-shaped dict) with messages to insert if new."""
        if isinstance(session, ChatSession):
            payload: Any = payloads.save_payload(session)
        else:
            payload = dict(session) if messages else session  # validation never changes the caller's dict
        if messages:
            payload["messages"] = [payloads.message_payload(m) if isinstance(m, ChatMessage) else m for m in messages]
        return self._send(buffered, "save_session", payload)

    def append_messages(
        self, session_id: str, messages: Sequence[ChatMessage | Mapping[str, Any]], *, buffered: bool = False
    ) -> str:
        """Append messages (skipping ids already stored) to a session."""
        items = [payloads.message_payload(m) if isinstance(m, ChatMessage) else m for m in messages]
        return self._send(buffered, "append_messages", {"session_id": session_id, "messages": items})

    def heartbeat(self, mcp_session_id: str, at: datetime | None = None, *, buffered: bool = False) -> str:
        """Record a transport session's heartbeat at ``at`` (default: now)."""
        return self._send(buffered, "heartbeat", {"mcp_session_id": mcp_session_id, "at": at or utcnow()})

    def mark_disconnected(
        self,
        mcp_session_id: str,
        at: datetime | None = None,
        *,
        grace: timedelta | None = None,
        buffered: bool = False,
    ) -> str:
        """Mark a transport session disconnected at ``at`` (default: now) with a recovery
        window of ``grace`` (default: the worker's ``grace_minutes``; 0 closes it)."""
        payload: dict[str, Any] = {"mcp_session_id": mcp_session_id, "at": at or utcnow()}
        if grace is not None:
            payload["grace_seconds"] = grace.total_seconds()
        return self._send(buffered, "mark_disconnected", payload)

    def register_transport(self, session: TransportSession | Mapping[str, Any], *, buffered: bool = False) -> str:
        """Insert a transport session or update its saved state."""
        return self._send(buffered, "register_transport", session.to_json() if isinstance(session, TransportSession) else session)

    def archive(self, session_id: str, at: datetime | None = None, *, buffered: bool = False) -> str:
        """Archive a session."""
        return self._send(buffered, "archive_session", {"session_id": session_id, "at": at or utcnow()})

    def put_agent_state(self, state: AgentState | Mapping[str, Any], *, buffered: bool = False) -> str:
        """Upsert one agent-state key."""
        return self._send(buffered, "put_agent_state", state.to_json() if isinstance(state, AgentState) else state)

    def save_file(self, record: FileRecord | Mapping[str, Any], *, buffered: bool = False) -> str:
        """Insert or replace a file record."""
        return self._send(buffered, "save_file", record.to_json() if isinstance(record, FileRecord) else record)

    def export(self, session_id: str, format: str = "json", path: str | None = None) -> str:
        """Export a session to a file under the workers' export dir (``path`` relative to it)."""
        payload: dict[str, Any] = {"session_id": session_id, "format": format}
        if path is not None:
            payload["path"] = path
        return self.send("export_session", payload)

    def run_sweep(self, kind: str) -> str:
        """Run one sweep (a kind from ``scheduler.sweeps.SWEEP_KINDS``) now."""
        return self.send("run_sweep", kind)

    # -- internals -----------------------------------------------------------------

    def _build(self, actor_name: str, args: Sequence[Any], *, buffered: bool = False) -> _Job:
        """Validate and canonicalise a job and encode it (raises InvalidPayload).

        A buffered job that took the plain path and is a snapshot of the caller's
        payload (see :func:`_deferred_bound`), well under the size limit, is encoded
        by the flusher instead: its encoding cannot fail, and the caller returns sooner.
        """
        plain = _PLAIN.get(actor_name)
        arg = plain(args[0]) if plain is not None and len(args) == 1 else None
        if arg is not None and buffered and 0 <= _deferred_bound(actor_name, arg) <= DEFAULT_MAX_JOB_BYTES:
            return _Job(payloads.ACTOR_QUEUES[actor_name], _uuid4(), b"", (actor_name, arg, int(time.time() * 1000)))
        if arg is None:
            arg = payloads.normalize(actor_name, args, self.settings.export_dir)
        try:
            # ASCII-only JSON (non-ASCII escaped), so its length in bytes is its length.
            message_id, text = _encoded_message(actor_name, arg)
            body = text.encode("ascii")
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidPayload(f"{actor_name} payload is not JSON-serialisable: {exc}") from None
        if len(body) > DEFAULT_MAX_JOB_BYTES:
            raise InvalidPayload(
                f"{actor_name} job is {len(body)} bytes; the limit is {DEFAULT_MAX_JOB_BYTES} (split it into appends)"
            )
        return _Job(payloads.ACTOR_QUEUES[actor_name], message_id, body)

    def _deliver(self, jobs: list[_Job]) -> None:
        if self._down:
            self._spool(jobs)
            return
        try:
            self._push([(job.queue_name, job.encoded()) for job in jobs])
        except _REDIS_DOWN as exc:
            logger.warning("broker unreachable (%s); spooling %d job(s) to %s", exc, len(jobs), self.outbox_path)
            self._down = True
            self._spool(jobs)

    def _push(self, items: list[tuple[str, bytes]]) -> None:
        """Enqueue encoded messages (without a Redis id yet) on their queues: per queue,
        one atomic script call (HSET + RPUSH of every job, as the wire contract says).

        The script calls of all queues are written in one send and their replies read
        back on the producer's own connection (a pooled one while another thread holds
        it), without redis-py's command machinery. Connection errors are retried as the
        client's ``retry`` policy says (and once more when the server dropped a proven
        connection), every attempt with fresh Redis ids (a push whose reply was lost
        may have landed: its retry must not push the same id twice).
        """
        if self._broker is not None:
            from dramatiq import Message

            for _, data in items:
                self._broker.enqueue(Message(**json.loads(data)))
            return
        by_queue: dict[str, list[bytes]] = {}
        for queue, data in items:
            by_queue.setdefault(queue, []).append(data)
        assert self._client is not None
        pool = self._client.connection_pool
        if self._conn_lock.acquire(blocking=False):
            try:
                if self._conn is None or self._conn_pid != os.getpid():  # none yet, or inherited by a fork
                    self._conn, self._conn_pid = pool.connection_class(**pool.connection_kwargs), os.getpid()
                    self._conn_proven = False
                conn = self._conn
                try:
                    self._enqueue_with_retry(conn, by_queue)
                except redis.ConnectionError:
                    if not self._conn_proven:
                        raise
                    # The server may have closed the idle connection (its timeout, a restart),
                    # which the pool would have noticed before lending it: once more on a new
                    # one, with new Redis ids (at worst a duplicate job, which is safe).
                    self._conn_proven = False
                    conn.disconnect()
                    self._enqueue_with_retry(conn, by_queue)
                self._conn_proven = True
            finally:
                if self._closed:
                    self._drop_connection()
                self._conn_lock.release()
            return
        conn = pool.get_connection()
        try:
            self._enqueue_with_retry(conn, by_queue)
        finally:
            pool.release(conn)

    def _drop_connection(self) -> None:
        """Close the producer's own connection (under its lock; not one inherited by a fork)."""
        if self._conn is not None and self._conn_pid == os.getpid():
            self._conn.disconnect()
        self._conn, self._conn_proven = None, False

    def _enqueue_with_retry(self, conn: Any, by_queue: dict[str, list[bytes]]) -> None:
        """:meth:`_enqueue_on` under the client's retry policy (reconnecting between attempts).

        The producer's own connection is only ever used under its lock and for whole
        request/reply exchanges (redis-py disconnects it on any error mid-reply), so
        unlike a pooled one it never holds stale replies.
        """
        conn.retry.call_with_retry(lambda: self._enqueue_on(conn, by_queue), lambda _error: conn.disconnect())

    def _head(self, queue: str) -> bytes:
        head = self._heads.get(queue)
        if head is None:
            keys = (f"{self.namespace}:{queue}.msgs", f"{self.namespace}:{queue}")
            head = b"".join(_bulk(a.encode()) for a in ("EVALSHA", _ENQUEUE_SHA, "2", *keys))
            self._heads[queue] = head
        return head

    def _enqueue_on(self, conn: Any, by_queue: dict[str, list[bytes]], *, reloaded: bool = False) -> None:
        """One attempt: EVALSHA of :data:`_ENQUEUE_LUA` per queue, written at once."""
        chunks: list[bytes] = []
        buf = bytearray()
        for queue, bodies in by_queue.items():
            buf += b"*%d\r\n" % (5 + 2 * len(bodies))
            buf += self._head(queue)
            for data in bodies:
                redis_id = _uuid4()
                body = _with_redis_id(data, redis_id)
                buf += b"$36\r\n%b\r\n$%d\r\n" % (redis_id.encode(), len(body))
                if len(body) > _PACK_COPY_LIMIT:
                    chunks += (bytes(buf), body)
                    buf = bytearray(b"\r\n")
                else:
                    buf += body
                    buf += b"\r\n"
        chunks.append(bytes(buf))
        conn.send_packed_command(chunks)
        # Read every reply (the connection stays in step), then report the first error.
        unloaded: list[str] = []
        error: redis.ResponseError | None = None
        for queue in by_queue:
            try:
                conn.read_response()
            except redis.exceptions.NoScriptError:
                unloaded.append(queue)  # nothing of that call ran
            except redis.ResponseError as exc:
                error = error or exc
        if unloaded and error is None:
            if reloaded:
                raise redis.ResponseError("the enqueue script is still not loaded after SCRIPT LOAD")
            conn.send_command("SCRIPT", "LOAD", _ENQUEUE_LUA)
            conn.read_response()
            self._enqueue_on(conn, {queue: by_queue[queue] for queue in unloaded}, reloaded=True)
        if error is not None:
            raise error

    def _get_outbox(self) -> Outbox:
        with self._lock:
            if self._outbox is None:
                self._outbox = Outbox(self.outbox_path)
            return self._outbox

    def _spool(self, jobs: list[_Job]) -> None:
        try:
            self._get_outbox().put((job.queue_name, job.encoded()) for job in jobs)
        except Exception as exc:
            raise ProducerError(f"broker unreachable and outbox {self.outbox_path} not writable: {exc}") from exc
        self._start_forwarder()

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="sessionq-producer-flush", daemon=True)
                self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                while not self._buffer and not self._closed:
                    self._flusher_idle = True
                    self._cond.wait()
                self._flusher_idle = False
                if self._closed and not self._buffer:
                    return
                if not self._closed and not self._flush_waiters and len(self._buffer) < DEFAULT_PIPELINE_BATCH:
                    self._cond.wait(DEFAULT_LINGER)  # let the burst gather (flush/close cut it short)
                batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), DEFAULT_PIPELINE_BATCH))]
                self._inflight = len(batch)
            try:
                self._deliver(batch)
            except Exception as exc:
                # Keep the jobs (in order) and tell flush/close/send_nowait, never drop them.
                logger.error("could not deliver %d buffered job(s): %s", len(batch), exc)
                with self._cond:
                    self._buffer.extendleft(reversed(batch))
                    self._failure = exc
                    self._inflight = 0
                    self._cond.notify_all()
                    if not self._closed:
                        self._cond.wait(DEFAULT_MAX_RETRY_INTERVAL)
                continue
            with self._cond:
                self._failure = None
                self._inflight = 0
                self._cond.notify_all()
            _make_ids_ahead()

    def _start_forwarder(self) -> None:
        with self._lock:
            if self._forwarder is not None:
                return
            self._forwarder = threading.Thread(target=self._forward_loop, name="sessionq-outbox", daemon=True)
            self._forwarder.start()

    def _forward_loop(self) -> None:
        interval = DEFAULT_RETRY_INTERVAL
        while not self._closed:
            try:
                self.forward_outbox()
            except _REDIS_DOWN:
                time.sleep(interval)
                interval = min(interval * 2, DEFAULT_MAX_RETRY_INTERVAL)
                continue
            except Exception:
                logger.exception("forwarding the outbox failed")
                time.sleep(DEFAULT_MAX_RETRY_INTERVAL)
                continue
            with self._lock:
                if self._outbox is None or self._outbox.count() == 0:
                    self._forwarder = None
                    return
