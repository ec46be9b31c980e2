"""Queue depth and dead letters, read straight from Dramatiq's Redis broker keys.

Health and metrics must not need the broker module (nor declare actors) to look at
the queues, so this reads the key layout of ``dramatiq.brokers.redis`` directly
(see its ``dispatch.lua``), with the namespace ``dramatiq``:

* ``dramatiq:<queue>`` — list of message ids ready to be fetched;
* ``dramatiq:<queue>.msgs`` — hash id -> message of every message not yet acked
  (ready plus fetched-but-unacked);
* ``dramatiq:<queue>.DQ.msgs`` — the same for the delay queue (retries with backoff,
  ``send_with_options(delay=...)``), including delayed messages a worker holds;
* ``dramatiq:<queue>.XQ`` — sorted set of dead-lettered message ids (kept by
  Dramatiq for its ``dead_message_ttl``, 7 days by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

# The queues sessionq declares; keep in step with the broker module's queue names.
QUEUES: tuple[str, ...] = ("sessions", "maintenance", "bulk", "tasks")
# Key prefix of Dramatiq's Redis broker (its ``namespace`` argument).
DEFAULT_NAMESPACE = "dramatiq"


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """Messages of one queue by state."""

    queue: str
    ready: int
    in_flight: int
    delayed: int
    dead: int

    @property
    def backlog(self) -> int:
        """Messages waiting to run: ready plus delayed."""
        return self.ready + self.delayed

    def to_json(self) -> dict[str, int]:
        """``{"ready", "in_flight", "delayed"}`` for the health document."""
        return {"ready": self.ready, "in_flight": self.in_flight, "delayed": self.delayed}


def read_queues(
    client: Any, queues: Iterable[str] = QUEUES, *, namespace: str = DEFAULT_NAMESPACE
) -> dict[str, QueueDepth]:
    """Depth and dead letters of each queue, read in one atomic MULTI round trip.

    ``client`` is a ``redis.Redis`` on the broker's database. Raises the client's
    connection errors unchanged (the caller decides what "unreachable" means).
    """
    names = list(queues)
    pipe = client.pipeline(transaction=True)
    for queue in names:
        base = f"{namespace}:{queue}"
        pipe.llen(base)
        pipe.hlen(f"{base}.msgs")
        pipe.hlen(f"{base}.DQ.msgs")
        pipe.zcard(f"{base}.XQ")
    values = [int(v) for v in pipe.execute()]
    out: dict[str, QueueDepth] = {}
    for i, queue in enumerate(names):
        ready, unacked, delayed, dead = values[4 * i : 4 * i + 4]
        out[queue] = QueueDepth(queue, ready, max(unacked - ready, 0), delayed, dead)
    return out
