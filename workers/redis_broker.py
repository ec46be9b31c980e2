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
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from typing import Any, Iterable

import redis
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.errors import ConnectionClosed, DecodeError

logger = logging.getLogger(__name__)


class SessionqConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer that buries undecodable messages and reports what it holds."""

    broker: SessionqRedisBroker

    def __next__(self) -> Any:
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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lock = threading.Lock()
        self._held: defaultdict[str, set[str]] = defaultdict(set)
        self._consumed: set[str] = set()
        self._early_acked: set[str] = set()
        self._ack_many = self.client.register_script(self._ACK_MANY)
        #: Messages requeued by :meth:`reclaim_orphans` since start (for tests and logs).
        self.reclaimed = 0

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
