"""Fault cases R1 and R2 of issue #9: workers crash, the database goes away.

* R1 — ``kill -9`` of a whole worker (parent and forked children) half-way through
  10,000 save/append jobs; a second worker's sweep requeues the dead one's unacked
  jobs once its heartbeat is older than ``SESSIONQ_WORKER_HEARTBEAT_TIMEOUT`` (lowered
  to 3 s here, so that appends waiting for their save do not run out of retries; 60 s
  by default) and every message ends up in PostgreSQL exactly once.
* R8 — the same crash with the default settings (heartbeat timeout 60 s, Dramatiq's
  random maintenance left at its default): the next worker requeues the dead one's
  unacked jobs within the heartbeat timeout plus 30 s, without any tuning.
* R2 — a private PostgreSQL cluster is stopped under load and started again: jobs
  fail as transient, retry with backoff, and all land; nothing is dead-lettered, and
  each failed attempt is one log line (no traceback flood).

Both print their figures (``pytest -s``) and append them to ``fault-figures.json``
under pytest's base temp dir; every worker log is scanned for the planted secrets.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis

from sessionq.models import Store, open_store, utcnow
from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.support_faults import SessionqWorker, assert_no_secrets, pg_ledger, record_figures, wait_until, with_password
from tests.support_jobs import dead_letters, pending_jobs, push_raw
from tests.support_services import PrivatePostgres, private_postgres  # noqa: F401

# Worker heartbeat silence (ms) after which the killed worker's jobs are redelivered.
HEARTBEAT_TIMEOUT_MS = 3000


def _message(i: int, at: Any) -> dict[str, Any]:
    return {"message_id": f"m{i}", "role": "user" if i % 2 else "assistant", "content": f"content {i}",
            "created_at": at.isoformat()}


def _workload(prefix: str, sessions: int, appends: int) -> list[tuple[str, Any]]:
    """Per session one save (message m0) then ``appends`` single-message appends, sessions interleaved."""
    base = utcnow() - timedelta(hours=1)
    jobs: list[tuple[str, Any]] = []
    for s in range(sessions):
        jobs.append(("save_session", {"session_id": f"{prefix}{s}", "model": "m", "created_at": base.isoformat(),
                                      "messages": [_message(0, base)]}))
    for a in range(1, appends + 1):
        for s in range(sessions):
            jobs.append(("append_messages", {"session_id": f"{prefix}{s}",
                                             "messages": [_message(a, base + timedelta(seconds=a))]}))
    return jobs


def _push(client: redis.Redis, jobs: list[tuple[str, Any]]) -> None:
    for i in range(0, len(jobs), 1000):
        push_raw(client, jobs[i : i + 1000])


def _reached(url: str, prefix: str, rows: int) -> bool:
    """True once ``rows`` messages are stored; False while the (loaded) server does not answer."""
    try:
        return _row_count(url, prefix) >= rows
    except psycopg2.OperationalError:
        return False


def _unacked(client: redis.Redis) -> int:
    return sum(int(client.scard(key)) for key in client.scan_iter(match="dramatiq:__acks__.*"))


def _row_count(url: str, prefix: str) -> int:
    conn = psycopg2.connect(url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM sessionq_messages WHERE session_id LIKE %s", (prefix + "%",))
            return int(cur.fetchone()[0])
    finally:
        conn.close()



@pytest.mark.slow
@pytest.mark.timeout(900)  # its waits add up to 540 s on a loaded box; the default is 300
def test_r1_kill9_worker_midway_every_message_exactly_once(
    pg_store: Store, redis_client: redis.Redis, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sessions, appends = 1000, 9
    jobs = _workload("r1-", sessions, appends)
    assert len(jobs) == 10_000
    url = with_password(POSTGRES_URL)
    tuning = {"SESSIONQ_WORKER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_MS)}
    # Given 10,000 save/append jobs on the queue and a worker draining them
    _push(redis_client, jobs)
    first = SessionqWorker(url, REDIS_URL, log=tmp_path / "worker-1.log", threads=8, env=tuning)
    try:
        wait_until(lambda: _reached(POSTGRES_URL, "r1-", 3000) or not first.alive(), timeout=180,
                   what="3,000 messages persisted by the first worker")
        assert first.alive(), first.output()[-3000:]
    finally:
        # When the worker is killed with SIGKILL mid-way (no ack, no shutdown hook)
        first.kill9()
    persisted_at_kill = _row_count(POSTGRES_URL, "r1-")
    # The killed worker's own unacked sets (the next worker's sets hold its live prefetch)
    dead_acks = list(redis_client.scan_iter(match="dramatiq:__acks__.*"))
    unacked_at_kill = _unacked(redis_client)
    queued_at_kill = int(redis_client.llen("dramatiq:sessions"))
    killed_at = time.monotonic()
    # And another worker starts
    second = SessionqWorker(url, REDIS_URL, log=tmp_path / "worker-2.log", threads=8, env=tuning)
    try:
        wait_until(lambda: sum(int(redis_client.scard(k)) for k in dead_acks) == 0 or not second.alive(),
                   timeout=120, what="redelivery of the killed worker's jobs")
        redelivered_after = time.monotonic() - killed_at
        wait_until(lambda: pending_jobs(redis_client) == 0 or not second.alive(), timeout=240,
                   what="all jobs processed")
        assert second.alive(), second.output()[-3000:]
    finally:
        assert second.stop() == 0
    # Then every message is in PostgreSQL exactly once, seq gap-free, counts matching
    ledger = pg_ledger(POSTGRES_URL, "r1-")
    expected = sessions * (appends + 1)
    dead = dead_letters(redis_client)
    scanned = assert_no_secrets([(p.name, p.read_text(errors="replace")) for p in tmp_path.glob("worker-*.log")])
    record_figures(request, "R1", jobs_sent=len(jobs), messages_expected=expected, persisted_at_kill=persisted_at_kill,
                   unacked_at_kill=unacked_at_kill, queued_at_kill=queued_at_kill,
                   redelivery_seconds_after_kill=round(redelivered_after, 1), persisted=len(ledger.per_message),
                   rows=ledger.rows, duplicated=ledger.duplicated, lost=expected - len(ledger.per_message),
                   dead_letters=len(dead), log_lines_scanned=scanned)
    assert 0 < persisted_at_kill < expected
    assert unacked_at_kill > 0, "the kill should have caught jobs in flight"
    assert dead == []
    assert ledger.rows == len(ledger.per_message) == expected
    assert ledger.duplicated == 0
    assert len(ledger.seqs) == sessions and ledger.gap_free()
    assert pg_store.stats().total_messages == expected


# What the README promises with the defaults: redelivery within the heartbeat timeout
# (60 s) plus 30 s, counted from the kill.
DEFAULT_REDELIVERY_BOUND = 60 + 30


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_r8_kill9_worker_with_default_settings_jobs_come_back_within_the_heartbeat_timeout(
    pg_store: Store, redis_client: redis.Redis, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Saves only (an append whose save sat with the dead worker would retry meanwhile),
    # enough that the kill finds jobs in flight, few enough that the next worker is
    # idle, polling once a second, when the dead one's heartbeat times out: what a
    # deployment sees between bursts
    sessions = 5000
    jobs = _workload("r8-", sessions, 0)
    url = with_password(POSTGRES_URL)
    defaults = dict.fromkeys(("SESSIONQ_WORKER_HEARTBEAT_TIMEOUT", "SESSIONQ_WORKER_MAINTENANCE_CHANCE",
                              "SESSIONQ_JOB_MIN_BACKOFF", "SESSIONQ_JOB_MAX_BACKOFF"), "")
    # Given 5,000 save jobs and a worker with the default settings draining them
    _push(redis_client, jobs)
    # (saves go fast in group commits: poll often, kill early, with most still queued;
    # a kill that lands between a batch's acks and the next fetch catches nothing in
    # flight, and then proves nothing: kill again, up to three workers)
    unacked_at_kill, dead_acks, killed_at = 0, [], 0.0
    for attempt in range(1, 4):
        target = _row_count(POSTGRES_URL, "r8-") + 100
        first = SessionqWorker(url, REDIS_URL, log=tmp_path / f"worker-1.{attempt}.log", threads=8, env=defaults)
        try:
            wait_until(lambda w=first, n=target: _reached(POSTGRES_URL, "r8-", n) or not w.alive(), timeout=180,
                       interval=0.02, what=f"{target} sessions persisted by the first worker")
            assert first.alive(), first.output()[-3000:]
        finally:
            # When the whole worker is killed with SIGKILL mid-way
            first.kill9()
        killed_at = time.monotonic()
        dead_acks = [key for key in redis_client.scan_iter(match="dramatiq:__acks__.*") if redis_client.scard(key)]
        unacked_at_kill = _unacked(redis_client)
        if unacked_at_kill:
            break
    # And another worker with the default settings starts
    second = SessionqWorker(url, REDIS_URL, log=tmp_path / "worker-2.log", threads=8, env=defaults)
    try:
        # Then the dead worker's unacked jobs are back within the heartbeat timeout + 30 s
        wait_until(lambda: sum(int(redis_client.scard(k)) for k in dead_acks) == 0 or not second.alive(),
                   timeout=DEFAULT_REDELIVERY_BOUND - (time.monotonic() - killed_at),
                   what="redelivery of the killed worker's jobs with the default settings")
        redelivered_after = time.monotonic() - killed_at
        wait_until(lambda: pending_jobs(redis_client) == 0 or not second.alive(), timeout=240,
                   what="all jobs processed")
        assert second.alive(), second.output()[-3000:]
    finally:
        assert second.stop() == 0
    # And every session is in PostgreSQL exactly once, nothing dead-lettered
    ledger = pg_ledger(POSTGRES_URL, "r8-")
    dead = dead_letters(redis_client)
    record_figures(request, "R8", jobs_sent=len(jobs), unacked_at_kill=unacked_at_kill,
                   redelivery_seconds_after_kill=round(redelivered_after, 1), persisted=len(ledger.per_message),
                   duplicated=ledger.duplicated, lost=sessions - len(ledger.per_message), dead_letters=len(dead))
    assert unacked_at_kill > 0, "the kill should have caught jobs in flight"
    assert dead == []
    assert ledger.rows == len(ledger.per_message) == sessions
    assert ledger.gap_free()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_r2_postgres_stopped_under_load_all_jobs_land(
    private_postgres: PrivatePostgres, redis_client: redis.Redis, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sessions, appends = 200, 9
    url = with_password(private_postgres.url)
    store = open_store(url)
    store.upgrade()
    store.close()
    jobs = _workload("r2-", sessions, appends)
    # Given a worker on a private PostgreSQL and 2,000 jobs flowing
    _push(redis_client, jobs)
    worker = SessionqWorker(url, REDIS_URL, log=tmp_path / "worker.log", threads=8,
                            env={"SESSIONQ_JOB_MIN_BACKOFF": "200", "SESSIONQ_JOB_MAX_BACKOFF": "2000",
                                 "SESSIONQ_JOB_MAX_RETRIES": "20"})
    try:
        wait_until(lambda: _reached(private_postgres.url, "r2-", 300), timeout=120,
                   what="300 messages persisted before the outage")
        # When PostgreSQL is stopped (fast: clients are cut off) and, 3 s later, started again
        private_postgres.stop("fast")
        down_at = time.monotonic()
        time.sleep(3)
        persisted_before_restart = None
        private_postgres.start()
        outage = time.monotonic() - down_at
        persisted_before_restart = _row_count(private_postgres.url, "r2-")
        wait_until(lambda: pending_jobs(redis_client) == 0 or not worker.alive(), timeout=180,
                   what="all jobs processed after the restart")
        assert worker.alive(), worker.output()[-3000:]
    finally:
        worker.stop()
    # Then every job landed (after retries), none dead-lettered, nothing duplicated
    log = worker.output()
    retries = log.count("Retrying message")
    ledger = pg_ledger(private_postgres.url, "r2-")
    expected = sessions * (appends + 1)
    dead = dead_letters(redis_client)
    scanned = assert_no_secrets([("worker.log", log)])
    record_figures(request, "R2", jobs_sent=len(jobs), messages_expected=expected,
                   persisted_when_restarted=persisted_before_restart, outage_seconds=round(outage, 1),
                   retries_logged=retries, tracebacks_logged=log.count("Traceback"), log_lines=len(log.splitlines()),
                   persisted=len(ledger.per_message), duplicated=ledger.duplicated,
                   lost=expected - len(ledger.per_message), dead_letters=len(dead), log_lines_scanned=scanned)
    assert [m["options"].get("dead_letter_reason") for m in dead] == []
    assert retries > 0, "the outage should have made jobs retry"
    assert log.count("Traceback") == 0, "a transient outage is logged as one line per retry, no traceback"
    assert ledger.rows == len(ledger.per_message) == expected
    assert ledger.gap_free()
