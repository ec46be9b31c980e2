"""GET /session-health against a real uvicorn server, real PostgreSQL and real Redis."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
import redis

from sessionq.models import Settings, Store, TransportSession, open_store
from sessionq.models.errors import ConfigError
from sessionq.scheduler.status import SweepBook
from sessionq.workers.health import HealthChecker
from sessionq.workers.http import check_bind, create_app, is_loopback
from tests.conftest import POSTGRES_URL, REDIS_URL, T0, messages, session
from tests.support_http import (
    STARTUP_TIMEOUT,
    Blackhole,
    ServerThread,
    TcpProxy,
    cli_command,
    dead_port,
    free_port,
    pg_store,
    subprocess_env,
    with_port,
)

__all__ = ["pg_store"]

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def settings(**overrides: Any) -> Settings:
    """Settings for the isolated services, with the test token."""
    values: dict[str, Any] = {"storage_url": POSTGRES_URL, "redis_url": REDIS_URL, "api_token": TOKEN}
    values.update(overrides)
    return Settings(**values)


def enqueue_raw(client: Any, queue: str, message_id: str, *, dead: bool = False) -> None:
    """Put a message where Dramatiq's Redis broker keeps one (ready, or dead-lettered)."""
    if dead:
        client.zadd(f"dramatiq:{queue}.XQ", {message_id: 1})
        client.hset(f"dramatiq:{queue}.XQ.msgs", message_id, "{}")
    else:
        client.hset(f"dramatiq:{queue}.msgs", message_id, "{}")
        client.rpush(f"dramatiq:{queue}", message_id)


def test_health_reports_counts_queues_and_sweeps(pg_store: Store, redis_client: Any) -> None:
    # Given sessions in every status, two transports, queued and dead messages and a sweep run
    pg_store.save_session(session("a1"), messages("a1", 2))
    pg_store.save_session(session("a2"))
    pg_store.save_session(session("x1", status="expired"))
    pg_store.save_session(session("r1"))
    pg_store.archive_session("r1", T0 + timedelta(minutes=1))
    pg_store.register_transport(TransportSession("t1", created_at=T0, last_heartbeat=T0))
    pg_store.register_transport(TransportSession("t2", created_at=T0, last_heartbeat=T0))
    pg_store.mark_disconnected("t2", T0 + timedelta(minutes=1))
    for i in range(3):
        enqueue_raw(redis_client, "sessions", f"m{i}")
    enqueue_raw(redis_client, "bulk", "d1", dead=True)
    SweepBook(redis_client).record("expire_sessions", ok=True, duration=0.2, counts={"expired": 4, "purged": 1})
    app = create_app(settings(), store=pg_store, redis_client=redis_client, event_store_mode=lambda: "memory")

    # When the health endpoint is asked with the right token
    with ServerThread(app) as server:
        response = httpx.get(server.url + "/session-health", headers=AUTH, timeout=30)

    # Then it answers 200 with the counts the store and the queues hold
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "healthy" and body["database"] == "ok" and body["broker"] == "ok"
    counts = (body["total_sessions"], body["active_sessions"], body["archived_sessions"], body["expired_sessions"])
    assert counts == (4, 2, 1, 1)
    assert body["transport_sessions"] == {"active": 1, "disconnected": 1}
    assert body["queue_depths"]["sessions"] == {"ready": 3, "in_flight": 0, "delayed": 0}
    assert body["dead_letters"] == {"sessions": 0, "maintenance": 0, "bulk": 1, "tasks": 0}
    assert body["sweeps"]["expire_sessions"]["counts"] == {"expired": 4, "purged": 1}
    assert body["sweeps"]["expire_sessions"]["ok"] is True and body["sweeps"]["expire_sessions"]["failing"] is False
    assert body["event_store"] == "memory"
    assert body["timestamp"].endswith("+00:00")
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"},
     {"Authorization": f"Bearer {TOKEN}x"}],
    ids=["missing", "wrong", "no-scheme", "basic", "longer"],
)
def test_missing_or_wrong_token_is_401(pg_store: Store, redis_client: Any, headers: dict[str, str]) -> None:
    # Given a server with a token
    app = create_app(settings(), store=pg_store, redis_client=redis_client)
    with ServerThread(app) as server:
        # When either endpoint is asked without the right Bearer token
        responses = [
            httpx.get(server.url + path, headers=headers, timeout=30) for path in ("/session-health", "/metrics")
        ]
    # Then both refuse with 401 and a Bearer challenge, revealing nothing
    for response in responses:
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "sessions" not in response.text


