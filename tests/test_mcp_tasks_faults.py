"""Durable MCP tasks under faults: workers and replicas killed with SIGKILL, lost queue
messages, cancellation and input requests across replicas (real processes, PostgreSQL,
Redis, the SDK client at 2026-07-28)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis
from mcp.client.context import ClientRequestContext
from mcp_types import ElicitRequestParams, ElicitResult

from sessionq.models import Settings, Store
from sessionq.workers.mcp.tasks_client import (
    CreateTaskResult,
    TaskState,
    call_tool_as_task,
    cancel_task,
    get_task,
    update_task,
    wait_for_task,
)
from sessionq.workers.producer import Producer
from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.support_mcp import anyio_backend  # noqa: F401  (fixture)
from tests.support_tasks import Cluster, await_until, task_client, task_in  # noqa: F401  (fixture)

pytestmark = pytest.mark.anyio

#: Dramatiq redelivers a dead worker's messages after 4 s of silence: later than a task lease (1.5 s) passes.
REDELIVERY_ENV = {"SESSIONQ_WORKER_HEARTBEAT_TIMEOUT": "4000"}


@pytest.fixture
def nodes(tmp_path: Path, redis_client: redis.Redis) -> Iterator[Cluster]:
    """A cluster factory on the run's (flushed) Redis; every process is killed at the end."""
    from tests.conftest import make_store

    make_store("postgresql", tmp_path).close()
    cluster = Cluster(tmp_path, **REDELIVERY_ENV)
    yield cluster
    cluster.stop()


async def handle_of(client: object, tool: str, arguments: dict[str, object]) -> str:
    """Start a task, return its id."""
    handle = await call_tool_as_task(client.session, tool, arguments)  # type: ignore[attr-defined]
    assert isinstance(handle, CreateTaskResult), handle
    return handle.task_id


def started(marker: Path, attempt: int) -> bool:
    """True once attempt ``attempt`` of the hold tool began."""
    return Path(f"{marker}.started.{attempt}").exists()


async def test_a_killed_worker_s_task_runs_again_once_or_fails_under_a_one_attempt_policy(
    nodes: Cluster, pg_store: Store, tmp_path: Path
) -> None:
    a = nodes.replica()
    first = nodes.worker()
    hold, fragile = tmp_path / "hold", tmp_path / "fragile"
    async with task_client(a) as client:
        # Given two tasks running on a worker: one allowed 2 attempts, one allowed 1
        held = await handle_of(client, "hold", {"marker": str(hold)})
        one_shot = await handle_of(client, "fragile", {"marker": str(fragile)})
        await await_until(lambda: started(hold, 1) and started(fragile, 1), "both tasks to start")
        # When the worker's host dies (SIGKILL, nothing cleaned up) and another worker comes up
        first.kill()
        nodes.worker()
        # Then Dramatiq redelivers both jobs: the first task starts a second attempt,
        await await_until(lambda: started(hold, 2), "a second attempt of the held task")
        Path(f"{hold}.release").touch()
        done = await wait_for_task(client.session, held, poll_interval=0.05, timeout=30)
        assert done.call_tool_result().structured_content == {"result": "released on attempt 2"}
        assert pg_store.load_task(held).attempt == 2
        # and the one-attempt task ends failed (-32603) without running again
        failed = await wait_for_task(client.session, one_shot, poll_interval=0.05, timeout=30)
        assert failed.status == "failed" and failed.error is not None and failed.error["code"] == -32603
        assert not started(fragile, 2)


async def test_a_killed_replica_loses_no_task_and_lost_queue_messages_are_dispatched_by_the_sweep(
    nodes: Cluster, pg_store: Store, tmp_path: Path, redis_client: redis.Redis
) -> None:
    replica_a, replica_b = nodes.replica(), nodes.replica()
    async with task_client(replica_a) as on_a, task_client(replica_b) as on_b:
        # Given a handle returned by replica A, which then dies before any worker runs the task
        marker = tmp_path / "m"
        task_id = await handle_of(on_a, "hold", {"marker": str(marker)})
        nodes.procs[0].kill()
        # And Redis loses the queued job (a restart without persistence)
        redis_client.flushdb()
        # When a worker comes up and the scheduler's tasks sweep runs after the dispatch deadline
        nodes.worker("tasks", "maintenance")
        settings = Settings(storage_url=POSTGRES_URL, redis_url=REDIS_URL)
        producer = Producer(settings)
        sent: list[float] = []

        def dispatched() -> bool:
            if started(marker, 1):
                return True
            if not sent or time.monotonic() - sent[-1] > 0.5:  # what the scheduler does every task_interval
                producer.run_sweep("tasks")
                sent.append(time.monotonic())
            return False

        try:
            await await_until(dispatched, "the sweep to dispatch the lost task")
        finally:
            producer.close()
        # Then the task runs once and replica B answers with its result
        Path(f"{marker}.release").touch()
        done = await wait_for_task(on_b.session, task_id, poll_interval=0.05, timeout=30)
        assert done.call_tool_result().structured_content == {"result": "released on attempt 1"}
        assert pg_store.load_task(task_id).attempt == 1


