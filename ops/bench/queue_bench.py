"""Job-queue benchmarks: P1 (enqueue latency) and P2 (drain rate through real workers).

P1 times ``Producer.save_session`` against a raw redis-py ``LPUSH`` of the same bytes,
and the caller-visible cost of the buffered path.

P2 runs real worker processes (``python -m dramatiq sessionq.workers.actors
ops.bench.noop_actors``) on the bench Redis db and PostgreSQL database. Jobs are
staged first: their bodies go into the queue's message hash and their ids into a
side list, which is RENAMEd onto the queue once the workers are up (the queue is
"paused" until then). The clock starts when the workers take the first job and
stops when the message hash is empty (every job acked) and every row is in
PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from .harness import BENCH_POSTGRES_URL, BENCH_REDIS_URL, DEFAULT_REPEATS, Result, ratio_result
from .store_bench import empty, open_bench_store

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "dramatiq:sessions"
MSGS = QUEUE + ".msgs"
STAGING = "sessionq-bench:staging"
# Absolute goal of the buffered path's caller-visible p99 (µs).
BUFFERED_P99_GOAL_US = 50.0
# Seconds to wait for worker processes to come up, and for a drain to finish.
WORKER_START_TIMEOUT = 90.0
DRAIN_TIMEOUT = 600.0
# Seconds between buffered calls in P1 (the flusher thread shares the GIL with the caller).
PACE = 0.0002


def _payload(i: int, messages: int, tag: str = "") -> dict[str, Any]:
    sid = f"b{tag}-{i:07d}"
    return {
        "session_id": sid, "model": "bench-model", "metadata": {"client": "bench", "i": i},
        "messages": [
            {"message_id": f"m{j}", "role": "user" if j % 2 == 0 else "assistant",
             "content": f"message {j} of session {i}: " + "lorem ipsum dolor " * 6}
            for j in range(messages)
        ],
    }


def _flush(client: redis.Redis) -> None:
    client.flushdb()  # the bench's own db (BENCH_REDIS_URL), never another


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- P1 ------------------------------------------------------------------------------


def bench_enqueue(*, quick: bool) -> list[Result]:
    """P1: producer save p50/p99 vs raw LPUSH of the same bytes; buffered p99."""
    from sessionq.workers.producer import Producer

    client = redis.Redis.from_url(BENCH_REDIS_URL)
    _flush(client)
    count = 300 if quick else 3000
    tmp = tempfile.mkdtemp(prefix="sessionq-bench-")
    producer = Producer(url=BENCH_REDIS_URL, outbox_path=Path(tmp) / "outbox.db")
    p50s, p99s, raw50s, raw99s, buf99s, buf50s, beat99s = [], [], [], [], [], [], []
    try:
        for rep in range(DEFAULT_REPEATS):
            payloads = [_payload(rep * count + i, 2) for i in range(count)]
            ours, raw = [], []
            for p in payloads:
                t = time.perf_counter()
                producer.save_session(p)
                ours.append(time.perf_counter() - t)
            for p in payloads:
                data = producer._build("save_session", [p]).body
                t = time.perf_counter()
                client.lpush("sessionq-bench:raw", data)
                raw.append(time.perf_counter() - t)
            beats = []
            for i in range(count):
                t = time.perf_counter()
                producer.heartbeat(f"mcp-{i}", buffered=True)
                beats.append(time.perf_counter() - t)
                time.sleep(PACE)
            producer.flush()
            beat99s.append(_quantile(beats, 0.99) * 1e6)
            buffered = []
            for p in payloads:
                t = time.perf_counter()
                producer.save_session(p, buffered=True)
                buffered.append(time.perf_counter() - t)
                time.sleep(PACE)  # a busy server (thousands of jobs/s), not a tight loop
            producer.flush()
            p50s.append(_quantile(ours, 0.5) * 1e6)
            p99s.append(_quantile(ours, 0.99) * 1e6)
            raw50s.append(_quantile(raw, 0.5) * 1e6)
            raw99s.append(_quantile(raw, 0.99) * 1e6)
            buf50s.append(_quantile(buffered, 0.5) * 1e6)
            buf99s.append(_quantile(buffered, 0.99) * 1e6)
            _flush(client)
    finally:
        producer.close()
        _flush(client)
        client.close()
    p50 = ratio_result("P1", "enqueue a save job (2 messages), p50: Producer.save_session vs raw LPUSH",
                       p50s, raw50s, "µs", goal_op="<=", goal=2.0, higher_is_better=False)
    p99 = ratio_result("P1-p99", "enqueue a save job, p99: Producer.save_session vs raw LPUSH",
                       p99s, raw99s, "µs", goal_op="info", goal=0, higher_is_better=False)
    buf = statistics.median(buf99s)
    buffered_result = Result(
        "P1-buffered", "buffered save (send_nowait) caller-visible p99 vs raw LPUSH p50", buf,
        statistics.median(raw50s), "µs", buf / statistics.median(raw50s), f"p99 <= {BUFFERED_P99_GOAL_US:g} µs",
        buf <= BUFFERED_P99_GOAL_US, buf99s,
        notes=f"buffered save p50 {statistics.median(buf50s):.1f} µs; buffered heartbeat p99 "
              f"{statistics.median(beat99s):.1f} µs; one call per {PACE * 1e6:.0f} µs + its own time",
    )
    return [p50, p99, buffered_result]


# -- P2 ------------------------------------------------------------------------------


class WorkerPool:
    """``python -m dramatiq sessionq.workers.actors ops.bench.noop_actors`` on the bench services."""

    def __init__(self, processes: int, threads: int = 8) -> None:
        self.processes, self.threads = processes, threads
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115  (closed by stop())
            prefix="sessionq-bench-workers-", suffix=".log", delete=False)
        env = dict(os.environ)
        for name in ("SESSIONQ_BROKER_URL", "SESSIONQ_REDIS_URL", "SESSIONQ_STORAGE_URL", "SESSIONQ_CONFIG"):
            env.pop(name, None)
        env.update(REDIS_URL=BENCH_REDIS_URL, STORAGE_URL=BENCH_POSTGRES_URL,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "sessionq.workers.actors", "ops.bench.noop_actors",
             "--processes", str(processes), "--threads", str(threads)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while Path(self.log.name).read_text(errors="replace").count("ready for action") < processes:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"workers did not start: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM the worker group (Dramatiq shuts down gracefully) and wait."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stage(client: redis.Redis, actor: str, jobs: int, messages: int, tag: str) -> None:
    """Write ``jobs`` messages in the wire format, ids on the side list (queue paused)."""
    pipe = client.pipeline(transaction=False)
    now = int(time.time() * 1000)
    for i in range(jobs):
        rid = str(uuid.uuid4())
        body = {"queue_name": "sessions", "actor_name": actor, "args": [_payload(i, messages, tag)], "kwargs": {},
                "options": {"redis_message_id": rid}, "message_id": str(uuid.uuid4()), "message_timestamp": now}
        pipe.hset(MSGS, rid, json.dumps(body, separators=(",", ":")))
        pipe.rpush(STAGING, rid)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def _count_messages(store: Any) -> int:
    return int(store.database.execute_sql("SELECT count(*) FROM sessionq_messages").fetchone()[0])


def drain(pool: WorkerPool, store: Any, actor: str, jobs: int, messages: int) -> float:
    """Jobs per second for ``jobs`` staged jobs of ``actor`` drained by ``pool``."""
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    try:
        _flush(client)
        empty(store)
        store.database.execute_sql("VACUUM ANALYZE sessionq_messages")
        tag = uuid.uuid4().hex[:6]
        _stage(client, actor, jobs, messages, tag)
        client.rename(STAGING, QUEUE)
        while client.llen(QUEUE) >= jobs:  # the clock starts when a worker takes the first job
            time.sleep(0.0005)
        started = time.perf_counter()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        expected = jobs * messages if actor == "save_session" else 0
        while True:
            if client.hlen(MSGS) == 0 and (not expected or _count_messages(store) >= expected):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"drain of {jobs} {actor} jobs did not finish in {DRAIN_TIMEOUT}s")
            time.sleep(0.005)
        seconds = time.perf_counter() - started
        dead = client.zcard(QUEUE + ".XQ")
        if dead:
            raise RuntimeError(f"{dead} {actor} job(s) were dead-lettered during the drain")
        if expected and _count_messages(store) != expected:
            raise RuntimeError(f"expected {expected} messages, found {_count_messages(store)}")
        return jobs / seconds
    finally:
        _flush(client)
        client.close()


def _warm_up(pool: WorkerPool, store: Any) -> None:
    """Untimed drains of both actors: each process opens its store and pools first."""
    drain(pool, store, "bench_noop", 100 * pool.processes, 2)
    drain(pool, store, "save_session", 100 * pool.processes, 2)


def _insert_many_rate(store: Any, jobs: int, messages: int) -> float:
    """Messages/s of Peewee ``insert_many`` of the same rows (1000 rows per statement and commit)."""
    from sessionq.models import ChatMessage, ChatSession, utcnow

    empty(store)
    now = utcnow()
    sessions, rows = [], []
    for i in range(jobs):
        p = _payload(i, messages, "raw")
        sessions.append(store._session_row(ChatSession(p["session_id"], model=p["model"], metadata=p["metadata"],
                                                       created_at=now)) | {"message_count": messages})
        for seq, m in enumerate(p["messages"], 1):
            rows.append(store._message_row(ChatMessage(m["message_id"], p["session_id"], m["role"], m["content"],
                                                       created_at=now), seq))
    S, M = store.m.Session, store.m.Message
    started = time.perf_counter()
    for model, items in ((S, sessions), (M, rows)):
        for chunk in _chunks(items, 1000):
            with store.database.atomic():
                model.insert_many(chunk).execute()
    seconds = time.perf_counter() - started
    empty(store)
    return len(rows) / seconds


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def bench_drain(*, quick: bool) -> list[Result]:
    """P2: save drain vs no-op drain (2 processes), 50-message jobs vs insert_many, and scale."""
    store = open_bench_store()
    jobs = 400 if quick else 10_000
    big_jobs = 40 if quick else 1_000
    results: list[Result] = []
    try:
        with WorkerPool(2) as pool:
            _warm_up(pool, store)
            saves, noops, big, raw = [], [], [], []
            for _ in range(DEFAULT_REPEATS):
                noops.append(drain(pool, store, "bench_noop", jobs, 2))
                saves.append(drain(pool, store, "save_session", jobs, 2))
                big.append(drain(pool, store, "save_session", big_jobs, 50) * 50)
                raw.append(_insert_many_rate(store, big_jobs, 50))
            results.append(ratio_result(
                "P2", f"drain {jobs:,} save jobs (2 msgs) vs no-op jobs, 2 worker processes x 8 threads",
                saves, noops, "jobs/s", goal_op=">=", goal=0.8, higher_is_better=True))
            results.append(ratio_result(
                "P2-50", f"{big_jobs:,} save jobs of 50 messages through workers vs Peewee insert_many (1 process)",
                big, raw, "msgs/s", goal_op="info", goal=0, higher_is_better=True))
            large = 1_000 if quick else 100_000
            many = [drain(pool, store, "save_session", large, 2) for _ in range(DEFAULT_REPEATS)]
            results.append(ratio_result(
                "P2-scale-N", f"save drain with {large:,} queued jobs vs {jobs:,} (2 processes)",
                many, saves, "jobs/s", goal_op="info", goal=0, higher_is_better=True))
        with WorkerPool(1) as pool:
            _warm_up(pool, store)
            one = [drain(pool, store, "save_session", jobs, 2) for _ in range(DEFAULT_REPEATS)]
            one_noop = [drain(pool, store, "bench_noop", jobs, 2) for _ in range(DEFAULT_REPEATS)]
        results.append(ratio_result(
            "P2-scale-procs", f"save drain, 2 worker processes vs 1 ({jobs:,} jobs)",
            saves, one, "jobs/s", goal_op="info", goal=0, higher_is_better=True,
            notes=f"1 process: save/no-op = {statistics.median(one) / statistics.median(one_noop):.2f}"))
        return results
    finally:
        empty(store)
        store.close()
