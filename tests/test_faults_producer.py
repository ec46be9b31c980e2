"""Fault case R3 of issue #9: Redis unreachable at the producer.

* Redis (a private server of this test, with an append-only file) goes away in the
  middle of a stream of saves and comes back: every job the producer accepted while
  it was down is spooled to the outbox and delivered later; a real worker stores each
  session exactly once.
* A job that cannot be accepted — a bad payload, or an outbox that cannot be written
  while Redis is down — raises a clear error at the caller, on the direct and the
  buffered path alike: never a silent drop.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from sessionq.models import Settings, Store
from sessionq.workers.errors import InvalidPayload, ProducerError
from sessionq.workers.producer import Producer
from tests.conftest import POSTGRES_URL
from tests.support_faults import (
    SessionqWorker,
    assert_no_secrets,
    pg_ledger,
    record_figures,
    wait_until,
    with_password,
)
from tests.support_services import PrivateRedis


def _dead_redis_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def _producer(tmp_path: Path, url: str, outbox: Path | None = None) -> Producer:
    settings = Settings(storage_url=f"sqlite:///{tmp_path / 'unused.db'}", redis_url=url,
                        outbox_path=str(outbox or tmp_path / "outbox.db"), export_dir=str(tmp_path / "exports"))
    return Producer(settings)


def _save(i: int) -> dict[str, Any]:
    return {"session_id": f"r3-{i}", "model": "m",
            "messages": [{"message_id": "only", "role": "user", "content": f"job {i}"}]}



def _queue_depth(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return sum(int(client.hlen(f"dramatiq:sessions{s}.msgs")) for s in ("", ".DQ"))
    finally:
        client.close()


def _wait_drained(url: str, worker: SessionqWorker, *, timeout: float) -> int:
    """Wait until the sessions queue is empty (0) or ``timeout``; return the jobs left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.alive():
        left = _queue_depth(url)
        if left == 0:
            return 0
        time.sleep(0.2)
    return _queue_depth(url)


@pytest.mark.slow
def test_r3_redis_goes_away_mid_stream_and_comes_back(
    pg_store: Store, tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    total, down_at, up_at = 1500, 500, 1000
    server = PrivateRedis(data_dir=tmp_path / "redis")
    server.start()
    worker = SessionqWorker(with_password(POSTGRES_URL), server.url, log=tmp_path / "worker.log")
    producer = _producer(tmp_path, server.url)
    spooled_peak, ids, stuck = 0, [], 0
    try:
        # Given a producer streaming saves (a third of them buffered) to a live Redis and worker
        for i in range(total):
            if i == down_at:
                # When Redis goes away mid-stream ...
                assert producer.flush(30)
                server.stop()
            if i == up_at:
                spooled_peak = producer.pending()
                # ... and comes back while the stream goes on
                server.start()
            ids.append(producer.save_session(_save(i), buffered=(i % 3 == 0)))
        assert producer.flush(60)
        wait_until(lambda: producer.pending() == 0, timeout=60, what="outbox forwarded")
        producer.close()
        # Then the one worker stores every accepted job, each exactly once, with no
        # restart: what it had fetched when Redis went away is requeued by its broker
        # when its consumer reconnects (workers/redis_broker.py), not left unacked.
        stuck = _wait_drained(server.url, worker, timeout=120)
        assert worker.alive(), worker.output()[-3000:]
        assert stuck == 0, f"{stuck} jobs left unacked with a live worker"
    finally:
        producer.close()
        worker.stop()
        server.stop()
    ledger = pg_ledger(POSTGRES_URL, "r3-")
    scanned = assert_no_secrets([(p.name, p.read_text(errors="replace")) for p in tmp_path.glob("worker*.log")]
                                + [("caplog", caplog.text)])
    record_figures(request, "R3", jobs_sent=total, accepted_ids=len(set(ids)), sent_while_down=up_at - down_at,
                   spooled_peak=spooled_peak, left_unacked=stuck, persisted=len(ledger.per_message),
                   duplicated=ledger.duplicated,
                   lost=total - len(ledger.per_message), log_lines_scanned=scanned)
    assert len(set(ids)) == total
    assert spooled_peak >= up_at - down_at
    assert ledger.rows == len(ledger.per_message) == total
    assert ledger.duplicated == 0


def test_r3_invalid_payload_is_refused_even_while_redis_is_down(tmp_path: Path) -> None:
    # Given a producer whose Redis does not answer
    producer = _producer(tmp_path, _dead_redis_url())
    # When a bad payload is sent directly or buffered, then the caller gets InvalidPayload
    for buffered in (False, True):
        with pytest.raises(InvalidPayload, match="role must be one of"):
            producer.save_session({"session_id": "s", "messages": [{"message_id": "m", "role": "robot",
                                                                    "content": "x"}]}, buffered=buffered)
    producer.close()
    # And nothing was spooled
    assert _producer(tmp_path, _dead_redis_url()).pending() == 0


def test_r3_unwritable_outbox_raises_instead_of_dropping(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # Given Redis unreachable and an outbox path that cannot be created (its parent is a file)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    producer = _producer(tmp_path, _dead_redis_url(), outbox=blocker / "outbox.db")
    # When a job is sent directly, then the caller is told it was not accepted
    with pytest.raises(ProducerError, match="not writable"):
        producer.save_session(_save(1))
    # When jobs are sent buffered, then each is either refused at once, or flush/close
    # raise: no job vanishes silently
    accepted, refused = 0, 0
    for i in range(5):
        try:
            producer.save_session(_save(i), buffered=True)
            accepted += 1
        except ProducerError:
            refused += 1
        time.sleep(0.05)
    with pytest.raises(ProducerError, match="not delivered") as flushed:
        producer.flush(5)
    with pytest.raises(ProducerError, match=f"{accepted} accepted job\\(s\\) not delivered.*not writable") as closed:
        producer.close()
    record_figures(request, "R3-unwritable-outbox", buffered_sent=5, accepted_then_reported=accepted,
                   refused_at_call=refused, flush_error=str(flushed.value)[:120], close_error=str(closed.value)[:120])
    assert accepted >= 1 and accepted + refused == 5
