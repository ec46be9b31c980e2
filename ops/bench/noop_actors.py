"""No-op actors for the P2 ceilings, imported by benchmark worker processes only.

``python -m dramatiq sessionq.workers.actors ops.bench.noop_actors`` declares it on the same
broker (same middleware, queue and worker settings) as the real actors, so the
difference between draining ``save_session`` jobs and ``bench_noop`` jobs is the cost
of the save itself. It is not shipped (ops/ is outside the wheel).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

import sessionq.workers.actors  # noqa: F401  (the configured broker, first)
from sessionq.models import ChatMessage, ChatSession, WriteResult
from sessionq.workers.broker import get_broker, get_settings
from sessionq.workers.groupcommit import GroupCommitter


class _NoWrites:
    """A store whose batch write does nothing (the group committer's work minus the database)."""

    def save_sessions_unless_forgotten(
        self, writes: Sequence[tuple[ChatSession, Sequence[ChatMessage]]], now: datetime
    ) -> tuple[WriteResult, set[str]]:
        """Write nothing, refuse nothing (the committer's one store call)."""
        del writes, now
        return WriteResult(), set()


_committer: GroupCommitter | None = None
_lock = threading.Lock()


def _noop_committer() -> GroupCommitter:
    global _committer
    with _lock:
        if _committer is None:
            # The committer uses only save_sessions_unless_forgotten of its store.
            _committer = GroupCommitter(
                _NoWrites(),  # type: ignore[arg-type]
                gather_delay=get_settings().group_commit_delay_ms / 1000,
                after_commit=getattr(get_broker(), "ack_messages", None),
            )
        return _committer


@dramatiq.actor(queue_name="sessions")
def bench_noop(payload: dict[str, Any]) -> None:
    """Receive a save payload and do nothing."""
    del payload


_NO_SESSION = ChatSession("bench-noop")


@dramatiq.actor(queue_name="sessions")
def bench_noop_batched(payload: dict[str, Any]) -> None:
    """Receive a save payload and hand nothing to a committer that writes nothing (batched ack)."""
    del payload
    _noop_committer().save(_NO_SESSION, token=CurrentMessage.get_current_message())


@dramatiq.actor(queue_name="tasks")
def bench_task_noop(payload: dict[str, Any]) -> None:
    """Receive a task leg's payload and do nothing (the T2 ceiling: a bare job on the tasks queue)."""
    del payload
