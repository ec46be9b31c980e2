"""``sessionq tasks``: list, show and cancel durable MCP tasks from the shell.

An operator sees every task (any owner); a cancellation goes through the same
compare-and-set as ``tasks/cancel`` (a queued or waiting task ends ``cancelled`` at
once, a running one is marked and its worker told over Redis), so a task is never
cancelled in a way the protocol path could not.
"""

from __future__ import annotations

import logging
from typing import Any

from sessionq.models.errors import NotFound
from sessionq.models.records import utcnow
from sessionq.models.store import Store
from sessionq.models.tasks import McpTask

logger = logging.getLogger(__name__)

# Tasks `sessionq tasks list` prints when no --limit is given.
DEFAULT_LIST_LIMIT = 50
# Characters of an owner digest shown in listings.
_OWNER_CHARS = 12


def summary(task: McpTask) -> dict[str, Any]:
    """One listing row of a task."""
    return {
        "task_id": task.task_id,
        "tool": task.tool,
        "status": task.status,
        "owner": task.owner[:_OWNER_CHARS] if task.owner else None,
        "leg": task.leg,
        "attempt": f"{task.attempt}/{task.max_attempts}",
        "created_at": task.created_at.isoformat(),
        "updated_at": task.last_updated.isoformat(),
        "expires_at": task.expires_at.isoformat() if task.expires_at else None,
    }


def list_tasks(store: Store, *, status: str | None = None, limit: int = DEFAULT_LIST_LIMIT) -> list[dict[str, Any]]:
    """Up to ``limit`` tasks (optionally of one status), in ``task_id`` order."""
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    while len(out) < limit:
        page = store.list_tasks(status=status, limit=min(500, limit - len(out)), cursor=cursor)
        out.extend(summary(task) for task in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    return out


def show_task(store: Store, task_id: str) -> dict[str, Any]:
    """Every field of a task (expired ones too: the sweep has not deleted them yet)."""
    return store.load_task(task_id).to_json()


def cancel_task(store: Store, task_id: str, *, redis: Any | None = None) -> McpTask:
    """Cancel a task for its owner (see the module docs); :class:`NotFound` if it is
    unknown or expired. A running task's worker is told on the cancel channel."""
    task = store.load_task(task_id)
    after, running = store.request_cancel(task_id, task.owner, utcnow())
    if after is None:
        raise NotFound(f"task {task_id!r} has expired")
    if running and redis is not None:
        from .mcp.task_executors import CANCEL_CHANNEL

        try:
            redis.publish(CANCEL_CHANNEL, task_id)
        except Exception as exc:  # the worker still sees the request on its next lease renewal
            logger.warning("could not publish the cancellation of %s: %s", task_id, exc)
    return after
