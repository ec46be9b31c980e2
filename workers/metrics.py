"""Prometheus metrics: every sessionq metric object lives here.

Two kinds:

* Event metrics, updated where things happen (actors, sweeps) through the helpers
  :func:`observe_job`, :func:`observe_save`, :func:`observe_sweep` (and the
  :func:`timed_job` context manager). They live in :func:`event_registry`.
* State metrics, read at scrape time by :class:`StateCollector` from one health
  check: sessions by status, queue depth, dead letters, component reachability,
  the last run of each sweep.

Workers run under Dramatiq's ``Prometheus`` middleware, which serves its own
``dramatiq_*`` metrics on port 9191 from a multiprocess directory. Give worker
processes ``PROMETHEUS_MULTIPROC_DIR`` and ``dramatiq_prom_db`` pointing at the same
directory *before they start*, and the event metrics above are served there too.
``sessionq serve`` serves both kinds for its own process at ``GET /metrics``.

Importing this module builds no metric: in multiprocess mode every metric writes a
file under that directory, so the event metrics are built on first use, after
:func:`prepare` (called by :func:`sessionq.workers.broker.configure`) has created the
directory from ``settings.prometheus_multiproc_dir``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from sessionq.models import Settings

from .health import OK, HealthChecker, HealthReport

# Outcomes a job can be counted under; a fixed set keeps label cardinality bounded.
OUTCOMES = ("ok", "retry", "dead", "skipped", "error")
# Save-latency buckets in seconds: a save is one transaction of a few statements.
DEFAULT_SAVE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Sweep-duration buckets in seconds: batched set-based statements over big tables.
DEFAULT_SWEEP_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


def prepare(settings: Settings) -> None:
    """Create the multiprocess directory the metrics of this process write into
    (``settings.prometheus_multiproc_dir``), if one is set."""
    if settings.prometheus_multiproc_dir:
        Path(settings.prometheus_multiproc_dir).mkdir(parents=True, exist_ok=True)


class _EventMetrics:
    """The event metrics, registered in their own registry (built by :func:`event_metrics`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter(
            "sessionq_jobs", "Jobs run, by actor and outcome.", ["actor", "outcome"], registry=self.registry
        )
        self.job_seconds = Histogram(
            "sessionq_job_duration_seconds", "Time spent running a job, by actor.", ["actor"],
            buckets=DEFAULT_SAVE_BUCKETS, registry=self.registry,
        )
        self.save_seconds = Histogram(
            "sessionq_save_seconds", "Store latency of one session save (one transaction).",
            buckets=DEFAULT_SAVE_BUCKETS, registry=self.registry,
        )
        self.sweep_rows = Counter(
            "sessionq_sweep_rows", "Rows changed or deleted by sweeps, by kind.", ["kind"], registry=self.registry
        )
        self.sweep_seconds = Histogram(
            "sessionq_sweep_duration_seconds", "Duration of sweep runs, by kind.", ["kind"],
            buckets=DEFAULT_SWEEP_BUCKETS, registry=self.registry,
        )
        self.sweep_failures = Counter(
            "sessionq_sweep_failures", "Sweep runs that failed, by kind.", ["kind"], registry=self.registry
        )


_built: _EventMetrics | None = None
_build_lock = threading.Lock()


def event_metrics() -> _EventMetrics:
    """This process's event metrics, built on first use."""
    global _built
    if _built is None:
        with _build_lock:
            if _built is None:
                _built = _EventMetrics()
    return _built


def event_registry() -> CollectorRegistry:
    """The registry holding sessionq's event metrics (what ``/metrics`` forwards)."""
    return event_metrics().registry


# The module attributes of the event metrics (``from .metrics import JOBS``), built on first access.
_ATTRIBUTES = {
    "REGISTRY": "registry",
    "JOBS": "jobs",
    "JOB_SECONDS": "job_seconds",
    "SAVE_SECONDS": "save_seconds",
    "SWEEP_ROWS": "sweep_rows",
    "SWEEP_SECONDS": "sweep_seconds",
    "SWEEP_FAILURES": "sweep_failures",
}


def __getattr__(name: str) -> Any:
    if name in _ATTRIBUTES:
        return getattr(event_metrics(), _ATTRIBUTES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Metric names Dramatiq's Prometheus middleware exports from workers (port 9191).
DRAMATIQ_METRICS = (
    "dramatiq_messages_total",
    "dramatiq_message_errors_total",
    "dramatiq_message_retries_total",
    "dramatiq_message_rejects_total",
    "dramatiq_messages_inprogress",
    "dramatiq_delayed_messages_inprogress",
    "dramatiq_message_duration_milliseconds",
)


def observe_job(actor: str, outcome: str, seconds: float | None = None) -> None:
    """Count one job run of ``actor`` under ``outcome`` (one of :data:`OUTCOMES`)
    and, if given, record its duration."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    metrics = event_metrics()
    metrics.jobs.labels(actor, outcome).inc()
    if seconds is not None:
        metrics.job_seconds.labels(actor).observe(seconds)


@contextmanager
def timed_job(actor: str) -> Iterator[None]:
    """Time the block as one run of ``actor``: ``ok`` if it returns, ``error`` if it raises
    (the exception propagates). For jobs run outside Dramatiq; Dramatiq messages are
    counted by :class:`sessionq.workers.middleware.JobObserver`."""
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        observe_job(actor, "error", time.perf_counter() - started)
        raise
    observe_job(actor, "ok", time.perf_counter() - started)


def observe_save(seconds: float) -> None:
    """Record the store latency of one session save."""
    event_metrics().save_seconds.observe(seconds)


def observe_sweep(kind: str, *, ok: bool, seconds: float, rows: int = 0) -> None:
    """Record one sweep run: its duration, the rows it touched, and a failure if not ``ok``."""
    metrics = event_metrics()
    metrics.sweep_seconds.labels(kind).observe(seconds)
    if rows:
        metrics.sweep_rows.labels(kind).inc(rows)
    if not ok:
        metrics.sweep_failures.labels(kind).inc()


_STATUSES = ("active", "archived", "expired")
_TRANSPORT_STATUSES = ("active", "disconnected", "recovered", "expired")
_TASK_STATUSES = ("working", "input_required", "completed", "failed", "cancelled")


def state_metrics(report: HealthReport | None) -> list[Metric]:
    """The state gauges for one health report (``None``: the families without samples)."""
    healthy = GaugeMetricFamily("sessionq_healthy", "1 when /session-health would answer 200.")
    up = GaugeMetricFamily("sessionq_up", "1 when a component answers (database, broker, redis).", labels=["component"])
    sessions = GaugeMetricFamily("sessionq_sessions", "Chat sessions by status.", labels=["status"])
    transports = GaugeMetricFamily("sessionq_transport_sessions", "MCP transport sessions by status.",
                                   labels=["status"])
    depth = GaugeMetricFamily("sessionq_queue_depth", "Messages per queue by state (ready, delayed, in_flight).",
                              labels=["queue", "state"])
    dead = GaugeMetricFamily("sessionq_dead_letters", "Dead-lettered messages per queue.", labels=["queue"])
    sweep_ok = GaugeMetricFamily("sessionq_sweep_last_ok", "1 if the last run of a sweep succeeded.", labels=["kind"])
    sweep_failures = GaugeMetricFamily("sessionq_sweep_consecutive_failures",
                                       "Failures in a row of a sweep (0 after a success).", labels=["kind"])
    sweep_rows = GaugeMetricFamily("sessionq_sweep_last_rows", "Rows touched by the last run of a sweep.",
                                   labels=["kind"])
    sweep_seconds = GaugeMetricFamily("sessionq_sweep_last_duration_seconds", "Duration of the last run of a sweep.",
                                      labels=["kind"])
    sweep_time = GaugeMetricFamily("sessionq_sweep_last_run_timestamp_seconds",
                                   "Unix time the last run of a sweep ended.", labels=["kind"])
    tasks = GaugeMetricFamily("sessionq_mcp_tasks", "MCP tasks (SEP-2663) by status.", labels=["status"])
    task_age = GaugeMetricFamily("sessionq_mcp_task_oldest_working_seconds", "Age of the oldest working MCP task.")
    task_leases = GaugeMetricFamily("sessionq_mcp_task_expired_leases",
                                    "Working MCP tasks whose lease passed (lost workers not yet swept).")
    families: list[Metric] = [healthy, up, sessions, transports, depth, dead,
                              sweep_ok, sweep_failures, sweep_rows, sweep_seconds, sweep_time,
                              tasks, task_age, task_leases]
    if report is None:
        return families
    healthy.add_metric([], 1.0 if report.healthy else 0.0)
    up.add_metric(["database"], 1.0 if report.database == OK else 0.0)
    if report.broker != "embedded":
        up.add_metric(["broker"], 1.0 if report.broker == OK else 0.0)
    if report.redis != "none":
        up.add_metric(["redis"], 1.0 if report.redis == OK else 0.0)
    if report.stats is not None:
        for status in sorted(set(_STATUSES) | set(report.stats.sessions_by_status)):
            sessions.add_metric([status], float(report.stats.sessions_by_status.get(status, 0)))
        for status in sorted(set(_TRANSPORT_STATUSES) | set(report.stats.transports_by_status)):
            transports.add_metric([status], float(report.stats.transports_by_status.get(status, 0)))
    if report.tasks is not None:
        for status in _TASK_STATUSES:
            tasks.add_metric([status], float(report.tasks.by_status.get(status, 0)))
        task_age.add_metric([], report.tasks.oldest_working_seconds)
        task_leases.add_metric([], float(report.tasks.expired_leases))
    for name, queue in report.queues.items():
        depth.add_metric([name, "ready"], float(queue.ready))
        depth.add_metric([name, "delayed"], float(queue.delayed))
        depth.add_metric([name, "in_flight"], float(queue.in_flight))
        dead.add_metric([name], float(queue.dead))
    for kind, run in report.sweeps.items():
        sweep_ok.add_metric([kind], 1.0 if run.ok else 0.0)
        sweep_failures.add_metric([kind], float(run.consecutive_failures))
        sweep_rows.add_metric([kind], float(sum(run.counts.values())))
        sweep_seconds.add_metric([kind], float(run.duration))
        sweep_time.add_metric([kind], float(run.finished_at))
    return families


class StateCollector:
    """Scrape-time gauges from one :meth:`HealthChecker.check` per scrape."""

    def __init__(self, checker: HealthChecker) -> None:
        self.checker = checker

    def describe(self) -> Iterable[Metric]:
        """The families without samples (so names are known without touching a service)."""
        return state_metrics(None)

    def collect(self) -> Iterable[Metric]:
        """Run a health check and turn it into gauges."""
        return state_metrics(self.checker.check())


def sample_names(metrics: Iterable[Metric]) -> set[str]:
    """Every sample name the families expose (``_total``, ``_bucket``, ... included)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    names: set[str] = set()
    for family in metrics:
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def exported_metric_names() -> set[str]:
    """Every metric name sessionq exports: event metrics, state gauges and Dramatiq's."""
    names = sample_names(event_registry().collect())
    names |= sample_names(state_metrics(None))
    names |= set(DRAMATIQ_METRICS)
    names |= {f"{n}_{s}" for n in DRAMATIQ_METRICS if n.endswith("_milliseconds") for s in ("bucket", "sum", "count")}
    return names
