"""Idempotent tools' edge cases with the SDK client in-process (no HTTP): what is kept,
what is released, bad keys, a duplicate that waits too long, and a replayed task that
is gone. (Two replicas at once: tests/test_mcp_handles.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, InputRequiredResult, RequestParamsMeta

from sessionq.models import Store, open_store
from sessionq.models.idempotency import entry_id_for
from sessionq.workers.mcp import SessionqTasks, SessionqTasksClient, TaskPolicy
from sessionq.workers.mcp.idempotency import IDEMPOTENCY_KEY_META, IdempotencyPolicy, SessionqIdempotency
from sessionq.workers.mcp.task_executors import InProcessExecutor
from sessionq.workers.mcp.tasks_client import CreateTaskResult, wait_for_task
from tests.support_mcp import anyio_backend  # noqa: F401  (fixture)

pytestmark = pytest.mark.anyio
TOOLS = ("count", "refuse", "fail", "ask", "block", "job")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A migrated SQLite store."""
    store = open_store(f"sqlite:///{tmp_path / 'idem.db'}")
    store.upgrade()
    yield store
    store.close()


class App:
    """The server's tools and what they saw."""

    def __init__(self, store: Store) -> None:
        self.runs: dict[str, int] = dict.fromkeys(TOOLS, 0)
        self.release = anyio.Event()
        tasks = SessionqTasks(store, tools={"job": TaskPolicy(mode="required", poll_interval_ms=10)},
                              executor=InProcessExecutor(lease_ms=3000, sweep_interval=60))
        self.idempotency = SessionqIdempotency(store, tools={name: IdempotencyPolicy() for name in TOOLS}, wait=0.3)
        self.server = tasks.bind(MCPServer("idem", extensions=[self.idempotency, tasks]))
        app = self

        @self.server.tool()
        async def count(n: int) -> int:
            app.runs["count"] += 1
            return n * 10

        @self.server.tool()
        async def refuse() -> str:
            app.runs["refuse"] += 1
            raise MCPError(code=-32099, message="not now")

        @self.server.tool()
        async def fail() -> str:
            app.runs["fail"] += 1
            raise ToolError("out of stock")

        @self.server.tool()
        async def ask() -> InputRequiredResult:
            app.runs["ask"] += 1
            return InputRequiredResult(input_requests={}, request_state="s1")

        @self.server.tool()
        async def block() -> str:
            app.runs["block"] += 1
            await app.release.wait()
            return "released"

        @self.server.tool()
        async def job() -> str:
            app.runs["job"] += 1
            return "done"


@pytest.fixture
async def app(store: Store) -> AsyncIterator[tuple[App, Client]]:
    """The app and an in-process client at 2026-07-28 declaring the Tasks extension."""
    app = App(store)
    async with Client(app.server, mode="2026-07-28", extensions=[SessionqTasksClient(poll_interval=0.01)]) as client:
        yield app, client


def keyed(key: Any) -> RequestParamsMeta:
    """The ``_meta`` of a call with idempotency key ``key``."""
    return cast(RequestParamsMeta, {IDEMPOTENCY_KEY_META: key})


async def test_tool_errors_are_kept_protocol_errors_and_input_requests_are_not(
    app: tuple[App, Client], store: Store
) -> None:
    server, client = app
    # A tool error is an outcome: the retry gets it without running the tool again
    first = await client.session.call_tool("fail", {}, meta=keyed("k-fail"))
    again = await client.session.call_tool("fail", {}, meta=keyed("k-fail"))
    assert first.is_error and again.content == first.content and server.runs["fail"] == 1
    # A protocol error is not: the claim is released and the retry runs
    for _ in range(2):
        with pytest.raises(MCPError) as refused:
            await client.session.call_tool("refuse", {}, meta=keyed("k-refuse"))
        assert refused.value.error.code == -32099
    assert server.runs["refuse"] == 2
    # Neither is a request for input
    for _ in range(2):
        asked = await client.session.call_tool("ask", {}, meta=keyed("k-ask"), allow_input_required=True)
        assert isinstance(asked, InputRequiredResult)
    assert server.runs["ask"] == 2
    for key in ("k-refuse", "k-ask"):
        with pytest.raises(Exception, match="does not exist"):
            store.load_idempotency(entry_id_for(None, key))
    # Keys are per call's key, not per tool: another key runs again
    assert (await client.session.call_tool("count", {"n": 1}, meta=keyed("a"))).structured_content == {"result": 10}
    assert (await client.session.call_tool("count", {"n": 1}, meta=keyed("b"))).structured_content == {"result": 10}
    assert server.runs["count"] == 2
    # And a call without a key (the tool is not repeat-safe) is never deduplicated
    await client.call_tool("count", {"n": 1})
    assert server.runs["count"] == 3


async def test_a_bad_key_or_another_tool_under_the_same_key_is_invalid_params(app: tuple[App, Client]) -> None:
    server, client = app
    for bad in (7, "", "k" * 256):
        with pytest.raises(MCPError) as rejected:
            await client.session.call_tool("count", {"n": 1}, meta=keyed(bad))
        assert rejected.value.error.code == -32602 and "idempotencyKey" in rejected.value.error.message
    await client.session.call_tool("count", {"n": 1}, meta=keyed("shared"))
    with pytest.raises(MCPError) as other_tool:
        await client.session.call_tool("fail", {}, meta=keyed("shared"))
    assert other_tool.value.error.code == -32602
    assert server.runs == dict.fromkeys(TOOLS, 0) | {"count": 1}


async def test_a_duplicate_waits_a_bounded_time_then_gets_the_outcome_on_retry(app: tuple[App, Client]) -> None:
    server, client = app
    results: list[CallToolResult] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            async def first() -> None:
                results.append(await client.session.call_tool("block", {}, meta=keyed("slow")))

            tg.start_soon(first)
            await anyio.sleep(0.05)
            # While the first call runs, a duplicate waits 0.3 s, then is told to retry later
            try:
                with pytest.raises(MCPError) as waited:
                    await client.session.call_tool("block", {}, meta=keyed("slow"))
            finally:
                server.release.set()
            assert waited.value.error.code == -32001 and "retry later" in waited.value.error.message
    retry = await client.session.call_tool("block", {}, meta=keyed("slow"))
    assert retry.content == results[0].content and server.runs["block"] == 1


async def test_a_task_tool_keeps_its_task_and_a_vanished_task_runs_again(
    app: tuple[App, Client], store: Store
) -> None:
    server, client = app
    first = await client.session.call_tool("job", {}, meta=keyed("j"), allow_claimed=True)
    again = await client.session.call_tool("job", {}, meta=keyed("j"), allow_claimed=True)
    assert isinstance(first, CreateTaskResult) and isinstance(again, CreateTaskResult)
    assert again.task_id == first.task_id
    assert (await wait_for_task(client.session, first.task_id)).status == "completed"
    assert server.runs["job"] == 1
    # When the task is gone (swept), the key no longer names anything: the retry runs anew
    store.database.execute_sql("DELETE FROM sessionq_tasks")  # type: ignore[attr-defined]
    third = await client.session.call_tool("job", {}, meta=keyed("j"), allow_claimed=True)
    assert isinstance(third, CreateTaskResult) and third.task_id != first.task_id
    assert store.load_idempotency(entry_id_for(None, "j")).task_id == third.task_id
