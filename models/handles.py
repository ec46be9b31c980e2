"""State handles (SEP-2567): the :class:`StateHandle` record and its Store contract.

At protocol 2026-07-28 there is no session to hang state on: a tool that starts a
conversation-long piece of state (``create_basket``) returns an opaque handle
(``bsk_...``) that later calls pass back (``add_item(basket_id, ...)``). Any replica
serves those calls, so the state lives in the store, bound to the caller:

* **Opaque, unguessable ids**: ``<prefix>_`` + 128 random bits (:func:`new_handle_id`).
* **Owner-bound**: ``owner`` is the digest of the authenticated principal that tasks
  use too (``None``: anonymous, a short-lived bearer token). A handle of another owner
  answers exactly like one that does not exist (:data:`UNKNOWN`).
* **Two lifetimes**: ``expires_at`` is the absolute deadline (``None``: none);
  ``idle_ttl`` (seconds, ``None``: none) is a deadline that every use pushes out.
  ``idle_until`` keeps that moving deadline as a column, so sweeps stay set-based; a
  use writes it only when it would move by more than a tenth of ``idle_ttl``
  (:meth:`HandleRecords.touch_handle`), so a read-mostly handle costs one read.
* **Compare-and-set data**: ``version`` grows with every change; an update names the
  version it read (:meth:`HandleRecords.update_handle`) and loses cleanly to a newer one.
* **Revocation** sets ``revoked_at``; revoked and expired handles stay readable as such
  (so a tool can say "expired" rather than "unknown") until the sweep deletes them
  (:meth:`HandleRecords.delete_dead_handles`).
"""

from __future__ import annotations

import abc
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from .errors import Conflict, NotFound, ValidationError
from .records import Record, utcnow
from .validation import (
    DEFAULT_MAX_JSON_BYTES,
    check_datetime,
    check_id,
    check_int,
    check_json_object,
    check_optional_datetime,
    check_text,
)

if TYPE_CHECKING:
    from .store import Page

#: What :meth:`HandleRecords.get_handle` says about a handle.
HandleStatus = Literal["ok", "expired", "revoked", "unknown"]
OK: HandleStatus = "ok"
EXPIRED: HandleStatus = "expired"
REVOKED: HandleStatus = "revoked"
UNKNOWN: HandleStatus = "unknown"
# Random bytes of a handle id after its prefix (128 bits).
HANDLE_ID_BYTES = 16
# Longest kind name and prefix.
MAX_KIND = 64
# Largest data a handle keeps (bytes of compact JSON).
MAX_HANDLE_DATA_BYTES = DEFAULT_MAX_JSON_BYTES
# A use writes the idle deadline only when it moves by more than this share of idle_ttl.
TOUCH_FRACTION = 10


def new_handle_id(prefix: str) -> str:
    """A fresh handle id: ``<prefix>_`` and 128 random bits, URL-safe."""
    return f"{prefix}_{secrets.token_urlsafe(HANDLE_ID_BYTES)}"


@dataclass(frozen=True, slots=True)
class StateHandle(Record):
    """One handle and its data (see the module docs for the rules)."""

    handle_id: str
    kind: str
    owner: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime | None = None
    expires_at: datetime | None = None
    idle_ttl: int | None = None
    idle_until: datetime | None = None
    revoked_at: datetime | None = None

    def validate(self) -> None:
        """Check every field; fill ``updated_at`` and ``idle_until`` from ``created_at``."""
        check_id("handle_id", self.handle_id)
        check_text("kind", self.kind, max_bytes=MAX_KIND, allow_empty=False)
        if self.owner is not None:
            check_id("owner", self.owner)
        self._set("data", check_json_object("data", self.data, max_bytes=MAX_HANDLE_DATA_BYTES, field_names=False))
        check_int("version", self.version)
        self._set("created_at", check_datetime("created_at", self.created_at))
        updated = self.created_at if self.updated_at is None else check_datetime("updated_at", self.updated_at)
        self._set("updated_at", updated)
        self._set("expires_at", check_optional_datetime("expires_at", self.expires_at))
        if self.idle_ttl is not None:
            check_int("idle_ttl", self.idle_ttl, minimum=1)
            idle = self.idle_until or self.created_at + timedelta(seconds=self.idle_ttl)
            self._set("idle_until", check_datetime("idle_until", idle))
        elif self.idle_until is not None:
            raise ValidationError("idle_until needs an idle_ttl")
        self._set("revoked_at", check_optional_datetime("revoked_at", self.revoked_at))

    def deadline(self) -> datetime | None:
        """When the handle expires unless used again: the earlier of both lifetimes."""
        times = [t for t in (self.expires_at, self.idle_until) if t is not None]
        return min(times) if times else None

    def status_at(self, now: datetime) -> HandleStatus:
        """``revoked``, ``expired`` or ``ok`` at ``now`` (ownership aside)."""
        if self.revoked_at is not None:
            return REVOKED
        deadline = self.deadline()
        return EXPIRED if deadline is not None and deadline <= now else OK


@dataclass(frozen=True, slots=True)
class HandleLookup:
    """The answer of :meth:`HandleRecords.get_handle`: a status, and the handle when ``ok``."""

    status: HandleStatus
    handle: StateHandle | None = None


