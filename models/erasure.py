"""Erasure records: the receipt of a ``forget`` and the tombstones it leaves.

The erasure itself (store, Redis, outbox, export files) is
:mod:`sessionq.workers.forget`; this module holds the two records the store keeps
for it and :class:`ErasureStore`, the part of the Store contract that keeps them:

* A **tombstone** says "session X was forgotten at T; refuse writes for it until
  ``expires_at``". Saves and appends that arrive later (a redelivered job, a producer's
  outbox forwarding after the erasure) are dead-lettered with reason ``forgotten``
  instead of re-creating the session. The group committer asks for every batch's ids
  in one query (:meth:`ErasureStore.forgotten_among`); the ``tombstones`` sweep
  deletes expired ones.
* A **receipt** records one erasure: when, what was asked (the selector: a session
  id as given, or a metadata key with the SHA-256 of its value, never the value) and,
  per place, how many records were found and removed. It holds no content.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sessionq.errors import SessionForgotten

from .errors import ValidationError
from .records import Record, utcnow
from .validation import check_datetime, check_id, check_json_object

# Rows a tombstone lookup or insert covers per statement.
DEFAULT_TOMBSTONE_CHUNK = 500
#: Every place a forget looks, in the order a receipt lists them.
PLACES = (
    "sessions", "messages", "files", "transports", "agent_states", "tasks", "store_events",
    "redis_event_streams", "queued_jobs", "dead_letters", "outbox", "export_files",
)


def hash_selector_value(key: str, value: str) -> str:
    """The SHA-256 (hex) a receipt keeps instead of a metadata value: of ``key=value``.

    Anyone holding the value can check a receipt against it; the receipt alone does not
    reveal it (though a short, guessable value such as a small integer can be found by
    trying them all: this is pseudonymisation, not anonymisation).
    """
    return hashlib.sha256(f"{key}={value}".encode()).hexdigest()


@dataclass(frozen=True)
class Selector:
    """What to forget: one ``session_id``, or the sessions whose ``metadata[key] == value``."""

    session_id: str | None = None
    key: str | None = None
    value: str | None = None

    def __post_init__(self) -> None:
        if (self.session_id is None) == (self.key is None):
            raise ValidationError("forget needs exactly one of a session id or a metadata KEY=VALUE")
        if self.session_id is not None:
            check_id("session_id", self.session_id)
        elif not self.key or not isinstance(self.value, str):
            raise ValidationError("a metadata selector needs a non-empty KEY and a VALUE (KEY=VALUE)")

    @classmethod
    def parse_metadata(cls, text: str) -> Selector:
        """``KEY=VALUE`` as a selector (the value may contain ``=``)."""
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ValidationError(f"--metadata takes KEY=VALUE, got {text!r:.80}")
        return cls(key=key, value=value)

    def to_receipt(self) -> dict[str, Any]:
        """The selector as a receipt keeps it: the session id, or the key and the
        SHA-256 of ``key=value`` (:func:`hash_selector_value`), never the value."""
        if self.session_id is not None:
            return {"session_id": self.session_id}
        assert self.key is not None and self.value is not None
        return {"metadata_key": self.key, "metadata_value_sha256": hash_selector_value(self.key, self.value)}

    def to_payload(self) -> dict[str, Any]:
        """The selector in a ``forget`` job's argument."""
        if self.session_id is not None:
            return {"session_id": self.session_id}
        return {"metadata": {"key": self.key, "value": self.value}}


@dataclass(frozen=True, slots=True)
class Tombstone(Record):
    """A forgotten session id and until when writes for it are refused."""

    session_id: str
    forgotten_at: datetime
    expires_at: datetime

    def validate(self) -> None:
        """Check every field."""
        check_id("session_id", self.session_id)
        self._set("forgotten_at", check_datetime("forgotten_at", self.forgotten_at))
        self._set("expires_at", check_datetime("expires_at", self.expires_at))


