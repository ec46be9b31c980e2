"""MCP task benchmarks (T1-T3), each a ratio measured in one run.

* **T1** ``tools/call`` answered with a task handle vs the same tool answered inline by
  the same server (one client declares the Tasks extension, the other does not): raw
  2026-07-28 JSON-RPC POSTs over one keep-alive connection, p50 of each, while no
  worker runs (the request path alone); afterwards the worker drains them and every
  handle must be one task row, each `completed`.
* **T2** a no-op task from its handle to ``completed`` as ``tasks/get`` reads it
  (``Store.get_task``, polled) vs a bare Dramatiq job on the same broker from enqueue
  to ack (its message gone from the queue's hash, polled): one worker process serving
  both, p50 of each.
* **T3** the ``tasks/get`` handler (``SessionqTasks`` in-process: checks, the owner
  read in a worker thread, the result document) vs one raw primary-key ``SELECT`` of
  the task row through the same PostgreSQL pool, p50 of each.

Processes: one replica (``python -m ops.bench.task_app``) and one worker
(``python -m dramatiq sessionq.workers.actors ops.bench.noop_actors --queues tasks``) on
the bench Redis db and PostgreSQL database; the worker polls an idle queue every 5 ms
at most (``dramatiq_worker_timeout``), for the ceiling and for us alike.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import redis

from .harness import BENCH_POSTGRES_URL, BENCH_REDIS_URL, DEFAULT_REPEATS, Result, ratio_result
from .store_bench import empty, open_bench_store

ROOT = Path(__file__).resolve().parents[2]
EXTENSION = "io.modelcontextprotocol/tasks"
# Seconds a process may take to come up, one task or job to finish, the queued T1 tasks to drain.
START_TIMEOUT = 60.0
FINISH_TIMEOUT = 30.0
DRAIN_TIMEOUT = 300.0
# Milliseconds the worker sleeps at most between polls of an idle queue.
IDLE_POLL_MS = "5"
TASKS_MSGS = "dramatiq:tasks.msgs"
# Untimed T1 calls before the timed ones.
T1_WARMUP = 20


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGE_", "REDIS_", "SESSIONQ_"))}
    env.update(STORAGE_URL=BENCH_POSTGRES_URL, REDIS_URL=BENCH_REDIS_URL, SESSIONQ_LOG_LEVEL="WARNING",
               SESSIONQ_MCP_APP="ops.bench.task_app:server", dramatiq_worker_timeout=IDLE_POLL_MS,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return env


class _Processes:
    """The replica and (once :meth:`start_worker` ran) the worker, in their own process groups."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115  (closed by stop())
            prefix="sessionq-bench-tasks-", suffix=".log", delete=False)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._start([sys.executable, "-m", "ops.bench.task_app", "--port", str(port)], self._serving)

    def start_worker(self) -> None:
        """Start the tasks worker and wait until it consumes."""
        self._start([sys.executable, "-m", "dramatiq", "sessionq.workers.actors", "ops.bench.noop_actors",
                     "--processes", "1", "--threads", "4", "--queues", "tasks"],
                    lambda: "ready for action" in Path(self.log.name).read_text(errors="replace"))

    def _start(self, cmd: list[str], ready: Any) -> None:
        self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError(f"bench processes did not start: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.05)

    def _serving(self) -> bool:
        try:
            body = {"jsonrpc": "2.0", "id": 0, "method": "ping"}
            httpx.post(f"http://127.0.0.1:{self.port}/mcp", json=body, timeout=1.0)
            return True
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _call(http: httpx.Client, url: str, *, declare: bool, n: int) -> dict[str, Any]:
    """One raw 2026-07-28 ``tools/call noop``; the JSON-RPC result."""
    capabilities: dict[str, Any] = {"extensions": {EXTENSION: {}}} if declare else {}
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": capabilities}
    headers = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2026-07-28",
               "mcp-method": "tools/call", "mcp-name": "noop"}
    body = {"jsonrpc": "2.0", "id": n, "method": "tools/call",
            "params": {"name": "noop", "arguments": {"n": n}, "_meta": meta}}
    reply = http.post(url, json=body, headers=headers).json()
    if "result" not in reply:
        raise RuntimeError(f"tools/call failed: {reply}")
    return dict(reply["result"])


def _p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _t1(http: httpx.Client, url: str, count: int) -> tuple[float, float]:
    handle, inline = [], []
    for i in range(count):
        t = time.perf_counter()
        result = _call(http, url, declare=True, n=i)
        handle.append(time.perf_counter() - t)
        assert result["resultType"] == "task"
        t = time.perf_counter()
        result = _call(http, url, declare=False, n=i)
        inline.append(time.perf_counter() - t)
        assert result["resultType"] == "complete"
    return _p50(handle), _p50(inline)


