"""Several replicas of one MCP server adopted with ``adopt()``: the real SDK client at
2026-07-28 (listen streams, multi-round-trip requests, tasks) and at 2025-11-25
(sessions), two replica processes of ``tests.replica_app``, a tasks worker, real
PostgreSQL and Redis (a private ``redis-server`` where a test restarts it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
import redis
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import ResourcesListChanged, ResourceUpdated, ServerEvent
from mcp_types import INVALID_PARAMS, CallToolResult, ElicitResult, InputRequiredResult, InputResponses

from sessionq.models.keyring import fingerprint, generate_key
from sessionq.workers.replicas import ReplicaBook
from tests.support_mcp import RoundRobin, anyio_backend, free_port, mcp_client  # noqa: F401  (fixture)
from tests.support_tasks import Proc, process_env, task_client

pytestmark = pytest.mark.anyio

# Seconds an event may take to reach a listen stream on another replica.
EVENT_WAIT = 15.0


class Replicas:
    """``tests.replica_app`` replicas and tasks workers sharing one environment."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.tmp = tmp
        self.env = process_env(SESSIONQ_TEST_SERVER_NAME=f"replicas-{uuid.uuid4().hex[:8]}", **env)
        self.procs: list[Proc] = []

    @property
    def name(self) -> str:
        """The server name (audience) of the replicas started without their own."""
        return self.env["SESSIONQ_TEST_SERVER_NAME"]

    def replica(self, port: int | None = None, **env: str) -> str:
        """Start a replica (``env`` on top of the shared one); return its MCP URL."""
        port = port or free_port()

        def up(_: Proc) -> bool:
            try:
                return bool(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).json()["events"])
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        cmd = [sys.executable, "-m", "tests.replica_app", "--port", str(port)]
        log = self.tmp / f"replica-{port}-{len(self.procs)}.log"
        self.procs.append(Proc(cmd, {**self.env, **env}, log, up).start())
        return f"http://127.0.0.1:{port}/mcp"

    def worker(self) -> Proc:
        """Start a tasks worker running the replicas' tools."""
        cmd = [sys.executable, "-m", "sessionq.cli", "worker", "-p", "1", "-t", "2", "--queues", "tasks",
               "--mcp-app", "tests.replica_app:server"]
        proc = Proc(cmd, self.env, self.tmp / f"worker-{len(self.procs)}.log",
                    lambda p: "ready for action" in p.output()).start()
        self.procs.append(proc)
        return proc

    def health(self, url: str) -> dict[str, Any]:
        """A replica's ``/healthz`` document."""
        return dict(httpx.get(url.replace("/mcp", "/healthz"), timeout=5.0).json())

    def stop(self) -> None:
        """Kill every process started."""
        for proc in self.procs:
            proc.kill()


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store's schema, before any process starts."""
    from tests.conftest import make_store

    tmp = tmp_path_factory.mktemp("replicas")
    make_store("postgresql", tmp).close()
    return tmp


@pytest.fixture(scope="module")
def shared_ring() -> str:
    """One key ring for the module's cluster."""
    return f"{generate_key()},{generate_key()}"


@pytest.fixture(scope="module")
def cluster(schema: Path, shared_ring: str) -> Iterator[tuple[Replicas, str, str]]:
    """Replicas A and B with one shared key ring, and one tasks worker."""
    nodes = Replicas(schema, SESSIONQ_REQUEST_STATE_KEYS=shared_ring)
    try:
        a, b = nodes.replica(), nodes.replica()
        nodes.worker()
        yield nodes, a, b
    finally:
        nodes.stop()


@asynccontextmanager
async def modern(url: str, *, transport: httpx2.AsyncBaseTransport | None = None) -> AsyncIterator[Client]:
    """An SDK client at 2026-07-28 (no extensions)."""
    async with (
        httpx2.AsyncClient(transport=transport, timeout=httpx2.Timeout(30.0, read=60.0)) as http,
        Client(streamable_http_client(url, http_client=http), mode="2026-07-28") as client,
    ):
        yield client


