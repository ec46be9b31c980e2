"""How the producer writes jobs to Redis (a private Redis server of this test).

Each push is one EVALSHA per queue of the HSET + RPUSH script, written at once on
the producer's own connection: the queue list and the message hash must always hold
the same ids, each message carrying its own id, also after the server forgot the
script (SCRIPT FLUSH, a restart) or closed the connection, and for a buffered batch
spanning several queues.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sessionq.workers.producer import Producer
from tests.support_services import PrivateRedis


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    redis_server = PrivateRedis()
    redis_server.start()
    yield redis_server
    redis_server.stop()


@pytest.fixture
def pair(server: PrivateRedis, tmp_path: Path) -> Iterator[tuple[redis.Redis, Producer]]:
    """A client of the private server and a producer pushing to it (both closed after)."""
    client = redis.Redis.from_url(server.url)
    producer = Producer(url=server.url, outbox_path=tmp_path / "outbox.db")
    yield client, producer
    producer.close()
    client.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _queue(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The messages of ``queue``, in list order; the list and the hash must match."""
    ids = [_text(i) for i in client.lrange(f"dramatiq:{queue}", 0, -1)]
    stored = {_text(k): json.loads(v) for k, v in client.hgetall(f"dramatiq:{queue}.msgs").items()}
    assert sorted(ids) == sorted(stored), "queue list and message hash disagree"
    for rid in ids:
        assert stored[rid]["options"] == {"redis_message_id": rid}
        assert stored[rid]["queue_name"] == queue
    return [stored[rid] for rid in ids]


def test_a_push_survives_a_flushed_script_cache_and_a_killed_connection(pair: tuple[redis.Redis, Producer]) -> None:
    client, producer = pair
    # Given a producer that has pushed once (its script is loaded, its connection open)
    first = producer.archive("s1")
    # When the server forgets the script, and then drops every client connection
    client.script_flush()
    second = producer.archive("s2")
    client.client_kill_filter(_type="normal", skipme=True)
    third = producer.archive("s3")
    # Then every job is on its queue exactly once, with its own Redis id
    assert [m["message_id"] for m in _queue(client, "maintenance")] == [first, second, third]
    assert producer.pending() == 0


def test_a_buffered_batch_on_several_queues_lands_on_each(pair: tuple[redis.Redis, Producer]) -> None:
    client, producer = pair
    sent: dict[str, list[str]] = {"sessions": [], "maintenance": []}
    for i in range(50):
        sent["sessions"].append(producer.heartbeat(f"mcp-{i}", buffered=True))
        sent["maintenance"].append(producer.archive(f"s{i}", buffered=True))
    assert producer.flush(30)
    for queue, ids in sent.items():
        assert [m["message_id"] for m in _queue(client, queue)] == ids


def test_concurrent_senders_share_the_producer(pair: tuple[redis.Redis, Producer]) -> None:
    # Threads pushing at once: one holds the producer's own connection, the others use the pool.
    client, producer = pair
    ids: list[str] = []
    lock = threading.Lock()

    def send(n: int) -> None:
        for i in range(100):
            message_id = producer.save_session({"session_id": f"t{n}-{i}", "messages": [
                {"message_id": "m", "role": "user", "content": "x"}]}, buffered=bool(i % 2))
            with lock:
                ids.append(message_id)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert producer.flush(30)
    assert sorted(m["message_id"] for m in _queue(client, "sessions")) == sorted(ids)
    assert len(set(ids)) == 400


def test_a_forked_child_delivers_its_own_buffered_jobs(pair: tuple[redis.Redis, Producer]) -> None:
    import os

    client, producer = pair
    # Given a producer whose flusher has run in the parent (a pre-forking server)
    parent = producer.heartbeat("mcp-parent", buffered=True)
    assert producer.flush(30)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a buffered job and a flush of its own
        try:
            child = producer.heartbeat("mcp-child", buffered=True)
            delivered = producer.flush(30)
            os.write(write, json.dumps([child, delivered]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_id, delivered = json.loads(pipe.read() or '[null, false]')
    os.waitpid(pid, 0)
    # Then the child's job is delivered by the child, once, beside the parent's
    assert delivered is True
    assert [m["message_id"] for m in _queue(client, "sessions")] == [parent, child_id]
