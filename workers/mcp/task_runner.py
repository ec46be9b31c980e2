"""Running one leg of a durable MCP task: what a ``tasks`` worker (and the embedded
executor) does with ``run_tool_task(task_id, leg)``.

:func:`run_task` claims the leg by compare-and-set (a lease and one more attempt; a
lost claim is a duplicate delivery and does nothing; a first leg whose task row is not
committed yet waits for it, up to :data:`CREATE_WAIT_S`), calls the tool on the user's
``MCPServer`` outside any request, renews the lease while the tool runs and folds the
outcome the way the SDK's own ``tools/call`` handler does:

* a ``CallToolResult`` -> ``completed`` (the by-alias JSON dump);
* a ``ToolError`` (or any crash the SDK wraps) -> ``completed`` with ``isError``;
* an ``MCPError`` -> ``failed`` with that JSON-RPC error;
* an ``InputRequiredResult`` -> ``input_required``: its requests are parked under
  fresh keys (``<tool key>.<random>``, unique for the task's life) and its
  ``requestState`` is kept server-side for the next leg; one carrying state only is a
  checkpoint and the next leg runs at once;
* a cancellation request (seen on a lease renewal, or pushed by
  :func:`cancel_local`) -> ``cancelled``; the time limit -> ``failed`` (-32603).

Every end is a compare-and-set on this worker's id: a worker that lost its lease
(the sweep handed the task to another attempt) changes nothing.

Limits of running outside a request (mcp 2.3): ``ctx.request_context``,
``ctx.report_progress``, ``ctx.info`` and ``Resolve(...)``/``ctx.elicit`` raise;
tools that return ``InputRequiredResult`` and read ``ctx.input_responses`` /
``ctx.request_state`` work, and :func:`current_task` gives a tool its task (to set a
status message).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolRequestParams, CallToolResult, InputRequiredResult, TextContent

from sessionq.models.errors import NotFound, ValidationError
from sessionq.models.records import utcnow
from sessionq.models.store import Store
from sessionq.models.tasks import DEFAULT_LEASE_MS, McpTask, task_error

logger = logging.getLogger(__name__)

# Random characters appended to a tool's input key to make it unique for the task's life.
_KEY_SUFFIX_BYTES = 6
# Seconds a first leg waits, at most, for its task's row: the replica enqueues the leg
# while the row's INSERT commits, so a quick worker may look before the commit (a job
# whose row never comes -- its create failed -- is dropped after this). It looks again
# after CREATE_WAIT_FIRST_S, then after twice as long each time.
CREATE_WAIT_S = 2.0
CREATE_WAIT_FIRST_S = 0.001

Clock = Callable[[], datetime]


@dataclass
class TaskContext:
    """The task a tool is running as (see :func:`current_task`)."""

    task_id: str
    leg: int
    attempt: int
    _store: Store = field(repr=False)
    _worker_id: str = field(repr=False)
    _clock: Clock = field(repr=False, default=utcnow)

    async def set_status(self, message: str | None) -> None:
        """Set the task's ``statusMessage`` (what ``tasks/get`` shows while it runs)."""
        store, clock = self._store, self._clock
        await anyio.to_thread.run_sync(store.set_task_message, self.task_id, self._worker_id, message, clock())


_CURRENT: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar("sessionq_mcp_task", default=None)


def current_task() -> TaskContext | None:
    """The task the calling tool runs as, or ``None`` in an ordinary ``tools/call``."""
    return _CURRENT.get()


class _Running:
    """The legs running in this process, so a cancellation pushed from another host
    (or the embedded executor) can reach them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._legs: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Task[Any], list[str]]] = {}

    def add(self, task_id: str, body: asyncio.Task[Any], reason: list[str]) -> None:
        with self._lock:
            self._legs[task_id] = (asyncio.get_running_loop(), body, reason)

    def remove(self, task_id: str) -> None:
        with self._lock:
            self._legs.pop(task_id, None)

    def cancel(self, task_id: str, why: str = "cancelled") -> bool:
        with self._lock:
            entry = self._legs.get(task_id)
        if entry is None:
            return False
        loop, body, reason = entry
        if not reason:
            reason.append(why)
        loop.call_soon_threadsafe(body.cancel)
        return True


_running = _Running()


def cancel_local(task_id: str) -> bool:
    """Cancel the task's leg if it runs in this process (thread-safe); True if it did."""
    return _running.cancel(task_id)


