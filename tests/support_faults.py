"""Helpers for the fault and hostile-input suite (issue #9).

* :class:`SessionqWorker` runs ``sessionq worker`` (the product's entry point, with its
  redacting log handler) in its own process group, so a test can ``kill -9`` the whole
  worker — parent and forked children — the way a crashed host loses it.
* :func:`record_figures` prints a case's figures (jobs sent, persisted, duplicated,
  lost ...) and appends them to ``fault-figures.json`` in pytest's base temp dir.
* Planted secrets: every worker these tests start gets a PostgreSQL URL with a
  password and an API token; :func:`assert_no_secrets` scans captured logs for them.
* :func:`pg_ledger` reads back what PostgreSQL holds, per message id, with plain SQL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support_jobs import ROOT, child_env

#: Secrets planted in every process of the suite; none may reach a log line.
PLANTED_PASSWORD = "pl4nted-PG-pw-7f3a91"
PLANTED_TOKEN = "pl4nted-api-token-9c1e5d2b"
PLANTED = (PLANTED_PASSWORD, PLANTED_TOKEN)


def with_password(url: str, password: str = PLANTED_PASSWORD) -> str:
    """``url`` with ``password`` for its user (trust auth ignores it; logs must hide it)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class SessionqWorker:
    """``python -m cli worker`` in a new process group; :meth:`kill9` is a host crash."""

    def __init__(self, storage_url: str, redis_url: str, *, log: Path, processes: int = 1, threads: int = 8,
                 env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = log.open("ab")
        argv = [sys.executable, "-m", "sessionq.cli", "worker", "-p", str(processes), "-t", str(threads)]
        extra = {"REDIS_URL": redis_url, "STORAGE_URL": storage_url, "SESSIONQ_API_TOKEN": PLANTED_TOKEN}
        extra.update(env or {})
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=child_env(**extra), stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        """True while the parent process runs."""
        return self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL the whole process group: nothing is acked, flushed or cleaned up."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self._out.close()

    def stop(self) -> int:
        """SIGTERM the parent (graceful: it stops its children), wait, return the exit
        code; SIGKILL the group after 60 s."""
        if self.alive():
            # Only the parent: a second SIGTERM (the group's, then the parent's) makes
            # dramatiq kill its children instead of stopping them.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self._out.closed:
            self._out.close()
        return int(self.proc.returncode)

    def output(self) -> str:
        """Everything the worker logged so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")


def figures_path(config: pytest.Config) -> Path:
    """Where the suite's figures accumulate (pytest's base temp dir)."""
    base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    return Path(base) / "fault-figures.json"


def record_figures(request: pytest.FixtureRequest, case: str, **numbers: Any) -> dict[str, Any]:
    """Print a case's figures and append them to ``fault-figures.json``."""
    entry = {"case": case, "test": request.node.nodeid, **numbers}
    path = figures_path(request.config)
    existing = json.loads(path.read_text()) if path.exists() else []
    existing.append(entry)
    path.write_text(json.dumps(existing, indent=2, default=str))
    print(f"\nFIGURES {case}: {json.dumps(numbers, default=str)}")
    return entry


def assert_no_secrets(sources: Iterable[tuple[str, str]]) -> int:
    """Fail if a planted secret appears in any line of the named texts; return lines scanned."""
    lines = 0
    for name, text in sources:
        for number, line in enumerate(text.splitlines(), start=1):
            lines += 1
            for secret in PLANTED:
                assert secret not in line, f"secret leaked in {name} line {number}: {line[:300]}"
    return lines


@dataclass
class Ledger:
    """What PostgreSQL holds for a set of sessions, read with plain SQL."""

    rows: int = 0
    per_message: Counter[tuple[str, str]] = field(default_factory=Counter)
    seqs: dict[str, list[int]] = field(default_factory=dict)
    message_count: dict[str, int] = field(default_factory=dict)

    @property
    def duplicated(self) -> int:
        """Rows beyond the first for any (session, message) id."""
        return sum(n - 1 for n in self.per_message.values() if n > 1)

    def gap_free(self) -> bool:
        """Every session's seq values are exactly 1..N and N equals its message_count."""
        return all(
            sorted(seqs) == list(range(1, len(seqs) + 1)) and self.message_count.get(sid) == len(seqs)
            for sid, seqs in self.seqs.items()
        )


def pg_ledger(url: str, prefix: str) -> Ledger:
    """Count rows per message id and collect seq values for sessions whose id starts with ``prefix``."""
    import psycopg2

    ledger = Ledger()
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT session_id, message_id, seq FROM sessionq_messages WHERE session_id LIKE %s",
                        (prefix + "%",))
            for sid, mid, seq in cur:
                ledger.rows += 1
                ledger.per_message[(sid, mid)] += 1
                ledger.seqs.setdefault(sid, []).append(seq)
            cur.execute("SELECT session_id, message_count FROM sessionq_sessions WHERE session_id LIKE %s",
                        (prefix + "%",))
            ledger.message_count = dict(cur)
    finally:
        conn.close()
    return ledger


def wait_until(predicate: Any, *, timeout: float, interval: float = 0.2, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout}s")
        time.sleep(interval)

