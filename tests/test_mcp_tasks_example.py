"""``ops/example_server.py``'s long-running ``render`` tool: a durable task on a tasks
worker for a 2026-07-28 client, an inline call for a 2025-11-25 session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sessionq.models import open_store
from sessionq.workers.mcp.tasks_client import CreateTaskResult, call_tool_as_task, get_task, wait_for_task
from tests.conftest import REDIS_URL
from tests.support_mcp import ServerProcess, anyio_backend, mcp_client, redis_db, servers  # noqa: F401  (fixtures)
from tests.support_tasks import Cluster, task_client

pytestmark = pytest.mark.anyio


async def test_render_runs_as_a_task_on_a_worker_and_inline_for_a_session_client(
    servers: Callable[..., ServerProcess], redis_db: object, tmp_path: Path
) -> None:
    # Given the example server and a tasks worker importing its server from the environment
    server = servers()
    workers = Cluster(tmp_path, STORAGE_URL=server.storage_url, REDIS_URL=REDIS_URL)
    try:
        workers.worker(app="ops.example_server:server")
        async with task_client(server.url, "unused") as client:
            # When a 2026-07-28 client asks for a render
            handle = await call_tool_as_task(client.session, "render", {"frames": 3, "seconds_per_frame": 0.1})
            assert isinstance(handle, CreateTaskResult) and handle.poll_interval_ms == 500
            # Then it runs on the worker (not the server process), reporting progress, and completes
            done = await wait_for_task(client.session, handle, poll_interval=0.05, timeout=30)
            result = done.call_tool_result().structured_content or {}
            assert (result["frames"], result["attempt"]) == (3, 1) and result["pid"] != server.pid
            assert done.status_message == "frame 3 of 3"
            assert (await get_task(client.session, handle.task_id)).status == "completed"
    finally:
        workers.stop()
    # And a 2025-11-25 session client gets the same tool inline
    async with mcp_client(server.url) as session:
        inline = await session.call_tool("render", {"frames": 1, "seconds_per_frame": 0.0})
        assert inline.structured_content == {"frames": 1, "attempt": 0, "pid": server.pid}
    store = open_store(server.storage_url)
    assert store.stats().tasks == 1
    store.close()
