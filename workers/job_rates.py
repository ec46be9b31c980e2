"""Jobs settled per minute, shared by every worker process through Redis.

The console's "jobs/s" and "failure rate" need counts from all workers, which the
per-process Prometheus counters cannot give the ``sessionq serve`` process. Each
worker process counts settled jobs in memory (:class:`RateRecorder`, fed by
:class:`~sessionq.workers.middleware.JobObserver`) and adds them every few seconds to
one Redis hash per minute (``sessionq:job-rates:<epoch minute>``, field = outcome),
which expires after an hour; :func:`read_rates` sums the last minutes. Counting is
best effort: a flush that fails is logged and its counts are dropped, never retried
into a double count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Prefix of the per-minute hashes.
KEY_PREFIX = "sessionq:job-rates:"
# Seconds between a worker process's flushes.
DEFAULT_FLUSH_INTERVAL = 2.0
# Seconds a minute's hash is kept.
DEFAULT_KEEP_SECONDS = 3600
# Outcomes that count as failures (see sessionq.workers.metrics.OUTCOMES).
FAILED_OUTCOMES = frozenset({"retry", "dead", "error"})


class RateRecorder:
    """Counts settled jobs per minute and outcome, flushed to Redis by a daemon thread."""

    def __init__(self, client: Any, *, interval: float = DEFAULT_FLUSH_INTERVAL) -> None:
        self.client = client
        self.interval = interval
        self._pending: Counter[tuple[int, str]] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def count(self, outcome: str, at: float | None = None) -> None:
        """Count one job settled with ``outcome`` (now, or at epoch seconds ``at``)."""
        minute = int((time.time() if at is None else at) // 60)
        with self._lock:
            self._pending[(minute, outcome)] += 1

    def flush(self) -> None:
        """Add the pending counts to Redis (dropped, with a warning, if Redis fails)."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
        if not pending:
            return
        pipe = self.client.pipeline(transaction=False)
        for (minute, outcome), n in pending.items():
            key = f"{KEY_PREFIX}{minute}"
            pipe.hincrby(key, outcome, n)
            pipe.expire(key, DEFAULT_KEEP_SECONDS)
        try:
            pipe.execute()
        except Exception as exc:  # rates are advisory; the job itself is settled already
            logger.warning("could not record %d job outcome(s) for the console: %s", sum(pending.values()), exc)

    def start(self) -> None:
        """Flush every ``interval`` seconds from a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="sessionq-job-rates", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def stop(self) -> None:
        """Stop the thread and flush what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1)
        self.flush()


@dataclass(frozen=True)
class JobRates:
    """Jobs settled over the last ``seconds``: by outcome, per second, failure share."""

    seconds: float
    by_outcome: dict[str, int]

    @property
    def total(self) -> int:
        """Jobs settled in the window."""
        return sum(self.by_outcome.values())

    @property
    def per_second(self) -> float:
        """Jobs settled per second over the window."""
        return self.total / self.seconds if self.seconds > 0 else 0.0

    @property
    def failure_rate(self) -> float | None:
        """The share of settled jobs that failed (retry, dead, error); None if none settled."""
        total = self.total
        failed = sum(n for outcome, n in self.by_outcome.items() if outcome in FAILED_OUTCOMES)
        return failed / total if total else None


def read_rates(client: Any, minutes: int = 5, now: float | None = None) -> JobRates:
    """The counts of the last ``minutes`` minutes (the current one included, so far)."""
    now = time.time() if now is None else now
    current = int(now // 60)
    pipe = client.pipeline(transaction=False)
    for minute in range(current - minutes + 1, current + 1):
        pipe.hgetall(f"{KEY_PREFIX}{minute}")
    totals: Counter[str] = Counter()
    for found in pipe.execute():
        for outcome, n in found.items():
            totals[outcome.decode() if isinstance(outcome, bytes) else str(outcome)] += int(n)
    return JobRates(seconds=(minutes - 1) * 60 + (now - current * 60), by_outcome=dict(totals))
