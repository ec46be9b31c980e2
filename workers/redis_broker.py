"""Dramatiq's Redis broker, hardened for two failures its own consumer does not survive.

Imported only when a ``redis://`` queue URL is configured (see :mod:`sessionq.workers.broker`).

1. **Undecodable messages.** Dramatiq's consumer raises on a message it cannot decode
   (invalid JSON, bytes that are not UTF-8, a missing envelope field): the consumer
   thread restarts, the messages it had prefetched stay unacked, and the bad message
   comes back after every restart. A foreign producer must not be able to do that, so
   the message is buried in the queue's dead-letter set with its reason instead.

2. **Messages orphaned by a connection error.** A Redis worker moves what it fetches
   into its own unacked set (``__acks__.<broker id>.<queue>``); Redis hands them back
   to the queue only once that worker's heartbeat stops. When the connection drops,
   Dramatiq's consumer thread throws its consumer away and starts a new one, and three
   kinds of message are then unacked but held by nobody in this process: a prefetch
   batch still in the old consumer's cache, a fetch whose reply was lost (the script
   ran, the socket died), and the ``.DQ`` messages waiting in the thread's delay queue
   (Dramatiq drops that queue on a connection error). The worker is alive and keeps
   heartbeating, so they would sit there until it is restarted. Each consumer after a
   queue's first therefore requeues every unacked id of its queue that this process
   does not hold (see :meth:`SessionqRedisBroker.consume`).

3. **Messages of a dead worker.** Dramatiq gives a dead worker's unacked messages back
   only during its "maintenance", which a Redis command runs with a chance of
   ``maintenance_chance`` per million (0.1 % by default): after a ``kill -9`` they sat
   for many minutes (the same maintenance expires old dead letters). Every consumer
   thread therefore runs a sweep every
   :data:`DEFAULT_SWEEP_INTERVAL` seconds (at most a quarter of the heartbeat timeout),
   the first one as the worker starts: it refreshes this worker's heartbeat and
   requeues the unacked messages of every worker whose heartbeat is older than the
   timeout (:meth:`SessionqRedisBroker.requeue_dead_workers`). A killed worker's jobs
   are back within the heartbeat timeout plus one sweep interval.

4. **Messages whose envelope names another id.** Dramatiq acks the Redis id written in
   the envelope (``options.redis_message_id``), while the worker's unacked set holds
   the id the producer pushed; a foreign producer that wrote two different ids had
   its message acked in vain and left unacked for ever. The fetch returns the pushed
   id with each message (:meth:`SessionqRedisBroker.do_fetch`) and the envelope is
   corrected to it; an id pushed without its message is dropped from the unacked set.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import redis
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.errors import ConnectionClosed, DecodeError

logger = logging.getLogger(__name__)

#: Longest pause (seconds) between two sweeps for dead workers of one process.
DEFAULT_SWEEP_INTERVAL = 5.0
# The tail our producer and the wire codec give every message: its options are last and
# hold only the Redis id (checked without decoding the message).
_OPTIONS_TAIL = b'"options":{"redis_message_id":"%s"}}'


class SessionqConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer that buries undecodable messages and reports what it holds."""

    broker: SessionqRedisBroker

    def __next__(self) -> Any:
        self.broker.sweep_if_due()
        try:
            message = super().__next__()
        except DecodeError as exc:
            data = exc.args[1] if len(exc.args) > 1 else b""
            cause = exc.args[2] if len(exc.args) > 2 else exc.__cause__
            self._bury(data, f"DecodeError: undecodable message ({type(cause).__name__}: {cause})"[:2000])
            return None
        if message is not None:
            self.broker.held(self.queue_name, [message.options["redis_message_id"]])
        return message

    def ack(self, message: Any) -> None:
        redis_id = message.options["redis_message_id"]
        if self.broker.take_early_ack(redis_id):
            self.queued_message_ids.discard(message.message_id)  # what Dramatiq's ack does besides Redis
        else:
            super().ack(message)
        self.broker.released(self.queue_name, [redis_id])

    def nack(self, message: Any) -> None:
        super().nack(message)
        self.broker.released(self.queue_name, [message.options["redis_message_id"]])

    def requeue(self, messages: Iterable[Any]) -> None:
        messages = list(messages)
        try:
            super().requeue(messages)
        except redis.ConnectionError as exc:  # Dramatiq's consumer thread only survives its own error type
            raise ConnectionClosed(exc) from None
        self.broker.released(self.queue_name, [m.options["redis_message_id"] for m in messages])

    def _bury(self, data: bytes, reason: str) -> None:
        broker = self.broker
        client, queue = broker.client, self.queue_name
        messages = f"{broker.namespace}:{queue}.msgs"
        for raw_id in client.smembers(broker.acks_key(queue)):
            if client.hget(messages, raw_id) != data:
                continue
            rid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            logger.error("message %s on queue %s dead-lettered: %s", rid, queue, reason)
            now_ms = int(time.time() * 1000)
            envelope = {
                "queue_name": queue.removesuffix(".DQ"), "actor_name": "undecodable", "args": [], "kwargs": {},
                "options": {"redis_message_id": rid, "dead_letter_reason": reason, "dead_lettered_at": now_ms,
                            "raw": bytes(data[:500]).decode("utf-8", "backslashreplace")},
                "message_id": rid, "message_timestamp": now_ms,
            }
            client.hset(messages, rid, json.dumps(envelope))
            broker.do_nack(queue, rid)
            return
        logger.error("an undecodable message on queue %s could not be found to dead-letter: %s", queue, reason)


