"""Test support for the scheduler: recording sends and a replica process entry point.

``python -m tests.support_scheduler`` runs one scheduler replica against
``SESSIONQ_TEST_REDIS_URL`` whose ``send`` records ``kind:unix_time:pid:message_id``
onto the Redis list :data:`SENDS_KEY` instead of enqueueing a job; the sweeps and
their intervals come from ``SESSIONQ_TEST_SCHEDULE`` (JSON ``{kind: seconds}``), the
lease period from ``SESSIONQ_SCHEDULER_LEASE_SECONDS``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from typing import Any

# Redis list the replica processes record their sends onto.
SENDS_KEY = "sessionq-test:sends"


def recording_send(client: Any) -> Any:
    """A ``send(kind)`` that records each call onto :data:`SENDS_KEY` and returns its id."""

    def send(kind: str) -> str:
        message_id = uuid.uuid4().hex
        client.rpush(SENDS_KEY, f"{kind}:{time.time():.6f}:{os.getpid()}:{message_id}")
        return message_id

    return send


def read_sends(client: Any) -> list[tuple[str, float, int, str]]:
    """The recorded sends as ``(kind, unix_time, pid, message_id)``."""
    out = []
    for raw in client.lrange(SENDS_KEY, 0, -1):
        kind, ts, pid, message_id = raw.decode().split(":")
        out.append((kind, float(ts), int(pid), message_id))
    return out


def main() -> None:
    """Run one recording scheduler replica until SIGTERM/SIGINT."""
    import redis

    from sessionq.models import Settings
    from sessionq.scheduler.runner import SweepScheduler

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s {os.getpid()} %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    client = redis.Redis.from_url(os.environ["SESSIONQ_TEST_REDIS_URL"], socket_timeout=10)
    schedule = {str(k): int(v) for k, v in json.loads(os.environ["SESSIONQ_TEST_SCHEDULE"]).items()}
    runner = SweepScheduler(recording_send(client), settings=Settings.load(), schedule=schedule, redis=client)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    runner.run(stop)


if __name__ == "__main__":
    main()
