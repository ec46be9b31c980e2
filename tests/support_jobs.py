"""Helpers for the job-system tests: real Redis, real worker processes, wire messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
QUEUES = ("sessions", "maintenance", "bulk")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: the repo on PYTHONPATH, no inherited broker/store."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "STORAGE_URL", "SESSIONQ_BROKER_URL")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("SESSIONQ_JOB_MIN_BACKOFF", "100")
    env.setdefault("SESSIONQ_JOB_MAX_BACKOFF", "1000")
    env.update(extra)
    return env




class WorkerProcess:
    """``python -m dramatiq sessionq.workers.actors`` as a subprocess, stopped with SIGTERM."""

    def __init__(self, storage_url: str, *, processes: int = 1, threads: int = 8, log: Path, **env: str) -> None:
        self.log = log
        argv = [sys.executable, "-m", "dramatiq", "sessionq.workers.actors", "-p", str(processes), "-t", str(threads)]
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=child_env(REDIS_URL=REDIS_URL, STORAGE_URL=storage_url, **env),
            stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, wait, return the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                # Dramatiq's worker processes too, or they keep consuming during later tests
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()
        return self.proc.returncode

    def output(self) -> str:
        """Everything the worker logged so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")


def wire_message(actor: str, arg: Any, queue: str = "sessions") -> tuple[str, bytes]:
    """A Dramatiq message exactly as docs/wire-contract.md describes: (redis id, JSON)."""
    rid = str(uuid.uuid4())
    message = {
        "queue_name": queue,
        "actor_name": actor,
        "args": [arg],
        "kwargs": {},
        "options": {"redis_message_id": rid},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": int(time.time() * 1000),
    }
    return rid, json.dumps(message).encode()


def push_raw(client: redis.Redis, items: list[tuple[str, Any]], queue: str = "sessions") -> None:
    """Push ``(actor, arg)`` jobs with HSET + RPUSH (no validation: tests bad payloads too)."""
    pipe = client.pipeline(transaction=True)
    for actor, arg in items:
        rid, data = wire_message(actor, arg, queue)
        pipe.hset(f"dramatiq:{queue}.msgs", rid, data)
        pipe.rpush(f"dramatiq:{queue}", rid)
    pipe.execute()


def pending_jobs(client: redis.Redis) -> int:
    """Jobs queued, delayed or in flight (not yet acked or dead-lettered)."""
    return sum(int(client.hlen(f"dramatiq:{q}{suffix}.msgs")) for q in QUEUES for suffix in ("", ".DQ"))


def wait_drained(client: redis.Redis, worker: WorkerProcess | None = None, *, timeout: float = 180.0) -> None:
    """Wait until every queue is empty; fail with the worker's log if it takes too long."""
    deadline = time.monotonic() + timeout
    while pending_jobs(client):
        if worker is not None and not worker.alive():
            pytest.fail(f"worker died:\n{worker.output()[-3000:]}")
        if time.monotonic() > deadline:
            log = worker.output()[-3000:] if worker else ""
            pytest.fail(f"{pending_jobs(client)} job(s) still pending after {timeout}s\n{log}")
        time.sleep(0.1)


def dead_letters(client: redis.Redis, queue: str = "sessions") -> list[dict[str, Any]]:
    """The dead-lettered messages of a queue (decoded)."""
    return [json.loads(v) for v in client.hvals(f"dramatiq:{queue}.XQ.msgs")]
