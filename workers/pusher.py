"""The producer's transport: what puts validated jobs on the broker, or in the outbox.

* :class:`RedisPusher` writes the wire contract itself (docs/wire-contract.md): per
  queue, one atomic script call of HSET + RPUSH for every job, packed by hand
  (:class:`~sessionq.workers.wire_codec.PackedEnqueue`), on a connection of its own;
  it owns that connection, renews it in a forked child, and retries as the Redis
  client's ``retry`` policy says.
* :class:`BrokerPusher` hands Dramatiq messages to a broker object (embedded mode's
  in-process broker, RabbitMQ).
* :class:`SpoolingPusher` wraps either: while the broker is unreachable (one of
  :data:`UNREACHABLE`) it spools jobs to the outbox (:mod:`sessionq.workers.outbox`)
  and a background thread forwards them, oldest first, once the broker answers --
  also jobs a previous process left in the same file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import redis

from sessionq.models.loop_connections import LoopConnections

from .errors import ProducerError
from .outbox import Outbox
from .wire_codec import PackedEnqueue, PendingJob

logger = logging.getLogger(__name__)

# Seconds to wait for a Redis connection before the producer spools to the outbox instead.
DEFAULT_CONNECT_TIMEOUT = 1.0
# Seconds to wait for a Redis reply.
DEFAULT_SOCKET_TIMEOUT = 5.0
# Seconds between attempts to forward the outbox while the broker is down (doubling, capped).
DEFAULT_RETRY_INTERVAL = 0.5
DEFAULT_MAX_RETRY_INTERVAL = 5.0

#: What a push raises when the broker is unreachable (the jobs may be spooled and retried).
UNREACHABLE: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError)


# Pushers of this process: a forked child gives each fresh locks (and threads).
_PUSHERS: weakref.WeakSet[RedisPusher | SpoolingPusher] = weakref.WeakSet()


def _reset_pushers_in_child() -> None:
    for pusher in list(_PUSHERS):
        pusher._after_fork()


os.register_at_fork(after_in_child=_reset_pushers_in_child)


class RedisPusher:
    """Push jobs to Dramatiq's Redis queues as the wire contract says. Thread-safe.

    Pushes take the pusher's own connection, or a pooled one while another thread
    holds it. Its socket is renewed in a forked child (never shared with the parent)
    and, once, when the server dropped it while it was idle.
    """

    def __init__(self, url: str, *, namespace: str) -> None:
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=DEFAULT_CONNECT_TIMEOUT, socket_timeout=DEFAULT_SOCKET_TIMEOUT
        )
        self._enqueue = PackedEnqueue(namespace)
        self._conn: Any = None
        self._conn_pid = 0
        self._lock = threading.Lock()
        # True once the connection's current socket carried a push.
        self._proven = False
        self._closed = False
        _PUSHERS.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the lock may have been held at the fork (the connection
        itself is renewed on first use, see :meth:`push`)."""
        self._lock = threading.Lock()

    def push(self, jobs: Sequence[PendingJob]) -> None:
        """Enqueue jobs on their queues: per queue, one atomic script call (HSET + RPUSH
        of every job, as the wire contract says).

        The script calls of all queues are written in one send and their replies read
        back without redis-py's command machinery. Connection errors are retried as the
        client's ``retry`` policy says (and once more when the server dropped a proven
        connection), every attempt with fresh Redis ids (a push whose reply was lost
        may have landed: its retry must not push the same id twice).
        """
        by_queue: dict[str, list[bytes]] = {}
        for job in jobs:
            by_queue.setdefault(job.queue_name, []).append(job.encoded())
        pool = self.client.connection_pool
        if not self._lock.acquire(blocking=False):
            conn = pool.get_connection()
            try:
                self._enqueue_with_retry(conn, by_queue)
            finally:
                pool.release(conn)
            return
        try:
            if self._conn is None or self._conn_pid != os.getpid():  # none yet, or inherited by a fork
                self._conn, self._conn_pid = pool.connection_class(**pool.connection_kwargs), os.getpid()
                self._proven = False
            conn = self._conn
            try:
                self._enqueue_with_retry(conn, by_queue)
            except redis.ConnectionError:
                if not self._proven:
                    raise
                # The server may have closed the idle connection (its timeout, a restart),
                # which the pool would have noticed before lending it: once more on a new
                # one, with new Redis ids (at worst a duplicate job, which is safe).
                self._proven = False
                conn.disconnect()
                self._enqueue_with_retry(conn, by_queue)
            self._proven = True
        finally:
            if self._closed:
                self._drop_connection()
            self._lock.release()

    def close(self) -> None:
        """Close the connections (a push in progress closes its own when done)."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._drop_connection()
            finally:
                self._lock.release()
        self.client.close()

    def _drop_connection(self) -> None:
        """Close the pusher's own connection (under its lock; not one inherited by a fork)."""
        if self._conn is not None and self._conn_pid == os.getpid():
            self._conn.disconnect()
        self._conn, self._proven = None, False

    def _enqueue_with_retry(self, conn: Any, by_queue: dict[str, list[bytes]]) -> None:
        """:class:`PackedEnqueue` under the client's retry policy (reconnecting between attempts).

        The pusher's own connection is only ever used under its lock and for whole
        request/reply exchanges (redis-py disconnects it on any error mid-reply), so
        unlike a pooled one it never holds stale replies.
        """
        conn.retry.call_with_retry(lambda: self._enqueue(conn, by_queue), lambda _error: conn.disconnect())


