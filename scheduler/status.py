"""The record of each sweep's last run, shared by workers (writers) and health (readers).

A sweep runs on whichever worker picks it up, so its outcome is kept where every
process can see it: a Redis hash (``sessionq:sweeps``) when Redis is configured, an
in-process dict in embedded mode (where worker, scheduler and HTTP share a process).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

# Redis hash holding one JSON entry per sweep kind.
DEFAULT_SWEEPS_KEY = "sessionq:sweeps"
# Consecutive failures after which health reports the sweep as failing.
DEFAULT_FAILING_AFTER = 3


@dataclass(frozen=True)
class SweepRun:
    """The outcome of a sweep's latest run and its failure streak."""

    kind: str
    finished_at: float
    ok: bool
    duration: float
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    consecutive_failures: int = 0

    @property
    def failing(self) -> bool:
        """True once the sweep has failed ``DEFAULT_FAILING_AFTER`` times in a row."""
        return self.consecutive_failures >= DEFAULT_FAILING_AFTER

    def to_json(self) -> dict[str, Any]:
        """A JSON-compatible dict (for health output and storage)."""
        return asdict(self) | {"failing": self.failing}


class _Backend(Protocol):
    def get(self, kind: str) -> str | None: ...
    def put(self, kind: str, value: str) -> None: ...
    def all(self) -> dict[str, str]: ...


class _Memory:
    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, kind: str) -> str | None:
        with self._lock:
            return self._data.get(kind)

    def put(self, kind: str, value: str) -> None:
        with self._lock:
            self._data[kind] = value

    def all(self) -> dict[str, str]:
        with self._lock:
            return dict(self._data)


class _Redis:
    def __init__(self, client: Any, key: str) -> None:
        self.client, self.key = client, key

    def get(self, kind: str) -> str | None:
        value = self.client.hget(self.key, kind)
        return value.decode() if isinstance(value, bytes) else value

    def put(self, kind: str, value: str) -> None:
        self.client.hset(self.key, kind, value)

    def all(self) -> dict[str, str]:
        return {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in self.client.hgetall(self.key).items()
        }


_memory = _Memory()


class SweepBook:
    """Where sweep outcomes are recorded and read.

    ``SweepBook(redis_client)`` shares them through Redis; ``SweepBook()`` uses the
    process-wide in-memory book (embedded mode).
    """

    def __init__(self, redis_client: Any | None = None, *, key: str = DEFAULT_SWEEPS_KEY) -> None:
        self._backend: _Backend = _memory if redis_client is None else _Redis(redis_client, key)

    def record(
        self, kind: str, *, ok: bool, duration: float, counts: dict[str, int] | None = None, error: str | None = None
    ) -> SweepRun:
        """Record one run; failures extend the streak, a success resets it."""
        previous = self.last(kind)
        streak = 0 if ok else (previous.consecutive_failures + 1 if previous else 1)
        run = SweepRun(kind, time.time(), ok, duration, dict(counts or {}), error, streak)
        self._backend.put(kind, json.dumps(asdict(run)))
        return run

    def last(self, kind: str) -> SweepRun | None:
        """The latest run of ``kind``, or ``None`` if it never ran."""
        raw = self._backend.get(kind)
        return None if raw is None else SweepRun(**json.loads(raw))

    def all(self) -> dict[str, SweepRun]:
        """The latest run of every kind that has run."""
        return {kind: SweepRun(**json.loads(raw)) for kind, raw in sorted(self._backend.all().items())}
