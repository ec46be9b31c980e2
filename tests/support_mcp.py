"""Fixtures and helpers for the MCP integration tests (imported explicitly).

A real Redis (``SESSIONQ_TEST_REDIS_URL``, flushed: that database only), real
``ops/example_server.py`` processes on free loopback ports, and the SDK's client.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import httpx2
import pytest
import redis
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_SERVER = ROOT / "ops" / "example_server.py"
# Seconds a server process may take to answer after it was started.
START_TIMEOUT = 30.0


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio (what uvicorn and the SDK use)."""
    return "asyncio"


@pytest.fixture
def redis_db(redis_client: redis.Redis) -> redis.Redis:
    """The test Redis database (see ``conftest.redis_client``)."""
    return redis_client


def free_port() -> int:
    """A TCP port nothing listens on right now (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_redis_url() -> str:
    """A Redis URL on a port where nothing listens."""
    return f"redis://127.0.0.1:{free_port()}/0"


class ServerProcess:
    """``ops/example_server.py`` in a subprocess we can SIGKILL and start again on the same port."""

    def __init__(self, port: int, storage_url: str, *, retry_ms: int | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.port = port
        self.storage_url = storage_url
        self.retry_ms = retry_ms
        self.env = env or {}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The MCP endpoint."""
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> ServerProcess:
        """Start the server and wait until it answers its health route."""
        env = {**os.environ, "REDIS_URL": REDIS_URL, "SESSIONQ_LOG_LEVEL": "INFO", **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, str(EXAMPLE_SERVER), "--port", str(self.port), "--storage-url", self.storage_url]
        if self.retry_ms is not None:
            cmd += ["--retry-ms", str(self.retry_ms)]
        with open(self.log_path or os.devnull, "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"example server exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1.0).raise_for_status()
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"example server did not start within {START_TIMEOUT}s")

    @property
    def pid(self) -> int:
        """The process id of the running server."""
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: a crash, nothing is cleaned up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM and wait (a clean shutdown), SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """A factory of started example servers sharing one SQLite store in ``tmp_path``;
    all are killed at the end."""
    started: list[ServerProcess] = []
    storage_url = f"sqlite:///{tmp_path / 'sessions.db'}"

    def make(
        *, port: int | None = None, retry_ms: int | None = None, env: dict[str, str] | None = None
    ) -> ServerProcess:
        server = ServerProcess(port or free_port(), storage_url, retry_ms=retry_ms, env=env,
                               log_path=tmp_path / "server.log")
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.kill()


class RoundRobin(httpx2.AsyncBaseTransport):
    """A load balancer without sticky routing: each request goes to the next port."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.turn = 0
        self.inner = httpx2.AsyncHTTPTransport()
        self.seen_session_ids: list[str] = []
        #: ``(method, Last-Event-ID or None)`` of every request sent.
        self.requests: list[tuple[str, str | None]] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Forward to the next instance."""
        port = self.ports[self.turn % len(self.ports)]
        self.turn += 1
        session_id = request.headers.get("mcp-session-id")
        if session_id:
            self.seen_session_ids.append(session_id)
        self.requests.append((request.method, request.headers.get("last-event-id")))
        request.url = request.url.copy_with(port=port)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self.inner.aclose()


@asynccontextmanager
async def mcp_client(url: str, *, transport: httpx2.AsyncBaseTransport | None = None,
                     logs: list[Any] | None = None) -> AsyncIterator[ClientSession]:
    """An initialized SDK client session (protocol 2025-11-25: sessions and priming events)."""

    async def on_log(params: Any) -> None:
        if logs is not None:
            logs.append(params.data)

    timeout = httpx2.Timeout(30.0, read=60.0)
    async with (
        httpx2.AsyncClient(transport=transport, timeout=timeout) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write, logging_callback=on_log) as session,
    ):
        result = await session.initialize()
        assert result.protocol_version == "2025-11-25"
        yield session


def text_of(result: Any) -> str:
    """The text of a tool result's first content block."""
    return str(result.content[0].text)


def session_keys(session_id: str) -> tuple[str, str]:
    """The Redis stream and open-request set of one MCP session."""
    return f"sessionq:mcp:events:{session_id}", f"sessionq:mcp:open:{session_id}"


Entry = tuple[bytes, dict[bytes, bytes]]


def entries(client: redis.Redis, key: str, first: str = "-", last: str = "+") -> list[Entry]:
    """``XRANGE key first last`` with its real (bytes) types."""
    return cast(list[Entry], client.xrange(key, min=first, max=last))
