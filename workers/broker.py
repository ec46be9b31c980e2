"""The ONE module that builds the broker and calls ``dramatiq.set_broker``.

* ``redis://`` (``REDIS_URL`` or ``SESSIONQ_BROKER_URL``): a :class:`RedisBroker`.
* ``amqp://`` (``SESSIONQ_BROKER_URL``): a :class:`RabbitmqBroker` (needs ``pika``).
* nothing: **embedded mode** — an in-process :class:`StubBroker`; the same actors run
  on worker threads started by :class:`sessionq.workers.embedded.EmbeddedRuntime` (importing
  this module never starts a thread).

Middleware: Retries (transient errors only, exponential backoff), TimeLimit, AgeLimit,
Callbacks, dead-letter reasons, job metrics and log context
(:class:`sessionq.workers.middleware.JobObserver`), CurrentMessage (the save actor hands its
message to the group committer, which acks a committed batch's jobs at once), and
Dramatiq's Prometheus exporter when
``SESSIONQ_WORKER_PROMETHEUS`` is true. Importing this module builds nothing and reads
no environment: :func:`configure` builds the broker for the settings it is given,
calls ``dramatiq.set_broker`` and rebinds every declared actor to it. A worker calls it
before any actor is declared: :mod:`sessionq.workers.actors` does so with the
environment's settings (``dramatiq sessionq.workers.actors``) unless a broker is
configured already (the CLI's ``--redis-url`` / ``--config``, the embedded runtime).

Worker tuning comes from :class:`~sessionq.models.settings.Settings` (environment names in
brackets, milliseconds): ``worker_heartbeat_timeout_ms``
(``SESSIONQ_WORKER_HEARTBEAT_TIMEOUT``, 60000: silence after which a Redis worker counts
as dead and its unacked messages are redelivered by the next sweep of a live worker,
see :mod:`sessionq.workers.redis_broker`), ``worker_maintenance_chance``
(``SESSIONQ_WORKER_MAINTENANCE_CHANCE``, per million of Dramatiq's own Redis calls
that run its maintenance), ``job_max_retries`` / ``job_min_backoff_ms`` / ``job_max_backoff_ms`` /
``job_time_limit_ms`` (``SESSIONQ_JOB_*``) and ``worker_prometheus``
(``SESSIONQ_WORKER_PROMETHEUS``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AgeLimit, Callbacks, CurrentMessage, Middleware, Retries, TimeLimit

from sessionq.errors import ConfigError, TransientJobError
from sessionq.models import Settings, Store, open_store
from sessionq.models.settings import is_amqp_url, is_redis_url, redact_url

from . import metrics
from .errors import is_transient
from .jobs import QUEUES
from .middleware import JobObserver

logger = logging.getLogger(__name__)

# Key prefix of every Dramatiq key in Redis (Dramatiq's default).
DEFAULT_NAMESPACE = "dramatiq"

def retry_policy(max_retries: int) -> Callable[[int, BaseException], bool]:
    """The Retries policy: retry only transient errors, at most ``max_retries`` times."""

    def retry_when(retries: int, exception: BaseException) -> bool:
        return is_transient(exception) and retries < max_retries

    return retry_when


class DeadLetterReasons(Middleware):
    """Record why a message was dead-lettered, in the message itself.

    Runs after Retries decided to give up and before the consumer nacks, so on Redis
    the stored message (which the nack moves into the dead-letter set) gains
    ``options.dead_letter_reason`` and ``options.dead_lettered_at``.
    """

    _SCRIPT = "if redis.call('hexists', KEYS[1], ARGV[1]) == 1 then redis.call('hset', KEYS[1], ARGV[1], ARGV[2]) end"

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        """Note the reason of a failed message."""
        if exception is not None and message.failed:
            # An error may name its own reason code (SessionForgotten: "forgotten: ...").
            code = getattr(exception, "dead_letter_reason", None) or type(exception).__name__
            self._record(broker, message, f"{code}: {exception}")

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Note the reason of a message skipped as failed (e.g. too old)."""
        if message.failed:
            self._record(broker, message, "skipped: message exceeded its age limit")

    def before_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        """Note a reason for a message rejected without being processed (e.g. a
        message for an unknown actor, which the consumer dead-letters itself)."""
        if "dead_letter_reason" not in message.options:
            exception = getattr(message, "_exception", None)
            reason = f"{type(exception).__name__}: {exception}" if exception is not None else "rejected"
            self._record(broker, message, reason)

    def _record(self, broker: dramatiq.Broker, message: Any, reason: str) -> None:
        reason = reason[:2000]
        logger.error("job %s (%s) dead-lettered: %s", message.message_id, message.actor_name, reason)
        message.options["dead_letter_reason"] = reason
        message.options["dead_lettered_at"] = int(time.time() * 1000)
        client = getattr(broker, "client", None)
        redis_id = message.options.get("redis_message_id")
        if client is None or redis_id is None:
            return
        key = f"{broker.namespace}:{message.queue_name}.msgs"  # type: ignore[attr-defined]
        data = message._message.copy(options={"dead_letter_reason": reason}).encode()
        try:
            client.eval(self._SCRIPT, 1, key, redis_id, data)
        except Exception as exc:  # the dead letter still happens, only without its reason
            logger.warning("could not record the dead-letter reason of %s: %s", message.message_id, exc)


