"""The client half of durable MCP tasks (SEP-2663): the SDK client has none in mcp 2.3.

* :class:`SessionqTasksClient` — a ``ClientExtension``: with
  ``Client(url, mode="2026-07-28", extensions=[SessionqTasksClient()])``, a
  ``call_tool`` the server answers with a task handle polls ``tasks/get`` (honouring
  ``pollIntervalMs``, sending ``Mcp-Name``) and returns the tool's
  ``CallToolResult``; input requests are answered through the client's own
  sampling / elicitation / roots callbacks and sent with ``tasks/update``.
* The lower level: :func:`call_tool_as_task` returns the handle (or an inline
  result), :func:`get_task`, :func:`update_task`, :func:`cancel_task` and
  :func:`wait_for_task` poll and steer a task by id — from another process too, since
  ids are durable and any replica answers.

A ``failed`` task raises :class:`~mcp.shared.exceptions.MCPError` with the task's
error; a ``cancelled`` one raises :class:`TaskCancelled`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import anyio
from mcp.client.context import ClientRequestContext
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, ErrorData, InputRequest, Request, RequestParams, Result
from pydantic import TypeAdapter

from .tasks import TASKS_EXTENSION

# Seconds between polls when the server suggests no interval.
DEFAULT_POLL_INTERVAL = 1.0
# Shortest pause between two polls, whatever the server suggests (seconds).
MIN_POLL_INTERVAL = 0.01
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

_INPUT_REQUEST: TypeAdapter[InputRequest] = TypeAdapter(InputRequest)


class TaskCancelled(RuntimeError):
    """The task ended ``cancelled`` (its :attr:`task` is the last ``tasks/get`` answer)."""

    def __init__(self, task: TaskState) -> None:
        super().__init__(f"task {task.task_id} was cancelled")
        self.task = task


class CreateTaskResult(Result):
    """A ``tools/call`` answered with a task handle (``resultType: "task"``)."""

    result_type: Literal["task"] = "task"
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None


class TaskState(Result):
    """A ``tasks/get`` answer: the task and, by status, its result, error or input requests."""

    result_type: str | None = None
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    input_requests: dict[str, Any] | None = None

    @property
    def final(self) -> bool:
        """True in ``completed``, ``failed`` or ``cancelled``."""
        return self.status in FINAL_STATUSES

    def call_tool_result(self) -> CallToolResult:
        """The tool's result of a ``completed`` task."""
        if self.status != "completed" or self.result is None:
            raise ValueError(f"task {self.task_id} is {self.status}, not completed")
        return CallToolResult.model_validate(self.result, by_name=False)


class TaskIdParams(RequestParams):
    """``{taskId}``."""

    task_id: str


class TaskUpdateParams(RequestParams):
    """``{taskId, inputResponses}``."""

    task_id: str
    input_responses: dict[str, Any]


class GetTaskRequest(Request[TaskIdParams, Literal["tasks/get"]]):
    """``tasks/get`` (sends ``Mcp-Name: <taskId>``)."""

    method: Literal["tasks/get"] = "tasks/get"
    params: TaskIdParams
    name_param = "taskId"


class UpdateTaskRequest(Request[TaskUpdateParams, Literal["tasks/update"]]):
    """``tasks/update`` (sends ``Mcp-Name: <taskId>``)."""

    method: Literal["tasks/update"] = "tasks/update"
    params: TaskUpdateParams
    name_param = "taskId"


class CancelTaskRequest(Request[TaskIdParams, Literal["tasks/cancel"]]):
    """``tasks/cancel`` (sends ``Mcp-Name: <taskId>``)."""

    method: Literal["tasks/cancel"] = "tasks/cancel"
    params: TaskIdParams
    name_param = "taskId"


class _Ack(Result):
    result_type: str | None = None


async def get_task(session: ClientSession, task_id: str) -> TaskState:
    """``tasks/get``."""
    return await session.send_request(GetTaskRequest(params=TaskIdParams(task_id=task_id)), TaskState)


async def update_task(session: ClientSession, task_id: str, responses: dict[str, Any]) -> None:
    """``tasks/update`` with answers keyed as the task's ``inputRequests`` were."""
    params = TaskUpdateParams(task_id=task_id, input_responses=responses)
    await session.send_request(UpdateTaskRequest(params=params), _Ack)


