"""Fixtures and helpers for the HTTP, metrics and health tests.

* :class:`ServerThread` runs a real uvicorn server on a free loopback port.
* :class:`TcpProxy` sits in front of a real service; stopping it drops every
  connection and refuses new ones, starting it again (same port) brings the
  service back — the real outage-and-recovery path, without touching the shared
  service itself.
* ``pg_store`` fixture (and conftest's ``redis_client``): the isolated PostgreSQL database and
  Redis db from the ``SESSIONQ_TEST_*`` variables, flushed before and after.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import uvicorn

from sessionq.models import Store, open_store
from sessionq.models.errors import StoreError
from tests.conftest import POSTGRES_URL, reset_store, service_missing

REPO_ROOT = Path(__file__).resolve().parent.parent
# Seconds to wait for a server or proxy to come up or go down.
STARTUP_TIMEOUT = 60.0  # a subprocess importing and connecting on a loaded 2-core box


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_port() -> int:
    """A loopback port with no listener (connections are refused)."""
    return free_port()


def with_port(url: str, port: int, host: str = "127.0.0.1") -> str:
    """``url`` pointed at ``host:port`` (user and password kept)."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=(f"{auth}@" if auth else "") + f"{host}:{port}"))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: repo root on ``PYTHONPATH``, no stray config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGE_", "SESSIONQ_", "REDIS_URL"))}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    """``python -m cli ARGS`` with this interpreter."""
    return [sys.executable, "-m", "sessionq.cli", *args]


class ServerThread:
    """A uvicorn server for ``app`` on a free loopback port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(STARTUP_TIMEOUT)


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``target``; :meth:`stop` is an outage, :meth:`start` a recovery."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        """Listen (again) on the same port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Refuse new connections and cut every open one."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture
def pg_store() -> Iterator[Store]:
    """The migrated PostgreSQL store of ``SESSIONQ_TEST_POSTGRES_URL``, emptied before and after."""
    try:
        store = open_store(POSTGRES_URL, max_pool_size=4)
        store.ping()
        store.upgrade()
    except StoreError as exc:
        service_missing("postgresql", exc)
    reset_store(store)
    yield store
    reset_store(store)
    store.close()




class Blackhole:
    """A TCP server that accepts connections and never answers: a hung database."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        """Stop listening and drop every held connection (clients then fail at once)."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for conn in self.accepted:
            conn.close()

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
