"""The dead-letter queues on Redis: list, requeue, purge (``sessionq dlq``).

Dramatiq keeps each queue's dead letters in ``<ns>:<queue>.XQ`` (a sorted set of
Redis message ids, scored by when they died) and ``<ns>:<queue>.XQ.msgs`` (id ->
message JSON). :class:`~sessionq.workers.broker.DeadLetterReasons` adds
``options.dead_letter_reason`` to each. Dead letters expire after Dramatiq's
dead-message TTL (7 days).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sessionq.errors import ConfigError
from sessionq.models import Settings
from sessionq.models.settings import is_redis_url

from .broker import DEFAULT_NAMESPACE, QUEUES

# Dead-letter messages read per round trip when listing.
DEFAULT_READ_BATCH = 500
# Options a requeued message drops, so it starts afresh.
_RESET_OPTIONS = ("retries", "traceback", "requeue_timestamp", "dead_letter_reason", "dead_lettered_at", "eta")


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered job."""

    id: str
    queue: str
    actor_name: str
    message_id: str
    dead_lettered_at: datetime
    reason: str
    args: list[Any]
    #: Deliveries that failed (Dramatiq's ``retries`` option counts each failure; at least 1).
    attempts: int = 1
    #: When it was first enqueued (Dramatiq's ``message_timestamp``), if recorded.
    enqueued_at: datetime | None = None
    kwargs: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-compatible dict (for ``sessionq dlq list --json``)."""
        return {
            "id": self.id,
            "queue": self.queue,
            "actor": self.actor_name,
            "message_id": self.message_id,
            "dead_lettered_at": self.dead_lettered_at.isoformat(),
            "reason": self.reason,
            "args": self.args,
        }


class DeadLetters:
    """The dead letters of the sessionq queues on one Redis."""

    def __init__(self, client: Any, *, namespace: str = DEFAULT_NAMESPACE, queues: Iterable[str] = QUEUES) -> None:
        self.client = client
        self.namespace = namespace
        self.queues = tuple(queues)

    @classmethod
    def from_settings(cls, settings: Settings) -> DeadLetters:
        """The dead letters on the Redis broker of ``settings`` (no connection is made yet).

        Raises :class:`~sessionq.errors.ConfigError` when the broker is not Redis.
        """
        import redis

        url = settings.queue_url
        if url is None or not is_redis_url(url):
            raise ConfigError("dead letters live in Redis: set REDIS_URL (embedded mode logs them instead)")
        return cls(redis.Redis.from_url(url, socket_connect_timeout=2))

    def _keys(self, queue: str) -> tuple[str, str]:
        xq = f"{self.namespace}:{queue}.XQ"
        return xq, f"{xq}.msgs"

    def __iter__(self) -> Iterator[DeadLetter]:
        """Every dead letter, oldest first per queue (messages read in batches of
        ``DEFAULT_READ_BATCH``, one round trip each)."""
        for queue in self.queues:
            xq, msgs = self._keys(queue)
            entries = [(raw_id.decode() if isinstance(raw_id, bytes) else raw_id, score)
                       for raw_id, score in self.client.zrange(xq, 0, -1, withscores=True)]
            for start in range(0, len(entries), DEFAULT_READ_BATCH):
                batch = entries[start : start + DEFAULT_READ_BATCH]
                raws = self.client.hmget(msgs, [rid for rid, _ in batch])
                yield from self._letters(queue, batch, raws)

    def _letters(self, queue: str, batch: list[tuple[str, float]], raws: list[Any]) -> Iterator[DeadLetter]:
        for (rid, score), raw in zip(batch, raws, strict=True):
            if raw is None:
                continue
            data = json.loads(raw)
            options = data.get("options", {})
            yield DeadLetter(
                id=rid,
                queue=queue,
                actor_name=str(data.get("actor_name", "?")),
                message_id=str(data.get("message_id", "?")),
                dead_lettered_at=datetime.fromtimestamp(score / 1000, UTC),
                reason=str(
                    options.get("dead_letter_reason") or "unknown (dead-lettered without a recorded reason)"
                ),
                args=list(data.get("args", [])),
                attempts=max(int(options.get("retries", 0) or 0), 1),
                enqueued_at=(datetime.fromtimestamp(data["message_timestamp"] / 1000, UTC)
                             if isinstance(data.get("message_timestamp"), int | float) else None),
                kwargs=data.get("kwargs") or None,
            )

    def count(self) -> int:
        """Dead letters across the queues."""
        return sum(int(self.client.zcard(self._keys(q)[0])) for q in self.queues)

    def requeue(self, ids: Iterable[str] | None = None) -> int:
        """Put dead letters (these Redis or message ids; ``None`` = all) back on their
        queues with a fresh retry count; return how many."""
        wanted = None if ids is None else set(ids)
        moved = 0
        for letter in list(self):
            if wanted is not None and letter.id not in wanted and letter.message_id not in wanted:
                continue
            xq, msgs = self._keys(letter.queue)
            raw = self.client.hget(msgs, letter.id)
            if raw is None:
                continue
            data = json.loads(raw)
            options = {k: v for k, v in data.get("options", {}).items() if k not in _RESET_OPTIONS}
            data["options"] = options
            data["queue_name"] = letter.queue
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(f"{self.namespace}:{letter.queue}.msgs", letter.id, json.dumps(data, separators=(",", ":")))
            pipe.rpush(f"{self.namespace}:{letter.queue}", letter.id)
            pipe.zrem(xq, letter.id)
            pipe.hdel(msgs, letter.id)
            pipe.execute()
            moved += 1
        return moved

    def remove(self, match: Callable[[Any], bool]) -> int:
        """Delete the dead letters whose decoded message ``match`` accepts (``forget``);
        return how many. Reads each queue's dead letters with ``HSCAN`` (memory stays flat)."""
        removed = 0
        for queue in self.queues:
            xq, msgs = self._keys(queue)
            cursor = 0
            while True:
                cursor, chunk = self.client.hscan(msgs, cursor, count=500)
                hits = []
                for rid, raw in chunk.items():
                    try:
                        data = json.loads(raw)
                    except ValueError:
                        continue
                    if match(data):
                        hits.append(rid)
                if hits:
                    pipe = self.client.pipeline(transaction=True)
                    pipe.zrem(xq, *hits)
                    pipe.hdel(msgs, *hits)
                    removed += int(pipe.execute()[1])
                if int(cursor) == 0:
                    break
        return removed

    def purge(self) -> int:
        """Delete every dead letter; return how many there were."""
        count = self.count()
        for queue in self.queues:
            self.client.delete(*self._keys(queue))
        return count
