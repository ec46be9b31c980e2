"""The MCP registry's jobs through the real queue: producer -> Redis -> worker process -> store."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import redis

from sessionq.models import Settings, open_store, utcnow
from sessionq.workers.mcp.registry import ProducerSender, SessionRegistry
from tests.conftest import REDIS_URL
from tests.support_jobs import WorkerProcess, wait_drained


def test_registry_jobs_travel_through_the_queue(tmp_path: Path, redis_client: redis.Redis) -> None:
    # Given a registry built from settings that name a broker, and a store the worker writes to
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    store = open_store(url)
    store.upgrade()
    registry = SessionRegistry.from_settings(store, Settings(storage_url=url, redis_url=REDIS_URL), via_queue=True)
    assert isinstance(registry.send, ProducerSender)
    producer = registry.send.producer

    async def register_and_beat() -> None:
        await registry.register("mcp-q1", transport_state={"proto": "2025-11-25"}, working_directory="/srv")
        await registry.heartbeat("mcp-q1")

    # When the server registers a session (written at once) and heartbeats it (a buffered job)
    asyncio.run(register_and_beat())
    assert store.load_transport("mcp-q1").working_directory == "/srv"
    assert producer.flush(10)
    assert redis_client.llen("dramatiq:sessions") == 1
    worker = WorkerProcess(url, threads=2, log=tmp_path / "worker.log")
    try:
        wait_drained(redis_client, worker, timeout=60)
        # Then the worker applied the heartbeat, and the session is recoverable
        saved = store.load_transport("mcp-q1")
        assert saved.last_heartbeat is not None and saved.last_heartbeat > saved.created_at
        assert (saved.transport_state, saved.working_directory, saved.status) == (
            {"proto": "2025-11-25"}, "/srv", "active"
        )
        assert store.can_recover("mcp-q1", utcnow())
        # When the client ends the session (grace 0) through the queue
        asyncio.run(registry.disconnect("mcp-q1", grace=timedelta(0)))
        wait_drained(redis_client, worker, timeout=60)
        # Then its recovery window is closed at once
        assert store.load_transport("mcp-q1").status == "disconnected"
        assert not store.can_recover("mcp-q1", utcnow() + timedelta(seconds=1))
    finally:
        assert worker.stop() == 0, worker.output()[-2000:]
        producer.close()
        store.close()
