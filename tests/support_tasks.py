"""Processes and clients for the MCP task tests (imported explicitly).

Replicas are ``python -m tests.task_app`` processes, workers are ``sessionq worker
--queues tasks --mcp-app tests.task_app:server`` processes (each in its own process
group, so ``kill -9`` takes the Dramatiq parent and its worker processes down like a
lost host); all share the private PostgreSQL database and Redis database of the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from sessionq.models import Store
from sessionq.models.tasks import McpTask
from sessionq.workers.mcp.tasks_client import SessionqTasksClient
from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.support_mcp import free_port

ROOT = Path(__file__).resolve().parent.parent
# Seconds a process may take to come up.
START_TIMEOUT = 30.0
# Seconds a test waits for a task to reach a state.
WAIT = 30.0
#: Short leases and sweeps so that lost workers are noticed within seconds.
FAST_ENV = {
    "SESSIONQ_TASK_LEASE": "1500",
    "SESSIONQ_TASK_INTERVAL": "1",
    "SESSIONQ_TASK_DISPATCH_TIMEOUT": "2000",
    "SESSIONQ_WORKER_HEARTBEAT_TIMEOUT": "2000",
    "SESSIONQ_WORKER_MAINTENANCE_CHANCE": "1000000",
    "SESSIONQ_LOG_LEVEL": "INFO",
}


def process_env(**extra: str) -> dict[str, str]:
    """The environment of a replica or worker: the run's PostgreSQL and Redis."""
    env = dict(os.environ, STORAGE_URL=POSTGRES_URL, REDIS_URL=REDIS_URL, **FAST_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


@dataclass
class Proc:
    """A child process in its own process group, with its log file."""

    cmd: list[str]
    env: dict[str, str]
    log: Path
    ready: Callable[[Proc], bool]
    proc: subprocess.Popen[bytes] | None = field(default=None)

    def start(self) -> Proc:
        """Start it and wait until ``ready``."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[2:5]} exited with {self.proc.returncode}: {self.output()[-2000:]}")
            if self.ready(self):
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.cmd} did not start within {START_TIMEOUT}s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group (a lost host)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def output(self) -> str:
        """Everything it logged so far."""
        return self.log.read_text(errors="replace")


class Cluster:
    """Replicas and workers of ``tests.task_app`` on the shared stores."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.tmp = tmp
        self.env = process_env(**env)
        self.procs: list[Proc] = []

    def replica(self, port: int | None = None, *, module: str = "tests.task_app") -> str:
        """Start a replica of the app ``module``; return its MCP URL."""
        port = port or free_port()

        def up(_: Proc) -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        log = self.tmp / f"replica-{port}.log"
        cmd = [sys.executable, "-m", module, "--port", str(port)]
        self.procs.append(Proc(cmd, self.env, log, up).start())
        return f"http://127.0.0.1:{port}/mcp"

    def worker(self, *queues: str, threads: int = 4, app: str = "tests.task_app:server") -> Proc:
        """Start a tasks worker (one process) running ``app``'s tools."""
        log = self.tmp / f"worker-{len(self.procs)}.log"
        cmd = [sys.executable, "-m", "sessionq.cli", "worker", "-p", "1", "-t", str(threads), "--mcp-app", app]
        for queue in queues or ("tasks",):
            cmd += ["--queues", queue]
        proc = Proc(cmd, self.env, log, lambda p: "ready for action" in p.output()).start()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Kill every process started."""
        for proc in self.procs:
            proc.kill()



@asynccontextmanager
async def task_client(url: str, token: str = "alice", *, tasks: bool = True, mode: str = "2026-07-28",
                      **client_options: Any) -> AsyncIterator[Client]:
    """An SDK client at ``mode`` with a bearer token, declaring the Tasks extension
    (``tasks=True``: :class:`SessionqTasksClient`, polling every 50 ms at most)."""
    headers = {"authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=60.0)) as http:
        extensions = [SessionqTasksClient(poll_interval=0.05, timeout=WAIT)] if tasks else []
        async with Client(streamable_http_client(url, http_client=http), mode=mode,
                          extensions=extensions, **client_options) as client:
            yield client


def wait_until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def await_until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """:func:`wait_until` for async tests (``check`` runs in a thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await anyio.to_thread.run_sync(check)
        if value:
            return value
        await anyio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def task_in(store: Store, task_id: str, *statuses: str) -> McpTask | None:
    """The task if it is in one of ``statuses`` now."""
    task = store.load_task(task_id)
    return task if task.status in statuses else None
