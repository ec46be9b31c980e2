"""The HTTP side: ``GET /session-health`` and ``GET /metrics`` (``sessionq serve``).

A Starlette app served by uvicorn, the stack the MCP SDK already uses. Both
endpoints want ``Authorization: Bearer <SESSIONQ_API_TOKEN>`` when a token is
configured (compared in constant time); :func:`serve` refuses to listen on a
non-loopback address without one, and binds before anything starts, so a port in use
is one line of error. Health probes block (store, Redis), so they run in
the thread pool and carry their own deadline (see :mod:`sessionq.workers.health`).
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sessionq.models import Settings, Store
from sessionq.models.errors import ConfigError

from .health import EventStoreMode, HealthChecker
from .metrics import StateCollector, event_registry, prepare

logger = logging.getLogger(__name__)

HEALTH_PATH = "/session-health"
METRICS_PATH = "/metrics"


class _Forward:
    """Expose another registry's metrics inside the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


def _authorized(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def _unauthorized() -> Response:
    return JSONResponse(
        {"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="sessionq"'}
    )


def create_app(
    settings: Settings,
    store: Store | None = None,
    redis_client: Any | None = None,
    *,
    event_store_mode: EventStoreMode | None = None,
    checker: HealthChecker | None = None,
) -> Starlette:
    """The health-and-metrics app for ``settings``.

    Shares ``store`` and ``redis_client`` if given (the caller closes them), else
    opens its own with short timeouts and closes them on shutdown.
    ``event_store_mode`` reports the MCP event store's mode (``"redis"``/``"memory"``).
    """
    own_checker = checker is None
    health = checker or HealthChecker(
        settings, store=store, redis_client=redis_client, event_store_mode=event_store_mode
    )
    prepare(settings)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Forward(event_registry()))
    registry.register(StateCollector(health))
    token = settings.api_token

    async def session_health(request: Request) -> Response:
        if not _authorized(request, token):
            return _unauthorized()
        report = await run_in_threadpool(health.check)
        return JSONResponse(report.to_json(), status_code=200 if report.healthy else 503,
                            headers={"Cache-Control": "no-store"})

    async def metrics(request: Request) -> Response:
        if not _authorized(request, token):
            return _unauthorized()
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if own_checker:
            health.close()

    app = Starlette(
        routes=[Route(HEALTH_PATH, session_health), Route(METRICS_PATH, metrics)],
        lifespan=lifespan,
    )
    app.state.health = health
    return app


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings, host: str) -> None:
    """Raise :class:`ConfigError` when ``host`` is not loopback and no API token is set."""
    if not settings.api_token and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host} without an API token: set SESSIONQ_API_TOKEN "
            "(or api_token in the config file), or bind 127.0.0.1"
        )


def listen(settings: Settings, host: str | None = None, port: int | None = None) -> tuple[Settings, socket.socket]:
    """Bind the HTTP address: ``settings`` with ``host``/``port`` applied, and the bound socket.

    The address is validated like any setting (:class:`ConfigError` for a port out of
    range) and checked by :func:`check_bind`; an address that cannot be bound (in use,
    not local) is a one-line :class:`ConfigError` too. ``port=0`` picks a free port:
    read it from the socket.
    """
    overrides: dict[str, Any] = {k: v for k, v in (("http_host", host), ("http_port", port)) if v is not None}
    settings = dataclasses.replace(settings, **overrides) if overrides else settings
    host, port = settings.http_host, settings.http_port
    check_bind(settings, host)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    # As uvicorn does: a restart may rebind while the old connections sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return settings, sock


def serve(
    settings: Settings, host: str | None = None, port: int | None = None, *, wait: float | None = None,
    **app_options: Any,
) -> None:
    """Bind, wait for the store and Redis (up to ``wait`` seconds, see
    :func:`~sessionq.workers.startup.wait_until_ready`), then serve the app with uvicorn
    until SIGINT/SIGTERM (in-flight requests finish first)."""
    import uvicorn

    from .startup import wait_until_ready

    settings, sock = listen(settings, host, port)
    try:
        wait_until_ready(settings, wait=wait)
    except BaseException:
        sock.close()
        raise
    app = create_app(settings, **app_options)
    host, port = settings.http_host, sock.getsockname()[1]
    logger.info("serving %s and %s on http://%s:%d", HEALTH_PATH, METRICS_PATH, host, port)
    # log_config=None: uvicorn's loggers go through the redacting handler the CLI set up.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