class HandleRecords(abc.ABC):
    """The state-handle part of the Store contract.

    Backends implement the primitives (:meth:`_insert_handle`, :meth:`load_handle`,
    :meth:`_update_handle`, :meth:`list_handles`, :meth:`delete_dead_handles`); the
    rules are written here once.
    """

    # -- primitives (per backend) -----------------------------------------------------

    @abc.abstractmethod
    def _insert_handle(self, handle: StateHandle) -> None:
        """Insert a new handle; :class:`Conflict` if its id is taken."""

    @abc.abstractmethod
    def load_handle(self, handle_id: str) -> StateHandle:
        """The handle as stored (any owner or state), or :class:`NotFound`: one
        primary-key read (from the MongoDB primary)."""

    @abc.abstractmethod
    def _update_handle(self, handle_id: str, expected_version: int, changes: dict[str, Any]) -> bool:
        """Set ``changes`` if the stored version is still ``expected_version`` (one
        conditional single-row update); False if another change came first."""

    @abc.abstractmethod
    def list_handles(
        self, owner: str | None, kind: str | None, now: datetime, *, limit: int = 100, cursor: str | None = None
    ) -> Page[StateHandle]:
        """A keyset page (``handle_id`` order) of ``owner``'s live handles, of one
        ``kind`` or all."""

    @abc.abstractmethod
    def delete_dead_handles(self, before: datetime, *, batch_size: int = 1000, dry_run: bool = False) -> int:
        """Delete handles revoked, expired or idle since ``before`` or earlier (set-based,
        batched); return how many."""

    # -- the contract, written once -------------------------------------------------

    def create_handle(self, handle: StateHandle) -> StateHandle:
        """Store a new handle (version 0) and return it."""
        if handle.version != 0:
            raise ValidationError("a new handle starts at version 0")
        self._insert_handle(handle)
        return handle

    def get_handle(self, handle_id: str, owner: str | None, now: datetime) -> HandleLookup:
        """What ``owner`` may know of the handle at ``now``: ``ok`` with the handle,
        ``expired``, ``revoked``, or ``unknown`` (missing or another owner's: one
        answer for both, so ids cannot be probed)."""
        try:
            handle = self.load_handle(handle_id)
        except NotFound:
            return HandleLookup(UNKNOWN)
        if handle.owner != owner:
            return HandleLookup(UNKNOWN)
        status = handle.status_at(now)
        return HandleLookup(status, handle if status == OK else None)

    def touch_handle(self, handle: StateHandle, now: datetime) -> StateHandle:
        """Push out the idle deadline of a live handle just used. Writes only when it
        moves by more than ``idle_ttl / 10`` (a lost race is fine: the other writer
        moved it too); returns the handle as it now is."""
        if handle.idle_ttl is None or handle.idle_until is None:
            return handle
        target = now + timedelta(seconds=handle.idle_ttl)
        if target - handle.idle_until <= timedelta(seconds=handle.idle_ttl / TOUCH_FRACTION):
            return handle
        version = handle.version + 1
        if self._update_handle(handle.handle_id, handle.version, {"idle_until": target, "version": version}):
            return handle.replace(idle_until=target, version=version)
        return handle

    def update_handle(
        self, handle_id: str, owner: str | None, data: dict[str, Any], expected_version: int, now: datetime
    ) -> StateHandle:
        """Replace a live handle's data if it is still at ``expected_version``; the new
        handle (its use pushes out the idle deadline too). :class:`NotFound` when it is
        not ``ok`` for ``owner``; :class:`Conflict` when another change came first."""
        lookup = self.get_handle(handle_id, owner, now)
        if lookup.handle is None:
            raise NotFound(f"handle {handle_id!r} is {lookup.status}")
        current = lookup.handle
        if current.version != expected_version:
            raise Conflict(f"handle {handle_id!r} is at version {current.version}, not {expected_version}")
        changes: dict[str, Any] = {"data": data, "updated_at": max(now, current.updated_at or now),
                                   "version": expected_version + 1}
        if current.idle_ttl is not None:
            changes["idle_until"] = now + timedelta(seconds=current.idle_ttl)
        new = current.replace(**changes)  # validates the data
        if not self._update_handle(handle_id, expected_version, {k: getattr(new, k) for k in changes}):
            raise Conflict(f"handle {handle_id!r} changed since version {expected_version}")
        return new

    def revoke_handle(self, handle_id: str, owner: str | None, now: datetime) -> bool:
        """Revoke ``owner``'s handle; False when it is unknown to ``owner`` or already
        revoked. (An expired one is revoked too: it ends the same way.)"""
        for _ in range(10):
            try:
                handle = self.load_handle(handle_id)
            except NotFound:
                return False
            if handle.owner != owner or handle.revoked_at is not None:
                return False
            changes = {"revoked_at": now, "updated_at": max(now, handle.updated_at or now),
                       "version": handle.version + 1}
            if self._update_handle(handle_id, handle.version, changes):
                return True
        raise Conflict(f"handle {handle_id!r} kept changing; try again")