async def test_cancel_from_another_replica_in_every_state(
    nodes: Cluster, pg_store: Store, tmp_path: Path
) -> None:
    replica_a, replica_b = nodes.replica(), nodes.replica()
    async with task_client(replica_a) as on_a, task_client(replica_b) as on_b:
        # A queued task (no worker yet) cancelled from B never runs
        queued = tmp_path / "queued"
        queued_id = await handle_of(on_a, "hold", {"marker": str(queued)})
        await cancel_task(on_b.session, queued_id)
        assert (await get_task(on_a.session, queued_id)).status == "cancelled"
        nodes.worker()
        # A running task (on the worker's host) cancelled from B ends cancelled
        running = tmp_path / "running"
        running_id = await handle_of(on_a, "hold", {"marker": str(running)})
        await await_until(lambda: started(running, 1), "the task to run")
        await cancel_task(on_b.session, running_id)
        cancelled = await wait_for_task(on_a.session, running_id, poll_interval=0.05, timeout=30)
        assert cancelled.status == "cancelled" and cancelled.result is None
        # A finished task stays completed
        finished_id = await handle_of(on_a, "echo", {"text": "done"})
        await wait_for_task(on_a.session, finished_id, poll_interval=0.05, timeout=30)
        await cancel_task(on_b.session, finished_id)
        assert (await get_task(on_a.session, finished_id)).status == "completed"
        # A task waiting for input ends cancelled; an update afterwards changes nothing
        waiting_id = await handle_of(on_a, "ask", {})
        waiting = await wait_until_status(on_b, waiting_id, "input_required")
        await cancel_task(on_b.session, waiting_id)
        await update_task(on_a.session, waiting_id, {key: accept("late") for key in waiting.input_requests or {}})
        assert (await get_task(on_a.session, waiting_id)).status == "cancelled"
    # And the queued task never started, and no task ran twice
    assert not started(queued, 1)
    assert pg_store.load_task(running_id).attempt == 1
    assert not Path(f"{running}.started.2").exists()


def accept(value: str) -> dict[str, object]:
    """An accepted form elicitation answering ``{"v": value}``."""
    return {"action": "accept", "content": {"v": value}}


async def wait_until_status(client: object, task_id: str, status: str) -> TaskState:
    """Poll until the task is in ``status`` (fails if it ends otherwise)."""
    session = client.session  # type: ignore[attr-defined]
    while True:
        state = await get_task(session, task_id)
        if state.status == status:
            return state
        assert not state.final, state
        await anyio.sleep(0.05)


def key_for(state: TaskState, tool_key: str) -> str:
    """The wire key of the outstanding request the tool called ``tool_key``."""
    (key,) = [k for k in state.input_requests or {} if k.split(".")[0] == tool_key]
    return key


async def test_input_legs_are_answered_across_replicas(nodes: Cluster, pg_store: Store) -> None:
    replica_a, replica_b = nodes.replica(), nodes.replica()
    nodes.worker()
    async with task_client(replica_a) as on_a, task_client(replica_b) as on_b:
        # Given a task that asks two questions, seen from replica B
        task_id = await handle_of(on_a, "ask", {})
        first = await wait_until_status(on_b, task_id, "input_required")
        assert {k.split(".")[0] for k in first.input_requests or {}} == {"name", "colour"}
        name_key, colour_key = key_for(first, "name"), key_for(first, "colour")
        # When B answers one of them (plus a key nobody asked for), one stays outstanding
        await update_task(on_b.session, task_id, {name_key: accept("Ada"), "nobody.asked": accept("x")})
        partial = await get_task(on_a.session, task_id)
        assert partial.status == "input_required" and list(partial.input_requests or {}) == [colour_key]
        # When A answers the other, the next leg runs and asks its own question under a fresh key
        await update_task(on_a.session, task_id, {colour_key: accept("blue")})
        second = await wait_until_status(on_b, task_id, "input_required")
        mood_key = key_for(second, "mood")
        assert mood_key not in (name_key, colour_key)
        # Then an answer under a stale key changes nothing, the right one completes the task
        await update_task(on_b.session, task_id, {name_key: accept("stale")})
        assert (await get_task(on_b.session, task_id)).status == "input_required"
        await update_task(on_b.session, task_id, {mood_key: accept("calm")})
        done = await wait_for_task(on_a.session, task_id, poll_interval=0.05, timeout=30)
        assert done.call_tool_result().structured_content == {"result": "Ada|blue|calm"}
        assert pg_store.load_task(task_id).leg == 2

    # And the transparent client answers through its elicitation callback
    async def elicit(ctx: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        return ElicitResult(action="accept", content={"v": params.message.rstrip("?")})

    async with task_client(replica_b, elicitation_callback=elicit) as client:
        result = await client.call_tool("ask", {})
        assert result.structured_content == {"result": "name|colour|mood"}
