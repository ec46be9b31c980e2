"""A no-op actor for the P2 ceiling, imported by benchmark worker processes only.

``python -m dramatiq sessionq.workers.actors ops.bench.noop_actors`` declares it on the same
broker (same middleware, queue and worker settings) as the real actors, so the
difference between draining ``save_session`` jobs and ``bench_noop`` jobs is the cost
of the save itself. It is not shipped (ops/ is outside the wheel).
"""

from __future__ import annotations

from typing import Any

import dramatiq

import sessionq.workers.actors  # noqa: F401  (the configured broker, first)


@dramatiq.actor(queue_name="sessions")
def bench_noop(payload: dict[str, Any]) -> None:
    """Receive a save payload and do nothing."""
    del payload


@dramatiq.actor(queue_name="tasks")
def bench_task_noop(payload: dict[str, Any]) -> None:
    """Receive a task leg's payload and do nothing (the T2 ceiling: a bare job on the tasks queue)."""
    del payload
