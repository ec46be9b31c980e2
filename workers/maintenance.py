"""Maintenance jobs (queue ``maintenance``): archive a session, run a sweep.

``run_sweep(kind)`` is what the scheduler enqueues (by name); it runs the sweep in
the database under the sweep's run lock (a slow sweep never overlaps itself, on any
host), records the outcome in the sweep book that health reads, and in metrics.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sessionq.models.errors import NotFound
from sessionq.scheduler.lease import sweep_guard
from sessionq.scheduler.status import SweepBook
from sessionq.scheduler.sweeps import run_sweep as _run_sweep

from . import payloads
from .broker import get_redis, get_settings, get_store
from .errors import SessionNotReady
from .jobs import job_actor
from .metrics import observe_sweep

logger = logging.getLogger(__name__)


@job_actor
def archive_session(payload: dict[str, Any]) -> None:
    """Set a session's status to archived (idempotent)."""
    session_id, at = payloads.parse_archive(payload)
    try:
        get_store().archive_session(session_id, at)
    except NotFound:
        raise SessionNotReady(f"session {session_id!r} does not exist (yet)") from None


@job_actor
def run_sweep(kind: str) -> None:
    """Run one hygiene sweep (a kind from ``sessionq.scheduler.sweeps.SWEEP_KINDS``)."""
    kind = payloads.parse_sweep(kind)
    client = get_redis()
    book = SweepBook(client) if client is not None else SweepBook()
    with sweep_guard(client, kind) as acquired:
        if not acquired:
            logger.info("sweep %s is already running elsewhere; skipping this run", kind)
            return
        started = time.perf_counter()
        try:
            counts = _run_sweep(kind, get_store(), get_settings(), book=book)
        except Exception:
            observe_sweep(kind, ok=False, seconds=time.perf_counter() - started)
            raise
        observe_sweep(kind, ok=True, seconds=time.perf_counter() - started, rows=sum(counts.values()))
