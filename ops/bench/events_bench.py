"""P6: the MCP EventStore on Redis Streams vs raw redis-py asyncio commands.

* ``store_event`` p50 (encode the message, XADD with MAXLEN, EXPIRE, one round trip)
  vs a raw ``XADD`` of the same bytes on the same client type.
* Replay of 1,000 events (``replay_events_after``: paged XRANGE, decode, callback)
  vs one raw ``XRANGE`` of the same 1,000 entries.

The standalone throughput script that used to live here compared the Redis and
Store back ends; this is its place in the suite (Redis, the default back end).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import anyio

from .harness import BENCH_REDIS_URL, DEFAULT_REPEATS, Result, ratio_result


def _note(adapter: Any, i: int) -> Any:
    return adapter.validate_python(
        {"jsonrpc": "2.0", "method": "notifications/message",
         "params": {"level": "info", "data": f"progress {i}: " + "x" * 200}}
    )


async def _run(events: int, calls: int) -> tuple[list[float], list[float], list[float], list[float]]:
    from redis import asyncio as aioredis

    from sessionq.workers.mcp import RedisEventStore
    from sessionq.workers.mcp.event_log import MESSAGE_ADAPTER, encode_message

    client = aioredis.Redis.from_url(BENCH_REDIS_URL)
    await client.flushdb()  # the bench's own db only
    root = RedisEventStore(redis=client, max_events=events + 10)
    messages = [_note(MESSAGE_ADAPTER, i) for i in range(max(events, calls))]
    store_ours, store_raw, replay_ours, replay_raw = [], [], [], []
    try:
        for rep in range(DEFAULT_REPEATS):
            view = root.for_session(f"bench-{rep}")
            ours, raw = [], []
            for message in messages[:calls]:
                t = time.perf_counter()
                await view.store_event("1", message)
                ours.append(time.perf_counter() - t)
            for message in messages[:calls]:
                data, _ = encode_message(message, compress=False)
                t = time.perf_counter()
                await client.xadd(f"bench:raw:{rep}", {"s": "1", "m": data})
                raw.append(time.perf_counter() - t)
            store_ours.append(statistics.median(ours) * 1e6)
            store_raw.append(statistics.median(raw) * 1e6)

            log = root.for_session(f"replay-{rep}")
            first = await log.store_event("1", None)
            for message in messages[:events]:
                await log.store_event("1", message)
            got = 0

            async def count(_: Any) -> None:
                nonlocal got
                got += 1

            t = time.perf_counter()
            await log.replay_events_after(first, count)
            replay_ours.append((time.perf_counter() - t) * 1e3)
            assert got == events, got
            t = time.perf_counter()
            rows: Any = await client.xrange(log.key(), min="-", max="+", count=events + 1)
            replay_raw.append((time.perf_counter() - t) * 1e3)
            assert len(rows) == events + 1, len(rows)
    finally:
        await client.flushdb()
        await client.aclose()
    return store_ours, store_raw, replay_ours, replay_raw


def bench_event_store(*, quick: bool) -> list[Result]:
    """P6: store_event p50 vs raw XADD; replay of 1,000 events vs raw XRANGE."""
    events = 1_000
    calls = 500 if quick else 3_000
    store_ours, store_raw, replay_ours, replay_raw = anyio.run(_run, events, calls)
    return [
        ratio_result("P6", "EventStore.store_event p50 vs raw XADD (Redis Streams, asyncio)",
                     store_ours, store_raw, "µs", goal_op="<=", goal=1.5, higher_is_better=False),
        ratio_result("P6-replay", f"replay {events:,} events vs one raw XRANGE of them",
                     replay_ours, replay_raw, "ms", goal_op="<=", goal=2.0, higher_is_better=False),
    ]
