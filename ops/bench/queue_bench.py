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

from .harness import BENCH_POSTGRES_URL, BENCH_REDIS_URL, Result, prove, ratio_result, repeats
from .store_bench import empty, open_bench_store

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "dramatiq:sessions"
MSGS = QUEUE + ".msgs"
STAGING = "sessionq-bench:staging"
# Absolute goal of the buffered path's caller-visible p99 (µs), and of the producer's
# p50 as a multiple of a raw LPUSH of the same bytes, for every payload mix.
BUFFERED_P99_GOAL_US = 50.0
P1_GOAL = 1.5
RAW_LIST = "sessionq-bench:raw"
# Seconds to wait for worker processes to come up, and for a drain to finish.
WORKER_START_TIMEOUT = 90.0
DRAIN_TIMEOUT = 600.0
# Seconds between buffered calls in P1 (the flusher thread shares the GIL with the caller).
PACE = 0.0002


# History of a re-saved session (messages already stored) and messages new in each job.
HISTORY = 100
NEW_MESSAGES = 2
# Payload mixes users send (P1 and P2 report each; the goals hold for every one):
# flat ASCII; non-ASCII text with nested metadata; a re-save of a session with its
# 100-message history plus new messages; an append of new messages to that session.
MIXES = ("ascii", "unicode", "resave", "append")
_UNICODE_TEXT = "Olá, ¿qué tal? Ça va — ünïcödé ✓ 日本語のテキスト "


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


def _unicode_payload(i: int, messages: int, tag: str = "") -> dict[str, Any]:
    """Non-ASCII text (the model's and the user's) with nested metadata, as MCP servers send."""
    sid = f"b{tag}-{i:07d}"
    return {
        "session_id": sid, "model": "modèle-ü", "metadata": {
            "client": {"name": "bench-ó", "version": [1, 2, 3]}, "user": {"locale": "pt-BR", "name": "João"},
            "i": i, "tags": ["é", "日本"]},
        "messages": [
            {"message_id": f"m{j}", "role": "user" if j % 2 == 0 else "assistant",
             "content": f"mensagem {j} da sessão {i}: " + _UNICODE_TEXT * 2,
             "metadata": {"tool": {"name": "busca", "args": {"q": "café"}}, "tokens": [j, j + 1]}}
            for j in range(messages)
        ],
    }


def mix_payload(mix: str, i: int, tag: str) -> tuple[str, dict[str, Any]]:
    """(actor, payload) of job ``i`` of a mix; re-saves and appends go to session ``b{tag}-{i}``,
    whose ``HISTORY`` messages ``m0..m99`` :func:`seed_history` stores."""
    if mix == "ascii":
        return "save_session", _payload(i, NEW_MESSAGES, tag)
    if mix == "unicode":
        return "save_session", _unicode_payload(i, NEW_MESSAGES, tag)
    if mix == "resave":
        return "save_session", _payload(i, HISTORY + NEW_MESSAGES, tag)
    if mix == "fifty":
        return "save_session", _payload(i, 50, tag)
    if mix == "append":
        p = _payload(i, HISTORY + NEW_MESSAGES, tag)
        return "append_messages", {"session_id": p["session_id"], "messages": p["messages"][HISTORY:]}
    raise ValueError(mix)


def _new_messages(mix: str) -> int:
    """Messages a job of ``mix`` adds to the store."""
    return 50 if mix == "fifty" else NEW_MESSAGES


def seed_history(store: Any, jobs: int, tag: str) -> None:
    """Sessions ``b{tag}-{i}`` with ``HISTORY`` messages each, set-based (the re-save/append mixes)."""
    from sessionq.models import utcnow

    now = utcnow()
    db = store.database
    db.execute_sql(
        "INSERT INTO sessionq_sessions (session_id, model, status, created_at, updated_at, metadata, message_count) "
        "SELECT %s || lpad(g::text, 7, '0'), 'bench-model', 'active', %s, %s, '{\"client\":\"bench\"}'::jsonb, %s "
        "FROM generate_series(0, %s) g", (f"b{tag}-", now, now, HISTORY, jobs - 1))
    db.execute_sql(
        "INSERT INTO sessionq_messages (session_id, message_id, seq, role, content, created_at, metadata) "
        "SELECT %s || lpad(s::text, 7, '0'), 'm' || (n - 1), n, "
        "CASE WHEN mod(n, 2) = 1 THEN 'user' ELSE 'assistant' END, "
        "'message ' || (n - 1) || ' of session ' || s || ': ' || repeat('lorem ipsum dolor ', 6), %s, '{}'::jsonb "
        "FROM generate_series(0, %s) s, generate_series(1, %s) n", (f"b{tag}-", now, jobs - 1, HISTORY))


