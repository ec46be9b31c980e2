"""The producer: validation before enqueue, the buffered path, and the outbox.

The outbox test runs the producer as a real process: Redis is unreachable (a dead
port), jobs are accepted and spooled; the process exits; a new producer process
starts with Redis reachable and forwards them; a real worker stores every one.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from sessionq.models import ChatMessage, ChatSession, Settings
from sessionq.workers.errors import InvalidPayload
from sessionq.workers.producer import Producer
from tests.conftest import POSTGRES_URL, REDIS_URL, T0, make_store, reset_store
from tests.support_jobs import ROOT, WorkerProcess, child_env, pending_jobs, wait_drained


def _dead_redis_url() -> str:
    """A Redis URL on a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def _producer(tmp_path: Path, url: str) -> Producer:
    settings = Settings(storage_url=f"sqlite:///{tmp_path / 's.db'}", redis_url=url,
                        outbox_path=str(tmp_path / "outbox.db"), export_dir=str(tmp_path / "exports"))
    return Producer(settings)


BAD: list[tuple[str, tuple[Any, ...], str]] = [
    ("save_session", ({"model": "m"},), "missing required field(s): session_id"),
    ("save_session", ({"session_id": ["x"]},), "session_id must be a string"),
    ("save_session", ({"session_id": "s", "created_at": "yesterday"},), "not an ISO 8601 datetime"),
    ("save_session", ({"session_id": "s", "metadata": {"a.b": 1}},), "may not start with '$' or contain '.'"),
    ("save_session", ({"session_id": "s", "extra": 1},), "unknown field(s): extra"),
    ("append_messages", ({"session_id": "s", "messages": [{"message_id": "", "role": "user", "content": "x"}]},),
     "message_id must not be empty"),
    ("append_messages", ({"session_id": "s", "messages": [{"message_id": "m", "role": "user", "content": "\x00"}]},),
     "NUL"),
    ("export_session", ({"session_id": "s", "path": "/etc/passwd"},), "outside the export directory"),
    ("export_session", ({"session_id": "s", "path": "a/../../x"},), "outside the export directory"),
    ("export_session", ({"session_id": "s", "format": "pdf"},), "format must be one of"),
    ("no_such_job", ({},), "unknown job"),
]


@pytest.mark.parametrize("actor,args,message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_payload_raises_at_the_caller_and_is_never_sent(
    redis_client: redis.Redis, tmp_path: Path, actor: str, args: tuple[Any, ...], message: str
) -> None:
    # Given a producer on a real Redis
    producer = _producer(tmp_path, REDIS_URL)
    # When a bad payload is sent (directly or buffered)
    for send in (producer.send, producer.send_nowait):
        with pytest.raises(InvalidPayload, match=None) as info:
            send(actor, *args)
        # Then the caller gets a clear error and nothing reaches Redis
        assert message in str(info.value)
    producer.close()
    assert pending_jobs(redis_client) == 0


def test_send_and_buffered_send_reach_redis_as_wire_messages(redis_client: redis.Redis, tmp_path: Path) -> None:
    # Given a producer on a real Redis
    producer = _producer(tmp_path, REDIS_URL)
    session = ChatSession(session_id="s1", model="m", created_at=T0, updated_at=T0)
    msgs = [ChatMessage(message_id="m1", session_id="s1", role="user", content="hi", created_at=T0)]
    # When jobs are sent directly and through the buffer
    first = producer.save_session(session, msgs)
    second = producer.heartbeat("mcp-1", T0, buffered=True)
    assert producer.flush(10)
    producer.close()
    # Then both are on their queue with the ids the caller got, in the wire format
    stored = [json.loads(v) for v in redis_client.hvals("dramatiq:sessions.msgs")]
    assert {m["message_id"] for m in stored} == {first, second}
    save = next(m for m in stored if m["actor_name"] == "save_session")
    assert save["args"][0]["messages"][0]["message_id"] == "m1"
    assert redis_client.llen("dramatiq:sessions") == 2


def test_unreachable_redis_spools_to_the_outbox(tmp_path: Path, redis_client: redis.Redis) -> None:
    # Given a producer whose Redis does not answer
    producer = _producer(tmp_path, _dead_redis_url())
    # When jobs are sent, directly and buffered
    ids = [producer.archive(f"s{i}") for i in range(3)] + [producer.heartbeat("t", buffered=True)]
    producer.close()
    # Then they are accepted (ids returned) and kept in the outbox
    assert len(set(ids)) == 4
    assert _producer(tmp_path, _dead_redis_url()).pending() == 4
    # And a producer on a reachable Redis forwards them
    revived = _producer(tmp_path, REDIS_URL)
    deadline = time.monotonic() + 30
    while revived.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    revived.close()
    assert pending_jobs(redis_client) == 4


