"""MCP task legs (queue ``tasks``): ``run_tool_task({"task_id": ..., "leg": n})``.

``sessionq worker --queues tasks --mcp-app package.module:server`` imports the
user's ``MCPServer`` (``SESSIONQ_MCP_APP``) and runs each leg there with
:func:`sessionq.workers.mcp.task_runner.run_task`: claim by compare-and-set, the
tool body on this worker thread's event loop, lease renewals, one compare-and-set
end. A redelivered or duplicate job finds the task claimed or finished and does
nothing, so the message is simply acked (late, after the leg: a killed worker's
job is redelivered by the broker, and the ``tasks`` sweep re-dispatches any task
whose lease passed).

Cancellations of running tasks arrive on :data:`~sessionq.workers.mcp.task_executors.CANCEL_CHANNEL`;
one listener thread per worker process cancels the leg if it runs here (the worker
also sees the request on its next lease renewal).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
import threading
import time
from typing import Any

from sessionq.errors import ConfigError

from . import payloads
from .broker import get_redis, get_settings, get_store
from .jobs import job_actor

logger = logging.getLogger(__name__)

#: The environment variable naming the MCP app (``package.module:attribute``).
APP_ENV = "SESSIONQ_MCP_APP"
# Dramatiq's own limit on one leg (ms). Legs enforce their tool's time limit
# themselves (TaskPolicy.time_limit_ms); this only bounds a runaway (Dramatiq's
# default, 10 minutes, would cut long tools short).
ACTOR_TIME_LIMIT_MS = 24 * 3600 * 1000
# Seconds between attempts to reconnect the cancel listener.
_LISTENER_RETRY = 1.0


def load_mcp_app(spec: str) -> Any:
    """Import ``package.module:attribute`` (from the working directory too) and return
    the ``MCPServer``; :class:`ConfigError` with one line if that fails."""
    from mcp.server.mcpserver import MCPServer

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"--mcp-app {spec!r}: expected package.module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--mcp-app {spec!r}: cannot import {module_name}: {exc}") from None
    server = getattr(module, attribute, None)
    if not isinstance(server, MCPServer):
        raise ConfigError(f"--mcp-app {spec!r}: {attribute} is not an MCPServer (got {type(server).__name__})")
    return server


def worker_queues(queues: tuple[str, ...], mcp_app: str | None) -> tuple[str, ...]:
    """The queues ``sessionq worker`` consumes: the ``tasks`` queue only with an MCP app
    (``--mcp-app`` or ``SESSIONQ_MCP_APP``), which is checked here, in the parent, so a
    typo is one line instead of a crash in every worker process."""
    from .broker import QUEUES

    spec = mcp_app or os.environ.get(APP_ENV) or None
    if spec is None:
        if "tasks" in queues:
            raise ConfigError("the tasks queue runs MCP tools: give the server with --mcp-app package.module:server")
        return queues or tuple(q for q in QUEUES if q != "tasks")
    load_mcp_app(spec)
    os.environ[APP_ENV] = spec  # the forked worker processes import it on their first leg
    return queues or QUEUES


class _Process:
    """Per-process state of the tasks worker: the app, the worker id, the cancel
    listener and one event loop per worker thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = 0
        self.server: Any = None
        self.worker_id = ""
        self.local = threading.local()

    def ensure(self) -> tuple[Any, str]:
        if self.pid != os.getpid():  # first job, or a forked child of the process that imported the app
            with self.lock:
                if self.pid != os.getpid():
                    from .mcp.task_executors import worker_identity

                    spec = os.environ.get(APP_ENV, "")
                    if not spec:
                        raise ConfigError(f"this worker runs no MCP app: start it with --mcp-app ({APP_ENV})")
                    self.server = load_mcp_app(spec)
                    self.worker_id = worker_identity()
                    self._start_listener()
                    self.pid = os.getpid()
        return self.server, self.worker_id

    def loop(self) -> asyncio.AbstractEventLoop:
        """This worker thread's event loop; the thread also keeps its store connection
        (a pool checkout pings the database: three round trips saved per leg)."""
        hold = getattr(get_store(), "hold_connection", None)
        if hold is not None:
            hold()
        loop = getattr(self.local, "loop", None)
        if loop is None or loop.is_closed():
            loop = self.local.loop = asyncio.new_event_loop()
        return loop

    def _start_listener(self) -> None:
        client = get_redis()
        if client is None:
            return
        threading.Thread(target=_listen, args=(client,), name="sessionq-task-cancels", daemon=True).start()


def _listen(client: Any) -> None:
    """Cancel local legs whose cancellation is published (reconnects on errors)."""
    from .mcp.task_executors import CANCEL_CHANNEL
    from .mcp.task_runner import cancel_local

    while True:
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(CANCEL_CHANNEL)
            for message in pubsub.listen():
                data = message.get("data")
                task_id = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
                if cancel_local(task_id):
                    logger.info("task %s: cancellation requested; cancelling its running leg", task_id)
        except Exception as exc:  # Redis went away: listen again (renewals still carry the request)
            logger.warning("task cancel listener: %s; reconnecting", exc)
            time.sleep(_LISTENER_RETRY)


_process = _Process()


@job_actor(time_limit=ACTOR_TIME_LIMIT_MS, throws=(ConfigError,))
def run_tool_task(payload: dict[str, Any]) -> None:
    """Run one leg of an MCP task on this worker (idempotent: see the module docs)."""
    from .mcp.task_runner import run_task

    task_id, leg = payloads.parse_tool_task(payload)
    server, worker_id = _process.ensure()
    outcome = _process.loop().run_until_complete(
        run_task(server, get_store(), task_id, leg, worker_id=worker_id, lease_ms=get_settings().task_lease_ms,
                 blocking=True)
    )
    logger.debug("task %s leg %d: %s", task_id, leg, outcome)