def _wait(check: Any, timeout: float = FINISH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("a task or job did not finish in time")


def _completed(store: Any, task_id: str) -> bool:
    from sessionq.models import utcnow

    task = store.get_task(task_id, None, utcnow())
    return task is not None and task.status == "completed"


def _all_completed(store: Any, created: int) -> bool:
    from sessionq.models import utcnow

    stats = store.task_stats(utcnow())
    if stats.total != created:
        raise RuntimeError(f"T1 returned {created} task handles but the store holds {stats.total} tasks")
    return bool(stats.by_status.get("completed", 0) == created)


def _acked(client: redis.Redis, rid: str) -> bool:
    return not client.hexists(TASKS_MSGS, rid)


def _t2(http: httpx.Client, url: str, client: redis.Redis, store: Any, count: int) -> tuple[float, float]:
    ours, bare = [], []
    for i in range(count):
        task_id = _call(http, url, declare=True, n=i)["taskId"]
        t = time.perf_counter()
        _wait(functools.partial(_completed, store, task_id))
        ours.append(time.perf_counter() - t)
        rid = str(uuid.uuid4())
        message = {"queue_name": "tasks", "actor_name": "bench_task_noop", "args": [{"i": i}], "kwargs": {},
                   "options": {"redis_message_id": rid}, "message_id": str(uuid.uuid4()),
                   "message_timestamp": int(time.time() * 1000)}
        data = json.dumps(message, separators=(",", ":"))
        t = time.perf_counter()
        pipe = client.pipeline(transaction=True)
        pipe.hset(TASKS_MSGS, rid, data)
        pipe.rpush("dramatiq:tasks", rid)
        pipe.execute()
        _wait(functools.partial(_acked, client, rid))
        bare.append(time.perf_counter() - t)
    return _p50(ours), _p50(bare)


class _NoExecutor:
    def dispatch(self, task_id: str, leg: int) -> None:
        del task_id, leg

    async def dispatch_async(self, task_id: str, leg: int) -> None:
        del task_id, leg

    def cancel(self, task_id: str) -> None:
        del task_id

    def start(self, server: Any, store: Any) -> None:
        del server, store


def _t3(store: Any, count: int) -> tuple[float, float]:
    from mcp_types import ClientCapabilities

    from sessionq.models import utcnow
    from sessionq.models.tasks import McpTask, new_task_id
    from sessionq.workers.mcp.tasks import SessionqTasks, TaskIdParams

    task = store.create_task(McpTask(new_task_id(), "noop", arguments={"n": 1}, created_at=utcnow()))
    store.claim_task(task.task_id, 0, "bench", utcnow(), utcnow())
    store.finish_task(task.task_id, "bench", utcnow(), result={"content": [{"type": "text", "text": "1"}],
                                                                "structuredContent": {"result": 1}})
    extension = SessionqTasks(store, tools={}, executor=_NoExecutor())
    session = SimpleNamespace(client_capabilities=ClientCapabilities(extensions={EXTENSION: {}}))
    ctx: Any = SimpleNamespace(session=session, request=None, protocol_version="2026-07-28")
    params = TaskIdParams(task_id=task.task_id)
    sql = "SELECT * FROM sessionq_tasks WHERE task_id = %s"
    db = store.database

    async def measure() -> tuple[list[float], list[float]]:
        handler, raw = [], []
        for _ in range(count):
            t = time.perf_counter()
            result = await extension._get(ctx, params)
            handler.append(time.perf_counter() - t)
            assert isinstance(result, dict) and result["status"] == "completed"
            t = time.perf_counter()
            row = db.execute_sql(sql, (task.task_id,)).fetchone()
            raw.append(time.perf_counter() - t)
            assert row is not None
        return handler, raw

    db.connect(reuse_if_open=True)
    handler, raw = anyio.run(measure)
    return _p50(handler), _p50(raw)


def bench_tasks(*, quick: bool) -> list[Result]:
    """T1, T2 and T3 (see the module docs)."""
    store = open_bench_store()
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    client.flushdb()  # the bench's own db
    store.database.execute_sql("TRUNCATE sessionq_tasks")
    count = 100 if quick else 1000
    t1, t1_raw, t2, t2_raw, t3, t3_raw = [], [], [], [], [], []
    processes = _Processes(_free_port())
    try:
        url = f"http://127.0.0.1:{processes.port}/mcp"
        with httpx.Client(timeout=30.0) as http:
            # T1 times the request path alone: the worker, which would run each task at
            # once on the same two cores, starts afterwards and drains what T1 queued.
            _t1(http, url, T1_WARMUP)
            for _ in range(DEFAULT_REPEATS):
                ours, raw = _t1(http, url, count)
                t1.append(ours)
                t1_raw.append(raw)
            processes.start_worker()
            # Proof of T1's work: every handle is one task row, and every one runs to completed.
            _wait(functools.partial(_all_completed, store, T1_WARMUP + DEFAULT_REPEATS * count), DRAIN_TIMEOUT)
            _t2(http, url, client, store, 10)
            for _ in range(DEFAULT_REPEATS):
                ours, raw = _t2(http, url, client, store, count // 2)
                t2.append(ours)
                t2_raw.append(raw)
        for _ in range(DEFAULT_REPEATS):
            ours, raw = _t3(store, count * 5)
            t3.append(ours)
            t3_raw.append(raw)
    finally:
        processes.stop()
        store.database.execute_sql("TRUNCATE sessionq_tasks")
        empty(store)
        store.close()
        client.flushdb()
        client.close()
    return [
        ratio_result("T1", "tools/call -> task handle vs the same tool inline (same server), p50",
                     t1, t1_raw, "µs", goal_op="<=", goal=1.5, higher_is_better=False),
        ratio_result("T2", "no-op task: handle -> completed in tasks/get vs bare Dramatiq job enqueue -> ack, p50",
                     t2, t2_raw, "µs", goal_op="<=", goal=2.0, higher_is_better=False),
        ratio_result("T3", "tasks/get handler vs one raw primary-key SELECT (PostgreSQL), p50",
                     t3, t3_raw, "µs", goal_op="<=", goal=3.0, higher_is_better=False),
    ]
