"""Periodic hygiene: the sweeps, the scheduler that enqueues them, and its leader lease.

* :mod:`sessionq.scheduler.sweeps` — what each sweep does and how often (:func:`run_sweep` runs one).
* :mod:`sessionq.scheduler.runner` — :class:`SweepScheduler`: APScheduler jobs that enqueue
  ``run_sweep(kind)`` on the ``maintenance`` queue, exactly once per tick across replicas.
* :mod:`sessionq.scheduler.lease` — the Redis leader lease, :func:`sweep_guard`, the per-kind
  run lock a worker holds while a sweep runs, and :func:`connect_redis`.
* :mod:`sessionq.scheduler.status` — :class:`SweepBook`, the record of each sweep's last run.
"""

from __future__ import annotations

from .lease import LocalLease, RedisLease, connect_redis, sweep_guard
from .runner import SweepScheduler, dramatiq_send
from .status import SweepBook, SweepRun
from .sweeps import SWEEP_KINDS, SWEEPS, SweepOutcome, run_sweep, run_sweeps_now, schedule_for

__all__ = [
    "SWEEPS",
    "SWEEP_KINDS",
    "LocalLease",
    "RedisLease",
    "SweepBook",
    "SweepOutcome",
    "SweepRun",
    "SweepScheduler",
    "connect_redis",
    "dramatiq_send",
    "run_sweep",
    "run_sweeps_now",
    "schedule_for",
    "sweep_guard",
]