def _flush(client: redis.Redis) -> None:
    client.flushdb()  # the bench's own db (BENCH_REDIS_URL), never another


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- P1 ------------------------------------------------------------------------------


def _send(producer: Any, actor: str, payload: dict[str, Any], *, buffered: bool) -> str:
    if actor == "append_messages":
        return str(producer.append_messages(payload["session_id"], payload["messages"], buffered=buffered))
    return str(producer.save_session(payload, buffered=buffered))


def _enqueue_mix(producer: Any, client: redis.Redis, mix: str, count: int, rep: int) -> dict[str, list[float]]:
    """One repetition of one mix: unbuffered, raw LPUSH, buffered; then prove every job arrived."""
    jobs = [mix_payload(mix, rep * count + i, "p1") for i in range(count)]
    ours, raw, buffered = [], [], []
    for actor, p in jobs:
        t = time.perf_counter()
        _send(producer, actor, p, buffered=False)
        ours.append(time.perf_counter() - t)
    for actor, p in jobs:
        data = producer._build(actor, [p]).body
        t = time.perf_counter()
        client.lpush(RAW_LIST, data)
        raw.append(time.perf_counter() - t)
    for actor, p in jobs:
        t = time.perf_counter()
        _send(producer, actor, p, buffered=True)
        buffered.append(time.perf_counter() - t)
        time.sleep(PACE)  # a busy server (thousands of jobs/s), not a tight loop
    producer.flush()
    # Proof: every job is on the queue (none spilled to the outbox, none lost).
    prove(f"P1 {mix}: jobs on the queue", (client.llen(QUEUE), client.hlen(MSGS)), (2 * count, 2 * count))
    prove(f"P1 {mix}: raw LPUSHes", client.llen(RAW_LIST), count)
    prove(f"P1 {mix}: jobs pending in the buffer or the outbox", producer.pending(), 0)
    _flush(client)
    return {"ours": ours, "raw": raw, "buffered": buffered}


