"""sessionq for MCP servers built on the official ``mcp`` SDK (2.x).

* :class:`RedisEventStore` / :class:`StoreEventStore` — the SDK's ``EventStore``
  (resumability with ``Last-Event-ID``), scoped per MCP session.
* :class:`SessionRegistry` — transport sessions: register, heartbeat, disconnect,
  recover, agent state; writes go out as jobs through an injectable sender.
* :class:`RecoverableSessionManager` / :func:`recoverable_http_app` — sessions that
  survive a restart or a hop to another instance instead of answering 404.
* :class:`SessionqTasks` / :class:`TaskPolicy` — durable tasks (SEP-2663) at protocol
  2026-07-28, run on sessionq's workers; :class:`SessionqTasksClient` is the client half.
* :class:`RedisSubscriptionBus` — ``subscriptions/listen`` events across replicas.
* :func:`adopt` — all of the above (and the request-state key ring) wired from
  ``Settings`` in one call, for both protocol generations; :func:`adopt_server`
  wires the 2026-07-28 half alone.

Imports only ``models``, the job payload checks (``sessionq.workers.payloads``),
``redis``, ``mcp`` and the standard library (never the broker), so importing it has
no side effects. See ``docs/mcp.md``.
"""

from __future__ import annotations

from typing import Any

from .event_log import MemoryEventLog
from .event_store import RedisEventStore
from .registry import (
    JOB_DISCONNECT,
    JOB_HEARTBEAT,
    JOB_REGISTER,
    TRANSPORT_JOBS,
    ProducerSender,
    SessionRegistry,
    StoreSender,
    apply_transport_job,
)
from .store_events import StoreEventStore

try:
    from .adoption import Adoption, adopt, adopt_server
    from .bus import RedisSubscriptionBus
    from .recovery import (
        RECOVERED_STATE_KEY,
        RecoverableSessionManager,
        install,
        recoverable_http_app,
        request_session_id,
    )
    from .task_runner import current_task
    from .tasks import SessionqTasks, TaskPolicy
    from .tasks_client import SessionqTasksClient
except ImportError as exc:  # the mcp 1.x line: event stores and registry only
    _recovery_missing: ImportError | None = exc
else:
    _recovery_missing = None


def __getattr__(name: str) -> Any:
    if _recovery_missing is not None and name in _RECOVERY_NAMES:
        raise ImportError(f"sessionq.workers.mcp.{name} needs the mcp 2.x SDK ({_recovery_missing})")
    raise AttributeError(name)


_RECOVERY_NAMES = frozenset(
    {"Adoption", "RedisSubscriptionBus", "adopt", "adopt_server",
     "RECOVERED_STATE_KEY", "RecoverableSessionManager", "install", "recoverable_http_app", "request_session_id",
     "SessionqTasks", "SessionqTasksClient", "TaskPolicy", "current_task"}
)

__all__ = [
    "JOB_DISCONNECT",
    "JOB_HEARTBEAT",
    "JOB_REGISTER",
    "RECOVERED_STATE_KEY",
    "TRANSPORT_JOBS",
    "Adoption",
    "MemoryEventLog",
    "ProducerSender",
    "RecoverableSessionManager",
    "RedisEventStore",
    "RedisSubscriptionBus",
    "SessionRegistry",
    "SessionqTasks",
    "SessionqTasksClient",
    "StoreEventStore",
    "StoreSender",
    "TaskPolicy",
    "adopt",
    "adopt_server",
    "apply_transport_job",
    "current_task",
    "install",
    "recoverable_http_app",
    "request_session_id",
]
