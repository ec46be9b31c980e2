"""Three scheduler replicas against real Redis: each tick fires once; a killed leader
hands over (issue #4, fault case R5 of issue #9)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sessionq.scheduler.lease import DEFAULT_LEASE_KEY
from sessionq.scheduler.runner import DEFAULT_TICK_PREFIX
from tests.conftest import REDIS_URL
from tests.support_scheduler import read_sends

ROOT = Path(__file__).resolve().parent.parent
SCHEDULE = {"transports": 1, "files": 2}
LEASE_SECONDS = 2.0
BEFORE_KILL = 11.0
AFTER_KILL = 9.0


def _replica(log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(
        SESSIONQ_TEST_REDIS_URL=REDIS_URL,
        SESSIONQ_TEST_SCHEDULE=json.dumps(SCHEDULE),
        SESSIONQ_SCHEDULER_LEASE_SECONDS=str(LEASE_SECONDS),
    )
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.support_scheduler"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _holder_pid(client: Any) -> int | None:
    value = client.get(DEFAULT_LEASE_KEY)
    return None if value is None else int(value.decode().split(":")[1])


class _TickWatcher(threading.Thread):
    """Snapshots the tick claim keys while they live (they expire after a few ticks)."""

    def __init__(self, client: Any) -> None:
        super().__init__(daemon=True)
        self.client, self.claims, self.stop = client, dict[str, str](), threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.scan()
        self.scan()

    def scan(self) -> None:
        for key in self.client.scan_iter(match=f"{DEFAULT_TICK_PREFIX}*"):
            value = self.client.get(key)
            if value is not None:
                self.claims[key.decode()] = value.decode()

    def ledger(self, kind: str) -> tuple[dict[str, int], dict[int, int], list[int]]:
        """For one kind: message id -> tick it was sent for, coalesced tick -> the tick
        whose message covered it, and ticks claimed but never sent."""
        sent_for, covered_by, unsent = {}, {}, []
        for key, value in self.claims.items():
            if not key.startswith(f"{DEFAULT_TICK_PREFIX}{kind}:"):
                continue
            tick, (state, *rest) = int(key.rsplit(":", 1)[1]), value.split(":")
            if state == "sent":
                sent_for[rest[-1]] = tick
            elif state == "coalesced":
                covered_by[tick] = int(rest[0])
            else:
                unsent.append(tick)
        return sent_for, covered_by, unsent


@pytest.mark.slow
def test_three_replicas_fire_each_tick_once_and_a_killed_leader_hands_over(redis_client: Any, tmp_path: Path) -> None:
    # Given three scheduler replicas on one Redis, ticking every 1 s and 2 s, lease 2 s
    watcher = _TickWatcher(redis_client)
    watcher.start()
    procs = [_replica(tmp_path / f"replica-{i}.log") for i in range(3)]
    try:
        deadline = time.monotonic() + 60  # three Python processes starting at once on a loaded box
        while _holder_pid(redis_client) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        leader = _holder_pid(redis_client)
        assert leader in {p.pid for p in procs}
        # When they run for ~11 s and then the leader is killed with SIGKILL
        time.sleep(BEFORE_KILL)
        leader = _holder_pid(redis_client)
        while leader is None:  # between two holders: wait for the next one
            time.sleep(0.02)
            leader = _holder_pid(redis_client)
        victim = next(p for p in procs if p.pid == leader)
        lease_left = max(0, int(redis_client.pttl(DEFAULT_LEASE_KEY))) / 1000
        killed_at = time.time()
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        while _holder_pid(redis_client) in (leader, None) and time.time() - killed_at < 4 * LEASE_SECONDS:
            time.sleep(0.02)
        takeover = time.time() - killed_at
        new_leader = _holder_pid(redis_client)
        # ... and the survivors run ~9 s more, then stop on SIGTERM
        time.sleep(AFTER_KILL)
        stopped_at = time.time()
        survivors = [p for p in procs if p is not victim]
        for p in survivors:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=20) for p in survivors]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        watcher.stop.set()
        watcher.join()

    # Then a survivor took over once the dead leader's lease ran out, within one renewal
    # check (a third of the lease) plus a second of scheduling slack on a loaded box
    assert new_leader in {p.pid for p in survivors}
    assert takeover <= lease_left + LEASE_SECONDS / 3 + 1.0, f"takeover took {takeover:.2f}s ({lease_left:.2f}s left)"
    # ... the survivors stopped cleanly and released the lease
    assert codes == [0, 0]
    assert redis_client.get(DEFAULT_LEASE_KEY) is None

    # ... and every tick from the first send to the stop was enqueued exactly once:
    # each send is accounted for by one tick's claim (a send no claim accounts for
    # would be a duplicate), no tick has two, and a tick with no send of its own
    # (the takeover gap) is covered by the new leader's first message
    sends = read_sends(redis_client)
    figures = {}
    for kind, interval in SCHEDULE.items():
        sent_for, covered_by, unsent = watcher.ledger(kind)
        kind_sends = [(ts, mid) for k, ts, _, mid in sends if k == kind]
        stray = [mid for _, mid in kind_sends if mid not in sent_for]
        per_tick = Counter(sent_for[mid] for _, mid in kind_sends if mid in sent_for)
        ticks = range(min(per_tick), math.floor(stopped_at / interval))
        duplicates = stray + [t for t in ticks if per_tick[t] > 1]
        coalesced = [t for t in ticks if per_tick[t] == 0 and per_tick[covered_by.get(t, -1)] == 1]
        missed = [t for t in ticks if per_tick[t] == 0 and t not in coalesced]
        takeover_ticks = range(math.floor(killed_at / interval), math.floor((killed_at + takeover) / interval) + 1)
        figures[kind] = {
            "ticks": len(ticks), "sends": sum(per_tick[t] for t in ticks),
            "duplicates": len(duplicates), "missed": len(missed),
            "coalesced_at_takeover": len([t for t in coalesced if t in takeover_ticks]),
            "coalesced_late_elsewhere": len([t for t in coalesced if t not in takeover_ticks]),
            "claimed_not_sent": len(unsent),
        }
        assert duplicates == [], (kind, duplicates)
        assert missed == [], (kind, missed, unsent)
        assert len(ticks) >= (BEFORE_KILL + AFTER_KILL) / interval - 3
        # ... no tick fired before its time (the wall clock agrees with the claims)
        assert all(ts >= sent_for[mid] * interval for ts, mid in kind_sends)
        # ... and the ticks after the takeover were fired by the new leader
        after = [pid for k, ts, pid, _ in sends if k == kind and killed_at + takeover < ts < stopped_at]
        assert after and set(after) == {new_leader}
    print(f"\nR5 scheduler replicas: takeover {takeover:.2f}s (lease {LEASE_SECONDS}s); {json.dumps(figures)}")
