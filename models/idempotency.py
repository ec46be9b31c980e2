"""Idempotent tool calls: the :class:`IdempotencyEntry` record and its Store contract.

Without sessions and resumability a client that lost a ``tools/call`` response
retries it, possibly on another replica. An opted-in tool's call is recorded under
its key (per owner) before it runs, so the retry gets the first call's outcome
instead of running again (:mod:`sessionq.workers.mcp.idempotency`):

* **Claimed by insert-if-absent**: :meth:`IdempotencyRecords.claim_idempotency`
  inserts a ``pending`` entry; exactly one caller wins the primary key
  (``entry_id`` = sha256 of owner and key), on any replica.
* **One lifetime field**: a ``pending`` entry's ``expires_at`` is its claim's
  deadline (a claimer that died frees the key then); a ``done`` entry's is when its
  result stops being replayed. An expired entry is taken over by the next claim (one
  compare-and-set on ``version``) and deleted by the sweep.
* **Terminal outcomes only**: ``done`` holds a ``CallToolResult`` (``result``) or the
  id of the task the call created (``task_id``); a call that failed with a protocol
  error releases its claim instead (:meth:`IdempotencyRecords.release_idempotency`).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import Conflict, NotFound, ValidationError
from .records import Record, utcnow
from .validation import (
    DEFAULT_MAX_CONTENT_BYTES,
    check_choice,
    check_datetime,
    check_id,
    check_int,
    check_json_object,
    check_text,
)

IDEMPOTENCY_STATUSES = frozenset({"pending", "done"})
# Longest idempotency key a client may send.
MAX_IDEMPOTENCY_KEY = 255
# Largest result replayed (bytes of compact JSON).
MAX_RESULT_BYTES = DEFAULT_MAX_CONTENT_BYTES


def entry_id_for(owner: str | None, key: str) -> str:
    """The primary key of ``owner``'s entry for ``key`` (sha256 hex)."""
    return hashlib.sha256(f"{owner or ''}\x00{key}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class IdempotencyEntry(Record):
    """One claimed idempotency key (see the module docs)."""

    entry_id: str
    key: str
    tool: str
    args_digest: str
    expires_at: datetime
    owner: str | None = None
    status: str = "pending"
    result: dict[str, Any] | None = None
    task_id: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    version: int = 0

    def validate(self) -> None:
        """Check every field."""
        check_id("entry_id", self.entry_id)
        check_text("key", self.key, max_bytes=MAX_IDEMPOTENCY_KEY, allow_empty=False)
        check_text("tool", self.tool, max_bytes=255, allow_empty=False)
        check_id("args_digest", self.args_digest)
        self._set("expires_at", check_datetime("expires_at", self.expires_at))
        if self.owner is not None:
            check_id("owner", self.owner)
        check_choice("status", self.status, IDEMPOTENCY_STATUSES)
        if self.result is not None:
            self._set("result", check_json_object("result", self.result, max_bytes=MAX_RESULT_BYTES,
                                                  field_names=False))
        if self.task_id is not None:
            check_id("task_id", self.task_id)
        self._set("created_at", check_datetime("created_at", self.created_at))
        check_int("version", self.version)

    @property
    def done(self) -> bool:
        """True once the outcome is recorded."""
        return self.status == "done"


class IdempotencyRecords(abc.ABC):
    """The idempotency part of the Store contract: backends implement the primitives,
    the claim rules are written here once."""

    @abc.abstractmethod
    def _insert_idempotency(self, entry: IdempotencyEntry) -> None:
        """Insert a new entry; :class:`Conflict` if its ``entry_id`` is taken."""

    @abc.abstractmethod
    def load_idempotency(self, entry_id: str) -> IdempotencyEntry:
        """The entry as stored, or :class:`NotFound` (a primary read)."""

    @abc.abstractmethod
    def _replace_idempotency(self, expected_version: int, entry: IdempotencyEntry) -> bool:
        """Overwrite the stored entry with ``entry`` if its version is still
        ``expected_version``; False if another change came first."""

    @abc.abstractmethod
    def _delete_idempotency(self, entry_id: str, expected_version: int) -> bool:
        """Delete the entry if its version is still ``expected_version``."""

    @abc.abstractmethod
    def delete_expired_idempotency(self, now: datetime, *, batch_size: int = 1000, dry_run: bool = False) -> int:
        """Delete entries with ``expires_at <= now`` (set-based, batched); return how many."""

    def claim_idempotency(self, entry: IdempotencyEntry, now: datetime) -> tuple[IdempotencyEntry, bool]:
        """Claim ``entry``'s key: ``(entry, True)`` when this caller now holds it (a
        fresh insert, or a takeover of an expired entry), else ``(stored entry, False)``."""
        if entry.status != "pending" or entry.version != 0:
            raise ValidationError("a claim is a new pending entry")
        for _ in range(10):
            try:
                self._insert_idempotency(entry)
                return entry, True
            except Conflict:
                pass
            try:
                stored = self.load_idempotency(entry.entry_id)
            except NotFound:
                continue  # swept in between: insert again
            if stored.expires_at > now:
                return stored, False
            taken = entry.replace(version=stored.version + 1)
            if self._replace_idempotency(stored.version, taken):
                return taken, True
        raise Conflict(f"idempotency key {entry.key!r:.80} kept changing; try again")

    def finish_idempotency(
        self, claim: IdempotencyEntry, expires_at: datetime, *, result: dict[str, Any] | None = None,
        task_id: str | None = None,
    ) -> IdempotencyEntry | None:
        """Record the outcome of a claim this caller holds; ``None`` if it lost the
        claim meanwhile (it expired and was taken over)."""
        if (result is None) == (task_id is None):
            raise ValidationError("an idempotent call ends with a result or a task id")
        done = claim.replace(status="done", result=result, task_id=task_id, expires_at=expires_at,
                             version=claim.version + 1)
        return done if self._replace_idempotency(claim.version, done) else None

    def release_idempotency(self, claim: IdempotencyEntry) -> bool:
        """Give up a claim (the call failed with nothing to replay), so a retry runs."""
        return self._delete_idempotency(claim.entry_id, claim.version)
