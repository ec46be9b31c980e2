"""Durable MCP tasks (SEP-2663): the :class:`McpTask` record and its Store contract.

A task is the state an MCP server keeps across requests and replicas at protocol
2026-07-28: a ``tools/call`` answered with a task handle runs on some worker, and
any replica answers ``tasks/get`` from the store. The rules every backend follows:

* **Created before the handle is returned.** :meth:`TaskStore.create_task` is one
  insert; its ``task_id`` carries 256 random bits (:func:`new_task_id`).
* **Single-row compare-and-set.** Every state change reads the row, decides with the
  pure rules below, and writes the new row only if its ``version`` is still the one
  read (:meth:`TaskStore._update_task`); a lost race reads again. So a redelivered
  or duplicate job can never regress a task: a claim, a finish or a park that no
  longer matches the stored state changes nothing.
* **Owner-bound.** ``owner`` is a digest of the authenticated principal (``None`` for
  anonymous callers); :meth:`TaskStore.get_task` answers ``None`` for a missing,
  expired or foreign task alike.
* **Leases.** A claimed task has a ``worker_id`` and a ``lease_until`` the worker
  renews; an unclaimed one has a ``lease_until`` by which a worker should have
  claimed it (its dispatch deadline). A task still ``working`` past its lease is
  stale: :meth:`TaskStore.requeue_stale_tasks` hands it out again, or fails it once
  it used ``max_attempts`` attempts.

States (SEP-2663): ``working`` <-> ``input_required``, either -> ``completed`` |
``failed`` | ``cancelled`` (final). ``completed`` includes tool errors
(``isError``); ``failed`` carries a JSON-RPC error.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .errors import Conflict, NotFound, ValidationError
from .records import Record, utcnow
from .validation import (
    DEFAULT_MAX_CONTENT_BYTES,
    check_choice,
    check_datetime,
    check_id,
    check_int,
    check_json_object,
    check_optional_datetime,
    check_text,
)

if TYPE_CHECKING:
    from .store import Page

TASK_STATUSES = frozenset({"working", "input_required", "completed", "failed", "cancelled"})
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

# JSON-RPC error of a task that ran out of attempts or time (SEP-2663: -32603).
INTERNAL_ERROR = -32603
# Rounds of read + compare-and-set before a state change gives up under contention.
DEFAULT_CAS_ATTEMPTS = 50
# Attempts of one leg of a task when the tool's policy does not say.
DEFAULT_MAX_ATTEMPTS = 3
# Milliseconds a worker's claim on a task lasts; the worker renews it every third of that.
DEFAULT_LEASE_MS = 30_000
# Milliseconds a dispatched leg may wait for a worker before the sweep dispatches it again.
DEFAULT_DISPATCH_TIMEOUT_MS = 60_000
# Longest tool result or input payload kept on a task (bytes of compact JSON).
MAX_PAYLOAD_BYTES = DEFAULT_MAX_CONTENT_BYTES
# Longest tool name.
MAX_TOOL_NAME = 255
# Longest status message.
MAX_STATUS_MESSAGE = 4096


def new_task_id() -> str:
    """A fresh task id: 256 random bits, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def task_error(message: str, code: int = INTERNAL_ERROR, data: Any = None) -> dict[str, Any]:
    """A JSON-RPC error object for :attr:`McpTask.error`."""
    out: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        out["data"] = data
    return out


def _payload(name: str, value: Any) -> dict[str, Any] | None:
    # Opaque MCP payloads: any key is allowed (they are stored as text, never as fields).
    if value is None:
        return None
    return check_json_object(name, value, max_bytes=MAX_PAYLOAD_BYTES, field_names=False)


