"""P7: end-to-end latency, enqueue → durable (visible to a reader on another connection).

Two worker processes drain save jobs that a producer in this process sends at a steady
50% and 90% of the save drain rate measured first in the same run, buffered and not.
A reader thread polls PostgreSQL (its own connection) every millisecond for the
sessions sent and not seen yet; a job's latency is from just before its producer call
to the poll that first sees its session (so it includes up to one poll interval).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .harness import BENCH_POSTGRES_URL, BENCH_REDIS_URL, Result, prove, repeats
from .queue_bench import WorkerPool, _payload, _quantile, drain
from .store_bench import count_messages, empty, open_bench_store

# Goal: p99 at 50% of the max drain rate (ms).
P99_GOAL_MS = 50.0
LOADS = (0.5, 0.9)
POLL = 0.001


class _Reader(threading.Thread):
    """Polls for sent sessions and records when each became visible."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psycopg2

        self.conn = psycopg2.connect(BENCH_POSTGRES_URL)
        self.conn.autocommit = True
        self.sent: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()

    def expect(self, session_id: str, at: float) -> None:
        with self.lock:
            self.sent[session_id] = at

    def run(self) -> None:
        cur = self.conn.cursor()
        while True:
            with self.lock:
                waiting = [sid for sid in self.sent if sid not in self.seen]
            if not waiting:
                if self.done.is_set():
                    return
                time.sleep(POLL)
                continue
            cur.execute("SELECT session_id FROM sessionq_sessions WHERE session_id = ANY(%s)", (waiting,))
            now = time.perf_counter()
            with self.lock:
                for (sid,) in cur.fetchall():
                    self.seen[sid] = now
            time.sleep(POLL)

    def latencies(self) -> list[float]:
        return [self.seen[sid] - at for sid, at in self.sent.items()]


def _run(producer: Any, rate: float, seconds: float, buffered: bool, tag: str) -> list[float]:
    """Send saves at ``rate``/s for ``seconds``; return each one's enqueue → visible seconds."""
    reader = _Reader()
    reader.start()
    count = max(int(rate * seconds), 20)
    start = time.perf_counter()
    try:
        for i in range(count):
            target = start + i / rate
            while (now := time.perf_counter()) < target:
                time.sleep(min(target - now, 0.0005))
            payload = _payload(i, 2, tag)
            reader.expect(payload["session_id"], time.perf_counter())
            producer.save_session(payload, buffered=buffered)
        producer.flush()
        deadline = time.monotonic() + 120
        while len(reader.seen) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"P7: {count - len(reader.seen)} of {count} saves never became visible")
            time.sleep(0.01)
    finally:
        reader.done.set()
        reader.join(10)
        reader.conn.close()
    return reader.latencies()


def bench_end_to_end(*, quick: bool) -> list[Result]:
    """P7: enqueue → durable p50/p99 at 50% and 90% of the max save drain rate."""
    from sessionq.workers.producer import Producer

    store = open_bench_store()
    seconds = 0.4 if quick else 10.0
    results: list[Result] = []
    tmp = tempfile.mkdtemp(prefix="sessionq-bench-e2e-")
    try:
        with WorkerPool(2) as pool:
            drain(pool, store, "", 200)  # warm
            max_rate = statistics.median(drain(pool, store, "", 300 if quick else 5_000)
                                         for _ in range(repeats(quick)))
            producer = Producer(url=BENCH_REDIS_URL, outbox_path=Path(tmp) / "outbox.db")
            try:
                for load in LOADS:
                    for buffered in (False, True):
                        empty(store)
                        tag = f"e{int(load * 100)}{'b' if buffered else 'u'}"
                        _run(producer, load * max_rate, min(seconds, 0.3), buffered, tag + "w")  # workers polling
                        empty(store)
                        lat = _run(producer, load * max_rate, seconds, buffered, tag)
                        prove(f"P7 {tag}: messages stored", count_messages(store), 2 * len(lat))
                        p50, p99 = _quantile(lat, 0.5) * 1e3, _quantile(lat, 0.99) * 1e3
                        key = f"P7-{int(load * 100)}{'-buffered' if buffered else ''}"
                        goal = load == 0.5
                        results.append(Result(
                            key, f"enqueue → visible to a reader, {'buffered' if buffered else 'unbuffered'} saves "
                                 f"at {load:.0%} of the max drain rate ({load * max_rate:,.0f}/s), p99 vs p50",
                            p99, p50, "ms", p99 / p50 if p50 else float("inf"),
                            f"p99 <= {P99_GOAL_MS:g} ms" if goal else "—", (p99 <= P99_GOAL_MS) if goal else None,
                            [p50, p99], notes=f"p50 {p50:.1f} ms, p99 {p99:.1f} ms over {len(lat):,} saves; "
                                              f"max drain {max_rate:,.0f} jobs/s",
                            sanity=(1.0, 1000.0), proof={"saves": len(lat), "all_visible": True}))
            finally:
                producer.close()
    finally:
        empty(store)
        store.close()
    return results