def test_dead_database_port_is_a_fast_503(redis_client: Any) -> None:
    # Given a store URL that points at a port nobody listens on
    dead = with_port(POSTGRES_URL, dead_port())
    store = open_store(dead, max_pool_size=2)
    app = create_app(settings(storage_url=dead), store=store, redis_client=redis_client)
    try:
        with ServerThread(app) as server:
            # When health is asked
            response = httpx.get(server.url + "/session-health", headers=AUTH, timeout=30)
    finally:
        store.close()
    # Then it answers 503, names the database, and has no counts to offer
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy" and body["database"] == "unreachable" and body["broker"] == "ok"
    assert body["total_sessions"] is None
    assert any(p.startswith("database unreachable") for p in body["problems"])


def test_database_outage_and_recovery(pg_store: Store, redis_client: Any) -> None:
    # Given PostgreSQL reached through a proxy we can cut, and a healthy server
    pg_store.save_session(session("s1"))
    target = httpx.URL(POSTGRES_URL)
    with TcpProxy(target.host, target.port or 5432) as proxy:
        url = with_port(POSTGRES_URL, proxy.port)
        store = open_store(url, max_pool_size=2)
        app = create_app(settings(storage_url=url), store=store, redis_client=redis_client)
        try:
            with ServerThread(app) as server:
                before = httpx.get(server.url + "/session-health", headers=AUTH, timeout=30)
                # When the database goes away (open connections cut, new ones refused)
                proxy.stop()
                during = httpx.get(server.url + "/session-health", headers=AUTH, timeout=30)
                # And comes back on the same address
                proxy.start()
                after = httpx.get(server.url + "/session-health", headers=AUTH, timeout=30)
        finally:
            store.close()
    # Then health goes 200 -> 503 -> 200 with the same store object
    assert (before.status_code, during.status_code, after.status_code) == (200, 503, 200)
    assert during.json()["database"] == "unreachable"
    assert before.json()["total_sessions"] == after.json()["total_sessions"] == 1


def test_hung_database_answers_503_within_the_deadline(redis_client: Any) -> None:
    # Given a "database" that accepts connections and never answers, behind a store
    # whose own connect timeout (10 s) is far longer than the health deadline (1 s)
    with Blackhole() as hole:
        url = with_port(POSTGRES_URL, hole.port)
        store = open_store(url, max_pool_size=2)
        checker = HealthChecker(settings(storage_url=url), store=store, redis_client=redis_client, timeout=1.0)
        app = create_app(settings(storage_url=url), checker=checker)
        try:
            with ServerThread(app) as server:
                # When health is asked twice while the first probe is still stuck
                first = httpx.get(server.url + "/session-health", headers=AUTH, timeout=30)
                second = httpx.get(server.url + "/session-health", headers=AUTH, timeout=30)
            attempts = len(hole.accepted)
        finally:
            hole.close()
            checker.close()
            store.close()
    # Then both answer 503 "no answer" instead of hanging, and the stuck probe was
    # waited on again rather than started twice
    for response in (first, second):
        assert response.status_code == 503
        assert response.json()["database"] == "unreachable"
        assert any("no answer within 1s" in p for p in response.json()["problems"])
    assert attempts == 1


def test_repeated_checks_on_an_owned_store_stay_healthy(pg_store: Store) -> None:
    # Given a checker that opens its own small-pool store from the settings
    with HealthChecker(settings()) as checker:
        # When it is asked many times in a row (more checks than pooled connections)
        reports = [checker.check() for _ in range(10)]
    # Then every check is healthy: probes reuse one connection instead of exhausting the pool
    assert [r.problems for r in reports] == [[]] * 10
    assert all(r.stats is not None and r.stats.total_sessions == 0 for r in reports)


def test_broker_unreachable_is_503(pg_store: Store) -> None:
    # Given Redis pointed at a dead port
    dead_url = with_port(REDIS_URL, dead_port())
    client = redis.Redis.from_url(dead_url, socket_connect_timeout=1, socket_timeout=1)
    app = create_app(settings(redis_url=dead_url), store=pg_store, redis_client=client)
    with ServerThread(app) as server:
        # When health is asked
        response = httpx.get(server.url + "/session-health", headers=AUTH, timeout=30)
    # Then it is 503 with the broker named, while the database counts still show
    assert response.status_code == 503
    body = response.json()
    assert body["broker"] == "unreachable" and body["database"] == "ok" and body["total_sessions"] == 0
    assert body["event_store"] == "none"