@dataclass(frozen=True, slots=True)
class McpTask(Record):
    """One durable MCP task (see the module docs for the rules).

    ``input_requests`` are the outstanding requests under their wire keys,
    ``input_keys`` maps the current leg's wire keys to the tool's own keys, and
    ``input_responses`` gathers the answers (by tool key) for the next leg, which
    runs the tool again with them and the server-side ``request_state``.
    ``version`` grows by one with every change: the compare-and-set token, and what
    "newer" means when tasks are migrated or restored.
    """

    task_id: str
    tool: str
    owner: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    status: str = "working"
    status_message: str | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    input_requests: dict[str, Any] | None = None
    input_keys: dict[str, Any] | None = None
    input_responses: dict[str, Any] | None = None
    request_state: str | None = None
    leg: int = 0
    attempt: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    time_limit_ms: int | None = None
    poll_interval_ms: int | None = None
    worker_id: str | None = None
    lease_until: datetime | None = None
    cancel_requested_at: datetime | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime | None = None
    expires_at: datetime | None = None
    version: int = 0

    def validate(self) -> None:
        """Check every field."""
        check_id("task_id", self.task_id)
        check_text("tool", self.tool, max_bytes=MAX_TOOL_NAME, allow_empty=False)
        if self.owner is not None:
            check_id("owner", self.owner)
        self._set("arguments", _payload("arguments", self.arguments) or {})
        check_choice("status", self.status, TASK_STATUSES)
        if self.status_message is not None:
            check_text("status_message", self.status_message, max_bytes=MAX_STATUS_MESSAGE)
        for name in ("result", "error", "input_requests", "input_keys", "input_responses"):
            self._set(name, _payload(name, getattr(self, name)))
        if self.request_state is not None:
            check_text("request_state", self.request_state, max_bytes=MAX_PAYLOAD_BYTES)
        check_int("leg", self.leg)
        check_int("attempt", self.attempt)
        check_int("max_attempts", self.max_attempts, minimum=1, maximum=1000)
        if self.time_limit_ms is not None:
            check_int("time_limit_ms", self.time_limit_ms, minimum=1)
        if self.poll_interval_ms is not None:
            check_int("poll_interval_ms", self.poll_interval_ms, minimum=1)
        if self.worker_id is not None:
            check_id("worker_id", self.worker_id)
        self._set("lease_until", check_optional_datetime("lease_until", self.lease_until))
        self._set("cancel_requested_at", check_optional_datetime("cancel_requested_at", self.cancel_requested_at))
        self._set("created_at", check_datetime("created_at", self.created_at))
        updated = self.created_at if self.updated_at is None else check_datetime("updated_at", self.updated_at)
        self._set("updated_at", updated)
        self._set("expires_at", check_optional_datetime("expires_at", self.expires_at))
        check_int("version", self.version)

    @property
    def final(self) -> bool:
        """True in ``completed``, ``failed`` or ``cancelled``."""
        return self.status in FINAL_STATUSES

    @property
    def last_updated(self) -> datetime:
        """``updated_at``, typed as always present (validation fills it in)."""
        assert self.updated_at is not None
        return self.updated_at

    def ttl_ms(self) -> int | None:
        """Milliseconds from creation to expiry (``None``: unlimited)."""
        if self.expires_at is None:
            return None
        return max(0, int((self.expires_at - self.created_at).total_seconds() * 1000))

    def expired_at(self, now: datetime) -> bool:
        """True once ``expires_at`` has passed."""
        return self.expires_at is not None and self.expires_at <= now

    def stale_at(self, now: datetime) -> bool:
        """True for a ``working`` task whose lease (or dispatch deadline) has passed."""
        return self.status == "working" and self.lease_until is not None and self.lease_until <= now


@dataclass(frozen=True, slots=True)
class TaskStats:
    """Task counts for health and metrics."""

    by_status: dict[str, int] = field(default_factory=dict)
    #: Seconds since the oldest ``working`` task was created (0 when none).
    oldest_working_seconds: float = 0.0
    #: ``working`` tasks whose lease or dispatch deadline has passed.
    expired_leases: int = 0

    @property
    def total(self) -> int:
        """Tasks in every status."""
        return sum(self.by_status.values())

    def to_json(self) -> dict[str, Any]:
        """The JSON shape health reports."""
        return {
            "by_status": {status: self.by_status.get(status, 0) for status in sorted(TASK_STATUSES)},
            "oldest_working_seconds": round(self.oldest_working_seconds, 3),
            "expired_leases": self.expired_leases,
        }


Decide = Callable[[McpTask], "dict[str, Any] | None"]


