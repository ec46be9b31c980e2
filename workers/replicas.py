"""Which request-state ring each MCP replica runs with, as it last reported it (Redis).

A 2026-07-28 retry may land on any replica, so every replica must open what any
other seals (``requestState``, see ``docs/mcp.md``). Each replica adopted with
:func:`sessionq.workers.mcp.adopt` records its :class:`ReplicaRing` (audience and
key fingerprints, never a key) every :data:`DEFAULT_REPLICA_BEAT` seconds with a
TTL of :data:`DEFAULT_REPLICA_TTL`; health reads the live ones and
:func:`ring_problems` says which cannot serve each other's retries.

Layout: ``sessionq:mcp:replica:<id>`` holds the JSON record (``SET EX``), and the
sorted set ``sessionq:mcp:replicas`` lists the ids scored by expiry, so reading the
live replicas never scans the keyspace. Imports neither the broker nor the MCP SDK
(health runs without it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Sorted set of replica ids, scored by the time their record expires (epoch seconds).
REPLICAS_KEY = "sessionq:mcp:replicas"
#: Prefix of one replica's record.
REPLICA_KEY_PREFIX = "sessionq:mcp:replica:"
#: Seconds between a replica's reports.
DEFAULT_REPLICA_BEAT = 30.0
#: Seconds a report stays live (three beats: a replica that stopped drops out after this).
DEFAULT_REPLICA_TTL = 90
# Replicas read at most per health check.
_MAX_REPLICAS = 1000


@dataclass(frozen=True)
class ReplicaRing:
    """One replica's request-state ring as health shows it: no key, only fingerprints."""

    replica: str
    audience: str
    fingerprints: tuple[str, ...]
    #: True when the replica runs with a per-process key (no ``SESSIONQ_REQUEST_STATE_KEYS``).
    ephemeral: bool = False
    seen: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The record (and the health document's entry)."""
        return {"replica": self.replica, "audience": self.audience, "fingerprints": list(self.fingerprints),
                "ephemeral": self.ephemeral, "seen": self.seen}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReplicaRing:
        """The inverse of :meth:`to_json`."""
        return cls(str(data["replica"]), str(data["audience"]), tuple(map(str, data["fingerprints"])),
                   bool(data.get("ephemeral")), float(data.get("seen") or 0.0))


class ReplicaBook:
    """The live replicas' rings on one Redis database (a sync ``redis.Redis``)."""

    def __init__(self, client: Any, *, ttl: int = DEFAULT_REPLICA_TTL) -> None:
        self.client = client
        self.ttl = ttl

    def record(self, ring: ReplicaRing) -> None:
        """Report ``ring`` as live for the next ``ttl`` seconds."""
        now = time.time()
        data = json.dumps({**ring.to_json(), "seen": now}, separators=(",", ":"))
        pipe = self.client.pipeline(transaction=True)
        pipe.set(REPLICA_KEY_PREFIX + ring.replica, data, ex=self.ttl)
        pipe.zadd(REPLICAS_KEY, {ring.replica: now + self.ttl})
        pipe.zremrangebyscore(REPLICAS_KEY, "-inf", now)
        pipe.expire(REPLICAS_KEY, self.ttl)
        pipe.execute()

    def remove(self, replica: str) -> None:
        """Forget a replica that stops cleanly."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(REPLICA_KEY_PREFIX + replica)
        pipe.zrem(REPLICAS_KEY, replica)
        pipe.execute()

    def live(self) -> list[ReplicaRing]:
        """Every replica whose report has not expired, in id order."""
        ids = self.client.zrangebyscore(REPLICAS_KEY, time.time(), "+inf", start=0, num=_MAX_REPLICAS)
        if not ids:
            return []
        rings = []
        for raw in self.client.mget([REPLICA_KEY_PREFIX + _text(i) for i in ids]):
            if raw is None:
                continue
            try:
                rings.append(ReplicaRing.from_json(json.loads(raw)))
            except (ValueError, KeyError, TypeError):
                continue  # a record from a newer version, or damaged: not ours to judge
        return sorted(rings, key=lambda r: r.replica)


def ring_problems(rings: Sequence[ReplicaRing]) -> list[str]:
    """Why a retry may fail between live replicas, one line per kind of disagreement:

    * same audience, but one replica seals with a key another cannot open (a skipped
      rotation phase, different keys, or per-process keys on more than one replica);
    * replicas sharing a key but sealing for different audiences (per-replica server
      names: each rejects the other's state).

    Replicas of different services (different audience, no key in common) are not compared.
    """
    problems: list[str] = []
    unopenable = sorted({(a.audience, a.fingerprints[0]) for a in rings for b in rings
                         if a.audience == b.audience and a.fingerprints and a.fingerprints[0] not in b.fingerprints})
    for audience, key in unopenable:
        holders = sum(1 for r in rings if r.audience == audience and r.fingerprints[:1] == (key,))
        ephemeral = any(r.ephemeral for r in rings if r.audience == audience and r.fingerprints[:1] == (key,))
        why = "a per-process key (set SESSIONQ_REQUEST_STATE_KEYS)" if ephemeral else f"key {key}"
        problems.append(f"MCP replicas of {audience!r}: {holders} seal requestState with {why}, which other "
                        f"replicas cannot open (retries landing there fail with -32602)")
    split = sorted({tuple(sorted((a.audience, b.audience))) for a in rings for b in rings
                    if a.audience != b.audience and set(a.fingerprints) & set(b.fingerprints)})
    for first, second in split:
        problems.append(f"MCP replicas share request-state keys but seal for different audiences "
                        f"{first!r} and {second!r} (server names differ; retries across them fail with -32602)")
    return problems


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
