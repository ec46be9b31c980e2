"""``sessionq up``: worker, scheduler and HTTP server in one process.

On the embedded default (no broker URL) the worker is the in-process runtime
(:class:`~sessionq.workers.embedded.EmbeddedRuntime`); with a broker it is a Dramatiq worker
on it. The scheduler fires sweeps onto the same broker; the HTTP server serves
``/session-health`` and ``/metrics`` from a background thread. Stopping reverses
the order, so the worker drains whatever the scheduler enqueued last.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from sessionq.models import Settings

logger = logging.getLogger(__name__)

# Seconds to wait for the HTTP server to start listening.
DEFAULT_HTTP_START_TIMEOUT = 10.0


class AllInOne:
    """The three long-running parts of sessionq in one process.

    ``http=False`` / ``scheduler=False`` leave a part out; ``host`` and ``port``
    override ``settings.http_host`` / ``settings.http_port`` and are validated like
    them (``0`` picks a free port, see :attr:`http_port`). The HTTP address is bound
    before anything starts, so an address in use is a :class:`ConfigError` with nothing
    to undo; if a later part fails to start, the parts already running are stopped.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        threads: int | None = None,
        http: bool = True,
        scheduler: bool = True,
        host: str | None = None,
        port: int | None = None,
    ) -> None:
        overrides: dict[str, Any] = {k: v for k, v in (("http_host", host), ("http_port", port)) if v is not None}
        self.settings = dataclasses.replace(settings, **overrides) if overrides else settings
        self.threads = threads or settings.worker_threads
        self.with_http, self.with_scheduler = http, scheduler
        self.http_port: int | None = None
        self._stoppers: list[Callable[[], Any]] = []

    def start(self) -> AllInOne:
        """Bind the HTTP address, bring the schema up to date, then start the worker, the scheduler and HTTP."""
        from sessionq.models import open_store

        sock = None
        if self.with_http:
            from .http import listen

            self.settings, sock = listen(self.settings)
        try:
            store = open_store(self.settings)
            try:
                store.upgrade()
            finally:
                store.close()
            self._stoppers.append(self._start_worker())
            if self.with_scheduler:
                self._stoppers.append(self._start_scheduler())
            if sock is not None:
                self._stoppers.append(self._start_http(sock))
                sock = None
        except BaseException:
            if sock is not None:
                sock.close()
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop in reverse order; the worker drains queued jobs last."""
        while self._stoppers:
            stopper = self._stoppers.pop()
            try:
                stopper()
            except Exception:
                logger.exception("stopping %r failed", stopper)

    def __enter__(self) -> AllInOne:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _start_worker(self) -> Callable[[], Any]:
        if self.settings.queue_url is None:
            from .embedded import EmbeddedRuntime

            runtime = EmbeddedRuntime(self.settings, threads=self.threads).start()
            return runtime.stop
        import dramatiq

        from .broker import configure

        broker = configure(self.settings)
        from . import actors  # noqa: F401  (every actor declared, on this broker, before the worker consumes)

        worker = dramatiq.Worker(broker, worker_threads=self.threads)
        worker.start()
        return worker.stop

    def _start_scheduler(self) -> Callable[[], Any]:
        from sessionq.scheduler.runner import SweepScheduler, dramatiq_send

        client = None
        if self.settings.redis_url:
            import redis

            client = redis.Redis.from_url(self.settings.redis_url)
        runner = SweepScheduler(dramatiq_send(), settings=self.settings, redis=client)
        runner.start()
        return runner.stop

    def _start_http(self, sock: socket.socket) -> Callable[[], Any]:
        import uvicorn

        from .http import create_app

        host, self.http_port = self.settings.http_host, sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.settings), host=host, port=self.http_port, log_config=None, access_log=False,
            lifespan="on",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="sessionq-http", daemon=True)
        thread.start()
        deadline = threading.Event()
        for _ in range(int(DEFAULT_HTTP_START_TIMEOUT * 20)):
            if server.started or not thread.is_alive():
                break
            deadline.wait(0.05)
        if not server.started:
            server.should_exit = True
            raise RuntimeError(f"the HTTP server did not start on {host}:{self.http_port}")
        logger.info("serving /session-health and /metrics on http://%s:%s", host, self.http_port)

        def stop() -> None:
            server.should_exit = True
            thread.join(timeout=10)

        return stop
