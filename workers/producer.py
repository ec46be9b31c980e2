"""The producer API: how an MCP server fires jobs without waiting for the database.

>>> from sessionq.workers.producer import Producer
>>> producer = Producer()                      # REDIS_URL etc. from the environment
>>> producer.save_session({"session_id": "s1", "model": "m", "messages": [...]})
'5d1c...'                                       # the Dramatiq message id
>>> producer.heartbeat("mcp-session-id", buffered=True)   # microseconds, pipelined
>>> producer.close()                            # flush the buffer on shutdown

* Every payload is validated before it is enqueued, as its actor will check it: a bad
  one raises :class:`~sessionq.workers.errors.InvalidPayload` here and is never sent.
* ``send`` pushes the job to Redis and returns its message id.
* ``send_nowait`` (``buffered=True`` on the helpers) appends to an in-memory buffer and
  returns; a background thread pipelines the buffer to Redis, a burst at a time (it
  lets jobs gather for ``DEFAULT_LINGER``, 2 ms). ``flush``/``close`` wait for it
  (``close`` is also registered with ``atexit``). Until the flusher pushed it, a
  buffered job lives only in this process: a crash (SIGKILL) loses it — measured, up
  to tens of milliseconds after the call (docs/producer.md). ``send`` is durable when
  it returns, and so is every buffered job once ``flush`` returned.
* The outbox: when Redis is unreachable, jobs are spooled to a SQLite file
  (``settings.outbox_path``) and forwarded, oldest first, once Redis answers again —
  also by the next producer started on the same file after a restart.
* With no queue URL (embedded mode) jobs go to the in-process broker.

Jobs are written to Redis exactly as docs/wire-contract.md describes (HSET + RPUSH,
atomically), the same keys a non-Python producer writes, by the producer's transport
(``sessionq.workers.pusher``, which also keeps the outbox): one Lua script call per
queue (one command, one reply), also for a whole buffered batch, packed by hand
(``sessionq.workers.wire_codec``).

Each job's queue, checks and canonical form come from the job table
(``sessionq.workers.jobs``); saves and appends first try a plain path that accepts only
plainly valid payloads and returns what the general check would
(``sessionq.workers.producer_plain``).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import redis

from sessionq.models import (
    AgentState,
    ChatMessage,
    ChatSession,
    FileRecord,
    Settings,
    TransportSession,
    utcnow,
)
from sessionq.models.settings import is_redis_url

from . import payloads
from .errors import InvalidPayload, ProducerError
from .jobs import job_named, single_argument
from .producer_plain import deferred_bound
from .pusher import AsyncRedisPusher, BrokerPusher, RedisPusher, SpoolingPusher
from .wire_codec import PendingJob, make_ids_ahead, message_text, uuid4

logger = logging.getLogger(__name__)

# Jobs per pipelined round trip of the background flusher.
DEFAULT_PIPELINE_BATCH = 1000
# Seconds the flusher lets buffered jobs gather before a round trip (cut short by flush
# and close): one wake-up and one push per burst, not per job, so that a busy caller
# neither pays for waking the flusher nor waits for the GIL behind it on every call.
DEFAULT_LINGER = 0.002
# Seconds the flusher waits before it retries a batch it could neither push nor spool.
DEFAULT_MAX_RETRY_INTERVAL = 5.0
# Key prefix of Dramatiq's keys (the broker's namespace).
DEFAULT_NAMESPACE = "dramatiq"
# Largest encoded job accepted (bigger sessions: send the messages in several appends).
DEFAULT_MAX_JOB_BYTES = 16 * 1024 * 1024

# Producers of this process: a forked child gives each fresh threads and locks.
_PRODUCERS: weakref.WeakSet[Producer] = weakref.WeakSet()


def _reset_producers_in_child() -> None:
    for producer in list(_PRODUCERS):
        producer._after_fork()


os.register_at_fork(after_in_child=_reset_producers_in_child)


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
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._buffer: collections.deque[PendingJob] = collections.deque()
        self._inflight = 0
        # True while the flusher waits for an empty buffer to fill (it needs a notify);
        # _flush_waiters counts flush() calls waiting (the flusher then does not linger).
        self._flusher_idle = False
        self._flush_waiters = 0
        self._flusher: threading.Thread | None = None
        self._closed = False
        # Why the last buffered batch could be neither pushed nor spooled (cleared on success).
        self._failure: BaseException | None = None
        pusher: RedisPusher | BrokerPusher
        self._async_pusher: AsyncRedisPusher | None = None
        if not is_redis_url(self.url):
            from .broker import build_broker, current_broker

            pusher = BrokerPusher(current_broker(self.url) or build_broker(self.settings))
        else:
            pusher = RedisPusher(self.url, namespace=namespace)
            self._async_pusher = AsyncRedisPusher(self.url, namespace=namespace)
        self._transport = SpoolingPusher(pusher, self.outbox_path)
        _PRODUCERS.add(self)
        atexit.register(self.close)

    def _after_fork(self) -> None:
        """In a forked child (a pre-forking server that made the producer before the
        fork): the parent's flusher thread does not exist here and its locks may have
        been held at the fork, so start them afresh. Jobs the parent had buffered stay
        the parent's to deliver; the transport resets itself (outbox, forwarder, Redis
        connection)."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._buffer = collections.deque()
        self._inflight = 0
        self._flusher_idle = False
        self._flush_waiters = 0
        self._flusher = None
        self._failure = None

    # -- sending ---------------------------------------------------------------

    def send(self, actor_name: str, *args: Any) -> str:
        """Validate and enqueue one job now; return its message id.

        When it returns, the job is in Redis and survives a crash of this process. If
        Redis is unreachable the job is spooled to the outbox (still accepted, as durably).
        Raises :class:`InvalidPayload` for a bad payload.
        """
        job = self._build(actor_name, args)
        self._deliver([job])
        return job.message_id

    async def send_async(self, actor_name: str, *args: Any) -> str:
        """:meth:`send` for asyncio code: as durable when it returns, without a thread.

        The job is pushed to Redis on the caller's event loop. If that push fails, or
        the queue is not Redis, or jobs are being spooled, :meth:`send`'s own path (its
        retries, the outbox) runs in a worker thread instead.
        """
        job = self._build(actor_name, args)
        if self._async_pusher is not None and not self._transport.down:
            try:
                await self._async_pusher.push([job])
                return job.message_id
            except (OSError, redis.RedisError) as exc:  # UNREACHABLE and every reply error
                logger.debug("async push of %s failed (%s); sending it the blocking way", actor_name, exc)
        await asyncio.to_thread(self._deliver, [job])
        return job.message_id

    def send_nowait(self, actor_name: str, *args: Any) -> str:
        """Validate a job and buffer it for the background flusher; return its message id.

        The job is durable only once the flusher pushed (or spooled) it, usually
        within milliseconds; a crash of this process before that (SIGKILL) loses it.
        Call :meth:`flush` where that matters, or use :meth:`send`.

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

        Once it returned True, those jobs survive a crash of this process.

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
        spooled = self._transport.spooled()
        with self._lock:
            return len(self._buffer) + self._inflight + spooled

    def forward_outbox(self) -> int:
        """Forward spooled jobs now; return how many (raises if Redis is still down)."""
        return self._transport.forward()

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
                    self._transport.spool(leftover, forward=False)
                except ProducerError as exc:
                    raise ProducerError(f"{len(leftover)} accepted job(s) not delivered: {exc}") from exc
        finally:
            self._transport.close()
            if self._async_pusher is not None:
                self._async_pusher.close()

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
        payload = session.to_json() if isinstance(session, TransportSession) else session
        return self._send(buffered, "register_transport", payload)

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
        """Run one sweep (a kind from ``sessionq.scheduler.sweeps.SWEEP_KINDS``) now."""
        return self.send("run_sweep", kind)

    # -- internals -----------------------------------------------------------------

    def _build(self, actor_name: str, args: Sequence[Any], *, buffered: bool = False) -> PendingJob:
        """Validate and canonicalise a job and encode it (raises InvalidPayload).

        A buffered job whose canonical argument is a snapshot of the caller's payload
        (a deferrable job, see :func:`deferred_bound`), well under the size limit, is
        encoded by the flusher instead: its encoding cannot fail, and the caller
        returns sooner.
        """
        job = job_named(actor_name)
        payload = single_argument(actor_name, args)
        arg = None if job.plain is None else job.plain(payload)
        if arg is None:
            arg = job.normalize(payload, self.settings.export_dir)
        message_id, timestamp = uuid4(), int(time.time() * 1000)
        if buffered and job.deferrable and 0 <= deferred_bound(arg) <= DEFAULT_MAX_JOB_BYTES:
            return PendingJob(job.queue, message_id, b"", (actor_name, arg, timestamp))
        try:
            # ASCII-only JSON (non-ASCII escaped), so its length in bytes is its length.
            body = message_text(actor_name, arg, message_id, timestamp).encode("ascii")
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidPayload(f"{actor_name} payload is not JSON-serialisable: {exc}") from None
        if len(body) > DEFAULT_MAX_JOB_BYTES:
            raise InvalidPayload(
                f"{actor_name} job is {len(body)} bytes; the limit is {DEFAULT_MAX_JOB_BYTES} (split it into appends)"
            )
        # A job pushed before send() returns keeps its argument (a broker other than
        # Redis takes it as is); a buffered one only its encoding, the snapshot.
        return PendingJob(job.queue, message_id, body, None if buffered else (actor_name, arg, timestamp))

    def _deliver(self, jobs: list[PendingJob]) -> None:
        self._transport.push(jobs)

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
                with self._cond:
                    closed = self._closed
                if closed:  # close() took the rest of the buffer: nobody would drain these
                    self._spool_after_close(batch, exc)
                    continue
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
            make_ids_ahead()

    def _spool_after_close(self, batch: list[PendingJob], exc: Exception) -> None:
        """A batch that was in flight when :meth:`close` stopped waiting, and then failed:
        into the outbox (the next producer on it forwards the jobs), not back into a
        buffer no thread drains any more."""
        try:
            self._transport.spool(batch, forward=False)
            logger.warning("could not deliver %d buffered job(s) after close (%s); spooled to %s",
                           len(batch), exc, self.outbox_path)
        except Exception as spool_exc:  # said as loudly as we can; close() has returned
            logger.error("%d buffered job(s) could be neither delivered (%s) nor spooled after close: %s",
                         len(batch), exc, spool_exc)
        with self._cond:
            self._inflight = 0
            self._cond.notify_all()
