"""The RabbitMQ option: jobs enqueued on an ``amqp://`` broker are run by a real worker process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from sessionq.models import Settings, open_store
from tests.conftest import messages, service_missing, session
from tests.support_jobs import ROOT, child_env

RABBITMQ_URL = os.environ.get("SESSIONQ_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
QUEUES = [f"{q}{suffix}" for q in ("sessions", "maintenance", "bulk") for suffix in ("", ".DQ", ".XQ")]


@pytest.fixture
def rabbitmq() -> Iterator[str]:
    """The test RabbitMQ, with sessionq's queues purged before and after."""
    def purge() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        for name in QUEUES:
            channel = connection.channel()
            try:
                channel.queue_purge(name)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:  # a queue Dramatiq has not declared yet is fine
                    raise
            else:
                channel.close()
        connection.close()

    try:
        purge()
    except Exception as exc:  # pika raises its own connection errors
        service_missing("rabbitmq", exc)
    yield RABBITMQ_URL
    purge()


def test_save_travels_through_rabbitmq(tmp_path: Path, rabbitmq: str) -> None:
    # Given a store and a producer on an amqp:// broker
    url = f"sqlite:///{tmp_path / 'rabbit.db'}"
    store = open_store(url)
    store.upgrade()
    from sessionq.workers.producer import Producer

    producer = Producer(Settings(storage_url=url, broker_url=rabbitmq, outbox_path=str(tmp_path / "outbox.db")))
    # When a save and a duplicate append are enqueued, and a worker consumes RabbitMQ
    job = producer.save_session(session("rb-1"), messages("rb-1", 2))
    producer.append_messages("rb-1", messages("rb-1", 3))
    producer.close()
    assert job
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "sessionq.workers.actors", "-p", "1", "-t", "2"],
        cwd=ROOT, env=child_env(STORAGE_URL=url, SESSIONQ_BROKER_URL=rabbitmq), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        count = 0
        while time.monotonic() < deadline:
            try:
                count = store.load_session("rb-1").message_count
            except Exception:
                count = 0
            if count == 3:
                break
            time.sleep(0.2)
        # Then the session is persisted, each message once
        assert count == 3, (tmp_path / "worker.log").read_text()[-2000:]
        assert [m.message_id for m in store.load_messages("rb-1")] == ["m0", "m1", "m2"]
    finally:
        worker.terminate()
        assert worker.wait(60) == 0
        log.close()
        store.close()