class AsyncRedisPusher:
    """:meth:`RedisPusher.push` for asyncio callers, on the caller's event loop (no
    thread): the same packed ``EVALSHA`` per queue (:meth:`PackedEnqueue.push_async`)
    on connections of redis-py's asyncio client kept per loop (:class:`LoopConnections`).
    It does not retry: a push that fails may or may not have landed, and the caller's
    fallback pushes again with new Redis ids (at worst a duplicate job, which is safe)."""

    def __init__(self, url: str, *, namespace: str) -> None:
        import redis.asyncio

        self.pool = redis.asyncio.ConnectionPool.from_url(
            url, socket_connect_timeout=DEFAULT_CONNECT_TIMEOUT, socket_timeout=DEFAULT_SOCKET_TIMEOUT)
        self._enqueue = PackedEnqueue(namespace)
        self._conns: LoopConnections[Any] = LoopConnections(self._open, _disconnect)

    async def push(self, jobs: Sequence[PendingJob]) -> None:
        """Enqueue jobs on their queues (raises on any failure: see the class docs)."""
        by_queue: dict[str, list[bytes]] = {}
        for job in jobs:
            by_queue.setdefault(job.queue_name, []).append(job.encoded())
        async with self._conns.lent() as conn:
            await self._enqueue.push_async(conn, by_queue)

    async def _open(self) -> Any:
        conn = self.pool.connection_class(**self.pool.connection_kwargs)
        await conn.connect()
        return conn

    def close(self) -> None:
        """Close the idle connections (each on its own loop)."""
        self._conns.close()


# Disconnects under way (referenced until done, so none is collected half-way).
_DISCONNECTING: set[asyncio.Future[Any]] = set()


def _disconnect(conn: Any) -> None:
    future = asyncio.ensure_future(conn.disconnect(nowait=True))
    _DISCONNECTING.add(future)
    future.add_done_callback(_DISCONNECTING.discard)


class BrokerPusher:
    """Hand jobs to a Dramatiq broker object as messages (no wire encoding involved)."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker

    def push(self, jobs: Sequence[PendingJob]) -> None:
        """Enqueue each job's message on the broker."""
        for job in jobs:
            self.broker.enqueue(job.message())

    def close(self) -> None:
        """Nothing to close: the broker belongs to its owner."""


class SpoolingPusher:
    """Push through ``pusher``; while the broker is unreachable, spool to the outbox at
    ``outbox_path`` instead and forward from there in the background. Thread-safe."""

    def __init__(self, pusher: RedisPusher | BrokerPusher, outbox_path: Path) -> None:
        self.pusher = pusher
        self.outbox_path = outbox_path
        self._lock = threading.Lock()
        self._outbox: Outbox | None = None
        self._forwarder: threading.Thread | None = None
        self._closed = False
        # True from a failed push until the outbox has been forwarded.
        self._down = False
        _PUSHERS.add(self)
        if self.spooled():
            self._down = True
            self._start_forwarder()

    def _after_fork(self) -> None:
        """In a forked child: the forwarder thread does not exist here, its lock may have
        been held at the fork, and a SQLite connection must not cross a fork."""
        self._lock = threading.Lock()
        self._forwarder = None
        self._outbox = None

    def push(self, jobs: Sequence[PendingJob]) -> None:
        """Push the jobs, or spool them when the broker is unreachable.

        Raises :class:`ProducerError` if they can be neither pushed nor spooled.
        """
        if self._down:
            self.spool(jobs)
            return
        try:
            self.pusher.push(jobs)
        except UNREACHABLE as exc:
            logger.warning("broker unreachable (%s); spooling %d job(s) to %s", exc, len(jobs), self.outbox_path)
            self._down = True
            self.spool(jobs)

    @property
    def down(self) -> bool:
        """True from a failed push until the outbox has been forwarded (pushes spool meanwhile)."""
        return self._down

    def spool(self, jobs: Iterable[PendingJob], *, forward: bool = True) -> None:
        """Put jobs in the outbox and (``forward``) start forwarding it; raises
        :class:`ProducerError` if the outbox is not writable."""
        try:
            self._get_outbox().put((job.queue_name, job.encoded()) for job in jobs)
        except Exception as exc:
            raise ProducerError(f"broker unreachable and outbox {self.outbox_path} not writable: {exc}") from exc
        if forward:
            self._start_forwarder()

    def spooled(self) -> int:
        """Jobs waiting in the outbox."""
        return self._get_outbox().count() if self.outbox_path.exists() else 0

    def forward(self) -> int:
        """Forward spooled jobs now; return how many (raises if the broker is still down)."""
        if not self.outbox_path.exists():
            return 0
        count = self._get_outbox().forward(self._push_spooled)
        self._down = False
        return count

    def close(self) -> None:
        """Stop forwarding and close the pusher (spooled jobs stay for the next process)."""
        self._closed = True
        self.pusher.close()

    def _push_spooled(self, items: list[tuple[str, bytes]]) -> None:
        self.pusher.push([PendingJob(queue, "", data) for queue, data in items])

    def _get_outbox(self) -> Outbox:
        with self._lock:
            if self._outbox is None:
                self._outbox = Outbox(self.outbox_path)
            return self._outbox

    def _start_forwarder(self) -> None:
        with self._lock:
            if self._forwarder is not None or self._closed:
                return
            self._forwarder = threading.Thread(target=self._forward_loop, name="sessionq-outbox", daemon=True)
            self._forwarder.start()

    def _forward_loop(self) -> None:
        interval = DEFAULT_RETRY_INTERVAL
        while not self._closed:
            try:
                self.forward()
            except UNREACHABLE:
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
