"""Durable MCP tasks (SEP-2663, protocol 2026-07-28) for the official SDK's ``MCPServer``.

:class:`SessionqTasks` is an ``mcp.server.extension.Extension``
(``io.modelcontextprotocol/tasks``). It decides per tool (:class:`TaskPolicy`)
whether a ``tools/call`` becomes a task, records the task in the sessionq store
*before* the handle is returned, hands the tool body to an executor (the ``tasks``
queue of sessionq's workers, or in-process without Redis: see
:mod:`sessionq.workers.mcp.task_executors`) and serves ``tasks/get``,
``tasks/update`` and ``tasks/cancel`` from the store, so any replica answers for
any task::

    tasks = SessionqTasks.from_settings(settings, tools={"render": TaskPolicy(mode="required")})
    server = tasks.bind(MCPServer("my-server", extensions=[tasks]))

Protocol rules it keeps (SEP-2663):

* Only a request at 2026-07-28 that declared the extension in its client
  capabilities gets a task. A ``required`` tool called by a client that did not
  declare it is refused with ``-32021`` (``requiredCapabilities`` names the
  extension); an ``optional`` one runs inline. Older protocol versions are never
  touched, and ``tasks/*`` at those versions is ``-32601``.
* Arguments are validated first: bad ones get the SDK's ordinary inline error, no task.
* ``tasks/*`` need the extension declared (``-32021``), an ``Mcp-Name`` header equal
  to ``taskId`` on HTTP (``-32020``), and a task of the caller's principal: a
  missing, expired or foreign task is one ``-32602``.
* ``completed`` carries the tool's ``CallToolResult`` (tool errors as ``isError``);
  ``failed`` carries a JSON-RPC error; ``tasks/update`` and ``tasks/cancel`` answer
  an empty result.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import MCPServer, require_client_extension
from mcp.server.request_state import authenticated_principal
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_NAME_HEADER, decode_header_value
from mcp_types import HEADER_MISMATCH, INVALID_PARAMS, CallToolRequestParams, InputResponses, RequestParams
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError as PydanticValidationError

from sessionq.models.errors import ValidationError
from sessionq.models.records import utcnow
from sessionq.models.store import Store
from sessionq.models.tasks import DEFAULT_DISPATCH_TIMEOUT_MS, DEFAULT_MAX_ATTEMPTS, McpTask, new_task_id

if TYPE_CHECKING:
    from sessionq.models.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: The extension's identifier (SEP-2663).
TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
#: The protocol versions the extension serves (sessionless revisions only).
TASK_PROTOCOL_VERSIONS = frozenset(MODERN_PROTOCOL_VERSIONS)
# A task's lifetime when its policy does not say (one hour).
DEFAULT_TTL_MS = 3_600_000
# Suggested polling interval when a policy does not say.
DEFAULT_POLL_INTERVAL_MS = 1000
# Longest a tool body may run when a policy does not say (ten minutes).
DEFAULT_TIME_LIMIT_MS = 600_000
# Threads (each holding one store connection) serving task creation and tasks/*.
DEFAULT_STORE_THREADS = 8


@dataclass(frozen=True)
class TaskPolicy:
    """How one tool runs as a task.

    ``mode``: ``required`` (always a task; a client without the extension gets
    ``-32021``), ``optional`` (a task for clients that declared the extension, inline
    for the others) or ``never``. ``ttl_ms`` (``None``: unlimited) counts from
    creation and grows with a running task's lease; ``max_attempts`` bounds how often
    a leg starts again after its worker was lost (``1``: a redelivered task fails at
    once); ``time_limit_ms`` bounds one leg's run.
    """

    mode: Literal["required", "optional", "never"] = "optional"
    ttl_ms: int | None = DEFAULT_TTL_MS
    poll_interval_ms: int = DEFAULT_POLL_INTERVAL_MS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    time_limit_ms: int | None = DEFAULT_TIME_LIMIT_MS

    def __post_init__(self) -> None:
        if self.mode not in ("required", "optional", "never"):
            raise ValueError(f"TaskPolicy.mode must be required, optional or never, not {self.mode!r}")
        for name in ("ttl_ms", "poll_interval_ms", "time_limit_ms"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TaskPolicy.{name} must be at least 1")
        if self.max_attempts < 1:
            raise ValueError("TaskPolicy.max_attempts must be at least 1")


class TaskExecutor(Protocol):
    """Where task legs run (see :mod:`sessionq.workers.mcp.task_executors`). Its calls
    come right after the store write they follow, from the same worker thread (one
    thread hop per request) or, for :meth:`dispatch_async`, from the event loop; none
    may raise."""

    def dispatch(self, task_id: str, leg: int) -> None:
        """Start leg ``leg`` of the task somewhere (a failure is logged: the sweep retries)."""

    async def dispatch_async(self, task_id: str, leg: int) -> None:
        """:meth:`dispatch` on the event loop, without blocking it (used after a store's
        ``async_create``, so a new task costs no thread hop)."""

    def cancel(self, task_id: str) -> None:
        """Tell whoever runs the task that its cancellation was requested."""

    def start(self, server: MCPServer, store: Store) -> None:
        """Called once the server is bound (the in-process executor needs both)."""


class TaskIdParams(RequestParams):
    """Params of ``tasks/get`` and ``tasks/cancel``."""

    task_id: str


class TaskUpdateParams(RequestParams):
    """Params of ``tasks/update``."""

    task_id: str
    input_responses: InputResponses


def iso(value: datetime) -> str:
    """A UTC time as ISO 8601 with a ``Z``."""
    return value.isoformat().replace("+00:00", "Z")


def task_json(task: McpTask) -> dict[str, Any]:
    """The SEP-2663 ``Task`` fields of a task."""
    out: dict[str, Any] = {
        "taskId": task.task_id,
        "status": task.status,
        "createdAt": iso(task.created_at),
        "lastUpdatedAt": iso(task.last_updated),
        "ttlMs": task.ttl_ms(),
    }
    if task.status_message is not None:
        out["statusMessage"] = task.status_message
    if task.poll_interval_ms is not None:
        out["pollIntervalMs"] = task.poll_interval_ms
    return out


def owner_of(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """The owner key of the request's principal: a sha256 of the SDK's authenticated
    principal (client, issuer, subject), ``None`` for an anonymous request."""
    principal = authenticated_principal(ctx)
    return None if principal is None else hashlib.sha256(principal.encode("utf-8")).hexdigest()


def _not_found() -> MCPError:
    return MCPError(code=INVALID_PARAMS, message="Task not found (unknown, expired, or not yours)")


class SessionqTasks(Extension):
    """The Tasks extension on the sessionq store (see the module docs).

    ``tools`` maps tool names to their :class:`TaskPolicy` (other tools never become
    tasks); ``executor`` runs the legs. :meth:`bind` hands it the ``MCPServer`` it
    was passed to (needed to validate arguments and to run tools in-process).
    """

    identifier = TASKS_EXTENSION

    def __init__(
        self,
        store: Store,
        *,
        tools: Mapping[str, TaskPolicy],
        executor: TaskExecutor,
        dispatch_timeout_ms: int = DEFAULT_DISPATCH_TIMEOUT_MS,
        clock: Any = utcnow,
        store_threads: int = DEFAULT_STORE_THREADS,
    ) -> None:
        self.store = store
        self.policies = dict(tools)
        self.executor = executor
        self.dispatch_timeout = timedelta(milliseconds=dispatch_timeout_ms)
        self.clock = clock
        self.server: MCPServer | None = None
        self._threads = ThreadPoolExecutor(store_threads, thread_name_prefix="sessionq-tasks-store")

    @classmethod
    def from_settings(
        cls, settings: Settings, *, tools: Mapping[str, TaskPolicy], store: Store | None = None
    ) -> SessionqTasks:
        """The extension for ``settings``: the ``tasks`` queue when a Redis queue URL is
        configured (run ``sessionq worker --queues tasks --mcp-app module:server``),
        else in-process execution on the store (embedded mode)."""
        from sessionq.models import open_store

        from .task_executors import executor_for

        return cls(store or open_store(settings), tools=tools, executor=executor_for(settings),
                   dispatch_timeout_ms=settings.task_dispatch_timeout_ms)

    def bind(self, server: MCPServer) -> MCPServer:
        """Attach the server this extension was passed to; returns it."""
        if self not in getattr(server, "_extensions", [self]):
            raise ValueError("bind() the server built with extensions=[this SessionqTasks]")
        self.server = server
        self.executor.start(server, self.store)
        return server

    async def _in_store_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store call on this extension's own threads, each of which keeps its
        pooled connection (a pool checkout costs a ``SELECT 1`` round trip on
        PostgreSQL and MySQL: ~100 µs of the ~300 µs a task insert or read takes)."""
        call = functools.partial(_held, self.store, fn, *args)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on asyncio (trio): the shared thread pool, a checkout per call
            return await anyio.to_thread.run_sync(call)
        return await loop.run_in_executor(self._threads, call)

    def policy(self, tool: str) -> TaskPolicy | None:
        """The policy of ``tool``, or ``None`` when it never becomes a task."""
        policy = self.policies.get(tool)
        return None if policy is None or policy.mode == "never" else policy

    # -- tools/call ----------------------------------------------------------------

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """Answer with a task handle when the policy and the client say so."""
        policy = self.policy(params.name)
        if policy is None or ctx.protocol_version not in TASK_PROTOCOL_VERSIONS:
            return await call_next(ctx)
        if not _declared(ctx):
            if policy.mode == "required":
                require_client_extension(ctx, TASKS_EXTENSION)
            return await call_next(ctx)
        if not self._arguments_valid(params):
            return await call_next(ctx)  # the SDK answers with its own inline validation error
        task = self._new_task(params, policy, owner_of(ctx))
        try:
            await self._create_and_dispatch(task)
        except ValidationError as exc:
            raise MCPError(code=INVALID_PARAMS, message=f"cannot run {params.name!r} as a task: {exc}") from None
        return {"resultType": "task", **task_json(task)}

    async def _create_and_dispatch(self, task: McpTask) -> None:
        """Store the task (committed when this returns) and start its first leg.

        Where the store and the executor can, both go from this event loop (no thread
        hop) and at once: the leg's enqueue travels while the INSERT commits, and a
        worker that looks before the commit waits for the row
        (:func:`~sessionq.workers.mcp.task_runner.run_task`). Else both run in one
        trip to a store thread, the insert first."""
        create = self.store.async_create
        if create is None or not _on_asyncio():
            await self._in_store_thread(self._create, task)
            return
        await asyncio.gather(create(task), self.executor.dispatch_async(task.task_id, 0))

    def _create(self, task: McpTask) -> None:
        self.store.create_task(task)
        self.executor.dispatch(task.task_id, 0)

    def _arguments_valid(self, params: CallToolRequestParams) -> bool:
        if self.server is None:
            raise MCPError(code=INVALID_PARAMS, message="task tools unavailable: SessionqTasks.bind() was not called")
        # The SDK has no public lookup of a tool's argument model; this is MCPServer's own one.
        tool = self.server._tool_manager.get_tool(params.name)
        if tool is None:
            return False
        try:
            tool.fn_metadata.validate_arguments(params.arguments or {})
        except PydanticValidationError:
            return False
        return True

    def _new_task(self, params: CallToolRequestParams, policy: TaskPolicy, owner: str | None) -> McpTask:
        now = self.clock()
        return McpTask(
            task_id=new_task_id(), tool=params.name, owner=owner, arguments=params.arguments or {}, created_at=now,
            expires_at=None if policy.ttl_ms is None else now + timedelta(milliseconds=policy.ttl_ms),
            lease_until=now + self.dispatch_timeout, poll_interval_ms=policy.poll_interval_ms,
            max_attempts=policy.max_attempts, time_limit_ms=policy.time_limit_ms,
        )

    # -- tasks/* ---------------------------------------------------------------------

    def methods(self) -> list[MethodBinding]:
        """``tasks/get``, ``tasks/update`` and ``tasks/cancel`` at 2026-07-28."""
        return [
            MethodBinding("tasks/get", TaskIdParams, self._get, protocol_versions=TASK_PROTOCOL_VERSIONS),
            MethodBinding("tasks/update", TaskUpdateParams, self._update, protocol_versions=TASK_PROTOCOL_VERSIONS),
            MethodBinding("tasks/cancel", TaskIdParams, self._cancel, protocol_versions=TASK_PROTOCOL_VERSIONS),
        ]

    def _admit(self, ctx: ServerRequestContext[Any, Any], task_id: str) -> str | None:
        """Check a tasks/* request; return its owner key."""
        require_client_extension(ctx, TASKS_EXTENSION)
        headers = getattr(ctx.request, "headers", None)
        if headers is not None and decode_header_value(headers.get(MCP_NAME_HEADER)) != task_id:
            raise MCPError(code=HEADER_MISMATCH, message=f"{MCP_NAME_HEADER} header must equal the taskId parameter")
        return owner_of(ctx)

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> HandlerResult:
        owner = self._admit(ctx, params.task_id)
        task = await self._in_store_thread(self.store.get_task, params.task_id, owner, self.clock())
        if task is None:
            raise _not_found()
        return get_result(task)

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: TaskUpdateParams) -> HandlerResult:
        owner = self._admit(ctx, params.task_id)
        responses = {key: value.model_dump(by_alias=True, mode="json", exclude_none=True)
                     for key, value in params.input_responses.items()}
        try:
            answered = await self._in_store_thread(self._answer, params.task_id, owner, responses)
        except ValidationError as exc:
            raise MCPError(code=INVALID_PARAMS, message=f"inputResponses rejected: {exc}") from None
        if answered is None:
            raise _not_found()
        return {"resultType": "complete"}

    def _answer(self, task_id: str, owner: str | None, responses: dict[str, Any]) -> McpTask | None:
        now = self.clock()
        task, resumed = self.store.answer_task(task_id, owner, responses, now, now + self.dispatch_timeout)
        if task is not None and resumed:
            self.executor.dispatch(task.task_id, task.leg)
        return task

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskIdParams) -> HandlerResult:
        owner = self._admit(ctx, params.task_id)
        if await self._in_store_thread(self._request_cancel, params.task_id, owner) is None:
            raise _not_found()
        return {"resultType": "complete"}

    def _request_cancel(self, task_id: str, owner: str | None) -> McpTask | None:
        task, running = self.store.request_cancel(task_id, owner, self.clock())
        if task is not None and running:
            self.executor.cancel(task_id)
        return task


def get_result(task: McpTask) -> dict[str, Any]:
    """The ``tasks/get`` result of a task: its fields plus the ``result``, ``error``
    or outstanding ``inputRequests`` of its state."""
    out: dict[str, Any] = {"resultType": "complete", **task_json(task)}
    if task.status == "completed" and task.result is not None:
        out["result"] = task.result
    elif task.status == "failed" and task.error is not None:
        out["error"] = task.error
    elif task.status == "input_required":
        out["inputRequests"] = task.input_requests or {}
    return out


def _held(store: Store, fn: Callable[..., T], *args: Any) -> T:
    hold = getattr(store, "hold_connection", None)  # SQL stores; again after a dropped connection
    if hold is not None:
        hold()
    return fn(*args)


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio
        return False
    return True


def _declared(ctx: ServerRequestContext[Any, Any]) -> bool:
    capabilities = ctx.session.client_capabilities
    return bool(capabilities and capabilities.extensions and TASKS_EXTENSION in capabilities.extensions)
