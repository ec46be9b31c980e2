"""The scheduler's parts against real Redis: the lease, tick claims, the Dramatiq send,
and the sweep run lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sessionq.models import Settings
from sessionq.scheduler.lease import DEFAULT_LEASE_KEY, LocalLease, RedisLease, sweep_guard
from sessionq.scheduler.runner import DEFAULT_TICK_PREFIX, SweepScheduler, dramatiq_send
from tests.conftest import REDIS_URL
from tests.support_scheduler import read_sends, recording_send

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000.0  # a tick boundary for intervals 1, 10, 60 and 3600


def _leader(client: Any, ttl: float = 5.0) -> RedisLease:
    lease = RedisLease(client, ttl=ttl)
    assert lease.maintain()
    return lease


def test_only_one_replica_holds_the_lease_and_a_release_hands_it_over(redis_client: Any) -> None:
    # Given two replicas' leases on one key
    first, second = RedisLease(redis_client, ttl=5), RedisLease(redis_client, ttl=5)
    # When both try to acquire, and the holder renews
    assert first.maintain() is True
    assert second.maintain() is False
    assert first.maintain() is True
    # Then only the first holds it, and the key names it
    assert (first.held(), second.held()) == (True, False)
    assert first.holder() == first.token
    # When the holder releases it on shutdown, the other takes it at its next check
    first.release()
    assert not first.held()
    assert second.maintain() is True
    assert second.holder() == second.token
    # ... and a stale release by the old holder does not steal it back
    first.release()
    assert second.holder() == second.token


def test_a_dead_holders_lease_lapses_and_a_renewed_one_does_not(redis_client: Any) -> None:
    # Given a holder with a 1.5 s lease (room for a stalled thread on a loaded box) and a follower
    ttl = 1.5
    holder, follower = RedisLease(redis_client, ttl=ttl), RedisLease(redis_client, ttl=ttl)
    assert holder.maintain()
    # When the holder keeps renewing for two lease periods
    for _ in range(6):
        time.sleep(ttl / 3)
        assert holder.maintain()
        # Then the follower never gets it
        assert not follower.maintain()
    # When the holder stops renewing (it died), the key lapses within one lease period
    time.sleep(ttl + 0.1)
    assert not holder.held()
    assert follower.maintain()
    # ... and the old holder, coming back, finds it lost
    assert holder.maintain() is False
    assert holder.held() is False


def test_only_the_leader_fires_and_each_tick_fires_once(redis_client: Any) -> None:
    # Given a leader and a follower scheduling "files" every 60 s
    leader = SweepScheduler(recording_send(redis_client), schedule={"files": 60}, redis=redis_client,
                            lease=_leader(redis_client))
    follower = SweepScheduler(recording_send(redis_client), schedule={"files": 60}, redis=redis_client,
                              lease=RedisLease(redis_client, ttl=5))
    assert not follower.lease.maintain()
    # When both fire at the same tick, twice, and the leader fires late in that tick
    assert follower.fire("files", now=NOW) is None
    message_id = leader.fire("files", now=NOW + 1)
    assert leader.fire("files", now=NOW + 59.9) is None
    assert follower.fire("files", now=NOW + 2) is None
    # Then exactly one message was sent, and the tick's key names it
    sends = read_sends(redis_client)
    assert [(kind, mid) for kind, _, _, mid in sends] == [("files", message_id)]
    tick = int(NOW // 60)
    assert redis_client.get(f"{DEFAULT_TICK_PREFIX}files:{tick}").decode().endswith(f":{message_id}")
    # When the next tick comes, it fires once more
    assert leader.fire("files", now=NOW + 60) is not None
    assert len(read_sends(redis_client)) == 2


def test_a_paused_old_leader_cannot_fire_a_tick_the_new_leader_fired(redis_client: Any) -> None:
    # Given two schedulers that both believe they lead (a paused leader whose lease
    # passed to another while it slept)
    old = SweepScheduler(recording_send(redis_client), schedule={"transports": 10}, redis=redis_client,
                         lease=LocalLease())
    new = SweepScheduler(recording_send(redis_client), schedule={"transports": 10}, redis=redis_client,
                         lease=_leader(redis_client))
    # When both fire the same tick
    fired = [new.fire("transports", now=NOW + 0.1), old.fire("transports", now=NOW + 0.2)]
    # Then only one message went out
    assert fired[0] is not None and fired[1] is None
    assert len(read_sends(redis_client)) == 1


def test_missed_ticks_are_covered_once_by_the_next_firing(redis_client: Any) -> None:
    # Given a scheduler that fired tick n, catching up 30 s of missed ticks of 10 s
    s = SweepScheduler(recording_send(redis_client), schedule={"transports": 10}, redis=redis_client,
                       lease=_leader(redis_client), catch_up=30)
    n = int(NOW // 10)
    assert s.fire("transports", now=NOW)
    # When the next firing happens 5 ticks later (a leader change left a gap)
    assert s.fire("transports", now=NOW + 50)
    # Then one message covers ticks n+2..n+5 (the 30 s catch-up window), and tick
    # n+1, beyond the window, stays unclaimed
    assert len(read_sends(redis_client)) == 2
    states = [
        (redis_client.get(f"{DEFAULT_TICK_PREFIX}transports:{t}") or b"-").decode().split(":")[0]
        for t in range(n, n + 6)
    ]
    assert states == ["sent", "-", "coalesced", "coalesced", "coalesced", "sent"]
    # ... and none of the covered ticks can fire again
    for t in range(n + 2, n + 6):
        assert s.fire("transports", now=t * 10.0) is None
    assert len(read_sends(redis_client)) == 2


def test_a_failed_send_gives_its_ticks_back_for_the_next_firing(redis_client: Any) -> None:
    # Given a leader whose broker is down for one firing
    calls: list[str] = []

    def flaky(kind: str) -> str:
        calls.append(kind)
        if len(calls) == 1:
            raise ConnectionError("broker down")
        return f"m{len(calls)}"

    s = SweepScheduler(flaky, schedule={"files": 10}, redis=redis_client, lease=_leader(redis_client), catch_up=30)
    n = int(NOW // 10)
    # When tick n fails to enqueue and tick n+1 succeeds
    assert s.fire("files", now=NOW) is None
    assert redis_client.get(f"{DEFAULT_TICK_PREFIX}files:{n}") is None
    assert s.fire("files", now=NOW + 10) == "m2"
    # Then tick n is covered by tick n+1's message (not lost, not sent twice)
    assert redis_client.get(f"{DEFAULT_TICK_PREFIX}files:{n}").decode().startswith("coalesced:")
    assert calls == ["files", "files"]


def test_embedded_scheduler_fires_each_tick_once_without_redis() -> None:
    # Given an embedded scheduler (no Redis: local lease, in-memory tick claims)
    sent: list[str] = []

    def send(kind: str) -> str:
        sent.append(kind)
        return str(len(sent))

    s = SweepScheduler(send, settings=Settings(), schedule={"files": 60})
    assert isinstance(s.lease, LocalLease)
    # When a tick is fired twice and the next tick once
    results = [s.fire("files", now=NOW), s.fire("files", now=NOW + 30), s.fire("files", now=NOW + 60)]
    # Then two messages went out
    assert results == ["1", None, "2"]


def test_schedule_comes_from_settings() -> None:
    # Given settings with aggressive cleanup on and custom intervals
    settings = Settings(aggressive_cleanup=True, transport_interval=7, aggressive_interval=11,
                        scheduler_lease_seconds=4)
    # When a scheduler is built from them
    s = SweepScheduler(lambda kind: "x", settings=settings)
    # Then every sweep is scheduled with its interval, and the lease period applies
    assert s.schedule["transports"] == 7 and s.schedule["aggressive_cleanup"] == 11
    assert set(s.schedule) == {"expire_sessions", "aggressive_cleanup", "transports", "files", "agent_state", "events",
                               "tasks", "handles", "tombstones"}
    assert s.lease.ttl == 4


def test_dramatiq_send_lands_on_the_maintenance_queue(redis_client: Any) -> None:
    from dramatiq.brokers.redis import RedisBroker

    # Given a real Dramatiq Redis broker with the maintenance queue declared
    broker = RedisBroker(url=REDIS_URL)
    broker.declare_queue("maintenance")
    try:
        s = SweepScheduler(dramatiq_send(broker), schedule={"events": 600}, redis=redis_client,
                           lease=_leader(redis_client))
        # When the scheduler fires a tick of the events sweep
        message_id = s.fire("events", now=NOW)
        # Then one run_sweep("events") message waits on Dramatiq's maintenance queue
        queued = redis_client.lrange("dramatiq:maintenance", 0, -1)
        assert len(queued) == 1
        body = json.loads(redis_client.hget("dramatiq:maintenance.msgs", queued[0]))
        assert (body["actor_name"], body["args"], body["queue_name"]) == ("run_sweep", ["events"], "maintenance")
        assert body["message_id"] == message_id
    finally:
        broker.close()


def test_sweep_guard_lets_one_run_at_a_time_and_outlives_its_ttl(redis_client: Any) -> None:
    # Given a sweep holding its lock with a 1.5 s ttl for two ttls
    seen: list[bool] = []
    with sweep_guard(redis_client, "events", ttl=1.5) as first:
        assert first is True
        for _ in range(2):
            time.sleep(1.5)
            # Then no other run gets it meanwhile (the lock is renewed while it runs)
            with sweep_guard(redis_client, "events", ttl=1.5) as other:
                seen.append(other)
        # ... while another kind is not blocked
        with sweep_guard(redis_client, "files", ttl=1.5) as unrelated:
            assert unrelated is True
    assert seen == [False, False]
    # When the run ends, the lock is free again
    assert redis_client.get("sessionq:sweep-lock:events") is None
    with sweep_guard(redis_client, "events", ttl=0.3) as again:
        assert again is True


def test_sweep_guard_without_redis_is_a_process_lock() -> None:
    # Given an embedded worker running a sweep in one thread
    inside, release, results = threading.Event(), threading.Event(), []

    def run() -> None:
        with sweep_guard(None, "files") as ok:
            results.append(ok)
            inside.set()
            release.wait(5)

    t = threading.Thread(target=run)
    t.start()
    assert inside.wait(30)
    # When another thread tries the same sweep, then after it ends
    with sweep_guard(None, "files") as during:
        results.append(during)
    release.set()
    t.join()
    with sweep_guard(None, "files") as after:
        results.append(after)
    # Then only one ran at a time
    assert results == [True, False, True]


def test_cli_scheduler_enqueues_and_stops_cleanly_on_sigterm(redis_client: Any, tmp_path: Path) -> None:
    # Given `sessionq scheduler` with a 1 s transport sweep
    env = dict(os.environ, REDIS_URL=REDIS_URL, STORAGE_URL=f"sqlite:///{tmp_path / 'q.db'}",
               SESSIONQ_TRANSPORT_INTERVAL="1", SESSIONQ_SCHEDULER_LEASE_SECONDS="2")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen([sys.executable, "-m", "sessionq.cli", "scheduler"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # When it has run until a sweep is on the maintenance queue
        def enqueued() -> bool:
            return any(redis_client.llen(key) for key in redis_client.scan_iter(match="*maintenance")
                       if redis_client.type(key) == b"list")

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not enqueued():
            time.sleep(0.1)
        assert enqueued(), "no sweep enqueued within 60 s"
        assert redis_client.get(DEFAULT_LEASE_KEY) is not None
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Then it logged what it enqueued, exited 0 and released the lease
    assert proc.returncode == 0, output.decode()
    assert b"enqueued run_sweep('transports')" in output
    assert redis_client.get(DEFAULT_LEASE_KEY) is None



def test_unreachable_redis_sends_nothing_and_crashes_nothing() -> None:
    import socket

    import redis

    # Given a scheduler whose Redis is a dead port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    sent: list[str] = []

    def send(kind: str) -> str:
        sent.append(kind)
        return "m"

    s = SweepScheduler(send, schedule={"files": 60}, redis=dead)
    # When it tries to lead and a believer-in-itself fires a tick through the same Redis
    assert s.lease.maintain() is False
    believer = SweepScheduler(send, schedule={"files": 60}, redis=dead, lease=LocalLease())
    results = [s.fire("files", now=NOW), believer.fire("files", now=NOW)]
    # Then nothing was enqueued (no tick can be claimed), and nothing raised
    assert results == [None, None] and sent == []


def test_cleanup_skips_a_sweep_running_elsewhere_and_books_the_ones_it_runs(redis_client: Any, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sessionq.cli import main
    from sessionq.scheduler import SweepBook

    # Given a configured Redis and a worker that is running the files sweep right now
    env = {"STORAGE_URL": f"sqlite:///{tmp_path / 'c.db'}", "REDIS_URL": REDIS_URL}
    runner = CliRunner()
    assert runner.invoke(main, ["db", "upgrade"], env=env).exit_code == 0
    with sweep_guard(redis_client, "files") as held:
        assert held
        # When `sessionq cleanup` runs the files and agent-state sweeps
        busy = runner.invoke(main, ["cleanup", "--kind", "files"], env=env)
        free = runner.invoke(main, ["cleanup", "--kind", "agent_state"], env=env)
    # Then it skips the busy one, runs the other, and books only the run it did
    assert busy.exit_code == 0 and busy.stdout == "files: skipped (already running elsewhere)\n"
    assert free.exit_code == 0 and free.stdout.startswith("agent_state: deleted=0 (")
    book = SweepBook(redis_client)
    assert book.last("files") is None
    last = book.last("agent_state")
    assert last is not None and last.ok and last.counts == {"deleted": 0}
