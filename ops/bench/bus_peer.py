"""The listening replica of benchmark B1: ``python -m ops.bench.bus_peer URL AUDIENCE RAW_CHANNEL COUNT OUT``.

Holds a :class:`~sessionq.workers.mcp.bus.RedisSubscriptionBus` listener on
``AUDIENCE``'s channel and a raw Redis subscription on ``RAW_CHANNEL`` on one event
loop, prints ``ready`` once both are subscribed, and records for every event
``(sequence, arrival - sent)`` in nanoseconds (``time.monotonic_ns``: one clock for
every process of the machine; the sender puts its time in the event). Writes
``{"bus": [[seq, ns], ...], "raw": [...]}`` to ``OUT`` once ``COUNT`` of each arrived.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import redis.asyncio
from mcp.shared.subscriptions import ResourceUpdated, ServerEvent

from sessionq.workers.mcp.bus import RedisSubscriptionBus

# Seconds the peer waits for all events before giving up (the bench then fails).
TIMEOUT = 120.0


def stamp(seq: int) -> str:
    """The payload of event ``seq``: its sequence number and the time it is sent."""
    return f"{seq}/{time.monotonic_ns()}"


def latency(payload: str, arrived: int) -> list[int]:
    """``[seq, ns in flight]`` of one received payload."""
    seq, sent = payload.rsplit("/", 2)[-2:]
    return [int(seq), arrived - int(sent)]


async def listen(url: str, audience: str, raw_channel: str, count: int, out: Path) -> None:
    """See the module docs."""
    samples: dict[str, list[list[int]]] = {"bus": [], "raw": []}
    done = asyncio.Event()

    def on_event(event: ServerEvent) -> None:
        arrived = time.monotonic_ns()
        if isinstance(event, ResourceUpdated) and event.uri.startswith("bench://"):
            samples["bus"].append(latency(event.uri, arrived))
            if len(samples["bus"]) >= count and len(samples["raw"]) >= count:
                done.set()

    bus = RedisSubscriptionBus(url, audience=audience)
    bus.subscribe(on_event)
    if not await bus.start():
        raise SystemExit("the bus did not subscribe")
    client = redis.asyncio.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(raw_channel)

    async def raw() -> None:
        while len(samples["raw"]) < count:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "message":
                samples["raw"].append(latency(message["data"].decode(), time.monotonic_ns()))
        if len(samples["bus"]) >= count:
            done.set()

    reader = asyncio.create_task(raw())
    print("ready", flush=True)
    try:
        await asyncio.wait_for(done.wait(), TIMEOUT)
    finally:
        reader.cancel()
        await pubsub.aclose()
        await client.aclose()
        await bus.aclose()
    out.write_text(json.dumps(samples))


def main() -> None:
    """Parse the arguments and listen."""
    url, audience, raw_channel, count, out = sys.argv[1:6]
    asyncio.run(listen(url, audience, raw_channel, int(count), Path(out)))


if __name__ == "__main__":
    main()
