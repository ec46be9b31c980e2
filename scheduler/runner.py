"""The scheduler: APScheduler jobs that enqueue ``run_sweep(kind)``, exactly once per tick.

Every replica runs the same jobs; only the lease holder (:mod:`sessionq.scheduler.lease`)
fires. Ticks are aligned to wall-clock multiples of each sweep's interval
(``tick = floor(unix_time / interval)``), so every replica agrees on what "tick
n" means, and each tick is claimed once with ``SET sessionq:tick:<kind>:<n> NX``
before anything is enqueued. The lease picks who fires; the claim makes sure that
even two processes that both believe they lead (a paused leader waking up after
its lease passed to another) cannot fire the same tick twice.

Takeover loses no tick: a new leader fires the latest tick of every sweep at once
if nobody claimed it, and each firing also claims the unclaimed ticks just before
it (up to ``catch_up`` seconds back) and covers them with the same message, the
way APScheduler coalesces misfires. A tick is at most once by construction; it is
lost only if a process dies between claiming and enqueueing (a window of one
Redis round trip), and then the next tick does the work: sweeps are idempotent.

The jobs never do the work: ``send(kind)`` enqueues it (see :func:`dramatiq_send`)
and returns the message id, which every tick logs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from sessionq.models import Settings

from .lease import Lease, LocalLease, RedisLease
from .sweeps import schedule_for

logger = logging.getLogger(__name__)

# Prefix of the per-tick claim keys (``sessionq:tick:<kind>:<tick>``).
DEFAULT_TICK_PREFIX = "sessionq:tick:"
# Seconds APScheduler still runs a job that is late (capped by the job's interval).
DEFAULT_MISFIRE_GRACE = 60
# Most earlier ticks one firing will claim and coalesce.
DEFAULT_MAX_CATCH_UP_TICKS = 100
# Queue and actor the sweeps are enqueued to.
DEFAULT_QUEUE = "maintenance"
DEFAULT_ACTOR = "run_sweep"

Send = Callable[[str], str]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# KEYS: the tick's key, then the earlier ticks' keys newest first. ARGV: the value,
# the earlier ticks' value, the expiry. Returns how many earlier ticks it claimed,
# or -1 if the tick itself was claimed already.
_CLAIM = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then
  return -1
end
local n = 0
for i = 2, #KEYS do
  if not redis.call('SET', KEYS[i], ARGV[2], 'NX', 'EX', ARGV[3]) then
    break
  end
  n = n + 1
end
return n
"""


class TickLedger(Protocol):
    """Where ticks are claimed, so that each one fires once."""

    def claim(self, kind: str, tick: int, back: int, owner: str, ttl: int) -> int | None:
        """Claim ``tick`` and the unclaimed ticks right before it (at most ``back``,
        stopping at the first claimed one); return the first tick covered, or
        ``None`` if ``tick`` was claimed already."""

    def sent(self, kind: str, tick: int, owner: str, message_id: str) -> None:
        """Note the message a claimed tick enqueued."""

    def unclaim(self, kind: str, ticks: range) -> None:
        """Give back claims whose message could not be enqueued."""


