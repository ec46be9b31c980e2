"""Durable MCP tasks in embedded mode: no Redis, a SQLite store, the tool run in the
server process by the in-process executor (which also sweeps)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp.shared.exceptions import MCPError

from sessionq.models import Store, open_store, utcnow
from sessionq.workers.mcp.tasks_client import (
    CreateTaskResult,
    call_tool_as_task,
    cancel_task,
    get_task,
    wait_for_task,
)
from tests.support_mcp import anyio_backend, free_port  # noqa: F401  (fixture)
from tests.support_tasks import Cluster, await_until, task_client

pytestmark = pytest.mark.anyio


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[Cluster, Store]]:
    """Servers without Redis on one SQLite file, and that store."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    store = open_store(url)
    store.upgrade()
    cluster = Cluster(tmp_path, STORAGE_URL=url, REDIS_URL="")
    yield cluster, store
    cluster.stop()
    store.close()


def started(marker: Path, attempt: int) -> bool:
    """True once attempt ``attempt`` of the hold tool began."""
    return Path(f"{marker}.started.{attempt}").exists()


async def test_embedded_tasks_run_cancel_and_expire_in_the_server(embedded: tuple[Cluster, Store],
                                                                  tmp_path: Path) -> None:
    cluster, store = embedded
    url = cluster.replica()
    async with task_client(url) as client:
        # A task runs in the server process and is polled to its result, transparently too
        assert (await client.call_tool("echo", {"text": "embedded"})).structured_content == {"result": "embedded"}
        # A running task is cancelled; a finished one stays completed
        marker = tmp_path / "m"
        handle = await call_tool_as_task(client.session, "hold", {"marker": str(marker)})
        assert isinstance(handle, CreateTaskResult)
        await await_until(lambda: started(marker, 1), "the task to run")
        await cancel_task(client.session, handle.task_id)
        assert (await wait_for_task(client.session, handle, poll_interval=0.05, timeout=30)).status == "cancelled"
        await cancel_task(client.session, handle.task_id)
        # A task waiting for input is cancelled at once
        asking = await call_tool_as_task(client.session, "ask", {})
        assert isinstance(asking, CreateTaskResult)
        while (await get_task(client.session, asking.task_id)).status != "input_required":
            await anyio.sleep(0.05)
        await cancel_task(client.session, asking.task_id)
        assert (await get_task(client.session, asking.task_id)).status == "cancelled"
        # A task past its TTL is not found, and the server's own sweep deletes it
        (tmp_path / "b.release").touch()
        brief = await call_tool_as_task(client.session, "brief", {"marker": str(tmp_path / "b")})
        assert isinstance(brief, CreateTaskResult)
        with anyio.fail_after(30):
            while True:
                try:
                    await get_task(client.session, brief.task_id)
                except MCPError as exc:
                    assert exc.code == -32602
                    break
                await anyio.sleep(0.1)
    await await_until(lambda: brief.task_id not in {t.task_id for t in store.list_tasks().items},
                      "the sweep to delete it")
    assert store.task_stats(utcnow()).by_status == {"completed": 1, "cancelled": 2}


async def test_a_task_survives_a_killed_embedded_server(embedded: tuple[Cluster, Store], tmp_path: Path) -> None:
    cluster, store = embedded
    port = free_port()
    url = cluster.replica(port)
    marker = tmp_path / "m"
    async with task_client(url) as client:
        handle = await call_tool_as_task(client.session, "hold", {"marker": str(marker)})
        assert isinstance(handle, CreateTaskResult)
    await await_until(lambda: started(marker, 1), "the task to run")
    # When the server is killed mid-task and started again on the same store
    cluster.procs[0].kill()
    cluster.replica(port)
    # Then its sweep hands the task out again once the lease passed, and it finishes once
    await await_until(lambda: started(marker, 2), "a second attempt after the restart")
    Path(f"{marker}.release").touch()
    async with task_client(url) as client:
        done = await wait_for_task(client.session, handle.task_id, poll_interval=0.05, timeout=30)
    assert done.call_tool_result().structured_content == {"result": "released on attempt 2"}
    assert store.load_task(handle.task_id).attempt == 2