async def cancel_task(session: ClientSession, task_id: str) -> None:
    """``tasks/cancel`` (cooperative: the task may still complete)."""
    await session.send_request(CancelTaskRequest(params=TaskIdParams(task_id=task_id)), _Ack)


async def call_tool_as_task(
    session: ClientSession, name: str, arguments: dict[str, Any] | None = None
) -> CreateTaskResult | CallToolResult:
    """``tools/call`` that hands back the task handle instead of waiting (or the
    inline result, when the server ran the tool at once). The session's client must
    carry :class:`SessionqTasksClient` (the claim that parses handles)."""
    result = await session.call_tool(name, arguments, allow_claimed=True)
    if isinstance(result, CreateTaskResult | CallToolResult):
        return result
    raise TypeError(f"unexpected tools/call result {type(result).__name__}")


def _interval(state: TaskState | CreateTaskResult, default: float) -> float:
    suggested = state.poll_interval_ms
    return max(MIN_POLL_INTERVAL, suggested / 1000 if suggested else default)


async def _answer(session: ClientSession, state: TaskState) -> None:
    """Answer every outstanding input request through the session's callbacks."""
    responses: dict[str, Any] = {}
    for key, raw in (state.input_requests or {}).items():
        request = _INPUT_REQUEST.validate_python(raw, by_name=False)
        meta = request.params.meta if request.params else None
        reply = await session.dispatch_input_request(ClientRequestContext(session=session, request_id=key, meta=meta),
                                                     request)
        if isinstance(reply, ErrorData):
            raise MCPError.from_error_data(reply)
        responses[key] = reply.model_dump(by_alias=True, mode="json", exclude_none=True)
    if responses:
        await update_task(session, state.task_id, responses)


async def wait_for_task(
    session: ClientSession,
    task: str | CreateTaskResult,
    *,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    timeout: float | None = None,
    answer_input: bool = True,
) -> TaskState:
    """Poll until the task is final and return its last state; with ``answer_input``
    its input requests are answered through the session's callbacks on the way.
    Raises ``TimeoutError`` after ``timeout`` seconds."""
    state: TaskState | CreateTaskResult = task if isinstance(task, CreateTaskResult) else await get_task(session, task)
    task_id = state.task_id
    deadline = None if timeout is None else time.monotonic() + timeout
    answered: set[str] = set()
    while True:
        if isinstance(state, TaskState):
            if state.final:
                return state
            pending = {k: v for k, v in (state.input_requests or {}).items() if k not in answered}
            if state.status == "input_required" and answer_input and pending:
                await _answer(session, state.model_copy(update={"input_requests": pending}))
                answered.update(pending)
                state = await get_task(session, task_id)
                continue
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"task {task_id} is still {state.status} after {timeout}s")
        await anyio.sleep(_interval(state, poll_interval))
        state = await get_task(session, task_id)


def final_result(state: TaskState) -> CallToolResult:
    """The ``CallToolResult`` of a final task; ``MCPError`` for ``failed``, :class:`TaskCancelled` for ``cancelled``."""
    if state.status == "failed":
        error = state.error or {"code": -32603, "message": "task failed"}
        code, message = int(error.get("code", -32603)), str(error.get("message", ""))
        raise MCPError(code=code, message=message, data=error.get("data"))
    if state.status == "cancelled":
        raise TaskCancelled(state)
    return state.call_tool_result()


class SessionqTasksClient(ClientExtension):
    """Declares the Tasks extension and resolves task handles transparently."""

    identifier = TASKS_EXTENSION

    def __init__(self, *, poll_interval: float = DEFAULT_POLL_INTERVAL, timeout: float | None = None) -> None:
        self.poll_interval = poll_interval
        self.timeout = timeout

    def claims(self) -> Sequence[ResultClaim[Any]]:
        """The ``resultType: "task"`` shape of ``tools/call``."""
        return [ResultClaim(result_type="task", model=CreateTaskResult, resolve=self._resolve)]

    async def _resolve(self, handle: CreateTaskResult, ctx: ClaimContext) -> CallToolResult:
        state = await wait_for_task(ctx.session, handle, poll_interval=self.poll_interval, timeout=self.timeout)
        return final_result(state)