class TransientTracebacks(logging.Filter):
    """Log a transient job failure as one WARNING line instead of an ERROR with a traceback.

    Dramatiq's worker logs every exception that is not a ``Retry`` with its traceback;
    while a database restarts, each retry of each job would add some 60 lines (87,000
    lines in a 3-second PostgreSQL outage with 8 threads). The failure is expected and
    retried with backoff, so one line naming the error is enough. A
    :class:`~sessionq.errors.TransientJobError` (a session whose save is still queued)
    is part of normal operation: like a Dramatiq ``Retry`` it is not logged here at all
    (Retries logs the retry at INFO).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Shorten records about transient errors; pass everything else unchanged."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TransientJobError):
            return False
        if exc is None or not is_transient(exc):
            return True
        try:
            text = record.getMessage()
            first = (str(exc).strip().splitlines() or [""])[0][:300]
        except Exception:  # a filter must never break the worker thread that logs
            return True
        record.msg, record.args = "%s (transient %s: %s; retried with backoff)", (text, type(exc).__name__, first)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


#: Dramatiq's logger for job failures (see :class:`TransientTracebacks`).
_WORKER_LOGGER = "dramatiq.worker.WorkerThread"


def _middleware(settings: Settings) -> list[Middleware]:
    stack: list[Middleware] = [
        AgeLimit(),
        TimeLimit(time_limit=settings.job_time_limit_ms),
        Callbacks(),
        JobObserver(),
        CurrentMessage(),
        DeadLetterReasons(),
        Retries(
            min_backoff=settings.job_min_backoff_ms,
            max_backoff=settings.job_max_backoff_ms,
            retry_when=retry_policy(settings.job_max_retries),
        ),
    ]
    if settings.worker_prometheus:
        from dramatiq.middleware.prometheus import Prometheus

        stack.append(Prometheus())
    return stack


def build_broker(settings: Settings) -> dramatiq.Broker:
    """A new broker for the settings' queue URL (``None`` = embedded StubBroker)."""
    url = settings.queue_url
    if url is None:
        return StubBroker(middleware=_middleware(settings), fail_fast_default=False)
    if is_redis_url(url):
        from .redis_broker import SessionqRedisBroker

        return SessionqRedisBroker(
            url=url,
            middleware=_middleware(settings),
            namespace=DEFAULT_NAMESPACE,
            heartbeat_timeout=settings.worker_heartbeat_timeout_ms,
            maintenance_chance=settings.worker_maintenance_chance,
        )
    if is_amqp_url(url):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=url, middleware=_middleware(settings))
    raise ConfigError(f"queue URL {redact_url(url)!r}: unsupported scheme (use redis:// or amqp://)")


