"""Fault case R9: a producer process killed with SIGKILL right after it sent jobs.

What survives is what ``docs/producer.md`` states, no more and no less: a job sent with
``send`` (the helpers' default) is in Redis when the call returns, or in the outbox
when Redis is down; a ``buffered=True`` job is in memory until the flusher pushed it,
and is durable once ``flush()`` returned. The test kills a real producer process at
several delays after 2,000 buffered saves and counts what reached Redis; those
figures are the window the docs quote.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import REDIS_URL
from tests.support_faults import record_figures
from tests.support_jobs import ROOT, child_env
from tests.support_mcp import dead_redis_url

# Jobs per run (the burst of the reported loss).
JOBS = 2000
# Milliseconds between the last buffered call returning and SIGKILL.
KILL_DELAYS_MS = (0, 1, 2, 5, 10, 20, 50, 100)

# A producer with a warm connection sends JOBS saves ("buffered", "flushed": buffered
# then flush(), "send": unbuffered), says so, then waits to be killed.
CHILD = r"""
import sys, time
from sessionq.workers.producer import Producer

mode, jobs, url, outbox = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
producer = Producer(url=url, outbox_path=outbox)
producer.heartbeat("warm-up")
for i in range(jobs):
    producer.save_session({"session_id": f"crash-{i}", "model": "m",
                           "messages": [{"message_id": "m1", "role": "user", "content": "hi"}]},
                          buffered=mode != "send")
if mode == "flushed":
    producer.flush()
print("sent", flush=True)
time.sleep(120)
"""


def _kill_after_sending(mode: str, delay_ms: int, url: str, outbox: Path) -> None:
    """Run :data:`CHILD` and SIGKILL it ``delay_ms`` after its last call returned."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(JOBS), url, str(outbox)], cwd=ROOT,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if delay_ms:
            time.sleep(delay_ms / 1000)
        os.kill(proc.pid, signal.SIGKILL)
        assert line.strip() == b"sent", (proc.stderr.read() if proc.stderr else b"")[-2000:]
    finally:
        proc.kill()
        proc.wait(30)


def _in_redis(client: redis.Redis) -> int:
    """Saves in Redis (less the warm-up heartbeat, sent unbuffered to the same queue)."""
    return int(client.hlen("dramatiq:sessions.msgs")) - 1


def _spooled(outbox: Path) -> int:
    with sqlite3.connect(outbox) as db:
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])


@pytest.mark.slow
def test_r9_a_killed_producer_keeps_exactly_what_the_docs_promise(
    redis_client: redis.Redis, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    reached: dict[int, int] = {}
    for delay in KILL_DELAYS_MS:
        # Given a producer that made 2,000 buffered saves, killed `delay` ms later
        redis_client.flushdb()
        _kill_after_sending("buffered", delay, REDIS_URL, tmp_path / f"outbox-{delay}.db")
        # (what reached Redis is the measured window: 0..2,000, whole batches)
        reached[delay] = _in_redis(redis_client)
        assert 0 <= reached[delay] <= JOBS
    # When the producer called flush() before it was killed, or sent without buffering
    redis_client.flushdb()
    _kill_after_sending("flushed", 0, REDIS_URL, tmp_path / "outbox-flushed.db")
    flushed = _in_redis(redis_client)
    redis_client.flushdb()
    _kill_after_sending("send", 0, REDIS_URL, tmp_path / "outbox-send.db")
    sent = _in_redis(redis_client)
    # ... or sent while Redis was down (spooled to the outbox)
    _kill_after_sending("send", 0, dead_redis_url(), tmp_path / "outbox-down.db")
    spooled = _spooled(tmp_path / "outbox-down.db") - 1
    record_figures(request, "R9", jobs=JOBS, buffered_reached_by_kill_delay_ms=reached, flushed_then_killed=flushed,
                   sent_then_killed=sent, spooled_then_killed=spooled)
    # Then every one of those is in Redis (or the outbox) despite the kill
    assert flushed == JOBS
    assert sent == JOBS
    assert spooled == JOBS


def test_the_docs_state_the_window_of_buffered_calls() -> None:
    """docs/producer.md promised that nothing accepted is lost, buffered jobs included;
    a crash loses what is still buffered (R9), and the docs must say so."""
    text = (ROOT / "docs" / "producer.md").read_text(encoding="utf-8")
    from sessionq.workers.producer import Producer

    assert "Nothing accepted is lost;" not in text
    for doc in (text, Producer.send_nowait.__doc__ or "", Producer.flush.__doc__ or ""):
        assert "SIGKILL" in doc or "crash" in doc, doc[:200]
