"""How a long-running command starts: wait for its services, then check the schema.

``sessionq worker``, ``sessionq scheduler`` and ``sessionq serve`` start alike
(:func:`wait_until_ready`). Each service they need — the store (worker, serve), Redis
and the broker (all three) — is asked to answer, again after 1 s, 2 s, 4 s … (at most
10 s apart), with one log line per failed attempt naming the service (password masked)
and why, until it answers or ``wait`` seconds (``--wait``, ``SESSIONQ_STARTUP_WAIT``,
default 60) have passed; then the command stops with one line naming what did not
answer, exit 1. A process manager restarting it, or the operator, takes it from there.

Then the store's schema is checked once (:meth:`~sessionq.models.store.Store.check_schema`):
missing or behind stops the command at once with one line naming the store and
``sessionq db upgrade`` (waiting would not fix it); the embedded default, a SQLite file
with no schema yet, gets its schema instead.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis

from sessionq.errors import StoreUnavailable
from sessionq.models import Settings, open_store
from sessionq.models.settings import is_amqp_url, is_redis_url, redact_url

from .health import DEFAULT_CONNECT_TIMEOUT, with_connect_timeout
from .logs import redact

logger = logging.getLogger(__name__)

# Seconds before the second attempt; each later pause doubles, up to DEFAULT_MAX_DELAY.
DEFAULT_FIRST_DELAY = 1.0
# Longest pause between two attempts (seconds).
DEFAULT_MAX_DELAY = 10.0
# Seconds one Redis command of a probe may take.
DEFAULT_PROBE_TIMEOUT = 5.0
# Port of an AMQP broker whose URL names none.
DEFAULT_AMQP_PORT = 5672

#: What "does not answer" looks like: worth another attempt. Anything else is raised at once.
UNANSWERED: tuple[type[BaseException], ...] = (StoreUnavailable, redis.ConnectionError, redis.TimeoutError, OSError)


@dataclass(frozen=True)
class Service:
    """Something a command needs at start: its name in messages (password masked) and a
    probe that returns once it answers and raises one of :data:`UNANSWERED` otherwise."""

    name: str
    probe: Callable[[], None]


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return redact(lines[0][:300] if lines else type(exc).__name__)


def wait_for(
    services: Sequence[Service],
    *,
    wait: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Probe each service in turn until it answers, within ``wait`` seconds in all.

    Raises :class:`~sessionq.errors.StoreUnavailable` naming the first service that did
    not answer in time, and why. ``wait=0`` makes one attempt per service.
    """
    deadline = clock() + wait
    for service in services:
        delay, attempt = DEFAULT_FIRST_DELAY, 0
        while True:
            attempt += 1
            try:
                service.probe()
            except UNANSWERED as exc:
                reason = _reason(exc)
            else:
                if attempt > 1:
                    logger.info("%s answers (attempt %d)", service.name, attempt)
                break
            left = deadline - clock()
            if left <= 0:
                raise StoreUnavailable(f"{service.name} did not answer within {wait:g}s: {reason}")
            pause = min(delay, left)
            logger.warning("%s does not answer (attempt %d): %s; next attempt in %.0fs, giving up in %.0fs",
                           service.name, attempt, reason, pause, left)
            sleep(pause)
            delay = min(delay * 2, DEFAULT_MAX_DELAY)


def _ping_redis(url: str) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=DEFAULT_CONNECT_TIMEOUT,
                                  socket_timeout=DEFAULT_PROBE_TIMEOUT)
    try:
        client.ping()
    finally:
        client.close()


def _connect_amqp(url: str) -> None:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "localhost", parts.port or DEFAULT_AMQP_PORT),
                                  timeout=DEFAULT_CONNECT_TIMEOUT):
        pass


def services_of(settings: Settings, *, store: bool) -> list[Service]:
    """The services a command on ``settings`` needs: the store (if ``store``), Redis
    (``redis_url``) and the broker (``broker_url``, when it is another server)."""
    services: list[Service] = []
    if store:
        store_url = with_connect_timeout(settings.storage_url)

        def ping_store() -> None:
            probe = open_store(store_url, max_pool_size=1)
            try:
                probe.ping()
            finally:
                probe.close()

        services.append(Service(f"store {redact_url(settings.storage_url)}", ping_store))
    for url in dict.fromkeys(u for u in (settings.redis_url, settings.queue_url) if u):
        if is_redis_url(url):
            services.append(Service(f"Redis {redact_url(url)}", functools.partial(_ping_redis, url)))
        elif is_amqp_url(url):
            services.append(Service(f"broker {redact_url(url)}", functools.partial(_connect_amqp, url)))
    return services


def wait_until_ready(settings: Settings, *, store: bool = True, wait: float | None = None) -> None:
    """Wait for the services of ``settings`` (see the module docs), then check the
    store's schema once (``store=False``: the scheduler, which opens no store).

    ``wait`` defaults to ``settings.startup_wait_seconds``. Raises
    :class:`~sessionq.errors.StoreUnavailable` for a service that did not answer in time
    and :class:`~sessionq.errors.SchemaOutdated` for a store to upgrade.
    """
    wait_for(services_of(settings, store=store), wait=settings.startup_wait_seconds if wait is None else wait)
    if store:
        checked = open_store(settings, max_pool_size=1)
        try:
            checked.check_schema(create=True)
        finally:
            checked.close()
