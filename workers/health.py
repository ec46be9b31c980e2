"""Health: can sessionq do its work right now?

One :class:`HealthChecker` answers for ``GET /session-health``, the scrape-time
gauges of ``GET /metrics`` and ``sessionq health``. It asks the store for its counts,
the broker's Redis for queue depths and dead letters, and the sweep book for the
last sweeps. Every probe runs in a small thread pool with a deadline, so a database
that does not answer gives a fast "unreachable", never a hung health check; a probe
still stuck from an earlier check is waited on again rather than started twice, so
threads cannot pile up behind a dead server (each probe has one thread of its own).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sessionq.models import Settings, Store, StoreStats, open_store, utcnow
from sessionq.models.errors import StoreUnavailable
from sessionq.models.settings import is_redis_url, redact_url, storage_backend
from sessionq.models.tasks import TaskStats
from sessionq.scheduler.status import SweepBook, SweepRun

from .logs import redact
from .queue_state import QUEUES, QueueDepth, read_queues

logger = logging.getLogger(__name__)

# Seconds one health check waits for its probes before calling a component unreachable.
DEFAULT_PROBE_TIMEOUT = 3.0
# Seconds a connection attempt by a health-owned client (PostgreSQL, Redis, MongoDB) may take.
DEFAULT_CONNECT_TIMEOUT = 2

#: Answers the MCP event store's mode ("redis" or "memory"), e.g. ``lambda: event_store.mode``.
EventStoreMode = Callable[[], str]

OK, UNREACHABLE, ERROR, EMBEDDED, NONE = "ok", "unreachable", "error", "embedded", "none"


@dataclass
class HealthReport:
    """The outcome of one health check.

    ``database``, ``broker`` and ``redis`` are ``"ok"``, ``"unreachable"`` or
    ``"error"`` (reachable but failing, e.g. no schema); the broker is
    ``"embedded"`` without a queue URL and ``redis`` is ``"none"`` without Redis.
    """

    database: str
    broker: str
    redis: str
    event_store: str
    timestamp: datetime
    backend: str = ""
    stats: StoreStats | None = None
    #: MCP task counts, the oldest working task's age and expired leases (None if unknown).
    tasks: TaskStats | None = None
    queues: dict[str, QueueDepth] = field(default_factory=dict)
    sweeps: dict[str, SweepRun] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """True when the store and the broker answer and no sweep keeps failing."""
        return not self.problems

    @property
    def status(self) -> str:
        """``"healthy"`` or ``"unhealthy"``."""
        return "healthy" if self.healthy else "unhealthy"

    def to_json(self) -> dict[str, Any]:
        """The ``/session-health`` document (secrets redacted)."""
        counts = self.stats.to_json() if self.stats is not None else {}
        return {
            "status": self.status,
            "database": self.database,
            "backend": self.backend,
            "broker": self.broker,
            "redis": self.redis,
            "total_sessions": counts.get("total_sessions"),
            "active_sessions": counts.get("active_sessions"),
            "expired_sessions": counts.get("expired_sessions"),
            "archived_sessions": counts.get("archived_sessions"),
            "transport_sessions": counts.get("transport_sessions"),
            "tasks": self.tasks.to_json() if self.tasks is not None else None,
            "queue_depths": {name: depth.to_json() for name, depth in self.queues.items()},
            "dead_letters": {name: depth.dead for name, depth in self.queues.items()},
            "sweeps": {kind: _sweep_json(run) for kind, run in self.sweeps.items()},
            "event_store": self.event_store,
            "problems": list(self.problems),
            "timestamp": self.timestamp.isoformat(),
        }


def _sweep_json(run: SweepRun) -> dict[str, Any]:
    data = run.to_json()
    if data.get("error"):
        data["error"] = redact(str(data["error"]))
    return data


def with_connect_timeout(url: str, seconds: int = DEFAULT_CONNECT_TIMEOUT) -> str:
    """``url`` with a short connect timeout added where the driver reads one from the URL
    (PostgreSQL ``connect_timeout``, MongoDB ``connectTimeoutMS``/``serverSelectionTimeoutMS``);
    a timeout already in the URL wins."""
    parts = urlsplit(url)
    backend = storage_backend(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if backend == "postgresql":
        query.setdefault("connect_timeout", str(seconds))
    elif backend == "mongodb":
        query.setdefault("connectTimeoutMS", str(seconds * 1000))
        query.setdefault("serverSelectionTimeoutMS", str(seconds * 1000))
    else:
        return url
    return urlunsplit(parts._replace(query=urlencode(query)))


def _redis_client(url: str, timeout: float) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=DEFAULT_CONNECT_TIMEOUT, socket_timeout=timeout)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__)


class HealthChecker:
    """Checks the store, the broker and the sweeps; thread-safe, reusable.

    Pass ready clients (``store``, ``redis_client``) to share them, or let the
    checker open its own from ``settings`` with short connect timeouts (those it
    opened are closed by :meth:`close`). ``redis_client`` serves the sweep book and,
    unless ``settings.broker_url`` names another server, the queues too.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        redis_client: Any | None = None,
        broker_client: Any | None = None,
        event_store_mode: EventStoreMode | None = None,
        queues: tuple[str, ...] = QUEUES,
        timeout: float = DEFAULT_PROBE_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.queues = queues
        self.timeout = timeout
        self.event_store_mode = event_store_mode
        self._store = store
        self._schema_current = False
        self._owned: list[Any] = []
        self._store_lock = threading.Lock()
        if redis_client is None and settings.redis_url:
            redis_client = _redis_client(settings.redis_url, timeout)
            self._owned.append(redis_client)
        self.redis_client = redis_client
        self.broker_url = (
            settings.broker_url if settings.broker_url and settings.broker_url != settings.redis_url else None
        )
        if broker_client is None and self.broker_url is None:
            broker_client = redis_client
        elif broker_client is None and is_redis_url(self.broker_url):
            broker_client = _redis_client(str(self.broker_url), timeout)
            self._owned.append(broker_client)
        self.broker_client = broker_client
        # One thread per probe: a probe never runs twice at once, and a pooled store
        # keeps exactly one connection (Peewee binds connections to threads).
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._inflight: dict[str, Future[Any]] = {}
        self._lock = threading.Lock()

    @property
    def store(self) -> Store:
        """The store checked (opened on first use with a short connect timeout if not given)."""
        with self._store_lock:
            if self._store is None:
                self._store = open_store(with_connect_timeout(self.settings.storage_url), max_pool_size=2)
                self._store.location = redact_url(self.settings.storage_url)  # as configured, without the timeouts
                self._owned.append(self._store)
            return self._store

    def close(self) -> None:
        """Close what the checker opened and stop its probe threads (without waiting)."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        for resource in reversed(self._owned):
            try:
                resource.close()
            except Exception:  # closing is best effort; the process is going away
                logger.debug("closing %r failed", resource, exc_info=True)
        self._owned.clear()

    def __enter__(self) -> HealthChecker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _submit(self, name: str, fn: Callable[[], Any]) -> Future[Any]:
        with self._lock:
            running = self._inflight.get(name)
            if running is not None and not running.done():
                return running
            pool = self._pools.get(name)
            if pool is None:
                pool = self._pools[name] = ThreadPoolExecutor(1, thread_name_prefix=f"sessionq-health-{name}")
            future = pool.submit(fn)
            self._inflight[name] = future
            return future

    def _wait(self, future: Future[Any], deadline: float) -> tuple[str, Any]:
        """``("ok", value)``, or ``("unreachable"|"error", description)``."""
        try:
            return OK, future.result(timeout=max(deadline - time.monotonic(), 0.0))
        except FutureTimeout:
            return UNREACHABLE, f"no answer within {self.timeout:g}s"
        except StoreUnavailable as exc:
            return UNREACHABLE, _describe(exc)
        except (ConnectionError, OSError, TimeoutError, RedisConnectionError, RedisTimeoutError) as exc:
            return UNREACHABLE, _describe(exc)
        except Exception as exc:
            return ERROR, _describe(exc)

    def _store_stats(self) -> StoreStats:
        try:
            return self._checked_stats()
        except StoreUnavailable:
            # A pooled connection cut by a database restart fails once and is dropped;
            # one fresh attempt tells a dead database from a stale connection.
            return self._checked_stats()

    def _checked_stats(self) -> StoreStats:
        # Until the schema was once found current (it never goes back), a missing or
        # outdated one is the answer ("error", naming `sessionq db upgrade`), not whatever
        # error a query on missing tables happens to raise.
        if not self._schema_current:
            self.store.check_schema(create=True)
            self._schema_current = True
        return self.store.stats()

    def _ping_broker_socket(self) -> None:
        parts = urlsplit(str(self.broker_url))
        address = (parts.hostname or "localhost", parts.port or 5672)
        with socket.create_connection(address, timeout=DEFAULT_CONNECT_TIMEOUT):
            pass

    def check(self) -> HealthReport:
        """Run every probe (in parallel, within ``timeout`` seconds) and report."""
        deadline = time.monotonic() + self.timeout
        store_future = self._submit("store", self._store_stats)
        tasks_future = self._submit("tasks", lambda: self.store.task_stats(utcnow()))
        broker_future: Future[Any] | None = None
        if self.broker_client is not None:
            client = self.broker_client
            broker_future = self._submit("broker", lambda: read_queues(client, self.queues))
        elif self.broker_url is not None:
            broker_future = self._submit("broker", self._ping_broker_socket)
        book = SweepBook(self.redis_client) if self.redis_client is not None else SweepBook()
        sweeps_future = self._submit("sweeps", book.all)

        report = HealthReport(database=OK, broker=EMBEDDED, redis=NONE, event_store=NONE, timestamp=utcnow())
        report.backend = self.settings.backend
        report.database, value = self._wait(store_future, deadline)
        if report.database == OK:
            report.stats = value
        else:
            report.problems.append(f"database {report.database}: {value}")
        state, value = self._wait(tasks_future, deadline)
        report.tasks = value if state == OK else None
        if broker_future is not None:
            report.broker, value = self._wait(broker_future, deadline)
            if report.broker == OK:
                report.queues = value or {}
            else:
                report.problems.append(f"broker {report.broker}: {value}")
        state, value = self._wait(sweeps_future, deadline)
        if self.redis_client is not None:
            report.redis = state
            if state != OK and (self.broker_client is not self.redis_client or report.broker == OK):
                report.problems.append(f"redis {state}: {value}")
        if state == OK:
            report.sweeps = value
            report.problems.extend(
                f"sweep {kind} failing: {run.consecutive_failures} failures in a row"
                + (f" ({redact(run.error)})" if run.error else "")
                for kind, run in value.items()
                if run.failing
            )
        report.event_store = self._event_store_mode(report)
        return report

    def _event_store_mode(self, report: HealthReport) -> str:
        if self.event_store_mode is None:
            return "redis" if report.redis == OK else NONE
        try:
            return str(self.event_store_mode())
        except Exception as exc:  # a broken provider must not break health
            logger.warning("event store mode provider failed: %s", exc)
            return ERROR