def bench_enqueue(*, quick: bool) -> list[Result]:
    """P1 per payload mix: producer p50/p99 vs raw LPUSH of the same bytes; buffered p99."""
    from sessionq.workers.producer import Producer

    client = redis.Redis.from_url(BENCH_REDIS_URL)
    _flush(client)
    count = 100 if quick else 3000
    tmp = tempfile.mkdtemp(prefix="sessionq-bench-")
    producer = Producer(url=BENCH_REDIS_URL, outbox_path=Path(tmp) / "outbox.db")
    results: list[Result] = []
    quantiles = ("p50", "p99", "raw50", "raw99", "buf50", "buf99")
    q: dict[str, dict[str, list[float]]] = {name: {k: [] for k in quantiles} for name in MIXES}
    beat99s: list[float] = []
    try:
        for rep in range(repeats(quick)):
            beats = []
            for i in range(count):
                t = time.perf_counter()
                producer.heartbeat(f"mcp-{i}", buffered=True)
                beats.append(time.perf_counter() - t)
                time.sleep(PACE)
            producer.flush()
            prove("P1 heartbeats on the queue", client.llen(QUEUE), count)
            _flush(client)
            beat99s.append(_quantile(beats, 0.99) * 1e6)
            for mix in MIXES:
                s = _enqueue_mix(producer, client, mix, count, rep)
                for key, samples, quant in (("p50", "ours", 0.5), ("p99", "ours", 0.99), ("raw50", "raw", 0.5),
                                            ("raw99", "raw", 0.99), ("buf50", "buffered", 0.5),
                                            ("buf99", "buffered", 0.99)):
                    q[mix][key].append(_quantile(s[samples], quant) * 1e6)
        prove("P1 outbox spooled jobs", producer.pending(), 0)
    finally:
        producer.close()
        _flush(client)
        client.close()
    for mix in MIXES:
        m = q[mix]
        key = "P1" if mix == "ascii" else f"P1-{mix}"
        what = {"ascii": "save, 2 ASCII messages, flat metadata",
                "unicode": "save, 2 non-ASCII messages, nested metadata",
                "resave": f"re-save, {HISTORY} + {NEW_MESSAGES} messages",
                "append": f"append {NEW_MESSAGES} messages"}[mix]
        proof = {"jobs_on_queue_per_rep": 2 * count, "outbox_and_buffer_after": 0}
        results.append(ratio_result(
            key, f"enqueue ({what}), p50: Producer vs raw LPUSH of the same bytes",
            m["p50"], m["raw50"], "µs", goal_op="<=", goal=P1_GOAL, higher_is_better=False, sanity=(0.2, 10.0),
            proof=proof))
        results.append(ratio_result(
            f"{key}-p99", f"enqueue ({what}), p99: Producer vs raw LPUSH", m["p99"], m["raw99"], "µs",
            goal_op="info", goal=0, higher_is_better=False, sanity=(0.005, 200.0)))  # one stall moves a p99
        buf = statistics.median(m["buf99"])
        raw50 = statistics.median(m["raw50"])
        results.append(Result(
            f"{key}-buffered", f"buffered ({what}) caller-visible p99 vs raw LPUSH p50", buf, raw50, "µs",
            buf / raw50, f"p99 <= {BUFFERED_P99_GOAL_US:g} µs", buf <= BUFFERED_P99_GOAL_US, m["buf99"],
            notes=f"buffered p50 {statistics.median(m['buf50']):.1f} µs"
                  + (f"; buffered heartbeat p99 {statistics.median(beat99s):.1f} µs; one call per "
                     f"{PACE * 1e6:.0f} µs + its own time" if mix == "ascii" else ""),
            sanity=(0.005, 20.0), proof=proof))
    return results


# -- P2 ------------------------------------------------------------------------------