def test_send_async_pushes_on_the_event_loop_as_send_does(redis_client: redis.Redis, tmp_path: Path) -> None:
    # Given a producer on a real Redis whose enqueue script is not loaded yet (SCRIPT FLUSH)
    producer = _producer(tmp_path, REDIS_URL)
    redis_client.script_flush()

    async def send_both() -> list[str]:
        return [await producer.send_async("archive_session", {"session_id": f"s{i}", "at": T0}) for i in range(2)]

    # When two jobs are sent from a coroutine
    ids = asyncio.run(send_both())
    producer.close()
    # Then both are on their queue under the ids returned, in the wire format a worker reads
    stored = {m["message_id"]: m for m in map(json.loads, redis_client.hvals("dramatiq:maintenance.msgs"))}
    assert set(stored) == set(ids) and redis_client.llen("dramatiq:maintenance") == 2
    queued = {rid.decode() for rid in redis_client.lrange("dramatiq:maintenance", 0, -1)}  # type: ignore[union-attr]
    assert {m["options"]["redis_message_id"] for m in stored.values()} == queued
    assert stored[ids[0]]["args"][0]["session_id"] == "s0"


def test_send_async_on_an_unreachable_redis_spools_like_send(tmp_path: Path) -> None:
    # Given a producer whose Redis does not answer
    producer = _producer(tmp_path, _dead_redis_url())
    # When a coroutine sends a job, the job is accepted (its id returned) and kept in the outbox
    job_id = asyncio.run(producer.send_async("archive_session", {"session_id": "s1", "at": T0}))
    assert job_id and producer.pending() == 1
    producer.close()


PRODUCE = """
import sys
from sessionq.workers.producer import Producer
p = Producer()
for i in range(int(sys.argv[1])):
    payload = {"session_id": f"o-{i}", "model": "m",
               "messages": [{"message_id": "a", "role": "user", "content": str(i)}]}
    if i % 2:
        p.save_session(payload)
    else:
        p.save_session(payload, buffered=True)
p.close()
print(p.pending())
"""

FORWARD = """
import time
from sessionq.workers.producer import Producer
p = Producer()
deadline = time.monotonic() + 60
while p.pending() and time.monotonic() < deadline:
    time.sleep(0.05)
print(p.pending())
"""


def test_outbox_survives_a_producer_restart(tmp_path: Path, redis_client: redis.Redis) -> None:
    store = make_store("postgresql", tmp_path)
    reset_store(store)
    outbox = str(tmp_path / "outbox.db")
    jobs = 200
    # Given a producer process whose Redis is down: it accepts every job and exits
    down = subprocess.run([sys.executable, "-c", PRODUCE, str(jobs)], cwd=ROOT, capture_output=True, text=True,
                          env=child_env(REDIS_URL=_dead_redis_url(), SESSIONQ_OUTBOX_PATH=outbox), timeout=120)
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == str(jobs)
    assert pending_jobs(redis_client) == 0
    # When a new producer process starts with Redis back
    up = subprocess.run([sys.executable, "-c", FORWARD], cwd=ROOT, capture_output=True, text=True,
                        env=child_env(REDIS_URL=REDIS_URL, SESSIONQ_OUTBOX_PATH=outbox), timeout=120)
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == "0"
    # Then a worker stores every accepted job
    worker = WorkerProcess(POSTGRES_URL, log=tmp_path / "worker.log")
    try:
        wait_drained(redis_client, worker)
    finally:
        worker.stop()
    assert store.stats().total_sessions == jobs
    assert store.stats().total_messages == jobs
    reset_store(store)
    store.close()


def test_a_job_too_big_for_one_message_is_refused(redis_client: redis.Redis, tmp_path: Path) -> None:
    # Given a save whose messages are each valid but together exceed the job size limit
    big = [{"message_id": f"m{i}", "role": "user", "content": "x" * (3 * 1024 * 1024)} for i in range(6)]
    producer = _producer(tmp_path, REDIS_URL)
    # When it is sent, then the caller is told to split it, and nothing is enqueued
    with pytest.raises(InvalidPayload, match="split it into appends"):
        producer.save_session({"session_id": "huge", "messages": big})
    producer.close()
    assert pending_jobs(redis_client) == 0


def test_a_batch_that_fails_after_close_stopped_waiting_goes_to_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from sessionq.workers.outbox import Outbox

    producer = Producer(url=REDIS_URL, outbox_path=tmp_path / "outbox.db")
    entered, release = threading.Event(), threading.Event()

    def deliver(jobs: list[Any]) -> None:  # a push that hangs, then fails with a Redis error
        entered.set()
        release.wait(30)
        raise redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(producer, "_deliver", deliver)
    # Given a buffered job whose push is in flight when close() stops waiting for it
    producer.heartbeat("mcp-late", buffered=True)
    assert entered.wait(30)
    producer.close(timeout=0.2)
    flusher = producer._flusher
    assert flusher is not None
    # When that push then fails
    release.set()
    flusher.join(30)
    # Then the job is spooled for the next producer, and the flusher has stopped
    assert not flusher.is_alive()
    assert Outbox(tmp_path / "outbox.db").count() == 1
