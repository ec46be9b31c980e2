"""Where the legs of durable MCP tasks run.

* :class:`QueueExecutor` (a Redis queue URL is configured): each leg is a
  ``run_tool_task`` job on the ``tasks`` queue, enqueued through sessionq's
  :class:`~sessionq.workers.producer.Producer` (spooled to its outbox while Redis is
  down); ``sessionq worker --queues tasks --mcp-app module:server`` runs it. A
  cancellation is published on :data:`CANCEL_CHANNEL`, which every tasks worker
  listens to. Lost jobs and dead workers are covered by the ``tasks`` sweep.
* :class:`InProcessExecutor` (embedded mode, no Redis): the same leg runner on a
  background event loop in the server process, with the sweep run there every
  ``task_sweep_interval`` seconds (so a restarted server picks up what a killed one
  left running once the leases pass).

Neither imports the Dramatiq broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from concurrent.futures import Future
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio
from mcp.server.mcpserver import MCPServer

from sessionq.models.records import utcnow
from sessionq.models.settings import is_redis_url
from sessionq.models.store import Store
from sessionq.models.tasks import DEFAULT_DISPATCH_TIMEOUT_MS, DEFAULT_LEASE_MS

from .task_runner import cancel_local, run_task

if TYPE_CHECKING:
    from sessionq.models.settings import Settings

logger = logging.getLogger(__name__)

#: The Redis channel a cancellation of a running task is published on (payload: the task id).
CANCEL_CHANNEL = "sessionq:tasks:cancel"
#: The job that runs one leg of a task (queue ``tasks``), and its payload keys.
RUN_TOOL_TASK = "run_tool_task"
# Seconds between sweeps of the in-process executor.
DEFAULT_SWEEP_INTERVAL = 5.0


def worker_identity() -> str:
    """A worker id unique to this process (host, pid, random suffix)."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def leg_payload(task_id: str, leg: int) -> dict[str, Any]:
    """The ``run_tool_task`` payload."""
    return {"task_id": task_id, "leg": leg}


class QueueExecutor:
    """Legs as ``run_tool_task`` jobs; cancellations over Redis pub/sub."""

    def __init__(self, producer: Any, redis: Any | None) -> None:
        self.producer = producer
        self.redis = redis

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueExecutor:
        """A producer on the settings' queue, Redis for the cancel channel."""
        import redis

        from sessionq.workers.producer import Producer

        url = settings.redis_url or settings.queue_url
        client = redis.Redis.from_url(url) if is_redis_url(url) else None
        return cls(Producer(settings), client)

    def start(self, server: MCPServer, store: Store) -> None:
        """Nothing to start: workers run the legs."""

    def dispatch(self, task_id: str, leg: int) -> None:
        """Enqueue the leg (a failure is logged: the sweep dispatches it later)."""
        try:
            self.producer.send(RUN_TOOL_TASK, leg_payload(task_id, leg))
        except Exception as exc:
            logger.warning("task %s: could not enqueue leg %d (the tasks sweep will): %s", task_id, leg, exc)

    async def dispatch_async(self, task_id: str, leg: int) -> None:
        """:meth:`dispatch` on the caller's event loop (see ``Producer.send_async``)."""
        try:
            await self.producer.send_async(RUN_TOOL_TASK, leg_payload(task_id, leg))
        except Exception as exc:
            logger.warning("task %s: could not enqueue leg %d (the tasks sweep will): %s", task_id, leg, exc)

    def cancel(self, task_id: str) -> None:
        """Publish the cancellation to every tasks worker (they also see it on their next lease renewal)."""
        if self.redis is None:
            return
        try:
            self.redis.publish(CANCEL_CHANNEL, task_id)
        except Exception as exc:
            logger.warning("task %s: could not publish its cancellation (seen on the next renewal): %s", task_id, exc)


class InProcessExecutor:
    """Legs and the tasks sweep on a background event loop of this process."""

    def __init__(
        self,
        *,
        lease_ms: int = DEFAULT_LEASE_MS,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL,
        dispatch_timeout_ms: int = DEFAULT_DISPATCH_TIMEOUT_MS,
    ) -> None:
        self.lease_ms = lease_ms
        self.sweep_interval = sweep_interval
        self.dispatch_timeout = timedelta(milliseconds=dispatch_timeout_ms)
        self.worker_id = worker_identity()
        self.server: MCPServer | None = None
        self.store: Store | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._futures: set[Future[Any]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> InProcessExecutor:
        """An executor with the settings' lease, sweep interval and dispatch timeout."""
        return cls(lease_ms=settings.task_lease_ms, sweep_interval=settings.task_interval,
                   dispatch_timeout_ms=settings.task_dispatch_timeout_ms)

    def start(self, server: MCPServer, store: Store) -> None:
        """Start the background loop (and its sweep) for ``server`` on ``store``."""
        self.server, self.store = server, store
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="sessionq-tasks", daemon=True)
        self._thread.start()
        ready.wait()
        self._submit(self._sweep_forever())

    def _submit(self, coro: Any) -> None:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        self._futures.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[Any]) -> None:
        self._futures.discard(future)
        if not future.cancelled() and future.exception() is not None:
            logger.error("a task leg crashed the in-process executor", exc_info=future.exception())

    def dispatch(self, task_id: str, leg: int) -> None:
        """Run the leg on the background loop (thread-safe)."""
        if self._loop is None:
            logger.warning("task %s: executor not started (SessionqTasks.bind was not called)", task_id)
            return
        self._submit(self._run(task_id, leg))

    async def dispatch_async(self, task_id: str, leg: int) -> None:
        """:meth:`dispatch` from a coroutine (it never blocks)."""
        self.dispatch(task_id, leg)

    def cancel(self, task_id: str) -> None:
        """Cancel the leg if it runs here (thread-safe)."""
        cancel_local(task_id)

    async def _run(self, task_id: str, leg: int) -> None:
        assert self.server is not None and self.store is not None
        await run_task(self.server, self.store, task_id, leg, worker_id=self.worker_id, lease_ms=self.lease_ms)

    async def sweep(self) -> int:
        """Dispatch the stale tasks again and delete the expired ones; return how many were dispatched."""
        assert self.store is not None
        now = utcnow()
        handed = await anyio.to_thread.run_sync(
            lambda: self.store.requeue_stale_tasks(now, now + self.dispatch_timeout))  # type: ignore[union-attr]
        for task in handed:
            self._submit(self._run(task.task_id, task.leg))
        await anyio.to_thread.run_sync(lambda: self.store.delete_expired_tasks(now))  # type: ignore[union-attr]
        return len(handed)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)  # a restarted server's leases pass meanwhile
            try:
                handed = await self.sweep()
                if handed:
                    logger.info("tasks sweep: dispatched %d stale task(s) again", handed)
            except Exception as exc:  # the store may be down for a while; the next sweep tries again
                logger.warning("tasks sweep failed: %s", exc)

    def close(self) -> None:
        """Stop the background loop (running legs are abandoned: their leases pass)."""
        if self._loop is not None:
            loop = self._loop

            def stop() -> None:
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                loop.call_soon(loop.stop)  # after the cancelled tasks had their turn

            loop.call_soon_threadsafe(stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._loop is not None and not self._thread.is_alive():
                self._loop.close()
        self._loop = self._thread = None


def executor_for(settings: Settings) -> QueueExecutor | InProcessExecutor:
    """The queue executor when a queue URL is configured, else the in-process one."""
    if settings.queue_url is not None:
        return QueueExecutor.from_settings(settings)
    return InProcessExecutor.from_settings(settings)
