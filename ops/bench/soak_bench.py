"""Long-run benchmarks: P10 (worker memory over many jobs; the producer through a Redis
outage) and P11 (save latency while a large purge runs).

P10's outage uses a private ``redis-server`` this benchmark starts on a free port and
stops (never the shared one): the producer buffers and spools saves while it is down,
then the server comes back and the outbox drains; every job must arrive.
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis

from .harness import BENCH_POSTGRES_URL, Result, prove, ratio_result, repeats
from .queue_bench import MSGS, QUEUE, WorkerPool, _payload, _quantile, drain
from .store_bench import _row_counts, _seed_expired, empty, open_bench_store

# Goal: RSS growth of a worker process over 100k save jobs (MB).
RSS_GROWTH_GOAL_MB = 20.0
# Goal: save p99 while a large purge runs / save p99 without it.
PURGE_P99_GOAL = 2.0
# Saves per second sent during the outage, and its length (s).
OUTAGE_RATE = 1000
OUTAGE_SECONDS = 60.0


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        out.extend(int(c) for c in children)
    return out


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def bench_worker_memory(*, quick: bool) -> Result:
    """P10: RSS of a worker process before and after draining 100k save jobs."""
    store = open_bench_store()
    total = 1_000 if quick else 100_000
    chunk = 500 if quick else 10_000
    try:
        with WorkerPool(1) as pool:
            drain(pool, store, "", 500 if quick else 2_000)  # warm: imports, pools, caches
            workers = _children(pool.proc.pid)
            if not workers:
                raise RuntimeError("no worker process found under the dramatiq parent")
            before = [_rss_mb(pid) for pid in workers]
            for _ in range(total // chunk):
                drain(pool, store, "", chunk)  # proves every message stored, no dead letters
            after = [_rss_mb(pid) for pid in workers]
    finally:
        empty(store)
        store.close()
    growth = max(a - b for a, b in zip(after, before, strict=True))
    return Result("P10-rss", f"worker process RSS after {total:,} save jobs vs after warm-up", max(after),
                  max(before), "MB", max(after) / max(before), f"growth <= {RSS_GROWTH_GOAL_MB:g} MB",
                  growth <= RSS_GROWTH_GOAL_MB, [*before, *after], notes=f"growth {growth:.1f} MB",
                  sanity=(0.5, 3.0), proof={"jobs": total, "messages_counted_per_drain": True})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A throwaway ``redis-server`` on a free loopback port, no persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary, self.port = binary, _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """The server's URL (db 0: the whole server is the benchmark's)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("private redis-server did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (its data is gone: the outage loses nothing only if the producer kept it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def bench_outage(*, quick: bool) -> Result:
    """P10: the producer's buffer and outbox during a Redis outage at 1k buffered saves/s,
    and the time to drain the outbox once Redis is back (every job must arrive)."""
    from sessionq.workers.producer import Producer

    seconds = 1.0 if quick else OUTAGE_SECONDS
    server = PrivateRedis()
    tmp = Path(tempfile.mkdtemp(prefix="sessionq-bench-outage-"))
    producer = Producer(url=server.url, outbox_path=tmp / "outbox.db")
    sent = 0
    peak_buffer = peak_spooled = 0
    try:
        for i in range(100):  # up: the connection is made
            producer.save_session(_payload(i, 2, "up"), buffered=True)
        producer.flush()
        sent = 100
        server.stop()
        start = time.perf_counter()
        interval = 1 / OUTAGE_RATE
        while (now := time.perf_counter()) - start < seconds:
            target = start + sent * interval - 100 * interval
            if now < target:
                time.sleep(min(target - now, 0.001))
                continue
            producer.save_session(_payload(sent, 2, "down"), buffered=True)
            sent += 1
            if sent % 100 == 0:
                with producer._lock:
                    peak_buffer = max(peak_buffer, len(producer._buffer) + producer._inflight)
                peak_spooled = max(peak_spooled, producer._transport.spooled())
        producer.flush(timeout=30)
        peak_spooled = max(peak_spooled, producer._transport.spooled())
        server.start()
        back = time.perf_counter()
        deadline = back + 120
        while producer.pending():
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{producer.pending()} jobs still pending 120 s after Redis came back")
            time.sleep(0.01)
        drained = time.perf_counter() - back
        client = redis.Redis.from_url(server.url)
        # The first 100 were lost with the server's memory (no persistence): the rest must all be there.
        prove("P10 outage: jobs on the queue after the outage", client.llen(QUEUE), sent - 100)
        prove("P10 outage: job bodies", client.hlen(MSGS), sent - 100)
        client.close()
    finally:
        producer.close()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    rate = (sent - 100) / drained if drained else float("inf")
    return Result("P10-outage", f"{seconds:g} s Redis outage at {OUTAGE_RATE:,} buffered saves/s: outbox drain "
                  "after vs send rate during", rate, float(OUTAGE_RATE), "jobs/s", rate / OUTAGE_RATE, "—", None,
                  [drained], sanity=(0.05, 1000.0),
                  notes=f"{sent - 100:,} jobs during the outage; peak in-memory buffer {peak_buffer:,} jobs, "
                        f"peak outbox {peak_spooled:,} jobs; outbox drained {drained:.2f} s after Redis came back",
                  proof={"jobs_sent_during_outage": sent - 100, "all_on_queue_after": True})


def _save_latencies(store: Any, tag: str, count: int, stop: threading.Event | None = None) -> list[float]:
    """Seconds per ``save_session`` of a new 2-message session, ``count`` of them (at least,
    and until ``stop`` is set when given)."""
    from sessionq.models import ChatMessage, ChatSession, utcnow

    samples: list[float] = []
    i = 0
    while i < count or (stop is not None and not stop.is_set()):
        now = utcnow()
        sid = f"live-{tag}-{i}"
        msgs = [ChatMessage(f"m{j}", sid, "user", f"message {j} " * 10, created_at=now) for j in range(2)]
        t = time.perf_counter()
        store.save_session(ChatSession(sid, created_at=now), msgs)
        samples.append(time.perf_counter() - t)
        i += 1
        time.sleep(0.001)
    return samples


def bench_purge_under_load(*, quick: bool) -> Result:
    """P11: save p99 while a purge of ~1M rows runs (another connection), / save p99 without."""
    from sessionq.models.sql import SqlStore

    store = open_bench_store()
    purger = SqlStore(BENCH_POSTGRES_URL, max_pool_size=1)
    sessions = 4_000 if quick else 200_000
    per_session = 4
    saves = 100 if quick else 2_000
    calm, busy = [], []
    try:
        for rep in range(repeats(quick)):
            empty(store)
            _seed_expired(store, sessions, per_session)
            store.database.execute_sql("VACUUM ANALYZE sessionq_sessions, sessionq_messages")
            calm.append(_quantile(_save_latencies(store, f"calm{rep}", saves), 0.99) * 1e6)
            stop = threading.Event()
            purged: list[int] = []
            thread = threading.Thread(target=_purge, args=(purger, purged, stop))
            thread.start()
            busy.append(_quantile(_save_latencies(store, f"busy{rep}", saves // 4, stop), 0.99) * 1e6)
            thread.join()
            prove("P11 sessions purged", purged, [sessions])
            live = _live_sessions(store)  # every save of both phases, none purged
            prove("P11 rows left (live sessions, their messages)", _row_counts(store), (live, 2 * live))
    finally:
        empty(store)
        purger.close()
        store.close()
    return ratio_result(
        "P11", f"save p99 while {sessions * (1 + per_session):,} rows are purged vs without", busy, calm, "µs",
        goal_op="<=", goal=PURGE_P99_GOAL, higher_is_better=False, sanity=(0.1, 100.0),
        proof={"purged_sessions_per_run": sessions, "live_sessions_checked": True},
        notes=f"calm p99 {statistics.median(calm):,.0f} µs, during the purge {statistics.median(busy):,.0f} µs")


def _purge(store: Any, purged: list[int], done: threading.Event) -> None:
    """Purge every expired session (batches of 1000), then set ``done``."""
    from sessionq.models import utcnow

    try:
        purged.append(store.purge_expired_sessions(utcnow() - timedelta(days=1), batch_size=1000))
    finally:
        done.set()


def _live_sessions(store: Any) -> int:
    return int(store.database.execute_sql(
        "SELECT count(*) FROM sessionq_sessions WHERE session_id LIKE 'live-%%'").fetchone()[0])

