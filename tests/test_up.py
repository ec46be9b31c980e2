"""``sessionq up``: worker, scheduler and HTTP in one real process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from sessionq.models import Settings, open_store
from tests.conftest import REDIS_URL, messages, session
from tests.support_jobs import ROOT, child_env
from tests.support_services import free_port, wait_port
from sessionq.workers.producer import Producer


def test_up_runs_worker_scheduler_and_http_on_redis(tmp_path: Path, redis_client: redis.Redis) -> None:
    # Given `sessionq up` on Redis with a 1 s lease and a 2 s transport sweep
    port = free_port()
    url = f"sqlite:///{tmp_path / 'up.db'}"
    env = child_env(
        REDIS_URL=REDIS_URL, STORAGE_URL=url, SESSIONQ_HTTP_PORT=str(port), SESSIONQ_API_TOKEN="up-token-123",
        SESSIONQ_SCHEDULER_LEASE_SECONDS="1", SESSIONQ_TRANSPORT_INTERVAL="2",
    )
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "sessionq.cli", "up", "--threads", "2"], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        wait_port(port, timeout=60)
        # When a producer sends a save to the queue
        producer = Producer(Settings(storage_url=url, redis_url=REDIS_URL))
        producer.save_session(session("up-1"), messages("up-1", 3))
        producer.close()
        # Then the worker in that process persists it
        store = open_store(url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if store.load_session("up-1").message_count == 3:
                    break
            except Exception:
                pass
            time.sleep(0.2)
        assert store.load_session("up-1").message_count == 3
        store.close()
        # ... the scheduler fires the transport sweep, which the worker runs and health reports
        headers = {"Authorization": "Bearer up-token-123"}
        body: dict[str, object] = {}
        deadline = time.monotonic() + 60  # its own budget: the save may have used most of the first
        while time.monotonic() < deadline:
            body = httpx.get(f"http://127.0.0.1:{port}/session-health", headers=headers, timeout=5).json()
            if "transports" in body.get("sweeps", {}):  # type: ignore[operator]
                break
            time.sleep(0.3)
        assert body["status"] == "healthy"
        assert body["total_sessions"] == 1
        assert body["sweeps"]["transports"]["ok"] is True  # type: ignore[index]
        assert httpx.get(f"http://127.0.0.1:{port}/session-health", timeout=5).status_code == 401
    finally:
        # And SIGTERM stops everything cleanly
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert "up-token-123" not in (tmp_path / "up.log").read_text()
