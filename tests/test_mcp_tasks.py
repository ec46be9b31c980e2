"""Durable MCP tasks at protocol 2026-07-28: the real SDK client against two replicas
of ``tests.task_app`` and a ``tasks`` worker process, on PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import anyio
import httpx
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, Request

from sessionq.models import Settings, Store
from sessionq.scheduler.sweeps import run_sweep
from sessionq.workers.mcp.tasks_client import (
    CreateTaskResult,
    GetTaskRequest,
    TaskIdParams,
    TaskState,
    call_tool_as_task,
    get_task,
    wait_for_task,
)
from tests.conftest import POSTGRES_URL
from tests.support_mcp import anyio_backend  # noqa: F401  (fixture)
from tests.support_tasks import Cluster, task_client

pytestmark = pytest.mark.anyio

EXTENSION = "io.modelcontextprotocol/tasks"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Replicas A and B and one tasks worker, for the whole module."""
    from tests.conftest import make_store

    tmp = tmp_path_factory.mktemp("tasks")
    make_store("postgresql", tmp).close()  # the schema, before the processes start
    nodes = Cluster(tmp)
    try:
        a, b = nodes.replica(), nodes.replica()
        nodes.worker()
        yield a, b
    finally:
        nodes.stop()


def modern_post(url: str, method: str, params: dict[str, object], *, token: str = "alice",
                name: str | None = None, declare: bool = True) -> dict[str, object]:
    """A raw 2026-07-28 JSON-RPC POST (for what the SDK client would not send)."""
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {"extensions": {EXTENSION: {}}} if declare else {}}
    headers = {"authorization": f"Bearer {token}", "accept": "application/json, text/event-stream",
               "mcp-protocol-version": "2026-07-28", "mcp-method": method}
    if name is not None:
        headers["mcp-name"] = name
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": meta}}
    return dict(httpx.post(url, json=body, headers=headers, timeout=30.0).json())


async def test_discover_advertises_the_extension_and_tasks_run_across_replicas(
    cluster: tuple[str, str], pg_store: Store
) -> None:
    a, b = cluster
    # Given a client on replica A and one on replica B, both declaring the extension
    async with task_client(a) as on_a, task_client(b) as on_b:
        # When A discovers the server, then calls a task tool without waiting
        discovered = await on_a.session.send_discover("2026-07-28")
        assert discovered["capabilities"]["extensions"] == {EXTENSION: {}}
        handle = await call_tool_as_task(on_a.session, "echo", {"text": "héllo"})
        # Then the handle is a durable task B answers for at once, and it completes on the worker
        assert isinstance(handle, CreateTaskResult) and handle.status == "working"
        assert len(handle.task_id) >= 43 and handle.ttl_ms == 3_600_000 and handle.poll_interval_ms == 50
        assert pg_store.load_task(handle.task_id).tool == "echo"
        first = await get_task(on_b.session, handle.task_id)
        assert first.task_id == handle.task_id and first.status in ("working", "completed")
        done = await wait_for_task(on_b.session, handle.task_id, poll_interval=0.05, timeout=30)
        assert done.status == "completed"
        assert done.call_tool_result().structured_content == {"result": "héllo"}
        # And the transparent call_tool polls to the same inline result shape
        result = await on_b.call_tool("echo", {"text": "again"})
        assert (result.is_error, result.structured_content) == (False, {"result": "again"})


async def test_tool_errors_complete_with_is_error_and_protocol_errors_fail(cluster: tuple[str, str]) -> None:
    a, _ = cluster
    async with task_client(a) as client:
        # A ToolError: the task completes, with isError and the tool's message
        broken = await client.call_tool("broken", {})
        assert broken.is_error and "failed on purpose" in broken.content[0].text  # type: ignore[union-attr]
        # An MCPError: the task fails with that JSON-RPC error
        handle = await call_tool_as_task(client.session, "refuse", {})
        assert isinstance(handle, CreateTaskResult)
        failed = await wait_for_task(client.session, handle, poll_interval=0.05, timeout=30)
        assert failed.status == "failed" and failed.error == {
            "code": -32099, "message": "refused on purpose", "data": {"why": "test"}}
        with pytest.raises(MCPError) as refused:
            await client.call_tool("refuse", {})
        assert refused.value.code == -32099
        # Bad arguments never become a task: the SDK's inline validation error
        bad = await client.session.call_tool("echo", {"text": {"not": "a string"}}, allow_claimed=True)
        assert isinstance(bad, CallToolResult) and bad.is_error


