"""The single-leader lease of the scheduler replicas, and the per-sweep run lock.

Many ``sessionq scheduler`` processes may run for availability; a :class:`RedisLease`
(``SET key token NX PX ttl``, renewed every ``ttl / 3`` by a compare-and-set script)
makes exactly one of them the leader. A leader that dies stops renewing, so its key
expires and another replica takes over within one lease period. A leader that is
merely slow may believe it still leads after its key expired: the per-tick claim in
:mod:`sessionq.scheduler.runner` is what keeps a tick from firing twice in that case.

:func:`sweep_guard` is the worker side: a sweep takes its kind's lock before it
runs, so a slow sweep never overlaps itself, even across worker hosts.
:func:`connect_redis` gives the scheduler and ``sessionq cleanup`` the Redis that
holds the lease, the locks and the sweep book.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from sessionq.errors import StoreUnavailable
from sessionq.models import Settings
from sessionq.models.settings import redact_url

logger = logging.getLogger(__name__)

# Redis key holding the current leader's token.
DEFAULT_LEASE_KEY = "sessionq:scheduler:leader"
# Seconds a lease lasts unless renewed; a dead leader is replaced within this time.
DEFAULT_LEASE_TTL = 30.0
# Fraction of the TTL a holder trusts its lease for: local clocks drift, and the
# SET may have reached Redis a little before we measured.
DEFAULT_SAFETY = 0.9
# Prefix of the per-kind sweep locks (``sessionq:sweep-lock:<kind>``).
DEFAULT_SWEEP_LOCK_PREFIX = "sessionq:sweep-lock:"
# Seconds a sweep lock lasts unless renewed (it is renewed every ttl / 3 while held).
DEFAULT_SWEEP_LOCK_TTL = 300.0
# Socket timeouts (seconds) of the scheduler's Redis client: connecting, and each command.
DEFAULT_CONNECT_TIMEOUT = 5
DEFAULT_SOCKET_TIMEOUT = 10

# Extend the key's expiry only if it still holds our token.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# Delete the key only if it still holds our token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def connect_redis(settings: Settings) -> Any | None:
    """A Redis client for ``settings.redis_url`` that answered a PING, or ``None`` when
    no Redis is configured (the scheduler is then the only one).

    Raises :class:`~sessionq.errors.StoreUnavailable` naming the URL (password masked)
    when Redis does not answer.
    """
    if not settings.redis_url:
        return None
    import redis

    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=DEFAULT_SOCKET_TIMEOUT, socket_connect_timeout=DEFAULT_CONNECT_TIMEOUT
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        raise StoreUnavailable(f"cannot reach Redis at {redact_url(settings.redis_url)}: {exc}") from None
    return client


def new_token() -> str:
    """A token naming this holder: ``host:pid:random`` (readable in ``redis-cli``)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class Lease(Protocol):
    """What the scheduler needs from a leader lease."""

    ttl: float
    token: str

    def maintain(self) -> bool:
        """Acquire the lease, or renew it if held; return whether it is held now."""

    def held(self) -> bool:
        """Whether this process may act as the leader right now (no Redis round trip)."""

    def release(self) -> None:
        """Give the lease up (if held) so another replica takes over at once."""


class LocalLease:
    """Embedded mode (no Redis): the only scheduler is always the leader."""

    def __init__(self, *, ttl: float = DEFAULT_LEASE_TTL) -> None:
        self.ttl = ttl
        self.token = new_token()

    def maintain(self) -> bool:
        """Always held."""
        return True

    def held(self) -> bool:
        """Always held."""
        return True

    def release(self) -> None:
        """Nothing to give up."""