class TaskStore(abc.ABC):
    """The task part of the Store contract.

    Backends implement the primitives (:meth:`_insert_task`, :meth:`load_task`,
    :meth:`_update_task`, :meth:`list_tasks`, :meth:`stale_tasks`,
    :meth:`delete_expired_tasks`, :meth:`count_tasks`); every state change is
    written here once, as a decision over the row as read, applied by
    compare-and-set on its ``version``.
    """

    #: :meth:`create_task` for asyncio callers, without a thread (``await
    #: store.async_create(task)``), on backends with a native async driver for it
    #: (PostgreSQL: :mod:`sessionq.models.sql.async_tasks`); ``None`` elsewhere.
    async_create: Callable[[McpTask], Awaitable[McpTask]] | None = None

    # -- primitives (per backend) -----------------------------------------------------

    @abc.abstractmethod
    def _insert_task(self, task: McpTask) -> None:
        """Insert a new task; :class:`~sessionq.models.errors.Conflict` if its id is taken."""

    @abc.abstractmethod
    def load_task(self, task_id: str) -> McpTask:
        """The task as stored (any owner, expired or not), or :class:`NotFound`.
        Reads the primary (MongoDB) so a write is visible to the next read."""

    @abc.abstractmethod
    def _update_task(self, task_id: str, expected_version: int, changes: dict[str, Any]) -> bool:
        """Set ``changes`` (validated field values, the new ``version`` among them) on
        the task if its version is still ``expected_version``: one conditional
        single-row UPDATE. False if another change came first."""

    @abc.abstractmethod
    def list_tasks(self, *, status: str | None = None, limit: int = 100, cursor: str | None = None) -> Page[McpTask]:
        """A keyset page of tasks in ``task_id`` order, optionally of one status."""

    @abc.abstractmethod
    def stale_tasks(self, now: datetime, *, limit: int = 1000) -> list[McpTask]:
        """``working`` tasks whose ``lease_until`` is ``<= now``, oldest lease first."""

    @abc.abstractmethod
    def delete_expired_tasks(self, now: datetime, *, batch_size: int = 1000, dry_run: bool = False) -> int:
        """Delete tasks with ``expires_at <= now`` (set-based, batched); return how many."""

    @abc.abstractmethod
    def task_stats(self, now: datetime) -> TaskStats:
        """Counts by status, the oldest working task's age and the expired leases."""

    # -- the contract, written once -------------------------------------------------

    def create_task(self, task: McpTask) -> McpTask:
        """Store a new task (see :meth:`_insert_task`) and return it."""
        if task.version != 0:
            raise ValidationError("a new task starts at version 0")
        self._insert_task(task)
        return task

    def get_task(self, task_id: str, owner: str | None, now: datetime) -> McpTask | None:
        """The task for ``owner`` at ``now``: ``None`` if it is missing, expired or
        belongs to another owner (one answer for all three, so ids cannot be probed)."""
        try:
            task = self.load_task(task_id)
        except NotFound:
            return None
        if task.owner != owner or task.expired_at(now):
            return None
        return task

    def _transition(
        self, task_id: str, decide: Decide, now: datetime, known: McpTask | None = None
    ) -> tuple[McpTask | None, bool]:
        """Apply ``decide`` to the stored task by compare-and-set: ``(task after, changed)``.
        ``decide`` returns the fields to change, or ``None`` to leave the task as it is.
        ``known`` (the task as the caller last wrote or read it) is tried first without
        a read; if it is stale its compare-and-set fails and the row is read."""
        for _ in range(DEFAULT_CAS_ATTEMPTS):
            if known is not None and known.task_id == task_id:
                current, known = known, None
                changes = decide(current)
                if changes is None:
                    continue
            else:
                try:
                    current = self.load_task(task_id)
                except NotFound:
                    return None, False
                changes = decide(current)
                if changes is None:
                    return current, False
            if changes.get("status", current.status) != current.status or "status_message" in changes:
                changes.setdefault("updated_at", max(now, current.last_updated))
            new = current.replace(**changes, version=current.version + 1)
            written = {name: getattr(new, name) for name in (*changes, "version")}
            if self._update_task(task_id, current.version, written):
                return new, True
        raise Conflict(f"task {task_id!r} kept changing under {DEFAULT_CAS_ATTEMPTS} attempts; try again")

    def claim_task(
        self, task_id: str, leg: int, worker_id: str, now: datetime, lease_until: datetime
    ) -> McpTask | None:
        """Take a ``working`` task's leg ``leg`` for ``worker_id`` until ``lease_until``
        (one more attempt); ``None`` when it is not there to take (finished, parked,
        another leg, or held by a live lease: a duplicate delivery).

        A stale task whose cancellation was requested ends ``cancelled``, and one that
        used every attempt ends ``failed``, instead of running again."""

        def decide(t: McpTask) -> dict[str, Any] | None:
            if t.status != "working" or t.leg != leg:
                return None
            if t.worker_id is not None and not t.stale_at(now):
                return None
            return _claim_or_end(t, worker_id, now, lease_until)

        task, changed = self._transition(task_id, decide, now)
        return task if changed and task is not None and task.worker_id == worker_id else None

    def renew_task(
        self, task_id: str, worker_id: str, now: datetime, lease_until: datetime, *, known: McpTask | None = None
    ) -> McpTask | None:
        """Extend ``worker_id``'s lease (and a limited TTL, so a running task never
        expires under its worker); the task, or ``None`` once it is no longer held.
        ``known``: see :meth:`_transition` (here and in the other worker-side changes)."""

        def decide(t: McpTask) -> dict[str, Any] | None:
            if t.status != "working" or t.worker_id != worker_id:
                return None
            changes: dict[str, Any] = {"lease_until": max(lease_until, t.lease_until or lease_until)}
            if t.expires_at is not None and t.expires_at < changes["lease_until"]:
                changes["expires_at"] = changes["lease_until"]
            return changes

        task, changed = self._transition(task_id, decide, now, known)
        return task if changed else None

    def set_task_message(
        self, task_id: str, worker_id: str, message: str | None, now: datetime, *, known: McpTask | None = None
    ) -> bool:
        """Set the status message of a task ``worker_id`` holds."""

        def decide(t: McpTask) -> dict[str, Any] | None:
            if t.status != "working" or t.worker_id != worker_id or t.status_message == message:
                return None
            return {"status_message": message}

        return self._transition(task_id, decide, now, known)[1]

    def finish_task(
        self,
        task_id: str,
        worker_id: str,
        now: datetime,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        cancelled: bool = False,
        known: McpTask | None = None,
    ) -> bool:
        """End a task ``worker_id`` holds: ``completed`` with ``result``, ``failed``
        with ``error``, or ``cancelled``. False if the worker no longer holds it (its
        lease passed to another attempt, or it was already finished)."""
        if cancelled:
            end: dict[str, Any] = {"status": "cancelled"}
        elif result is not None:
            end = {"status": "completed", "result": result}
        elif error is not None:
            end = {"status": "failed", "error": error}
        else:
            raise ValidationError("finish_task needs a result, an error or cancelled=True")

        def decide(t: McpTask) -> dict[str, Any] | None:
            if t.status != "working" or t.worker_id != worker_id:
                return None
            return end | _released()

        return self._transition(task_id, decide, now, known)[1]

    def park_task(
        self,
        task_id: str,
        worker_id: str,
        now: datetime,
        *,
        input_requests: dict[str, Any],
        input_keys: dict[str, Any],
        request_state: str | None,
        known: McpTask | None = None,
    ) -> bool:
        """Move a task ``worker_id`` holds to ``input_required`` with the outstanding
        requests (by wire key), their tool keys and the request state the next leg
        gets back. A task whose cancellation was requested ends ``cancelled`` instead."""

        def decide(t: McpTask) -> dict[str, Any] | None:
            if t.status != "working" or t.worker_id != worker_id:
                return None
            if t.cancel_requested_at is not None:
                return {"status": "cancelled"} | _released()
            return {
                "status": "input_required",
                "input_requests": input_requests,
                "input_keys": input_keys,
                "input_responses": {},
                "request_state": request_state,
            } | _released()

        return self._transition(task_id, decide, now, known)[1]

    def checkpoint_task(
        self, task_id: str, worker_id: str, now: datetime, request_state: str, dispatch_until: datetime, *,
        known: McpTask | None = None,
    ) -> bool:
        """Close a leg that asked for nothing but returned new ``request_state``: the
        next leg runs with it (a checkpoint a retry resumes from)."""

        def decide(t: McpTask) -> dict[str, Any] | None:
            if t.status != "working" or t.worker_id != worker_id:
                return None
            return {"request_state": request_state, "input_responses": {}, "leg": t.leg + 1, "attempt": 0,
                    "worker_id": None, "lease_until": dispatch_until}

        return self._transition(task_id, decide, now, known)[1]

    def answer_task(
        self, task_id: str, owner: str | None, responses: dict[str, Any], now: datetime, dispatch_until: datetime
    ) -> tuple[McpTask | None, bool]:
        """``tasks/update``: keep the answers to outstanding requests (unknown or
        already answered keys are ignored; a partial set is fine). When none is left
        the task goes back to ``working`` on its next leg, to be dispatched by
        ``dispatch_until``. Returns ``(task, resumed)``; the task is ``None`` when it is
        missing, expired or foreign."""
        if self.get_task(task_id, owner, now) is None:
            return None, False

        def decide(t: McpTask) -> dict[str, Any] | None:
            if t.status != "input_required" or not t.input_requests:
                return None
            keys = t.input_keys or {}
            accepted = {k: v for k, v in responses.items() if k in t.input_requests and k in keys}
            if not accepted:
                return None
            outstanding = {k: v for k, v in t.input_requests.items() if k not in accepted}
            gathered = dict(t.input_responses or {}) | {keys[k]: v for k, v in accepted.items()}
            if outstanding:
                return {"input_requests": outstanding, "input_responses": gathered}
            return {"status": "working", "input_requests": None, "input_keys": None, "input_responses": gathered,
                    "leg": t.leg + 1, "attempt": 0, "status_message": None, "lease_until": dispatch_until}

        task, changed = self._transition(task_id, decide, now)
        return task, changed and task is not None and task.status == "working"

    def request_cancel(self, task_id: str, owner: str | None, now: datetime) -> tuple[McpTask | None, bool]:
        """``tasks/cancel``: a queued or ``input_required`` task ends ``cancelled`` now;
        a running one is marked (its worker cancels it and ends it ``cancelled``, or it
        may still complete); a final one is left alone. Returns ``(task, running)``:
        ``running`` says the owning worker must be told. ``None`` for a missing,
        expired or foreign task."""
        if self.get_task(task_id, owner, now) is None:
            return None, False

        def decide(t: McpTask) -> dict[str, Any] | None:
            if t.final:
                return None
            if t.status == "input_required" or t.worker_id is None or t.stale_at(now):
                return {"status": "cancelled"} | _released()
            if t.cancel_requested_at is None:
                return {"cancel_requested_at": now}
            return None

        task, _ = self._transition(task_id, decide, now)
        return task, task is not None and task.status == "working" and task.cancel_requested_at is not None

    def requeue_stale_tasks(self, now: datetime, dispatch_until: datetime, *, limit: int = 1000) -> list[McpTask]:
        """Hand out again every stale task (see :meth:`stale_tasks`): released for a new
        attempt with a new dispatch deadline and returned, to be dispatched; one that
        used every attempt ends ``failed`` and one whose cancellation was requested
        ends ``cancelled`` instead. Each is one compare-and-set, so two sweeps racing
        hand a task out once."""
        out: list[McpTask] = []

        def decide(t: McpTask) -> dict[str, Any] | None:
            if not t.stale_at(now):
                return None
            if t.cancel_requested_at is not None or (t.worker_id is not None and t.attempt >= t.max_attempts):
                return _claim_or_end(t, None, now, dispatch_until)
            return {"worker_id": None, "lease_until": dispatch_until}

        for stale in self.stale_tasks(now, limit=limit):
            task, changed = self._transition(stale.task_id, decide, now)
            if changed and task is not None and task.status == "working":
                out.append(task)
        return out


def _released() -> dict[str, Any]:
    return {"worker_id": None, "lease_until": None}


def _claim_or_end(t: McpTask, worker_id: str | None, now: datetime, lease_until: datetime) -> dict[str, Any]:
    """The change for taking a stale or unclaimed task: cancelled if that was asked,
    failed once every attempt is used, else one more attempt for ``worker_id``."""
    if t.cancel_requested_at is not None:
        return {"status": "cancelled"} | _released()
    if t.attempt >= t.max_attempts:
        message = f"task failed: its worker was lost on each of {t.attempt} attempt(s)"
        return {"status": "failed", "error": task_error(message)} | _released()
    assert worker_id is not None
    return {"worker_id": worker_id, "lease_until": lease_until, "attempt": t.attempt + 1}


def lease_deadline(now: datetime, lease_ms: int) -> datetime:
    """``now`` plus a lease of ``lease_ms`` milliseconds."""
    return now + timedelta(milliseconds=lease_ms)