@dataclass(frozen=True, slots=True)
class ForgetReceipt(Record):
    """What one erasure found and removed, per place (see the module docs)."""

    receipt_id: str
    #: ``{"session_id": id}`` or ``{"metadata_key": key, "metadata_value_sha256": hex}``.
    selector: dict[str, Any]
    #: Place (one of :data:`PLACES`) -> ``{"found": n, "removed": n}``.
    places: dict[str, Any] = field(default_factory=dict)
    #: Sessions tombstoned by this erasure (writes for them are refused until ``tombstone_until``).
    tombstones: int = 0
    tombstone_until: datetime | None = None
    created_at: datetime = field(default_factory=utcnow)
    #: When the last run under this receipt finished (a re-run adds its counts).
    finished_at: datetime | None = None

    def validate(self) -> None:
        """Check every field; the places must be known and their counts non-negative integers."""
        check_id("receipt_id", self.receipt_id)
        self._set("selector", check_json_object("selector", self.selector))
        places = check_json_object("places", self.places)
        for place, counts in places.items():
            if place not in PLACES:
                raise ValidationError(f"unknown erasure place {place!r:.40}")
            if not (isinstance(counts, Mapping) and set(counts) == {"found", "removed"}
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values())):
                raise ValidationError(f"erasure place {place}: counts must be {{found, removed}} non-negative ints")
        self._set("places", {p: dict(places[p]) for p in PLACES if p in places})
        self._set("created_at", check_datetime("created_at", self.created_at))
        if self.tombstone_until is not None:
            self._set("tombstone_until", check_datetime("tombstone_until", self.tombstone_until))
        if self.finished_at is not None:
            self._set("finished_at", check_datetime("finished_at", self.finished_at))

    @property
    def removed(self) -> int:
        """Records removed across every place."""
        return sum(int(c["removed"]) for c in self.places.values())

    def merged(self, later: ForgetReceipt) -> ForgetReceipt:
        """This receipt with the counts of a later run under the same id added (a
        redelivered ``forget`` job); the first run's time is kept."""
        places = {p: {k: int(self.places.get(p, {}).get(k, 0)) + int(later.places.get(p, {}).get(k, 0))
                      for k in ("found", "removed")}
                  for p in PLACES if p in self.places or p in later.places}
        until = max(filter(None, (self.tombstone_until, later.tombstone_until)), default=None)
        return self.replace(places=places, tombstones=max(self.tombstones, later.tombstones),
                            tombstone_until=until, finished_at=later.finished_at)


def refuse_if_forgotten(store: ErasureStore, session_id: str) -> None:
    """Raise :class:`~sessionq.errors.SessionForgotten` if ``session_id`` has a live
    tombstone. Jobs that found no session (append, archive, export) ask this before they
    retry: an erased session is refused at once instead of being waited for."""
    if store.forgotten_among([session_id], utcnow()):
        raise SessionForgotten(f"session {session_id!r} was erased by forget; its tombstone refuses this job")


class ErasureStore(abc.ABC):
    """Tombstones and receipts: the Store's part of ``forget`` (every backend)."""

    @abc.abstractmethod
    def put_tombstones(self, session_ids: Sequence[str], forgotten_at: datetime, expires_at: datetime) -> int:
        """Tombstone these sessions until ``expires_at`` (an existing tombstone is moved
        to the later expiry, never an earlier one); return how many ids were given."""

    @abc.abstractmethod
    def forgotten_among(self, session_ids: Sequence[str], now: datetime) -> set[str]:
        """The ids among ``session_ids`` with a tombstone live at ``now``: one query per
        :data:`DEFAULT_TOMBSTONE_CHUNK` ids (the save path asks once per batch)."""

    @abc.abstractmethod
    def load_tombstone(self, session_id: str) -> Tombstone:
        """The tombstone (live or expired), or :class:`~sessionq.models.errors.NotFound`."""

    @abc.abstractmethod
    def delete_expired_tombstones(self, now: datetime, *, batch_size: int = 1000, dry_run: bool = False) -> int:
        """Delete tombstones with ``expires_at <= now``; return how many."""

    @abc.abstractmethod
    def save_receipt(self, receipt: ForgetReceipt) -> None:
        """Insert a receipt, or replace the one with its id."""

    @abc.abstractmethod
    def load_receipt(self, receipt_id: str) -> ForgetReceipt:
        """The receipt, or :class:`~sessionq.models.errors.NotFound`."""
