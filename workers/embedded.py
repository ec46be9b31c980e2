"""Embedded mode: the same actors on an in-process broker and worker threads.

With no queue URL configured, :class:`EmbeddedRuntime` runs a Dramatiq
:class:`~dramatiq.Worker` over the module's :class:`~dramatiq.brokers.stub.StubBroker`
against the configured store (a SQLite file by default). Nothing accepted is dropped:
:meth:`EmbeddedRuntime.stop` drains the queues first, and whatever is still queued
when its drain timeout runs out is spooled to the outbox file and run on the next
start. Dead letters are kept in memory and logged with their reason.

:func:`run_jobs` is what ``sessionq enqueue`` and ``sessionq archive`` do: send jobs to
the configured broker or, with none, run them here and wait for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.errors import QueueJoinTimeout

from sessionq.errors import ConfigError, JobError
from sessionq.models import Settings

from .broker import QUEUES, configure, get_broker, get_store, runtime
from .outbox import Outbox

logger = logging.getLogger(__name__)

# Worker threads of the embedded runtime when the settings do not say.
DEFAULT_THREADS = 4
# Seconds stop() waits for the queues to drain before spooling the rest.
DEFAULT_DRAIN_TIMEOUT = 30.0


@dataclass(frozen=True)
class DeadLetter:
    """A job the embedded runtime gave up on, and why."""

    message_id: str
    actor_name: str
    reason: str


class EmbeddedRuntime:
    """Worker threads over the in-process broker (see the module docs).

    Usable as a context manager: ``with EmbeddedRuntime(settings) as rt: ...``.
    """

    def __init__(self, settings: Settings, *, threads: int | None = None, upgrade: bool = True) -> None:
        if settings.queue_url is not None:
            raise ConfigError("embedded mode runs only without a queue URL (REDIS_URL / SESSIONQ_BROKER_URL)")
        self.settings = settings
        self.threads = threads or min(settings.worker_threads, DEFAULT_THREADS * 2) or DEFAULT_THREADS
        self.upgrade = upgrade
        self.worker: dramatiq.Worker | None = None

    def __enter__(self) -> EmbeddedRuntime:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def broker(self) -> dramatiq.Broker:
        """The in-process broker the actors are bound to."""
        return get_broker()

    def start(self) -> EmbeddedRuntime:
        """Bind the actors to a fresh in-process broker, migrate the store, replay any
        jobs spooled by an earlier run, and start the worker threads."""
        configure(self.settings)
        from . import actors  # noqa: F401  (every actor declared, on this broker, before the threads start)

        if self.upgrade:
            get_store().upgrade()
        replayed = 0
        if Path(self.settings.outbox_path).exists():
            outbox = Outbox(self.settings.outbox_path)
            try:
                replayed = outbox.forward(self._enqueue_encoded)
            finally:
                outbox.close()
        if replayed:
            logger.info("replayed %d job(s) spooled by an earlier run", replayed)
        self.worker = dramatiq.Worker(self.broker, worker_threads=self.threads, worker_timeout=100)
        self.worker.start()
        logger.info("embedded worker started: %d thread(s), store %s", self.threads, get_store().backend)
        return self

    def _enqueue_encoded(self, items: list[tuple[str, bytes]]) -> None:
        for _, data in items:
            self.broker.enqueue(dramatiq.Message.decode(data))

    def join(self, timeout: float | None = None) -> None:
        """Wait until every queue (and its retry queue) is empty and idle.

        Raises :class:`dramatiq.errors.QueueJoinTimeout` after ``timeout`` seconds.
        """
        ms = None if timeout is None else max(1, int(timeout * 1000))
        for _ in range(2):  # a job may enqueue onto a queue already joined
            for queue in QUEUES:
                self.broker.join(queue, timeout=ms, fail_fast=False)  # type: ignore[call-arg]

    def dead_letters(self) -> list[DeadLetter]:
        """Jobs dead-lettered since start, with their reasons."""
        out = []
        for message in getattr(self.broker, "dead_letters", []):
            reason = message.options.get("dead_letter_reason") or repr(getattr(message, "_exception", None))
            out.append(DeadLetter(message.message_id, message.actor_name, reason))
        return out

    def stop(self, timeout: float | None = DEFAULT_DRAIN_TIMEOUT) -> int:
        """Drain the queues (up to ``timeout`` seconds), stop the threads, spool what is
        left to the outbox, and return how many jobs were spooled."""
        if self.worker is None:
            return 0
        try:
            self.join(timeout)
        except QueueJoinTimeout:
            logger.warning("queues not drained after %ss; spooling the rest", timeout)
        self.worker.stop()
        self.worker = None
        left = self._spool_leftovers()
        runtime.reset()
        return left

    def _spool_leftovers(self) -> int:
        items: list[tuple[str, bytes]] = []
        queues: dict[str, Any] = getattr(self.broker, "queues", {})
        for name, queue in queues.items():
            while not queue.empty():
                items.append((name, queue.get_nowait()))
                queue.task_done()
        if not items:
            return 0
        outbox = Outbox(self.settings.outbox_path)
        try:
            outbox.put(items)
        finally:
            outbox.close()
        logger.warning("spooled %d unfinished job(s) to %s; they run on the next start", len(items), outbox.path)
        return len(items)


@dataclass(frozen=True)
class JobsSent:
    """What :func:`run_jobs` did: the jobs' message ids, and how many of them went to
    the outbox because the broker was unreachable (they are forwarded later)."""

    ids: list[str]
    spooled: int = 0
    outbox_path: Path | None = None


def run_jobs(settings: Settings, jobs: Sequence[tuple[str, Any]]) -> JobsSent:
    """Send ``(actor, payload)`` jobs to the broker of ``settings``; with no broker
    configured run them here, on an embedded runtime, and return once they are done.

    Raises :class:`~sessionq.errors.InvalidPayload` for a bad payload (nothing is sent)
    and, in embedded mode, :class:`~sessionq.errors.JobError` naming the first job that
    was dead-lettered and why.
    """
    from .producer import Producer

    if settings.queue_url is not None:
        producer = Producer(settings)
        try:
            ids = [producer.send(actor, arg) for actor, arg in jobs]
            return JobsSent(ids, producer.pending(), producer.outbox_path)
        finally:
            producer.close()
    embedded = EmbeddedRuntime(settings, threads=2).start()
    try:
        producer = Producer(settings)
        ids = [producer.send(actor, arg) for actor, arg in jobs]
        embedded.join()
        failed = {d.message_id: d.reason for d in embedded.dead_letters()}
    finally:
        embedded.stop()
    for job_id in ids:
        if job_id in failed:
            raise JobError(f"job {job_id} failed: {failed[job_id]}")
    return JobsSent(ids)
