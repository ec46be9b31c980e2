"""The periodic hygiene sweeps: what each one does, and how often it runs.

A sweep is a function of ``(store, settings, now, dry_run)`` returning row counts; it
runs inside the database through set-based, batched store operations (a dry run
only counts what it would change). The scheduler
only enqueues ``run_sweep(kind)`` jobs (``maintenance`` queue); workers call
:func:`run_sweep`, which also records the outcome in the :class:`SweepBook`.
:func:`run_sweeps_now` runs several in this process (``sessionq cleanup``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sessionq.models import Settings, Store, utcnow

from .lease import sweep_guard
from .status import SweepBook

logger = logging.getLogger(__name__)

# How long past expiry the aggressive sweep purges a session.
DEFAULT_AGGRESSIVE_PURGE_AFTER = timedelta(hours=1)
# The queue and job of one MCP task leg (sessionq.workers.tool_tasks).
TASKS_QUEUE = "tasks"
TASKS_ACTOR = "run_tool_task"

Sweep = Callable[[Store, Settings, datetime, bool], dict[str, int]]


def _expire_and_purge(
    store: Store, settings: Settings, idle_before: datetime, purge_before: datetime, dry_run: bool
) -> dict[str, int]:
    batch = settings.sweep_batch_size
    expired = store.expire_idle_sessions(idle_before, batch_size=batch, dry_run=dry_run)
    purged = store.purge_expired_sessions(purge_before, batch_size=batch, dry_run=dry_run)
    if dry_run:
        # A real run purges, in the same pass, the idle sessions it has just expired
        # (expiry keeps ``updated_at``): count those too.
        purged += store.expire_idle_sessions(purge_before, batch_size=batch, dry_run=True)
    return {"expired": expired, "purged": purged}


def _expire_sessions(store: Store, settings: Settings, now: datetime, dry_run: bool = False) -> dict[str, int]:
    """Expire idle sessions, then purge the ones expired for longer than the retention window."""
    idle_before = now - timedelta(hours=settings.expiry_hours)
    purge_before = idle_before - timedelta(hours=settings.retention_hours)
    return _expire_and_purge(store, settings, idle_before, purge_before, dry_run)


def _aggressive_cleanup(store: Store, settings: Settings, now: datetime, dry_run: bool = False) -> dict[str, int]:
    """Expire idle sessions and purge those more than an hour past their expiry."""
    idle_before = now - timedelta(hours=settings.expiry_hours)
    return _expire_and_purge(store, settings, idle_before, idle_before - DEFAULT_AGGRESSIVE_PURGE_AFTER, dry_run)


def _transports(store: Store, settings: Settings, now: datetime, dry_run: bool = False) -> dict[str, int]:
    """Disconnect silent transport sessions; expire disconnected ones past their grace."""
    grace = timedelta(minutes=settings.grace_minutes)
    stale_before = now - timedelta(seconds=settings.stale_heartbeat_seconds)
    batch = settings.sweep_batch_size
    disconnected = store.disconnect_stale_transports(stale_before, now, grace, batch_size=batch, dry_run=dry_run)
    # Those just disconnected get a deadline in the future, so they never expire in
    # the same pass: a dry run's two counts add up like a real run's.
    expired = store.expire_transports(now, batch_size=batch, dry_run=dry_run)
    return {"disconnected": disconnected, "expired": expired}


def _files(store: Store, settings: Settings, now: datetime, dry_run: bool = False) -> dict[str, int]:
    """Delete file records past ``expires_at``."""
    return {"deleted": store.delete_expired_files(now, batch_size=settings.sweep_batch_size, dry_run=dry_run)}


def _agent_state(store: Store, settings: Settings, now: datetime, dry_run: bool = False) -> dict[str, int]:
    """Delete agent state past ``expires_at``."""
    return {"deleted": store.delete_expired_agent_state(now, batch_size=settings.sweep_batch_size, dry_run=dry_run)}


def _events(store: Store, settings: Settings, now: datetime, dry_run: bool = False) -> dict[str, int]:
    """Trim store-backed MCP event logs to their cap and TTL."""
    deleted = store.trim_events(
        max_per_session=settings.max_events_per_session,
        created_before=now - timedelta(seconds=settings.session_ttl),
        batch_size=settings.sweep_batch_size,
        dry_run=dry_run,
    )
    return {"deleted": deleted}


def _tasks(store: Store, settings: Settings, now: datetime, dry_run: bool = False) -> dict[str, int]:
    """Delete MCP tasks past their TTL; with a queue, dispatch again every ``working``
    task whose lease (or dispatch deadline) passed, or fail it once it used its
    attempts (:meth:`Store.requeue_stale_tasks`: one compare-and-set each, so sweeps
    racing on two hosts dispatch a task once). Without a queue the MCP server's own
    in-process executor does the dispatching."""
    deleted = store.delete_expired_tasks(now, batch_size=settings.sweep_batch_size, dry_run=dry_run)
    if settings.queue_url is None:
        return {"deleted": deleted, "dispatched": 0}
    if dry_run:  # each stale task is dispatched again (or ended, once out of attempts)
        return {"deleted": deleted, "dispatched": store.task_stats(now).expired_leases}
    until = now + timedelta(milliseconds=settings.task_dispatch_timeout_ms)
    handed = store.requeue_stale_tasks(now, until, limit=settings.sweep_batch_size)
    if handed:
        import dramatiq

        broker = dramatiq.get_broker()
        for task in handed:
            # By name, like the scheduler's own sends: the scheduler never imports actor modules.
            args = ({"task_id": task.task_id, "leg": task.leg},)
            broker.enqueue(dramatiq.Message(queue_name=TASKS_QUEUE, actor_name=TASKS_ACTOR, args=args, kwargs={},
                                            options={}))
    return {"deleted": deleted, "dispatched": len(handed)}


def _handles(store: Store, settings: Settings, now: datetime, dry_run: bool = False) -> dict[str, int]:
    """Delete MCP state handles revoked, expired or idle for longer than the retention
    window (until then they answer "expired"/"revoked", not "unknown"), and
    idempotency entries past their TTL."""
    batch = settings.sweep_batch_size
    before = now - timedelta(seconds=settings.handle_retention)
    handles = store.delete_dead_handles(before, batch_size=batch, dry_run=dry_run)
    entries = store.delete_expired_idempotency(now, batch_size=batch, dry_run=dry_run)
    return {"handles": handles, "idempotency_entries": entries}


def _tombstones(store: Store, settings: Settings, now: datetime, dry_run: bool = False) -> dict[str, int]:
    """Delete erasure tombstones past their window (``sessionq forget``; saves for
    those sessions are accepted again)."""
    return {"deleted": store.delete_expired_tombstones(now, batch_size=settings.sweep_batch_size, dry_run=dry_run)}


SWEEPS: dict[str, Sweep] = {
    "expire_sessions": _expire_sessions,
    "aggressive_cleanup": _aggressive_cleanup,
    "transports": _transports,
    "files": _files,
    "agent_state": _agent_state,
    "events": _events,
    "tasks": _tasks,
    "handles": _handles,
    "tombstones": _tombstones,
}
SWEEP_KINDS = tuple(SWEEPS)


def schedule_for(settings: Settings) -> dict[str, int]:
    """The sweeps to schedule and their intervals in seconds, per the settings."""
    plan = {
        "expire_sessions": settings.expiry_interval,
        "transports": settings.transport_interval,
        "files": settings.file_interval,
        "agent_state": settings.file_interval,
        "events": settings.event_trim_interval,
        "tasks": settings.task_interval,
        "handles": settings.handle_interval,
        "tombstones": settings.file_interval,
    }
    if settings.aggressive_cleanup:
        plan["aggressive_cleanup"] = settings.aggressive_interval
    return plan


def run_sweep(
    kind: str,
    store: Store,
    settings: Settings,
    *,
    now: datetime | None = None,
    book: SweepBook | None = None,
    dry_run: bool = False,
) -> dict[str, int]:
    """Run one sweep now, log and record its outcome, and return its counts.

    Raises ``KeyError`` for an unknown kind; a store error is recorded as a failed
    run and re-raised (so the job is retried). A ``dry_run`` changes nothing, is not
    recorded in the book, and returns what a real run would change now.
    """
    sweep = SWEEPS[kind]
    if dry_run:
        book = None
    started = time.perf_counter()
    try:
        counts = sweep(store, settings, now or utcnow(), dry_run)
    except Exception as exc:
        duration = time.perf_counter() - started
        if book is not None:
            book.record(kind, ok=False, duration=duration, error=f"{type(exc).__name__}: {exc}"[:500])
        logger.warning("sweep %s failed after %.3fs: %s", kind, duration, exc)
        raise
    duration = time.perf_counter() - started
    if book is not None:
        book.record(kind, ok=True, duration=duration, counts=counts)
    summary = ", ".join(f"{k}={v}" for k, v in counts.items()) or "nothing"
    logger.info("sweep %s%s done in %.3fs: %s", kind, " (dry run)" if dry_run else "", duration, summary)
    return counts


@dataclass(frozen=True)
class SweepOutcome:
    """One sweep run by :func:`run_sweeps_now`: its counts (``None``: skipped, because
    another run of the same kind holds its lock) and how long it took."""

    kind: str
    counts: dict[str, int] | None
    seconds: float


def run_sweeps_now(
    kinds: Iterable[str], store: Store, settings: Settings, *, redis: Any | None = None, dry_run: bool = False
) -> Iterator[SweepOutcome]:
    """Run sweeps here, one after another, each under its run lock (:func:`sweep_guard`;
    a process-local one without ``redis``) and, with ``redis``, recorded in the sweep
    book. Yields each outcome as soon as that sweep is done; a store error propagates.
    """
    book = SweepBook(redis) if redis is not None else None
    for kind in kinds:
        started = time.perf_counter()
        with sweep_guard(redis, kind) as acquired:
            counts = run_sweep(kind, store, settings, book=book, dry_run=dry_run) if acquired else None
        yield SweepOutcome(kind, counts, time.perf_counter() - started)