class SessionqRedisBroker(RedisBroker):
    """Dramatiq's :class:`RedisBroker` with :class:`SessionqConsumer`, orphan reclaim and
    batched early acks (:meth:`ack_many`)."""

    # Dramatiq's ack (dispatch.lua, "ack") for many ids of one queue in one call.
    _ACK_MANY = (
        "for i = 1, #ARGV do "
        "if redis.call('srem', KEYS[1], ARGV[i]) > 0 then redis.call('hdel', KEYS[2], ARGV[i]) end "
        "end return #ARGV"
    )
    # Dramatiq's fetch (dispatch.lua, "fetch": heartbeat, move up to N ids from the queue
    # to the unacked set) that returns each pushed id with its message (false: none).
    # KEYS = heartbeats, queue, unacked set, messages; ARGV = now (ms), worker id, N.
    _FETCH = """
redis.call('zadd', KEYS[1], ARGV[1], ARGV[2])
local out = {}
for _ = 1, tonumber(ARGV[3]) do
  local id = redis.call('lpop', KEYS[2])
  if not id then break end
  redis.call('sadd', KEYS[3], id)
  out[#out + 1] = id
  out[#out + 1] = redis.call('hget', KEYS[4], id)
end
return out
"""
    # Dramatiq's maintenance for dead letters older than ARGV[1] (ms), up to 1,000 per queue.
    # KEYS = pairs of a queue's dead-letter set and its messages.
    _EXPIRE_DEAD_LETTERS = """
local n = 0
for i = 1, #KEYS, 2 do
  local ids = redis.call('zrangebyscore', KEYS[i], 0, ARGV[1], 'LIMIT', 0, 1000)
  if #ids > 0 then
    redis.call('zrem', KEYS[i], unpack(ids))
    redis.call('hdel', KEYS[i + 1], unpack(ids))
    n = n + #ids
  end
end
return n
"""
    # Requeue a dead worker's unacked messages (dispatch.lua's maintenance, for one
    # worker and the named queues) unless it spoke since ARGV[3]; then forget its heartbeat.
    # KEYS = heartbeats; ARGV = namespace, worker id, cutoff (ms), queue names...
    _REQUEUE_DEAD = """
local beat = redis.call('zscore', KEYS[1], ARGV[2])
if beat and tonumber(beat) > tonumber(ARGV[3]) then return -1 end
local n = 0
for i = 4, #ARGV do
  local queue = ARGV[1] .. ':' .. ARGV[i]
  local acks = ARGV[1] .. ':__acks__.' .. ARGV[2] .. '.' .. ARGV[i]
  for _, id in ipairs(redis.call('smembers', acks)) do
    if redis.call('hexists', queue .. '.msgs', id) == 1 then
      redis.call('rpush', queue, id)
      n = n + 1
    end
  end
  redis.call('del', acks)
end
redis.call('zrem', KEYS[1], ARGV[2])
return n
"""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lock = threading.Lock()
        self._held: defaultdict[str, set[str]] = defaultdict(set)
        self._consumed: set[str] = set()
        self._early_acked: set[str] = set()
        self._ack_many = self.client.register_script(self._ACK_MANY)
        self._fetch = self.client.register_script(self._FETCH)
        self._requeue_dead = self.client.register_script(self._REQUEUE_DEAD)
        self._expire_dead_letters = self.client.register_script(self._EXPIRE_DEAD_LETTERS)
        #: Messages requeued by :meth:`reclaim_orphans` since start (for tests and logs).
        self.reclaimed = 0
        #: Seconds between two sweeps for dead workers (:meth:`sweep_if_due`).
        self.sweep_interval = min(DEFAULT_SWEEP_INTERVAL, self.heartbeat_timeout / 4000)
        self._next_sweep = 0.0

    @property
    def consumer_class(self) -> type:
        return SessionqConsumer

    def acks_key(self, queue_name: str) -> str:
        """The Redis set of this worker's unacked message ids on ``queue_name``."""
        return f"{self.namespace}:__acks__.{self.broker_id}.{queue_name}"

    def held(self, queue_name: str, message_ids: Iterable[str]) -> None:
        """Record ids handed to Dramatiq's worker (until acked, nacked or requeued)."""
        with self._lock:
            self._held[queue_name].update(message_ids)

    def released(self, queue_name: str, message_ids: Iterable[str]) -> None:
        """Forget ids whose ack, nack or requeue went through."""
        with self._lock:
            self._held[queue_name].difference_update(message_ids)
            self._early_acked.difference_update(message_ids)

    def ack_many(self, queue_name: str, message_ids: list[str]) -> None:
        """Ack messages of ``queue_name`` with one round trip, ahead of their worker threads.

        The group committer calls this once a batch of saves has committed, before it
        releases the threads; each thread's own ack then only does the consumer's
        bookkeeping (see :meth:`take_early_ack`). If this raises, nothing is marked
        and the threads ack as usual.
        """
        self._ack_many(keys=[self.acks_key(queue_name), f"{self.namespace}:{queue_name}.msgs"], args=message_ids)
        with self._lock:
            self._early_acked.update(message_ids)

    def ack_messages(self, messages: list[Any]) -> None:
        """:meth:`ack_many` for committed jobs (Dramatiq messages) of any queues: one
        round trip per queue. Messages from a delay queue are left to their threads."""
        by_queue: dict[str, list[str]] = {}
        for message in messages:
            redis_id = message.options.get("redis_message_id")
            if redis_id is not None and not message.queue_name.endswith(".DQ"):
                by_queue.setdefault(message.queue_name, []).append(redis_id)
        for queue_name, ids in by_queue.items():
            self.ack_many(queue_name, ids)

    def take_early_ack(self, message_id: str) -> bool:
        """True (once) if :meth:`ack_many` already acked ``message_id``."""
        with self._lock:
            if message_id in self._early_acked:
                self._early_acked.discard(message_id)
                return True
            return False

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        """A new consumer; every one after the queue's first reclaims orphans first.

        A consumer thread asks for a new consumer only at start and after its consumer
        failed, so a repeat call means the previous one may have left orphans behind. If
        Redis is still unreachable this raises Dramatiq's ``ConnectionClosed``, and the
        consumer thread tries again a second later.
        """
        with self._lock:
            repeat = queue_name in self._consumed
            self._consumed.add(queue_name)
        if repeat:
            self.reclaim_orphans(queue_name)
        return super().consume(queue_name, prefetch, timeout)

    def reclaim_orphans(self, queue_name: str) -> int:
        """Requeue this worker's unacked ids on ``queue_name`` that nothing here holds.

        Held ids of a delay queue (``.DQ``) count as orphans too: Dramatiq's consumer
        thread drops its delay queue when its consumer fails. Ids of an ordinary queue
        that were handed over live on in the worker's work queue and are kept. The held
        set is read before the unacked set, and an ack reaches Redis before its id
        leaves the held set, so an id acked meanwhile is never requeued.
        """
        delayed = queue_name.endswith(".DQ")
        with self._lock:
            if delayed:
                self._held[queue_name].clear()
            keep = set(self._held[queue_name])
        try:
            unacked = {m.decode() if isinstance(m, bytes) else str(m)
                       for m in self.client.smembers(self.acks_key(queue_name))}
            orphans = sorted(unacked - keep)
            if orphans:
                self.do_requeue(queue_name, *orphans)
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None
        if orphans:
            self.reclaimed += len(orphans)
            logger.warning("requeued %d message(s) on queue %s left unacked by a failed consumer",
                           len(orphans), queue_name)
        return len(orphans)

    def do_fetch(self, queue_name: str, prefetch: int) -> list[bytes]:
        """Up to ``prefetch`` messages of ``queue_name``, moved to this worker's unacked set.

        What Dramatiq's fetch does, except that each message's envelope carries the id
        it was pushed under (the one in the unacked set, which its ack must remove) and
        an id pushed without a message is dropped instead of being held unacked.
        """
        queue = f"{self.namespace}:{queue_name}"
        keys = [f"{self.namespace}:__heartbeats__", queue, self.acks_key(queue_name), f"{queue}.msgs"]
        reply = self._fetch(keys=keys, args=[int(time.time() * 1000), self.broker_id, prefetch])
        messages: list[bytes] = []
        for raw_id, data in zip(reply[::2], reply[1::2], strict=False):
            redis_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            if data is None:
                logger.error("message %s on queue %s has no body (pushed without its HSET); dropped",
                             redis_id, queue_name)
                self.client.srem(self.acks_key(queue_name), raw_id)
                continue
            fixed = _with_pushed_id(data, redis_id, queue_name)
            if fixed is not data:
                # Stored too, so that a dead letter or a requeue carries the same envelope.
                self.client.hset(f"{queue}.msgs", raw_id, fixed)
            messages.append(fixed)
        return messages

    def sweep_if_due(self) -> None:
        """Run :meth:`requeue_dead_workers` and :meth:`expire_dead_letters` if this process
        has not for :attr:`sweep_interval` seconds (consumer threads call this before
        each fetch; one of them does the work).

        Dramatiq ran both as the random maintenance of its fetch, which this broker's
        fetch replaces (see :meth:`do_fetch`).
        """
        now = time.monotonic()
        with self._lock:
            if now < self._next_sweep:
                return
            self._next_sweep = now + self.sweep_interval
        try:
            self.requeue_dead_workers()
            self.expire_dead_letters()
        except redis.ConnectionError as exc:  # the fetch that follows fails too and says so
            logger.warning("the sweep for dead workers could not reach Redis: %s", exc)
        except Exception as exc:  # a failed sweep must never stop the consumer
            logger.error("the sweep for dead workers failed: %s: %s", type(exc).__name__, exc)

    def requeue_dead_workers(self) -> int:
        """Refresh this worker's heartbeat; requeue the unacked messages of every worker
        whose heartbeat is older than ``heartbeat_timeout``; return how many.

        The dead worker's unacked sets of this broker's queues are emptied, and those of
        any other queue it consumed (found with one ``SCAN``, only when a worker died);
        its heartbeat is then removed, so it is handled once. A worker that spoke again
        since (a long pause, not a death) is left alone.
        """
        now = int(time.time() * 1000)
        cutoff = now - self.heartbeat_timeout
        heartbeats = f"{self.namespace}:__heartbeats__"
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(heartbeats, {self.broker_id: now})
        pipe.zrangebyscore(heartbeats, 0, cutoff)
        _, stale = pipe.execute()
        dead = {w.decode() if isinstance(w, bytes) else str(w) for w in stale} - {self.broker_id}
        if not dead:
            return 0
        queues = {worker: set(self.queues) | set(self.delay_queues) for worker in dead}
        prefix = f"{self.namespace}:__acks__."
        for key in self.client.scan_iter(match=f"{prefix}*", count=1000):
            worker, _, queue = (key.decode() if isinstance(key, bytes) else str(key))[len(prefix):].partition(".")
            if worker in queues and queue:
                queues[worker].add(queue)
        total = 0
        for worker in sorted(dead):
            args = [self.namespace, worker, cutoff, *sorted(queues[worker])]
            requeued = int(self._requeue_dead(keys=[heartbeats], args=args))
            if requeued > 0:
                total += requeued
                logger.warning("requeued %d message(s) left unacked by worker %s (no heartbeat for %d s)",
                               requeued, worker, self.heartbeat_timeout // 1000)
        return total

    def expire_dead_letters(self) -> int:
        """Delete the dead letters of this broker's queues older than ``dead_message_ttl``
        (up to 1,000 per queue and call); return how many."""
        keys: list[str] = []
        for queue in sorted(self.queues):
            keys += [f"{self.namespace}:{queue}.XQ", f"{self.namespace}:{queue}.XQ.msgs"]
        if not keys:
            return 0
        return int(self._expire_dead_letters(keys=keys, args=[int(time.time() * 1000) - self.dead_message_ttl]))


def _with_pushed_id(data: bytes, redis_id: str, queue_name: str) -> bytes:
    """``data`` itself, or a corrected copy whose ``options.redis_message_id`` is the id
    it was pushed under.

    Messages this package wrote end with exactly that id (no decoding needed). An
    envelope that cannot be read, or whose options are not an object, is returned as
    it is: the consumer dead-letters what it cannot decode.
    """
    if data.endswith(_OPTIONS_TAIL % redis_id.encode()):
        return data
    try:
        envelope = json.loads(data)
    except ValueError:
        return data
    options = envelope.get("options") if isinstance(envelope, dict) else None
    if not isinstance(options, dict) or options.get("redis_message_id") == redis_id:
        return data
    logger.warning("message %s on queue %s named Redis id %r in its envelope; using the id it was pushed under",
                   redis_id, queue_name, str(options.get("redis_message_id"))[:100])
    options["redis_message_id"] = redis_id
    return json.dumps(envelope, separators=(",", ":")).encode()
