"""Task legs' edge cases with the SDK client in-process (no HTTP): time limits,
checkpoints, outcomes too big to keep, and refused input responses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import InputRequiredResult

from sessionq.models import Store, open_store, utcnow
from sessionq.models.tasks import McpTask, new_task_id
from sessionq.workers.mcp import SessionqTasks, SessionqTasksClient, TaskPolicy, task_runner
from sessionq.workers.mcp.task_executors import InProcessExecutor
from sessionq.workers.mcp.task_runner import run_task
from sessionq.workers.mcp.tasks_client import (
    CreateTaskResult,
    call_tool_as_task,
    get_task,
    update_task,
    wait_for_task,
)
from tests.support_mcp import anyio_backend  # noqa: F401  (fixture)

pytestmark = pytest.mark.anyio


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A migrated SQLite store."""
    store = open_store(f"sqlite:///{tmp_path / 'tasks.db'}")
    store.upgrade()
    yield store
    store.close()


@pytest.fixture
async def client(store: Store) -> AsyncIterator[Client]:
    """An in-process client at 2026-07-28 of a server with a few task tools."""
    policies = {name: TaskPolicy(poll_interval_ms=10) for name in ("huge", "resumable", "waits")}
    policies["slow"] = TaskPolicy(poll_interval_ms=10, time_limit_ms=200)
    executor = InProcessExecutor(lease_ms=3000, sweep_interval=60)
    tasks = SessionqTasks(store, tools=policies, executor=executor)
    server = tasks.bind(MCPServer("inprocess", extensions=[tasks]))

    @server.tool()
    async def huge() -> str:
        """A result over the 4 MiB a task keeps."""
        return "x" * (5 * 1024 * 1024)

    @server.tool()
    async def slow() -> str:
        """Longer than its time limit."""
        await anyio.sleep(30)
        return "too late"

    @server.tool()
    async def resumable(ctx: Context) -> str | InputRequiredResult:
        """A checkpoint (state, no question), then the result."""
        if ctx.request_state is None:
            return InputRequiredResult(request_state="half way")
        return f"resumed from {ctx.request_state}"

    @server.tool()
    async def waits(ctx: Context) -> str | InputRequiredResult:
        """One question."""
        from mcp_types import ElicitRequest, ElicitRequestFormParams

        if ctx.request_state is None:
            question = ElicitRequest(params=ElicitRequestFormParams(message="v?", requested_schema={
                "type": "object", "properties": {"v": {"type": "string"}}}))
            return InputRequiredResult(input_requests={"v": question}, request_state="asked")
        return "answered"

    async with Client(server, mode="2026-07-28", extensions=[SessionqTasksClient(poll_interval=0.01)]) as connected:
        yield connected
    executor.close()


async def start(client: Client, tool: str) -> str:
    """Start a task, return its id."""
    handle = await call_tool_as_task(client.session, tool, {})
    assert isinstance(handle, CreateTaskResult)
    return handle.task_id


async def test_a_leg_past_its_time_limit_fails(client: Client) -> None:
    done = await wait_for_task(client.session, await start(client, "slow"), poll_interval=0.01, timeout=30)
    assert done.status == "failed"
    assert done.error == {"code": -32603, "message": "task exceeded its time limit of 200 ms"}


async def test_an_outcome_too_big_to_keep_fails_the_task_instead_of_the_worker(client: Client) -> None:
    done = await wait_for_task(client.session, await start(client, "huge"), poll_interval=0.01, timeout=30)
    assert done.status == "failed" and done.error is not None
    assert done.error["code"] == -32603 and "cannot be stored: result" in done.error["message"]


async def test_a_checkpoint_runs_the_next_leg_with_the_kept_state(client: Client, store: Store) -> None:
    task_id = await start(client, "resumable")
    done = await wait_for_task(client.session, task_id, poll_interval=0.01, timeout=30)
    assert done.call_tool_result().structured_content == {"result": "resumed from half way"}
    assert store.load_task(task_id).leg == 1


async def test_input_responses_a_store_cannot_keep_are_refused_with_one_line(client: Client) -> None:
    task_id = await start(client, "waits")
    while (state := await get_task(client.session, task_id)).status != "input_required":
        await anyio.sleep(0.01)
    (key,) = state.input_requests or {}
    with pytest.raises(MCPError) as refused:
        await update_task(client.session, task_id, {key: {"action": "accept", "content": {"v": "nul\x00"}}})
    assert refused.value.code == -32602 and refused.value.message.startswith("inputResponses rejected: ")
    await update_task(client.session, task_id, {key: {"action": "accept", "content": {"v": "fine"}}})
    done = await wait_for_task(client.session, task_id, poll_interval=0.01, timeout=30)
    assert done.call_tool_result().structured_content == {"result": "answered"}


async def test_a_first_leg_waits_for_its_task_row_and_drops_one_that_never_comes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = MCPServer("late")

    @server.tool()
    async def echo(text: str) -> str:
        """Return ``text``."""
        return text

    task = McpTask(new_task_id(), "echo", arguments={"text": "hi"}, created_at=utcnow())

    async def insert_late() -> None:
        await anyio.sleep(0.05)
        await anyio.to_thread.run_sync(store.create_task, task)

    # Given a worker that gets the first leg before the replica's INSERT has committed
    async with anyio.create_task_group() as group:
        group.start_soon(insert_late)
        outcome = await run_task(server, store, task.task_id, 0, worker_id="w1")
    # Then it runs the task once the row is there, once
    done = store.load_task(task.task_id)
    assert outcome == "completed" and done.status == "completed" and done.attempt == 1
    # And when the row commits between a missed claim and the look for it, the leg still runs
    racing = McpTask(new_task_id(), "echo", arguments={"text": "raced"}, created_at=utcnow())

    class CommitsAfterTheClaim:
        """The store, where the task's INSERT commits right after the first claim missed it."""

        def __init__(self) -> None:
            self.missed = False

        def __getattr__(self, name: str) -> object:
            return getattr(store, name)

        def claim_task(self, *args: object) -> object:
            claimed = store.claim_task(*args)  # type: ignore[arg-type]
            if not self.missed:
                self.missed = True
                store.create_task(racing)
            return claimed

    racy: Any = CommitsAfterTheClaim()
    assert await run_task(server, racy, racing.task_id, 0, worker_id="w1") == "completed"
    assert store.load_task(racing.task_id).status == "completed"
    # And a leg whose row never comes (its create failed) is dropped after the wait
    monkeypatch.setattr(task_runner, "CREATE_WAIT_S", 0.05)
    assert await run_task(server, store, new_task_id(), 0, worker_id="w1") == "skipped"
    # And a later leg of a missing task does not wait at all
    monkeypatch.setattr(task_runner, "CREATE_WAIT_S", 60.0)
    with anyio.fail_after(5):
        assert await run_task(server, store, new_task_id(), 1, worker_id="w1") == "skipped"