class RedisLease:
    """A leader lease on one Redis key, shared by every scheduler replica.

    Call :meth:`maintain` every ``ttl / 3`` (the runner does): it acquires the free
    key with ``SET NX PX`` or renews our own with a compare-and-set, and keeps a
    local deadline (``DEFAULT_SAFETY`` of the TTL after the call started) past which
    :meth:`held` turns false even if Redis cannot be reached to tell.
    """

    def __init__(
        self,
        client: Any,
        *,
        key: str = DEFAULT_LEASE_KEY,
        ttl: float = DEFAULT_LEASE_TTL,
        token: str | None = None,
    ) -> None:
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        self.client = client
        self.key = key
        self.ttl = ttl
        self.token = token or new_token()
        self._valid_until = 0.0
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def maintain(self) -> bool:
        """Acquire or renew; a Redis error leaves the local deadline to run out."""
        was_held = self.held()
        started = time.monotonic()
        try:
            ok = bool(self._renew(keys=[self.key], args=[self.token, self._ttl_ms]))
            if not ok:
                ok = bool(self.client.set(self.key, self.token, nx=True, px=self._ttl_ms))
        except Exception as exc:  # Redis down: we cannot renew, and cannot know more
            logger.warning("scheduler lease %s: cannot reach Redis: %s", self.key, exc)
            return self.held()
        if ok:
            self._valid_until = started + self.ttl * DEFAULT_SAFETY
            if not was_held:
                logger.info("scheduler lease %s acquired by %s (ttl %.1fs)", self.key, self.token, self.ttl)
        else:
            self._valid_until = 0.0
            if was_held:
                logger.warning("scheduler lease %s lost by %s", self.key, self.token)
        return ok

    def held(self) -> bool:
        """True until the local deadline of the last successful acquire or renew."""
        return time.monotonic() < self._valid_until

    def holder(self) -> str | None:
        """The token of the current leader, if any (for status and tests)."""
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def release(self) -> None:
        """Delete the key if it is still ours, so a follower takes over at its next check."""
        self._valid_until = 0.0
        try:
            if self._release(keys=[self.key], args=[self.token]):
                logger.info("scheduler lease %s released by %s", self.key, self.token)
        except Exception as exc:  # the key will expire on its own
            logger.warning("scheduler lease %s: release failed: %s", self.key, exc)


_local_sweeps: dict[str, threading.Lock] = {}
_local_sweeps_guard = threading.Lock()


@contextmanager
def sweep_guard(redis: Any | None, kind: str, ttl: float = DEFAULT_SWEEP_LOCK_TTL) -> Iterator[bool]:
    """Hold the run lock of sweep ``kind`` for the ``with`` block; yield whether we got it.

    ``True``: run the sweep. ``False``: another run of the same kind holds it (on any
    host): skip this one, that run already does the work. With Redis the lock is
    ``sessionq:sweep-lock:<kind>`` (``SET NX PX ttl``), renewed every ``ttl / 3`` by
    a background thread while the block runs, and deleted (only if still ours) when
    it ends, so a slow sweep keeps it however long it takes and a crashed worker's
    lock lapses after ``ttl``. With ``redis=None`` (embedded mode) it is a
    process-local lock. Usage in the ``run_sweep`` actor::

        with sweep_guard(redis_client, kind) as acquired:
            if not acquired:
                return
            run_sweep(kind, store, settings, book=SweepBook(redis_client))
    """
    if redis is None:
        with _local_sweeps_guard:
            lock = _local_sweeps.setdefault(kind, threading.Lock())
        acquired = lock.acquire(blocking=False)
        try:
            yield acquired
        finally:
            if acquired:
                lock.release()
        return
    key = DEFAULT_SWEEP_LOCK_PREFIX + kind
    token = new_token()
    ttl_ms = max(1, int(ttl * 1000))
    if not redis.set(key, token, nx=True, px=ttl_ms):
        logger.info("sweep %s is already running elsewhere (%s): skipped", kind, key)
        yield False
        return
    stop = threading.Event()
    renew = redis.register_script(_RENEW)

    def keep_alive() -> None:
        while not stop.wait(ttl / 3):
            try:
                if not renew(keys=[key], args=[token, ttl_ms]):
                    logger.warning("sweep lock %s was lost while the sweep ran", key)
                    return
            except Exception as exc:  # keep trying: the lock lasts ttl from the last renewal
                logger.warning("sweep lock %s: renewal failed: %s", key, exc)

    keeper = threading.Thread(target=keep_alive, name=f"sweep-lock-{kind}", daemon=True)
    keeper.start()
    try:
        yield True
    finally:
        stop.set()
        keeper.join()
        try:
            redis.register_script(_RELEASE)(keys=[key], args=[token])
        except Exception as exc:  # it expires after ttl anyway
            logger.warning("sweep lock %s: release failed: %s", key, exc)