async def test_undeclared_clients_get_inline_results_or_32021(
    cluster: tuple[str, str], pg_store: Store
) -> None:
    a, _ = cluster
    async with task_client(a, tasks=False) as plain:
        # An optional task tool runs inline for a client that did not declare the extension
        inline = await plain.call_tool("echo", {"text": "inline"})
        assert inline.structured_content == {"result": "inline"}
        # A required one is refused with -32021 naming the extension
        with pytest.raises(MCPError) as refused:
            await plain.call_tool("hold", {"marker": "/nonexistent"})
        assert refused.value.code == -32021
        assert refused.value.data == {"requiredCapabilities": {"extensions": {EXTENSION: {}}}}
    assert pg_store.stats().tasks == 0
    # And tasks/* without the declaration is -32021 as well
    reply = modern_post(a, "tasks/get", {"taskId": "x" * 43}, name="x" * 43, declare=False)
    assert reply["error"]["code"] == -32021  # type: ignore[index]


async def test_task_ids_are_checked_against_the_header_and_the_principal(cluster: tuple[str, str]) -> None:
    a, b = cluster
    async with task_client(a, "alice") as alice:
        handle = await call_tool_as_task(alice.session, "echo", {"text": "mine"})
        assert isinstance(handle, CreateTaskResult)
        task_id = handle.task_id
        await wait_for_task(alice.session, handle, poll_interval=0.05, timeout=30)
    # A wrong or missing Mcp-Name header is -32020
    assert modern_post(b, "tasks/get", {"taskId": task_id}, name="other")["error"]["code"] == -32020  # type: ignore[index]
    assert modern_post(b, "tasks/get", {"taskId": task_id})["error"]["code"] == -32020  # type: ignore[index]
    # The right header answers alice
    answer = modern_post(b, "tasks/get", {"taskId": task_id}, name=task_id)
    assert answer["result"]["status"] == "completed"  # type: ignore[index]
    # Bob sees "not found" for alice's task, on get, update and cancel alike, as for an unknown id
    async with task_client(b, "bob") as bob:
        for call in (lambda: get_task(bob.session, task_id), lambda: get_task(bob.session, "n" * 43)):
            with pytest.raises(MCPError) as missing:
                await call()
            assert missing.value.code == -32602
    calls: list[tuple[str, dict[str, object]]] = [("tasks/update", {"taskId": task_id, "inputResponses": {}}),
                                                  ("tasks/cancel", {"taskId": task_id})]
    for method, params in calls:
        reply = modern_post(b, method, params, token="bob", name=task_id)
        assert reply["error"]["code"] == -32602, method  # type: ignore[index]


class TaskResultRequest(Request[TaskIdParams, Literal["tasks/result"]]):
    """``tasks/result`` of the 2025-11-25 core tasks (gone in 2026-07-28)."""

    method: Literal["tasks/result"] = "tasks/result"
    params: TaskIdParams


async def test_a_legacy_client_is_untouched(cluster: tuple[str, str], pg_store: Store) -> None:
    a, _ = cluster
    # Given a 2025-11-25 client (initialize handshake, sessions)
    async with task_client(a, tasks=False, mode="legacy") as legacy:
        assert legacy.protocol_version == "2025-11-25"
        # Then even a required task tool runs inline (tasks are a 2026-07-28 extension)
        result = await legacy.call_tool("echo", {"text": "old"})
        assert result.structured_content == {"result": "old"}
        # And tasks/* and tasks/result do not exist at that version
        for request in (GetTaskRequest(params=TaskIdParams(task_id="x")),
                        TaskResultRequest(params=TaskIdParams(task_id="x"))):
            with pytest.raises(MCPError) as missing:
                await legacy.session.send_request(request, TaskState)
            assert missing.value.code == -32601, request.method
    assert pg_store.stats().tasks == 0


async def test_an_expired_task_is_not_found_and_is_swept(
    cluster: tuple[str, str], pg_store: Store, tmp_path: Path
) -> None:
    a, b = cluster
    async with task_client(a) as client, task_client(b) as other:
        # Given a task with a short TTL that finished at once
        (tmp_path / "m.release").touch()
        handle = await call_tool_as_task(client.session, "brief", {"marker": str(tmp_path / "m")})
        assert isinstance(handle, CreateTaskResult) and handle.ttl_ms == 1500
        await wait_for_task(client.session, handle, poll_interval=0.05, timeout=30)

        async def gone() -> bool:
            try:
                await get_task(other.session, handle.task_id)
            except MCPError as exc:
                return exc.code == -32602
            return False

        # When its TTL passes, no replica knows it any more
        with anyio.fail_after(30):
            while not await gone():
                await anyio.sleep(0.1)
    # And the tasks sweep deletes its row
    assert run_sweep("tasks", pg_store, Settings(storage_url=POSTGRES_URL)) == {"deleted": 1, "dispatched": 0}
    assert pg_store.stats().tasks == 0