def result_json(result: CallToolResult) -> dict[str, Any]:
    """A ``CallToolResult`` as kept on a completed task (its wire JSON)."""
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


def _tool_error(tool: str, exc: Exception) -> CallToolResult:
    # The SDK's own tools/call handler answers these the same way (mcpserver.server._handle_call_tool).
    if isinstance(exc, ToolError) and not isinstance(exc, UnexpectedToolError):
        logger.info("task tool %r failed: %r", tool, str(exc))
    else:
        logger.error("task tool %r raised an unexpected exception", tool, exc_info=exc)
    return CallToolResult(content=[TextContent(type="text", text=str(exc))], is_error=True)


def fresh_keys(requests: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Input requests under fresh wire keys, and the map back to the tool's keys."""
    wire: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for key, request in requests.items():
        fresh = f"{key}.{secrets.token_urlsafe(_KEY_SUFFIX_BYTES)}"
        wire[fresh] = request.model_dump(by_alias=True, mode="json", exclude_none=True) if hasattr(
            request, "model_dump") else request
        keys[fresh] = key
    return wire, keys


@dataclass
class _Leg:
    """One claimed leg: where its state lives and the task as this worker last wrote it
    (passed as ``known`` to the store, so an end or a renewal is one statement)."""

    store: Store
    task: McpTask
    worker_id: str
    lease_ms: int
    clock: Clock
    blocking: bool

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A store call: in a worker thread, or right here when this event loop runs
        nothing else (a Dramatiq worker thread's own loop, before or after the body)."""
        if self.blocking:
            return fn(*args, **kwargs)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def finish(self, outcome: str, **end: Any) -> str:
        task, finish = self.task, self.store.finish_task
        try:
            done = await self.call(finish, task.task_id, self.worker_id, self.clock(), known=task, **end)
        except ValidationError as exc:  # e.g. a result over the size limit: the task fails, the worker goes on
            logger.warning("task %s: its %s outcome cannot be stored: %s", task.task_id, outcome, exc)
            error = task_error(f"the tool's outcome cannot be stored: {exc}")
            outcome = "failed"
            done = await self.call(finish, task.task_id, self.worker_id, self.clock(), known=task, error=error)
        if done:
            logger.info("task %s: %s", task.task_id, outcome)
            return outcome
        logger.warning("task %s: no longer held by this worker; its %s outcome is dropped", task.task_id, outcome)
        return "lost"

    async def park(self, result: InputRequiredResult) -> str:
        task, store = self.task, self.store
        if not result.input_requests:
            state = result.request_state or ""
            now = self.clock()
            done = await self.call(store.checkpoint_task, task.task_id, self.worker_id, now, state, now, known=task)
            return "checkpoint" if done else "lost"
        requests, keys = fresh_keys(dict(result.input_requests))
        parked = await self.call(store.park_task, task.task_id, self.worker_id, self.clock(), input_requests=requests,
                                 input_keys=keys, request_state=result.request_state, known=task)
        if not parked:
            return "lost"
        logger.info("task %s: waiting for input (%s)", task.task_id, ", ".join(sorted(keys.values())))
        return "input_required"


async def run_task(
    server: MCPServer,
    store: Store,
    task_id: str,
    leg: int,
    *,
    worker_id: str,
    lease_ms: int = DEFAULT_LEASE_MS,
    clock: Clock = utcnow,
    blocking: bool = False,
) -> str:
    """Run leg ``leg`` of the task (see the module docs) and return what happened:
    ``completed``, ``failed``, ``cancelled``, ``input_required``, ``skipped`` (not
    claimed: a duplicate, finished or cancelled task) or ``lost`` (the lease passed
    to another attempt meanwhile). ``blocking``: the event loop runs this leg only,
    so the claim and the end call the store directly instead of in a thread."""
    waited, seen = 0.0, False
    while True:
        now = clock()
        until = now + timedelta(milliseconds=lease_ms)
        task = store.claim_task(task_id, leg, worker_id, now, until) if blocking else await anyio.to_thread.run_sync(
            store.claim_task, task_id, leg, worker_id, now, until)
        if task is None and leg == 0 and not seen and waited < CREATE_WAIT_S:
            # The replica enqueues the first leg while the task's INSERT commits: wait for the
            # row, then claim once more (it may have appeared between the claim and the look).
            seen = await _stored(store, task_id, blocking)
            if not seen:
                delay = min(waited + CREATE_WAIT_FIRST_S, CREATE_WAIT_S - waited)  # 1, 2, 4... ms
                await asyncio.sleep(delay)
                waited += delay
            continue
        if task is None:
            logger.debug("task %s leg %d not claimed (duplicate, finished or held elsewhere)", task_id, leg)
            return "skipped"
        outcome = await _run_claimed(server, _Leg(store, task, worker_id, lease_ms, clock, blocking))
        if outcome != "checkpoint":
            return outcome
        leg += 1


async def _stored(store: Store, task_id: str, blocking: bool) -> bool:
    """True if the task's row exists (in whatever state)."""
    try:
        if blocking:
            store.load_task(task_id)
        else:
            await anyio.to_thread.run_sync(store.load_task, task_id)
    except NotFound:
        return False
    return True


async def _run_claimed(server: MCPServer, leg: _Leg) -> str:
    task = leg.task
    params = CallToolRequestParams(
        name=task.tool, arguments=task.arguments, input_responses=task.input_responses or None,
        request_state=task.request_state,
    )
    context: Context[Any, Any] = Context(
        mcp_server=server, input_params=params, subscriptions=getattr(server, "_subscriptions", None)
    )
    token = _CURRENT.set(TaskContext(task.task_id, task.leg, task.attempt, leg.store, leg.worker_id, leg.clock))
    reason: list[str] = []
    try:
        body = asyncio.ensure_future(server.call_tool(task.tool, task.arguments, context))
    finally:
        _CURRENT.reset(token)
    _running.add(task.task_id, body, reason)
    keeper = asyncio.ensure_future(_keep_lease(leg, body, reason))
    limit = None if task.time_limit_ms is None else task.time_limit_ms / 1000
    logger.info("task %s: running %r (leg %d, attempt %d of %d)", task.task_id, task.tool, task.leg, task.attempt,
                task.max_attempts)
    try:
        result: Any = await asyncio.wait_for(body, limit)
    except TimeoutError:
        return await leg.finish("failed", error=task_error(f"task exceeded its time limit of {task.time_limit_ms} ms"))
    except asyncio.CancelledError:
        if not reason:  # this runner itself is being stopped: the lease passes, another attempt runs it
            raise
        if reason[0] == "lost":
            logger.warning("task %s: lease lost to another attempt; this attempt's outcome is dropped", task.task_id)
            return "lost"
        return await leg.finish("cancelled", cancelled=True)
    except MCPError as exc:
        return await leg.finish("failed", error=exc.error.model_dump(mode="json", exclude_none=True))
    except Exception as exc:
        return await leg.finish("completed", result=result_json(_tool_error(task.tool, exc)))
    finally:
        _running.remove(task.task_id)
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
    if isinstance(result, InputRequiredResult):
        return await leg.park(result)
    return await leg.finish("completed", result=result_json(result))


async def _keep_lease(leg: _Leg, body: asyncio.Task[Any], reason: list[str]) -> None:
    """Renew the lease every third of it (in a thread: the body runs meanwhile); cancel
    the body when a cancellation was requested or the lease was lost (a renewal
    failing on a store outage keeps trying: the lease is ours until it passes)."""
    interval = leg.lease_ms / 3000
    task_id = leg.task.task_id
    while not body.done():
        await asyncio.sleep(interval)
        now = leg.clock()
        until = now + timedelta(milliseconds=leg.lease_ms)
        try:
            renew = functools.partial(leg.store.renew_task, task_id, leg.worker_id, now, until, known=leg.task)
            held = await anyio.to_thread.run_sync(renew)
        except Exception as exc:  # a store outage: keep running, try again next beat
            logger.warning("task %s: lease renewal failed: %s", task_id, exc)
            continue
        if held is None:
            if not reason:
                reason.append("lost")
            body.cancel()
            return
        leg.task = held
        if held.cancel_requested_at is not None:
            if not reason:
                reason.append("cancelled")
            body.cancel()
            return