class WorkerPool:
    """``python -m dramatiq sessionq.workers.actors ops.bench.noop_actors`` on the bench services."""

    def __init__(self, processes: int, threads: int = 8, storage_url: str = BENCH_POSTGRES_URL) -> None:
        self.processes, self.threads = processes, threads
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115  (closed by stop())
            prefix="sessionq-bench-workers-", suffix=".log", delete=False)
        env = dict(os.environ)
        for name in ("SESSIONQ_BROKER_URL", "SESSIONQ_REDIS_URL", "SESSIONQ_STORAGE_URL", "SESSIONQ_CONFIG"):
            env.pop(name, None)
        env.update(REDIS_URL=BENCH_REDIS_URL, STORAGE_URL=storage_url,
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

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the workers' log."""
        return Path(self.log.name).read_text(errors="replace")[-chars:]

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


def _stage(client: redis.Redis, actor: str, jobs: int, mix: str, tag: str) -> None:
    """Write ``jobs`` messages of ``mix`` in the wire format, ids on the side list (queue
    paused); ``actor`` replaces the mix's own actor (a no-op ceiling of the same payloads)."""
    pipe = client.pipeline(transaction=False)
    now = int(time.time() * 1000)
    for i in range(jobs):
        rid = str(uuid.uuid4())
        own, payload = mix_payload(mix, i, tag)
        body = {"queue_name": "sessions", "actor_name": actor or own, "args": [payload], "kwargs": {},
                "options": {"redis_message_id": rid}, "message_id": str(uuid.uuid4()), "message_timestamp": now}
        pipe.hset(MSGS, rid, json.dumps(body, separators=(",", ":"), ensure_ascii=False))
        pipe.rpush(STAGING, rid)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def _count_messages(store: Any, tag: str | None = None, jobs: int = 0) -> int:
    """Messages stored, or those of the sessions of ``jobs`` jobs tagged ``tag`` (index lookups)."""
    if tag is None:
        return int(store.database.execute_sql("SELECT count(*) FROM sessionq_messages").fetchone()[0])
    return int(store.database.execute_sql(
        "SELECT count(*) FROM sessionq_messages WHERE session_id = ANY(%s)",
        ([f"b{tag}-{i:07d}" for i in range(jobs)],)).fetchone()[0])


# The processes that have taken jobs: their acks sets (one per worker process) are not empty.
_TAKING_LUA = """
local out = {}
for _, key in ipairs(redis.call('keys', ARGV[1])) do
  if redis.call('scard', key) > 0 then table.insert(out, key) end
end
return out
"""
ACKS_PATTERN = "dramatiq:__acks__.*.sessions"


def drain(pool: WorkerPool, store: Any, actor: str, jobs: int, mix: str = "ascii", *, keep: bool = False) -> float:
    """Jobs per second for ``jobs`` staged jobs of ``mix`` (run by ``actor``, or by the
    mix's own actor if empty) drained by ``pool``.

    The clock starts once every worker process has taken a job (a process idle between
    drains polls with a backoff of up to a second), counting only the jobs not yet acked
    then; it stops when every job is acked and every message is in PostgreSQL. Then it
    proves the work: no job dead-lettered, every message stored. ``keep``: the store's
    rows stay (P8 drains into a large database), and it is not vacuumed first.
    """
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    try:
        _flush(client)
        if not keep:
            empty(store)
        tag = uuid.uuid4().hex[:6]
        own = mix_payload(mix, 0, tag)[0]
        saving = not actor or actor == own
        seeded = mix in ("resave", "append")
        if seeded:
            seed_history(store, jobs, tag)
        if not keep:
            store.database.execute_sql("VACUUM ANALYZE sessionq_sessions, sessionq_messages")
        _stage(client, actor, jobs, mix, tag)
        taking = client.register_script(_TAKING_LUA)
        client.rename(STAGING, QUEUE)
        seen: set[bytes] = set()
        first: float | None = None
        first_left = jobs
        while True:  # the clock starts once every process has taken a job
            seen.update(taking(args=[ACKS_PATTERN]))
            left = client.hlen(MSGS)
            if first is None and (seen or left < jobs):
                first, first_left = time.perf_counter(), jobs
            if len(seen) >= pool.processes or left == 0:
                break
            time.sleep(0.0005)
        if len(seen) >= pool.processes:
            started, counted = time.perf_counter(), left
        else:  # the drain ended before every process joined (a tiny --quick drain)
            started, counted = first or time.perf_counter(), first_left
        deadline = time.monotonic() + DRAIN_TIMEOUT
        expected = jobs * ((HISTORY if seeded else 0) + (_new_messages(mix) if saving else 0))
        while True:
            if client.hlen(MSGS) == 0 and (not saving or _count_messages(store, tag, jobs) >= expected):
                break
            failed = client.zcard(QUEUE + ".XQ") + client.hlen(QUEUE + ".DQ.msgs")
            if failed or time.monotonic() > deadline:
                # A failed job is retried later (delay queue) or dead-lettered: the drain
                # would never end; say why, from the workers' log.
                raise RuntimeError(
                    f"drain of {jobs} {actor or own} jobs ({mix}): {failed} failed, or not finished in "
                    f"{DRAIN_TIMEOUT}s; workers' log:\n{pool.log_tail()}")
            time.sleep(0.002)
        seconds = time.perf_counter() - started
        prove(f"P2 {mix}/{actor or own}: dead-lettered jobs", client.zcard(QUEUE + ".XQ"), 0)
        prove(f"P2 {mix}/{actor or own}: jobs left on the queue", (client.llen(QUEUE), client.hlen(MSGS)), (0, 0))
        prove(f"P2 {mix}/{actor or own}: messages stored", _count_messages(store, tag, jobs), expected)
        return max(counted, 1) / seconds
    finally:
        _flush(client)
        client.close()


def _warm_up(pool: WorkerPool, store: Any) -> None:
    """Untimed drains of every actor: each process opens its store and pools first."""
    for actor in ("bench_noop", "bench_noop_batched", ""):
        drain(pool, store, actor, 50 * pool.processes)


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
    prove("P2-50 raw rows stored", _count_messages(store), len(rows))
    empty(store)
    return len(rows) / seconds


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# P2 goals: save drain / no-op drain with the same ack scheme.
P2_GOALS = {"ascii": 0.8, "unicode": 0.8, "resave": 0.6, "append": 0.6}


def bench_drain(*, quick: bool) -> list[Result]:
    """P2 per payload mix: save (or append) drain vs a no-op drain of the same payloads acked
    the same way (2 processes); also vs per-message-ack no-ops, 50-message jobs vs
    insert_many, and scale."""
    store = open_bench_store()
    jobs = 200 if quick else 5_000
    # Re-saves and appends carry (or land in) 100-message histories: fewer jobs, same order of time.
    seeded_jobs = 60 if quick else 1_000
    big_jobs = 20 if quick else 1_000
    reps = repeats(quick)
    results: list[Result] = []
    try:
        with WorkerPool(2) as pool:
            _warm_up(pool, store)
            rates: dict[str, list[float]] = {}
            for rep in range(reps):
                for mix in MIXES:
                    n = seeded_jobs if mix in ("resave", "append") else jobs
                    # The ceiling acks as the measured actor does: saves per committed batch, appends per job.
                    ceiling = "bench_noop" if mix == "append" else "bench_noop_batched"
                    runs = [(f"{mix}:ceiling", ceiling), (f"{mix}:ours", "")]
                    if mix == "ascii":
                        runs.append(("ascii:ack1", "bench_noop"))
                    for label, actor in (runs if rep % 2 == 0 else runs[::-1]):
                        rates.setdefault(label, []).append(drain(pool, store, actor, n, mix))
                rates.setdefault("fifty", []).append(drain(pool, store, "", big_jobs, "fifty") * 50)
                rates.setdefault("raw50", []).append(_insert_many_rate(store, big_jobs, 50))
            for mix in MIXES:
                n = seeded_jobs if mix in ("resave", "append") else jobs
                what = {"ascii": "save jobs (2 ASCII msgs, new sessions)",
                        "unicode": "save jobs (2 non-ASCII msgs, nested metadata, new sessions)",
                        "resave": f"re-save jobs ({HISTORY} stored + {NEW_MESSAGES} new msgs)",
                        "append": f"append jobs ({NEW_MESSAGES} msgs to {HISTORY}-message sessions)"}[mix]
                ack = "per job" if mix == "append" else "per committed batch"
                results.append(ratio_result(
                    "P2" if mix == "ascii" else f"P2-{mix}",
                    f"drain {n:,} {what} vs no-op jobs of the same payloads (ack {ack}), 2 processes x 8 threads",
                    rates[f"{mix}:ours"], rates[f"{mix}:ceiling"], "jobs/s", goal_op=">=", goal=P2_GOALS[mix],
                    higher_is_better=True, sanity=(0.02, 3.0),
                    proof={"jobs": n, "dead_letters": 0, "messages_counted": True}))
            results.append(ratio_result(
                "P2-ack1", f"drain {jobs:,} save jobs vs no-op jobs acked one by one (Dramatiq's ack; the old ceiling)",
                rates["ascii:ours"], rates["ascii:ack1"], "jobs/s", goal_op="info", goal=0, higher_is_better=True,
                sanity=(0.02, 5.0)))
            results.append(ratio_result(
                "P2-50", f"{big_jobs:,} save jobs of 50 messages through workers vs Peewee insert_many (1 process)",
                rates["fifty"], rates["raw50"], "msgs/s", goal_op="info", goal=0, higher_is_better=True,
                sanity=(0.05, 50.0)))
            large = 400 if quick else 30_000
            many = [drain(pool, store, "", large) for _ in range(reps)]
            results.append(ratio_result(
                "P2-scale-N", f"save drain with {large:,} queued jobs vs {jobs:,} (2 processes)",
                many, rates["ascii:ours"], "jobs/s", goal_op="info", goal=0, higher_is_better=True,
                sanity=(0.1, 10.0)))
        with WorkerPool(1) as pool:
            _warm_up(pool, store)
            one = [drain(pool, store, "", jobs) for _ in range(reps)]
            one_noop = [drain(pool, store, "bench_noop_batched", jobs) for _ in range(reps)]
        results.append(ratio_result(
            "P2-scale-procs", f"save drain, 2 worker processes vs 1 ({jobs:,} jobs)",
            rates["ascii:ours"], one, "jobs/s", goal_op="info", goal=0, higher_is_better=True, sanity=(0.1, 10.0),
            notes=f"1 process: save/no-op (batched ack) = {statistics.median(one) / statistics.median(one_noop):.2f}"))
        return results
    finally:
        empty(store)
        store.close()