async def next_event(subscription: Any, timeout: float = EVENT_WAIT) -> ServerEvent:
    """The next event of a listen stream, or a failure after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        event: ServerEvent = await subscription.__anext__()
        return event


def pid_of(result: Any) -> int:
    """The pid a ``touch`` tool answered."""
    assert isinstance(result, CallToolResult) and not result.is_error, result
    return int(result.structured_content["result"])


async def test_listen_on_a_sees_events_published_on_b_and_by_a_worker(cluster: tuple[Replicas, str, str]) -> None:
    nodes, a, b = cluster
    first, second, third = (f"note://{uuid.uuid4().hex}" for _ in range(3))
    # Given a listen stream on replica A for three resources
    async with (
        modern(a) as on_a,
        task_client(b) as on_b,
        on_a.listen(resource_subscriptions=[first, second, third]) as events,
    ):
        # When replica B's tool publishes the first
        b_pid = pid_of(await on_b.call_tool("touch", {"uri": first}))
        # Then A's stream gets it (and B really is another process)
        assert await next_event(events) == ResourceUpdated(uri=first)
        assert b_pid != nodes.health(a)["pid"]
        # When a durable task publishes the second from the tasks worker
        worker_pid = pid_of(await on_b.call_tool("touch_later", {"uri": second}))
        assert worker_pid not in (b_pid, nodes.health(a)["pid"])
        # Then A's stream gets it too
        assert await next_event(events) == ResourceUpdated(uri=second)
        # And A's own publish reaches its own stream once (its echo from Redis is skipped)
        await on_a.call_tool("touch", {"uri": third})
        assert await next_event(events) == ResourceUpdated(uri=third)
        with anyio.move_on_after(0.5) as nothing_more:
            await events.__anext__()
        assert nothing_more.cancelled_caught


async def test_a_multi_round_trip_request_continues_on_the_other_replica_with_a_shared_ring(
    cluster: tuple[Replicas, str, str], shared_ring: str
) -> None:
    nodes, a, b = cluster
    # Given a first round answered by replica A: input required, state sealed by A
    async with modern(a) as on_a, modern(b) as on_b:
        first = await on_a.session.call_tool("ask", {}, allow_input_required=True)
        assert isinstance(first, InputRequiredResult) and first.request_state
        assert first.request_state.startswith("v1.")  # sealed, not the tool's plaintext
        # When the retry with the answer lands on replica B
        answer: InputResponses = {"name": ElicitResult(action="accept", content={"v": "ada"})}
        done = await on_b.session.call_tool("ask", {}, input_responses=answer, request_state=first.request_state)
    # Then B opened A's state and finished the request
    assert isinstance(done, CallToolResult) and not done.is_error
    a_pid, b_pid = nodes.health(a)["pid"], nodes.health(b)["pid"]
    assert done.structured_content["result"] == f"hello ada (asked-by-{a_pid}, answered by {b_pid})"
    # And both replicas show the ring by fingerprints only, primary first
    expected = [fingerprint(k.encode()) for k in shared_ring.split(",")]
    for url in (a, b):
        state = nodes.health(url)["request_state"]
        assert state == {"audience": nodes.name, "fingerprints": expected, "ephemeral": False}
    assert not any(key in json.dumps(nodes.health(a)) for key in shared_ring.split(","))


async def _round_on(first_url: str, retry_url: str) -> CallToolResult | MCPError:
    """Round one on ``first_url``, the retry on ``retry_url``: the final result, or the error."""
    async with modern(first_url) as first_client, modern(retry_url) as retry_client:
        first = await first_client.session.call_tool("ask", {}, allow_input_required=True)
        assert isinstance(first, InputRequiredResult)
        answer: InputResponses = {"name": ElicitResult(action="accept", content={"v": "bob"})}
        try:
            done = await retry_client.session.call_tool("ask", {}, input_responses=answer,
                                                        request_state=first.request_state)
        except MCPError as exc:
            return exc
        assert isinstance(done, CallToolResult)
        return done


async def test_retries_across_replicas_fail_clearly_with_other_names_or_keys_and_health_says_why(
    schema: Path, redis_client: redis.Redis
) -> None:
    key = generate_key()
    nodes = Replicas(schema, SESSIONQ_REQUEST_STATE_KEYS=key)
    try:
        # Given two replicas sharing keys under different server names, and one with other keys
        a = nodes.replica()
        renamed = nodes.replica(SESSIONQ_TEST_SERVER_NAME=nodes.name + "-other")
        rekeyed = nodes.replica(SESSIONQ_REQUEST_STATE_KEYS=generate_key())
        # When a first round on A is retried on each of them
        for other in (renamed, rekeyed):
            refused = await _round_on(a, other)
            # Then the retry is refused with -32602, not served with someone else's state
            assert isinstance(refused, MCPError) and refused.error.code == INVALID_PARAMS
            assert refused.error.message == "Invalid or expired requestState"
        # And the replica book names both disagreements
        from sessionq.workers.replicas import ring_problems

        problems = " | ".join(ring_problems(ReplicaBook(redis_client).live()))
        assert f"different audiences {nodes.name!r} and {nodes.name + '-other'!r}" in problems
        assert f"MCP replicas of {nodes.name!r}: 1 seal requestState with key " in problems
        assert key not in problems
    finally:
        nodes.stop()


async def test_rotation_phases_keep_every_retry_working(schema: Path, redis_client: redis.Redis) -> None:
    from sessionq.workers.replicas import ring_problems

    old, new = generate_key(), generate_key()
    nodes = Replicas(schema)
    try:
        # Given replicas on the old key alone
        previous = nodes.replica(SESSIONQ_REQUEST_STATE_KEYS=old)
        # When each rotation phase is rolled out next to the previous one
        for ring in (f"{old},{new}", f"{new},{old}", new):
            current = nodes.replica(SESSIONQ_REQUEST_STATE_KEYS=ring)
            # Then state sealed in either phase opens in the other, both ways
            for first, retry in ((previous, current), (current, previous)):
                done = await _round_on(first, retry)
                assert isinstance(done, CallToolResult), done
                assert str(done.structured_content["result"]).startswith("hello bob")
            # And health finds nothing wrong between the two phases
            live = [r for r in ReplicaBook(redis_client).live() if r.audience == nodes.name]
            assert len(live) == 2 and not ring_problems(live)
            # (the previous phase is retired: stopped, and out of the book at once)
            retired = nodes.health(previous)["replica"]
            nodes.procs.pop(0).kill()
            ReplicaBook(redis_client).remove(retired)
            previous = current
        # But skipping a phase (old alone next to new alone) fails, and health says so
        skipped = nodes.replica(SESSIONQ_REQUEST_STATE_KEYS=old)
        refused = await _round_on(previous, skipped)
        assert isinstance(refused, MCPError) and refused.error.code == INVALID_PARAMS
        live = [r for r in ReplicaBook(redis_client).live() if r.audience == nodes.name]
        problems = ring_problems(live)
        assert len(problems) == 2  # each seals with a key the other cannot open
        assert all(f"MCP replicas of {nodes.name!r}: 1 seal requestState with key" in p for p in problems)
    finally:
        nodes.stop()


async def test_legacy_clients_keep_their_session_across_replicas_behind_round_robin(
    cluster: tuple[Replicas, str, str],
) -> None:
    nodes, a, b = cluster
    ports = [int(url.split(":")[2].split("/")[0]) for url in (a, b)]
    balancer = RoundRobin(ports)
    # Given a 2025-11-25 client behind a balancer without sticky routing
    async with mcp_client(a, transport=balancer) as session:
        # When it calls a tool several times, each request going to the next replica
        served = []
        for _ in range(4):
            result = await session.call_tool("whoami", {})
            served.append(result.structured_content)
    # Then one session id throughout, served by both replicas (recovered on the one that did not open it)
    assert len({s["session_id"] for s in served}) == 1 and served[0]["session_id"]
    assert {s["pid"] for s in served} == {nodes.health(a)["pid"], nodes.health(b)["pid"]}
    recovered = [nodes.health(url)["sessions"]["recovered_sessions"] for url in (a, b)]
    assert sum(recovered) >= 1


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A redis-server of this test alone (it gets restarted: never the shared one)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return proc
            except redis.ConnectionError:
                time.sleep(0.05)
        proc.kill()
        raise RuntimeError("private redis-server did not start")

    procs = [start()]

    def restart() -> None:
        procs[-1].kill()
        procs[-1].wait(10)
        time.sleep(0.5)
        procs.append(start())

    try:
        yield f"redis://127.0.0.1:{port}/0", restart
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


async def test_listens_survive_a_redis_restart_and_get_list_changed_after_the_gap(
    schema: Path, private_redis: tuple[str, Any]
) -> None:
    url, restart = private_redis
    nodes = Replicas(schema, REDIS_URL=url, SESSIONQ_REQUEST_STATE_KEYS=generate_key())
    try:
        a, b = nodes.replica(), nodes.replica()
        uri = f"note://{uuid.uuid4().hex}"
        # Given an open listen stream on A
        async with (
            modern(a) as on_a,
            modern(b) as on_b,
            on_a.listen(resources_list_changed=True, resource_subscriptions=[uri]) as events,
        ):
            # When Redis restarts under it
            await anyio.to_thread.run_sync(restart)
            # Then the stream stays open and gets a level trigger once A subscribed again
            assert await next_event(events) == ResourcesListChanged()
            with anyio.fail_after(EVENT_WAIT):
                while not (nodes.health(a)["events"]["connected"] and nodes.health(b)["events"]["connected"]):
                    await anyio.sleep(0.05)
            assert nodes.health(a)["events"]["reconnects"] >= 1
            # And B's events reach it again
            await on_b.call_tool("touch", {"uri": uri})
            assert await next_event(events) == ResourceUpdated(uri=uri)
    finally:
        nodes.stop()

