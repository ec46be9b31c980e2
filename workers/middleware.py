"""A Dramatiq middleware that gives every job its log context and its metrics.

Add it to the broker (``broker.add_middleware(JobObserver())``) and every message:

* logs with ``job_id``, ``actor``, ``queue`` (and ``session_id`` when the message
  carries one) on each line its actor and the middleware below log;
* counts once in ``sessionq_jobs_total{actor, outcome}`` when the broker settles it:
  ``ok`` (acked after success), ``retry`` (failed, re-enqueued by the Retries
  middleware), ``dead`` (failed for good: dead-lettered), ``skipped``
  (``SkipMessage``, e.g. too old) — so at-least-once redeliveries count per delivery;
* records its run time in ``sessionq_job_duration_seconds{actor}``.

The outcome is taken from ack/nack rather than from ``after_process_message``, so
it does not depend on where this middleware sits relative to ``Retries``.
"""

from __future__ import annotations

import threading
import time
from contextvars import Token
from typing import Any

from dramatiq import Middleware

from .job_rates import RateRecorder
from .logs import bind_job_context, reset_job_context
from .metrics import event_metrics, observe_job


def session_id_of(message: Any) -> str | None:
    """The ``session_id`` a job is about: a keyword argument, or a key of a dict first argument."""
    value = message.kwargs.get("session_id") if isinstance(message.kwargs, dict) else None
    if value is None and message.args and isinstance(message.args[0], dict):
        value = message.args[0].get("session_id")
    return str(value) if value is not None else None


class _Running:
    __slots__ = ("failed", "seconds", "skipped", "started", "token")

    def __init__(self, token: Token[dict[str, str] | None] | None) -> None:
        self.started = time.perf_counter()
        self.seconds: float | None = None
        self.failed = False
        self.skipped = False
        self.token = token


class JobObserver(Middleware):
    """Log context and job metrics for every message (see the module docs)."""

    def __init__(self) -> None:
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._rates: RateRecorder | None = None

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        """Build this process's event metrics now, so that a worker that has run no job
        yet already serves its (zero) series and rates start from a sample. On a Redis
        broker, start counting settled jobs for the console (:mod:`~sessionq.workers.job_rates`)."""
        event_metrics()
        client = getattr(broker, "client", None)
        if client is not None and self._rates is None:
            self._rates = RateRecorder(client)
            self._rates.start()

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        """Flush the last job counts."""
        rates, self._rates = self._rates, None
        if rates is not None:
            rates.stop()

    def before_process_message(self, broker: Any, message: Any) -> None:
        """Bind the job's log context and start its clock."""
        token = bind_job_context(
            job_id=message.message_id,
            actor=message.actor_name,
            queue=message.queue_name,
            session_id=session_id_of(message),
        )
        with self._lock:
            self._running[message.message_id] = _Running(token)

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        """Stop the clock; remember whether the actor raised."""
        with self._lock:
            running = self._running.get(message.message_id)
        if running is not None:
            running.seconds = time.perf_counter() - running.started
            running.failed = exception is not None

    def after_skip_message(self, broker: Any, message: Any) -> None:
        """A skipped message is settled like a processed one: ``skipped`` if acked, ``dead``
        if rejected (an earlier middleware such as AgeLimit may skip it before our
        ``before_process_message`` ran)."""
        with self._lock:
            running = self._running.setdefault(message.message_id, _Running(None))
        if running.seconds is None:
            running.seconds = time.perf_counter() - running.started
        running.skipped = True

    def after_ack(self, broker: Any, message: Any) -> None:
        """Acked: ``ok``, or ``retry`` if the actor raised (Retries enqueued a copy)."""
        self._settle(message, acked=True)

    def after_nack(self, broker: Any, message: Any) -> None:
        """Rejected: the message is dead-lettered."""
        self._settle(message, acked=False)

    def _settle(self, message: Any, *, acked: bool) -> None:
        with self._lock:
            running = self._running.pop(message.message_id, None)
        if running is None:
            # Settled without being processed here (e.g. requeued at shutdown): nothing ran.
            return
        if not acked:
            outcome = "dead"
        elif running.skipped:
            outcome = "skipped"
        else:
            outcome = "retry" if running.failed else "ok"
        observe_job(message.actor_name, outcome, running.seconds)
        if self._rates is not None:
            self._rates.count(outcome)
        if running.token is None:
            return
        try:
            reset_job_context(running.token)
        except ValueError:
            # Settled on another thread or context than it started on; that context ends anyway.
            pass
