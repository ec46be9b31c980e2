"""MCP event bus benchmark (B1), a ratio measured in one run.

* **B1** an event published with :class:`~sessionq.workers.mcp.bus.RedisSubscriptionBus`
  in one process (replica B: this one) until the bus listener of another process
  (replica A: ``python -m ops.bench.bus_peer``) is called with it, vs a raw Redis
  ``PUBLISH`` from the same process until the same other process's raw subscription
  reads it (redis-py asyncio on both sides): p50 of each. The two kinds alternate,
  one event in flight at a time (a pause between sends), over the same Redis and the
  same two event loops. Each event carries its send time (``time.monotonic_ns``, one
  clock for the whole machine); the listener proves every event arrived (all
  sequence numbers of both kinds) before any figure is taken.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import anyio
import redis.asyncio
from mcp.shared.subscriptions import ResourceUpdated

from sessionq.workers.mcp.bus import RedisSubscriptionBus

from .bus_peer import stamp
from .harness import BENCH_REDIS_URL, DEFAULT_REPEATS, Result, ratio_result

ROOT = Path(__file__).resolve().parents[2]
# Seconds the listener may take to subscribe.
START_TIMEOUT = 30.0
# Seconds between two sends: one event in flight at a time.
PAUSE = 0.002


async def _publish(url: str, audience: str, raw_channel: str, count: int) -> None:
    bus = RedisSubscriptionBus(url, audience=audience)
    client = redis.asyncio.Redis.from_url(url)
    try:
        for seq in range(count):
            await bus.publish(ResourceUpdated(uri=f"bench://{stamp(seq)}"))
            await anyio.sleep(PAUSE)
            await client.publish(raw_channel, stamp(seq))
            await anyio.sleep(PAUSE)
    finally:
        await bus.aclose()
        await client.aclose()


def _run(count: int) -> tuple[float, float]:
    """One run: a listener process, ``count`` events of each kind; p50 µs of (bus, raw)."""
    audience, raw_channel = f"bench-{uuid.uuid4().hex[:8]}", f"sessionq:bench:raw:{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="sessionq-bench-bus-") as tmp:
        out = Path(tmp) / "samples.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        peer = subprocess.Popen(
            [sys.executable, "-m", "ops.bench.bus_peer", BENCH_REDIS_URL, audience, raw_channel, str(count), str(out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert peer.stdout is not None
            deadline = time.monotonic() + START_TIMEOUT
            line = peer.stdout.readline()
            if line.strip() != "ready" or time.monotonic() > deadline:
                raise RuntimeError(f"bus listener did not start: {line}{peer.stdout.read()[-2000:]}")
            anyio.run(_publish, BENCH_REDIS_URL, audience, raw_channel, count)
            if peer.wait(timeout=120) != 0:
                raise RuntimeError(f"bus listener failed: {peer.stdout.read()[-2000:]}")
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.wait()
        samples = json.loads(out.read_text())
    figures = []
    for kind in ("bus", "raw"):
        seqs = sorted(seq for seq, _ in samples[kind])
        if seqs != list(range(count)):
            raise RuntimeError(f"B1: the listener got {len(seqs)} of {count} {kind} events")
        figures.append(statistics.median(ns for _, ns in samples[kind]) / 1000)
    return figures[0], figures[1]


def bench_bus(*, quick: bool) -> Result:
    """B1 (see the module docs)."""
    count = 200 if quick else 2000
    ours, raw = [], []
    _run(20)  # warm-up: imports, connections, page cache
    for _ in range(DEFAULT_REPEATS):
        bus_p50, raw_p50 = _run(count)
        ours.append(bus_p50)
        raw.append(raw_p50)
    return ratio_result("B1", "MCP event: bus publish on one process -> bus listener on another vs raw Redis "
                        "PUBLISH -> subscriber, p50", ours, raw, "µs", goal_op="<=", goal=1.5,
                        higher_is_better=False)
