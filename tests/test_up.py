"""``sessionq up``: worker, scheduler and HTTP in one real process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from sessionq.models import Settings, open_store
from sessionq.workers.producer import Producer
from tests.conftest import REDIS_URL, messages, session
from tests.support_jobs import ROOT, child_env
from tests.support_services import free_port, wait_port


def test_up_runs_worker_scheduler_and_http_on_redis(tmp_path: Path, redis_client: redis.Redis) -> None:
    # Given `sessionq up` on Redis with a 1 s lease and a 2 s transport sweep
    port = free_port()
    url = f"sqlite:///{tmp_path / 'up.db'}"
    env = child_env(
        REDIS_URL=REDIS_URL, STORAGE_URL=url, SESSIONQ_HTTP_PORT=str(port), SESSIONQ_API_TOKEN="up-token-123",
        SESSIONQ_SCHEDULER_LEASE_SECONDS="1", SESSIONQ_TRANSPORT_INTERVAL="2",
    )
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "sessionq.cli", "up", "--threads", "2"], cwd=ROOT, env=env,
                            stdout=log, stderr=log)
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


def run_cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``sessionq ARGS`` on an embedded SQLite store in ``tmp_path``; waits for it to exit."""
    environ = child_env(STORAGE_URL=f"sqlite:///{tmp_path / 'up.db'}", **env)
    return subprocess.run([sys.executable, "-m", "sessionq.cli", *args], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("command", ["up", "serve"])
def test_a_port_in_use_is_one_line_error(command: str, tmp_path: Path) -> None:
    # Given something already listening on the port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # When `sessionq up` / `serve` is asked to listen there
        result = run_cli([command, "--port", str(port)], tmp_path)
    # Then it exits 1 with one line naming the address, before starting anything
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert not (tmp_path / "up.db").exists()


@pytest.mark.parametrize("how", [["--port", "70000"], []])
@pytest.mark.parametrize("command", ["up", "serve"])
def test_a_port_out_of_range_is_one_line_error(command: str, how: list[str], tmp_path: Path) -> None:
    # Given port 70000 as an option or in the environment, When the command starts
    result = run_cli([command, *how], tmp_path, **({} if how else {"SESSIONQ_HTTP_PORT": "70000"}))
    # Then it names the setting and the rule, in one line
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == ["Error: http_port: must be a TCP port from 0 to 65535, got 70000"]


def test_up_listens_on_host_and_port_options(tmp_path: Path) -> None:
    # Given `sessionq up --host --port`, with another port in the environment
    port = free_port()
    env = child_env(STORAGE_URL=f"sqlite:///{tmp_path / 'up.db'}", SESSIONQ_HTTP_PORT=str(free_port()))
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "sessionq.cli", "up", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        # When it is up
        wait_port(port, timeout=60, proc=proc)
        # Then the options win: health answers on that address
        assert httpx.get(f"http://127.0.0.1:{port}/session-health", timeout=10).json()["status"] == "healthy"
        # ... and so does the console (no token: loopback only; embedded: no dead letters to list)
        overview = httpx.get(f"http://127.0.0.1:{port}/ui/", timeout=10)
        assert overview.status_code == 200 and "embedded mode" in overview.text
        assert "No session matches" in httpx.get(f"http://127.0.0.1:{port}/ui/sessions", timeout=10).text
        assert "live in Redis" in httpx.get(f"http://127.0.0.1:{port}/ui/dead-letters", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert f"http://127.0.0.1:{port}" in (tmp_path / "up.log").read_text()
