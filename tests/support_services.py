"""Private, throwaway service instances for fault tests.

Fault tests stop and restart a real server under load. They never touch the shared
services: each starts its own ``redis-server`` or PostgreSQL cluster on a free port
and stops it when done.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import service_missing

PG_BIN = Path(os.environ.get("SESSIONQ_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, *, up: bool = True, timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Wait until 127.0.0.1:port accepts (``up``) or refuses connections.

    With ``proc`` (the server meant to listen there), fail at once if it exited: the
    port may otherwise be answered by whoever else took it.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up and proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for port {port} exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} did not go {'up' if up else 'down'} within {timeout}s")


class PrivateRedis:
    """A ``redis-server`` on its own port that a test may stop and start again.

    With ``data_dir`` it keeps an append-only file there (``appendfsync always``), so a
    stop and start keeps its data like a production Redis restart; without it nothing
    is kept on disk.
    """

    def __init__(self, port: int | None = None, *, data_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) the server and wait until it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            service_missing("redis-server binary", FileNotFoundError("redis-server"))
        args = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.data_dir is None:
            args += ["--appendonly", "no"]
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            args += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)

    def stop(self) -> None:
        """SIGTERM the server (it writes its append-only file first, if any) and wait."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None
            wait_port(self.port, up=False)


class PrivatePostgres:
    """A PostgreSQL cluster in a temporary directory on its own port.

    Data survives :meth:`stop` / :meth:`start`, as with a real server restart.
    """

    def __init__(self, base: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self._as_postgres = os.geteuid() == 0
        self._own_base: Path | None = None
        if self._as_postgres:
            # pytest's temp dirs are 0700 root: the postgres user could not reach them.
            base = self._own_base = Path(tempfile.mkdtemp(prefix="sessionq-pg-"))
        self.dir = base / "pgdata"
        self.sock = base / "pgsock"

    @property
    def url(self) -> str:
        """A URL for the ``postgres`` database as user ``postgres``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if self._as_postgres:
            runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin") or "runuser"
            cmd = [runuser, "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def init(self) -> None:
        """Create the cluster (trust auth on loopback)."""
        if not (PG_BIN / "initdb").exists():
            service_missing("PostgreSQL binaries", FileNotFoundError(str(PG_BIN / "initdb")))
        for path in (self.dir.parent, self.sock):
            path.mkdir(parents=True, exist_ok=True)
            if self._as_postgres:
                shutil.chown(path, "postgres", "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.dir), "-U", "postgres", "-A", "trust", "--no-sync")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir), "-o", opts, "-w", "-t", "60",
                  "-l", str(self.dir.parent / "pg.log"), "start")
        wait_port(self.port)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients; ``immediate``: crash-like)."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir), "-m", mode, "-w", "stop")
        wait_port(self.port, up=False)

    def remove(self) -> None:
        """Delete the cluster's files if they live outside the test's temp dir."""
        if self._own_base is not None:
            shutil.rmtree(self._own_base, ignore_errors=True)


@pytest.fixture
def private_redis() -> object:
    """A private Redis, stopped at the end of the test."""
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_postgres(tmp_path: Path) -> object:
    """A private PostgreSQL cluster, stopped at the end of the test."""
    server = PrivatePostgres(tmp_path)
    server.init()
    server.start()
    yield server
    try:
        server.stop("immediate")
    except (subprocess.CalledProcessError, TimeoutError):
        pass
    server.remove()