class _Runtime:
    """Per-process state shared by the actors: settings, broker, store, group committer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.settings: Settings | None = None
        self.broker: dramatiq.Broker | None = None
        self.store: Store | None = None
        self.committer: Any = None
        self.redis: Any = None

    def reset(self) -> None:
        with self.lock:
            if self.committer is not None:
                self.committer.close()
            if self.store is not None:
                self.store.close()
            self.store = self.committer = self.redis = None


runtime = _Runtime()


def configure(settings: Settings) -> dramatiq.Broker:
    """Build the broker for ``settings``, make it the global one and rebind every
    declared actor to it; the per-process store is reopened on next use."""
    worker_logger = logging.getLogger(_WORKER_LOGGER)
    if not any(isinstance(f, TransientTracebacks) for f in worker_logger.filters):
        worker_logger.addFilter(TransientTracebacks())
    metrics.prepare(settings)
    new = build_broker(settings)
    # An actor module imported before any configure() declared its actors on
    # Dramatiq's default broker: those are rebound too.
    old = runtime.broker or dramatiq.broker.global_broker
    runtime.reset()
    runtime.settings, runtime.broker = settings, new
    dramatiq.set_broker(new)
    if old is not None:
        for actor in list(old.actors.values()):
            actor.broker = new
            new.declare_actor(actor)
    for queue in QUEUES:
        new.declare_queue(queue)
    return new


def is_configured() -> bool:
    """True once :func:`configure` has run in this process."""
    return runtime.broker is not None


def current_broker(url: str | None) -> dramatiq.Broker | None:
    """The configured broker if it serves the queue URL ``url``, else ``None``."""
    if runtime.broker is None or runtime.settings is None or runtime.settings.queue_url != url:
        return None
    return runtime.broker


def get_settings() -> Settings:
    """The settings the broker was configured with."""
    assert runtime.settings is not None
    return runtime.settings


def get_broker() -> dramatiq.Broker:
    """The configured broker."""
    assert runtime.broker is not None
    return runtime.broker


def is_embedded() -> bool:
    """True when no queue URL is configured (in-process broker)."""
    return get_settings().queue_url is None


def get_store() -> Store:
    """This process's store, opened on first use (shared by all worker threads)."""
    if runtime.store is None:
        with runtime.lock:
            if runtime.store is None:
                runtime.store = open_store(get_settings())
                if runtime.store.sealer.enabled:
                    logger.info("encryption at rest on: sealing under key %s, opening keys %s",
                                runtime.store.sealer.primary, ", ".join(runtime.store.sealer.key_ids))
    return runtime.store


def get_committer() -> Any:
    """This process's :class:`~sessionq.workers.groupcommit.GroupCommitter` over the store."""
    if runtime.committer is None:
        store = get_store()
        with runtime.lock:
            if runtime.committer is None:
                from .groupcommit import GroupCommitter

                # On Redis the flusher acks a committed batch's jobs in one round trip.
                early_ack = getattr(get_broker(), "ack_messages", None)
                delay = get_settings().group_commit_delay_ms / 1000
                runtime.committer = GroupCommitter(store, gather_delay=delay, after_commit=early_ack)
    return runtime.committer


def get_redis() -> Any | None:
    """A Redis client for shared state (sweep book), or ``None`` in embedded mode."""
    settings = get_settings()
    url = settings.redis_url or (settings.queue_url if is_redis_url(settings.queue_url) else None)
    if url is None:
        return None
    if runtime.redis is None:
        import redis

        broker = get_broker()
        runtime.redis = getattr(broker, "client", None) if url == settings.queue_url else None
        if runtime.redis is None:
            runtime.redis = redis.Redis.from_url(url)
    return runtime.redis