class RedisTicks:
    """Tick claims in Redis, shared by every replica (``sessionq:tick:<kind>:<tick>``)."""

    def __init__(self, client: Any, *, prefix: str = DEFAULT_TICK_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._claim = client.register_script(_CLAIM)

    def key(self, kind: str, tick: int) -> str:
        """The claim key of one tick."""
        return f"{self.prefix}{kind}:{tick}"

    def claim(self, kind: str, tick: int, back: int, owner: str, ttl: int) -> int | None:
        """See :meth:`TickLedger.claim` (one atomic script)."""
        keys = [self.key(kind, t) for t in range(tick, tick - back - 1, -1)]
        claimed = int(self._claim(keys=keys, args=[f"claimed:{owner}", f"coalesced:{tick}:{owner}", ttl]))
        return None if claimed < 0 else tick - claimed

    def sent(self, kind: str, tick: int, owner: str, message_id: str) -> None:
        """See :meth:`TickLedger.sent`."""
        self.client.set(self.key(kind, tick), f"sent:{owner}:{message_id}", xx=True, keepttl=True)

    def unclaim(self, kind: str, ticks: range) -> None:
        """See :meth:`TickLedger.unclaim`."""
        self.client.delete(*[self.key(kind, t) for t in ticks])


class MemoryTicks:
    """Tick claims of the one embedded scheduler (kept for the catch-up window only)."""

    def __init__(self) -> None:
        self._claims: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()

    def claim(self, kind: str, tick: int, back: int, owner: str, ttl: int) -> int | None:
        """See :meth:`TickLedger.claim`."""
        now = time.monotonic()
        with self._lock:
            self._claims = {k: until for k, until in self._claims.items() if until > now}
            if (kind, tick) in self._claims:
                return None
            first = tick
            while first - 1 >= tick - back and (kind, first - 1) not in self._claims:
                first -= 1
            for t in range(first, tick + 1):
                self._claims[(kind, t)] = now + ttl
            return first

    def sent(self, kind: str, tick: int, owner: str, message_id: str) -> None:
        """Nothing to note in memory."""

    def unclaim(self, kind: str, ticks: range) -> None:
        """See :meth:`TickLedger.unclaim`."""
        with self._lock:
            for t in ticks:
                self._claims.pop((kind, t), None)


def dramatiq_send(
    broker: Any | None = None, *, queue_name: str = DEFAULT_QUEUE, actor_name: str = DEFAULT_ACTOR
) -> Send:
    """A ``send(kind)`` that enqueues ``run_sweep(kind)`` by name and returns the message id.

    It builds the Dramatiq message itself, so the scheduler never imports actor
    modules; ``broker`` defaults to the global one (``dramatiq.get_broker()``).
    """
    import dramatiq

    def send(kind: str) -> str:
        target = broker if broker is not None else dramatiq.get_broker()
        message: Any = dramatiq.Message(
            queue_name=queue_name, actor_name=actor_name, args=(kind,), kwargs={}, options={}
        )
        return str(target.enqueue(message).message_id)

    return send


class SweepScheduler:
    """Fires each sweep of ``schedule`` (``{kind: interval_seconds}``) once per tick.

    ``redis`` (a redis-py client) shares the lease and the tick claims between
    replicas; without it the scheduler is the only one (embedded mode). ``send``
    enqueues one sweep and returns its message id.
    """

    def __init__(
        self,
        send: Send,
        *,
        settings: Settings | None = None,
        schedule: dict[str, int] | None = None,
        redis: Any | None = None,
        lease: Lease | None = None,
        ledger: TickLedger | None = None,
        catch_up: float | None = None,
    ) -> None:
        settings = settings or Settings()
        self.send = send
        self.schedule = dict(schedule if schedule is not None else schedule_for(settings))
        if lease is None:
            ttl = settings.scheduler_lease_seconds
            lease = RedisLease(redis, ttl=ttl) if redis is not None else LocalLease(ttl=ttl)
        self.lease = lease
        self.ledger: TickLedger = ledger or (RedisTicks(redis) if redis is not None else MemoryTicks())
        # A takeover can leave up to one lease period (plus a renewal period) unfired.
        self.catch_up = catch_up if catch_up is not None else 2 * lease.ttl
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max(1, len(self.schedule)))},
            timezone=UTC,
        )
        for kind, interval in self.schedule.items():
            self._scheduler.add_job(
                self.fire,
                IntervalTrigger(seconds=interval, start_date=_EPOCH, timezone=UTC),
                args=[kind],
                id=f"sweep-{kind}",
                name=f"enqueue run_sweep({kind!r}) every {interval}s",
                coalesce=True,
                max_instances=1,
                misfire_grace_time=max(1, min(interval, DEFAULT_MISFIRE_GRACE)),
            )

    def fire(self, kind: str, now: float | None = None) -> str | None:
        """Enqueue ``kind`` for the latest tick if this process leads and nobody
        claimed that tick; return the message id, or ``None`` if nothing was sent."""
        if not self.lease.held():
            logger.debug("tick %s: not the leader, skipped", kind)
            return None
        interval = self.schedule[kind]
        now = time.time() if now is None else now
        tick = int(now // interval)
        back = min(DEFAULT_MAX_CATCH_UP_TICKS, math.ceil(self.catch_up / interval))
        ttl = max(2, math.ceil(interval * (back + 2)))
        try:
            first = self.ledger.claim(kind, tick, back, self.lease.token, ttl)
        except Exception as exc:  # Redis down: the next firing's catch-up covers this tick
            logger.warning("tick %s #%d: cannot claim it: %s", kind, tick, exc)
            return None
        if first is None:
            logger.debug("tick %s #%d: already fired", kind, tick)
            return None
        try:
            message_id = self.send(kind)
        except Exception:
            logger.exception("tick %s #%d: enqueueing run_sweep(%r) failed; a later tick retries", kind, tick, kind)
            try:
                self.ledger.unclaim(kind, range(first, tick + 1))
            except Exception as exc:  # the claims expire; those ticks are then skipped
                logger.warning("tick %s #%d: cannot give its claim back: %s", kind, tick, exc)
            return None
        try:
            self.ledger.sent(kind, tick, self.lease.token, message_id)
        except Exception as exc:  # the claim stands either way; only the note is missing
            logger.warning("tick %s #%d: cannot note message %s: %s", kind, tick, message_id, exc)
        if first < tick:
            logger.info(
                "tick %s #%d: enqueued run_sweep(%r) as message %s, covering %d missed tick(s) #%d..#%d",
                kind, tick, kind, message_id, tick - first, first, tick - 1,
            )
        else:
            logger.info("tick %s #%d: enqueued run_sweep(%r) as message %s", kind, tick, kind, message_id)
        return message_id

    def _keep_lease(self) -> None:
        while not self._stop.wait(self.lease.ttl / 3):
            self._maintain()

    def _maintain(self) -> None:
        was_leader = self.lease.held()
        if self.lease.maintain() and not was_leader:
            # A new leader fires at once the latest tick of every sweep that nobody
            # fired (the old leader may have died just before it).
            for kind in self.schedule:
                self._scheduler.add_job(self.fire, args=[kind], id=f"catch-up-{kind}", replace_existing=True)

    def start(self) -> None:
        """Start firing in background threads (returns at once)."""
        logger.info(
            "scheduler %s starting: %s (lease ttl %.1fs)",
            self.lease.token,
            ", ".join(f"{k} every {v}s" for k, v in self.schedule.items()) or "nothing",
            self.lease.ttl,
        )
        self._stop.clear()
        self._scheduler.start()
        self._maintain()
        self._keeper = threading.Thread(target=self._keep_lease, name="scheduler-lease", daemon=True)
        self._keeper.start()

    def stop(self) -> None:
        """Stop firing, wait for a running tick, and release the lease."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join()
            self._keeper = None
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        self.lease.release()
        logger.info("scheduler %s stopped", self.lease.token)

    def run(self, stop: threading.Event) -> None:
        """Fire until ``stop`` is set, then stop cleanly (the long-running CLI mode)."""
        self.start()
        try:
            # Short waits keep the main thread responsive to signal handlers.
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()
