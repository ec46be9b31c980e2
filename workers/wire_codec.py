"""The producer's wire encoding: message JSON, message and Redis ids, the packed
``EVALSHA`` that puts jobs on Dramatiq's Redis queues (docs/wire-contract.md), and
:class:`PendingJob`, a validated job on its way (:mod:`sessionq.workers.pusher` sends it).

Everything here is on the caller's hot path (``Producer.save_session`` and friends),
so it avoids per-job allocations the standard helpers make: the C JSON encoder is built
once, the envelope of each actor's message is encoded once, UUIDs come from blocks of
random bytes, and the Redis commands are packed by hand.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
import time
from typing import Any, ClassVar, NamedTuple

import redis

from .jobs import JOBS

# Encoded messages end with their (empty) options, so that the Redis id can be
# appended to the bytes at push time instead of decoding and re-encoding the JSON.
_OPTIONS_TAIL = b'"options":{}}'
# Atomic HSET + RPUSH of (redis id, message) pairs: KEYS = hash, list; ARGV = id, body, ...
# (the same writes as the MULTI of docs/wire-contract.md, in one command and one reply).
ENQUEUE_LUA = """
for i = 1, #ARGV, 2 do
  redis.call('hset', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('rpush', KEYS[2], ARGV[i])
end
return #ARGV / 2
"""
ENQUEUE_SHA = hashlib.sha1(ENQUEUE_LUA.encode()).hexdigest()


# The message encoder: ``json.dumps(message, separators=(",", ":"))``, with the C
# encoder built once (no circular-reference markers: a validated payload is a tree).
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_MAKE_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODER = (
    None if _MAKE_C_ENCODER is None
    else _MAKE_C_ENCODER(None, None, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
)


def encode(message: Any) -> str:
    return _ENCODER.encode(message) if _C_ENCODER is None else "".join(_C_ENCODER(message, 0))


# Random bytes for UUIDs, drawn from os.urandom a block at a time (one system call per
# 256 ids); reset in a forked child so that parent and child never share ids.
_RANDOM_BLOCK = 16 * 256


class _RandomBlock:
    lock = threading.Lock()
    block = b""
    at = 0

    #: Ids made ahead by the flusher between its round trips (taken by any thread).
    ready: ClassVar[collections.deque[str]] = collections.deque()

    @classmethod
    def reset(cls) -> None:
        cls.lock, cls.block, cls.at = threading.Lock(), b"", 0
        cls.ready.clear()


os.register_at_fork(after_in_child=_RandomBlock.reset)

# Bodies up to this size are copied into the packed command; bigger ones are sent as is.
PACK_COPY_LIMIT = 16 * 1024


# Ids the flusher keeps made ahead, and makes at most per round.
_READY_IDS, _READY_IDS_STEP = 256, 32


def uuid4() -> str:
    """A fresh UUID 4 string: one made ahead by the flusher, else a new one."""
    try:
        return _RandomBlock.ready.popleft()
    except IndexError:
        return new_uuid4()


def make_ids_ahead() -> None:
    """Top up the ids made ahead (a few at a time: the flusher holds the GIL meanwhile)."""
    ready = _RandomBlock.ready
    for _ in range(min(_READY_IDS - len(ready), _READY_IDS_STEP)):
        ready.append(new_uuid4())


def new_uuid4() -> str:
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


def bulk(data: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


# Per actor: the encoded message up to its argument. Messages are encoded in the key
# order queue_name, actor_name, args, kwargs, message_id, message_timestamp, options.
_ENVELOPE_HEADS = {
    job.name: encode({"queue_name": job.queue, "actor_name": job.name})[:-1] + ',"args":['
    for job in JOBS.values()
}


def message_text(actor_name: str, arg: Any, message_id: str, timestamp: int) -> str:
    """The encoded message (only the argument goes through the encoder: the envelope is
    the same for every job but its id and timestamp)."""
    return (f'{_ENVELOPE_HEADS[actor_name]}{encode(arg)}],"kwargs":{{}},"message_id":"{message_id}",'
            f'"message_timestamp":{timestamp},"options":{{}}}}')


def encoded_message(actor_name: str, arg: Any) -> tuple[str, str]:
    """A new message id and the encoded message."""
    message_id = uuid4()
    return message_id, message_text(actor_name, arg, message_id, int(time.time() * 1000))


class PendingJob(NamedTuple):
    """A validated job on its way to the broker: its queue, message id and message JSON
    (without a Redis id), encoded once -- by the caller, or for a buffered job whose
    argument is a snapshot, by the producer's flusher."""

    queue_name: str
    message_id: str
    #: The message JSON; empty until :meth:`encoded` writes it from :attr:`source`.
    body: bytes
    #: (actor name, canonical argument, timestamp in ms) while the argument cannot change
    #: any more (a snapshot, or a job pushed before its caller returns); else None.
    source: tuple[str, Any, int] | None = None

    def encoded(self) -> bytes:
        """The message JSON."""
        if self.body or self.source is None:
            return self.body
        actor_name, arg, timestamp = self.source
        return message_text(actor_name, arg, self.message_id, timestamp).encode("ascii")

    def message(self) -> Any:
        """The job as a Dramatiq :class:`~dramatiq.Message` (for a broker other than Redis)."""
        from dramatiq import Message

        if self.source is None:
            return Message(**json.loads(self.body))  # spooled, or no longer the job's own argument
        actor_name, arg, timestamp = self.source
        return Message(queue_name=self.queue_name, actor_name=actor_name, args=(arg,), kwargs={}, options={},
                       message_id=self.message_id, message_timestamp=timestamp)


def with_redis_id(data: bytes, redis_id: str) -> bytes:
    """The message JSON with ``options.redis_message_id`` set (fast path for our own encoding)."""
    if data.endswith(_OPTIONS_TAIL):
        return data[:-3] + b'{"redis_message_id":"' + redis_id.encode() + b'"}}'
    message = json.loads(data)  # spooled by an older version: any key order
    message.setdefault("options", {})["redis_message_id"] = redis_id
    return json.dumps(message, separators=(",", ":")).encode()


class PackedEnqueue:
    """Pushes encoded messages with one ``EVALSHA`` of :data:`ENQUEUE_LUA` per queue,
    packed by hand and written in one send (redis-py's command machinery costs more
    than the round trip on the producer's hot path). Loads the script on ``NOSCRIPT``."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        # Per queue: the packed EVALSHA command up to its first job.
        self.heads: dict[str, bytes] = {}

    def head(self, queue: str) -> bytes:
        """The packed ``EVALSHA`` command for ``queue`` up to its first job (cached)."""
        head = self.heads.get(queue)
        if head is None:
            keys = (f"{self.namespace}:{queue}.msgs", f"{self.namespace}:{queue}")
            head = b"".join(bulk(a.encode()) for a in ("EVALSHA", ENQUEUE_SHA, "2", *keys))
            self.heads[queue] = head
        return head

    def __call__(self, conn: Any, by_queue: dict[str, list[bytes]], *, reloaded: bool = False) -> None:
        """One attempt: EVALSHA of :data:`ENQUEUE_LUA` per queue, written at once."""
        conn.send_packed_command(self.pack(by_queue))
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
            conn.send_command("SCRIPT", "LOAD", ENQUEUE_LUA)
            conn.read_response()
            self(conn, {queue: by_queue[queue] for queue in unloaded}, reloaded=True)
        if error is not None:
            raise error

    async def push_async(self, conn: Any, by_queue: dict[str, list[bytes]], *, reloaded: bool = False) -> None:
        """:meth:`__call__` on a connection of redis-py's asyncio client."""
        await conn.send_packed_command(self.pack(by_queue), check_health=False)
        unloaded: list[str] = []
        error: redis.ResponseError | None = None
        for queue in by_queue:
            try:
                await conn.read_response()
            except redis.exceptions.NoScriptError:
                unloaded.append(queue)
            except redis.ResponseError as exc:
                error = error or exc
        if unloaded and error is None:
            if reloaded:
                raise redis.ResponseError("the enqueue script is still not loaded after SCRIPT LOAD")
            await conn.send_command("SCRIPT", "LOAD", ENQUEUE_LUA)
            await conn.read_response()
            await self.push_async(conn, {queue: by_queue[queue] for queue in unloaded}, reloaded=True)
        if error is not None:
            raise error

    def pack(self, by_queue: dict[str, list[bytes]]) -> list[bytes]:
        """The packed ``EVALSHA`` commands, one per queue, each job with a fresh Redis id."""
        chunks: list[bytes] = []
        buf = bytearray()
        for queue, bodies in by_queue.items():
            buf += b"*%d\r\n" % (5 + 2 * len(bodies))
            buf += self.head(queue)
            for data in bodies:
                redis_id = uuid4()
                body = with_redis_id(data, redis_id)
                buf += b"$36\r\n%b\r\n$%d\r\n" % (redis_id.encode(), len(body))
                if len(body) > PACK_COPY_LIMIT:
                    chunks += (bytes(buf), body)
                    buf = bytearray(b"\r\n")
                else:
                    buf += body
                    buf += b"\r\n"
        chunks.append(bytes(buf))
        return chunks