def test_a_sweep_failing_repeatedly_is_503_until_it_succeeds(pg_store: Store, redis_client: Any) -> None:
    # Given a sweep that failed three times in a row (recorded by some worker)
    book = SweepBook(redis_client)
    for _ in range(3):
        book.record("transports", ok=False, duration=0.1, error="StoreUnavailable: postgresql://u:pw@db/x down")
    app = create_app(settings(), store=pg_store, redis_client=redis_client)
    with ServerThread(app) as server:
        failing = httpx.get(server.url + "/session-health", headers=AUTH, timeout=30)
        # When it succeeds once
        book.record("transports", ok=True, duration=0.1, counts={"expired": 0})
        recovered = httpx.get(server.url + "/session-health", headers=AUTH, timeout=30)
    # Then health was 503 naming the sweep (secrets redacted) and is 200 again
    assert failing.status_code == 503
    assert failing.json()["sweeps"]["transports"]["failing"] is True
    assert any("sweep transports failing" in p for p in failing.json()["problems"])
    assert "pw" not in failing.text
    assert recovered.status_code == 200


def test_embedded_mode_needs_no_redis(tmp_path: Any) -> None:
    # Given no Redis at all and a SQLite store
    store = open_store(f"sqlite:///{tmp_path / 'h.db'}")
    store.upgrade()
    store.save_session(session("e1"))
    app = create_app(Settings(storage_url=f"sqlite:///{tmp_path / 'h.db'}"), store=store)
    with ServerThread(app) as server:
        # When health is asked (no token configured, loopback)
        response = httpx.get(server.url + "/session-health", timeout=30)
    store.close()
    # Then it is healthy with an embedded broker and no event store
    assert response.status_code == 200
    body = response.json()
    assert (body["broker"], body["redis"], body["event_store"], body["total_sessions"]) == (
        "embedded", "none", "none", 1
    )


def test_non_loopback_bind_needs_a_token() -> None:
    # Given no token, Then only loopback addresses are allowed
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")
    check_bind(Settings(), "127.0.0.1")
    with pytest.raises(ConfigError, match="SESSIONQ_API_TOKEN"):
        check_bind(Settings(), "0.0.0.0")
    check_bind(Settings(api_token=TOKEN), "0.0.0.0")


def test_cli_serve_refuses_public_bind_without_token() -> None:
    # When `sessionq serve` is asked to bind every interface without a token
    result = subprocess.run(cli_command("serve", "--host", "0.0.0.0", "--port", str(free_port())),
                            env=subprocess_env(), capture_output=True, text=True, timeout=60)
    # Then it exits non-zero with one line, no traceback
    assert result.returncode != 0
    assert "refusing to serve on 0.0.0.0" in result.stderr and "Traceback" not in result.stderr


def test_cli_serve_answers_and_stops_on_sigterm(pg_store: Store, redis_client: Any) -> None:
    # Given `sessionq serve` started as a real process on a free port
    port = free_port()
    env = subprocess_env(STORAGE_URL=POSTGRES_URL, REDIS_URL=REDIS_URL, SESSIONQ_API_TOKEN=TOKEN)
    proc = subprocess.Popen(cli_command("serve", "--port", str(port)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        response = None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while response is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/session-health", headers=AUTH, timeout=30)
            except httpx.TransportError:
                time.sleep(0.1)
        # When it gets SIGTERM
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Then it had answered 200 and shut down gracefully (uvicorn re-raises SIGTERM after
    # its shutdown, so the exit status is the signal's), with the token never logged
    assert response is not None and response.status_code == 200, stderr
    assert proc.returncode in (0, -15), stderr
    assert "Application shutdown complete" in stderr
    assert TOKEN not in stderr


def test_cli_health_exit_codes(pg_store: Store, redis_client: Any) -> None:
    # Given a reachable store and a dead one
    good = subprocess_env(STORAGE_URL=POSTGRES_URL, REDIS_URL=REDIS_URL)
    dead = subprocess_env(STORAGE_URL=with_port("postgresql://postgres:hunter2@127.0.0.1/x", dead_port()))
    # When `sessionq health` runs against each
    ok = subprocess.run(cli_command("health"), env=good, capture_output=True, text=True, timeout=60)
    bad = subprocess.run(cli_command("health"), env=dead, capture_output=True, text=True, timeout=60)
    # Then it prints one JSON line and exits 0 / 1, never leaking the password
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["status"] == "healthy" and len(ok.stdout.strip().splitlines()) == 1
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["database"] == "unreachable"
    assert "hunter2" not in bad.stdout + bad.stderr
