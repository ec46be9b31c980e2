"""Job payloads: the ONE place where a job's JSON arguments become records.

Each job's ``parse_*`` function here is run by its actor on receipt, by the producer
before the job is enqueued (through the job table, :mod:`sessionq.workers.jobs`: a bad
payload raises :class:`~sessionq.workers.errors.InvalidPayload` at the caller and is
never sent) and by the MCP registry's :func:`~sessionq.workers.mcp.registry.apply_transport_job`;
the worker checks again because a non-Python producer may have skipped the producer's
check. Every actor takes one JSON object, except ``run_sweep`` which takes the sweep
kind (a string) — see docs/wire-contract.md.

Every instant a payload carries (when something happened: ``at``, ``created_at``,
``last_heartbeat``, ...) is refused more than a day in the future
(:data:`DEFAULT_MAX_FUTURE_SKEW`): a far-future heartbeat would keep a transport
alive forever, a far-future ``updated_at`` would win over every later save.
Deadlines (``expires_at``) may lie further ahead; a grace window ends at most
:data:`DEFAULT_MAX_GRACE_SECONDS` after that.

The save payload is exactly what ``sessionq export --format json`` writes, so an
export can be enqueued again unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sessionq.models.errors import ConfigError, ValidationError
from sessionq.models.kinds import KINDS, kind_named
from sessionq.models.records import (
    AgentState,
    ChatMessage,
    ChatSession,
    FileRecord,
    TransportSession,
    utcnow,
)
from sessionq.models.settings import STORE_ENV_PREFIX, redact_url, store_name
from sessionq.models.validation import check_choice, check_datetime, check_id

from .errors import InvalidPayload

# How far in the future a timestamp may lie (producer clock skew) before it is refused.
DEFAULT_MAX_FUTURE_SKEW = timedelta(days=1)
# Longest grace window a disconnect (or a registered transport) may ask for.
DEFAULT_MAX_GRACE_SECONDS = 7 * 24 * 3600.0
# Most messages one save or append job may carry.
DEFAULT_MAX_MESSAGES_PER_JOB = 10_000
# Export formats and the file suffix each one writes.
EXPORT_FORMATS = {"json": "json", "text": "txt", "markdown": "md"}

# Largest migration batch one job may ask for.
DEFAULT_MAX_BATCH = 10_000

_SESSION_FIELDS = {"session_id", "model", "created_at", "updated_at", "status", "metadata", "messages"}
_MESSAGE_FIELDS = {"message_id", "session_id", "role", "content", "created_at", "metadata"}


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """A parsed export job: which session, which format, and the file to write."""

    session_id: str
    format: str
    path: Path


def _object(name: str, payload: Any, allowed: set[str], required: Sequence[str]) -> Mapping[str, Any]:
    # Exact dicts (every JSON payload) skip the abstract Mapping check, and the key
    # checks run as set operations; the error messages are built only on failure.
    if type(payload) is not dict and not isinstance(payload, Mapping):
        raise InvalidPayload(f"{name} payload must be a JSON object, got {type(payload).__name__}")
    if not allowed.issuperset(payload):
        unknown = sorted(str(k) for k in payload if k not in allowed)
        raise InvalidPayload(f"{name} payload has unknown field(s): {', '.join(unknown)[:200]}")
    for key in required:
        if key not in payload:
            missing = [k for k in required if k not in payload]
            raise InvalidPayload(f"{name} payload is missing required field(s): {', '.join(missing)}")
    return payload


def _not_future(name: str, value: datetime | None, now: datetime, *, grace: bool = False) -> None:
    """The one rule for a payload's instants: at most a day ahead of ``now``; the end of
    a grace window (``grace``) at most the longest grace window beyond that."""
    limit = now + DEFAULT_MAX_FUTURE_SKEW
    if grace:
        limit += timedelta(seconds=DEFAULT_MAX_GRACE_SECONDS)
    if value is not None and value > limit:
        ahead = "a day" if not grace else f"{DEFAULT_MAX_GRACE_SECONDS / 86400:.0f} days (the longest grace) and a day"
        raise InvalidPayload(f"{name} {value.isoformat()} is more than {ahead} in the future")


def _guard(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a record's ValidationError into InvalidPayload (same message)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ValidationError as exc:
            raise InvalidPayload(str(exc)) from None

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


def _messages(session_id: str, items: Any, now: datetime) -> list[ChatMessage]:
    if not isinstance(items, list):
        raise InvalidPayload(f"messages must be a JSON array, got {type(items).__name__}")
    if len(items) > DEFAULT_MAX_MESSAGES_PER_JOB:
        raise InvalidPayload(f"{len(items)} messages in one job; the limit is {DEFAULT_MAX_MESSAGES_PER_JOB}")
    out: list[ChatMessage] = []
    for index, item in enumerate(items):
        data = dict(_object(f"messages[{index}]", item, _MESSAGE_FIELDS, ("message_id", "role", "content")))
        if data.setdefault("session_id", session_id) != session_id:
            raise InvalidPayload(f"messages[{index}] belongs to session {data['session_id']!r:.80}, not {session_id!r}")
        try:
            message = ChatMessage(**data)
        except ValidationError as exc:
            raise InvalidPayload(f"messages[{index}]: {exc}") from None
        _not_future(f"messages[{index}].created_at", message.created_at, now)
        out.append(message)
    return out


@_guard
def parse_save(payload: Any) -> tuple[ChatSession, list[ChatMessage]]:
    """``save_session``: a session in the export shape with its messages (``messages`` optional)."""
    data = dict(_object("save_session", payload, _SESSION_FIELDS, ("session_id",)))
    items = data.pop("messages", [])
    now = utcnow()
    session = ChatSession(**data)
    _not_future("created_at", session.created_at, now)
    _not_future("updated_at", session.updated_at, now)
    return session, _messages(session.session_id, items, now)


@_guard
def parse_append(payload: Any) -> tuple[str, list[ChatMessage]]:
    """``append_messages``: ``{"session_id", "messages": [...]}``."""
    data = _object("append_messages", payload, {"session_id", "messages"}, ("session_id", "messages"))
    session_id = check_id("session_id", data["session_id"])
    return session_id, _messages(session_id, data["messages"], utcnow())


@_guard
def parse_heartbeat(payload: Any) -> tuple[str, datetime]:
    """``heartbeat``: ``{"mcp_session_id", "at"}``."""
    data = _object("heartbeat", payload, {"mcp_session_id", "at"}, ("mcp_session_id", "at"))
    at = check_datetime("at", data["at"])
    _not_future("at", at, utcnow())
    return check_id("mcp_session_id", data["mcp_session_id"]), at


@_guard
def parse_disconnect(payload: Any) -> tuple[str, datetime, float | None]:
    """``mark_disconnected``: ``{"mcp_session_id", "at"}`` and optionally ``"grace_seconds"``
    (0 closes the window at once, e.g. the client ended the session)."""
    data = _object("mark_disconnected", payload, {"mcp_session_id", "at", "grace_seconds"}, ("mcp_session_id", "at"))
    at = check_datetime("at", data["at"])
    _not_future("at", at, utcnow())
    grace = data.get("grace_seconds")
    if grace is not None:
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= DEFAULT_MAX_GRACE_SECONDS:
            raise InvalidPayload(f"grace_seconds must be a number between 0 and {DEFAULT_MAX_GRACE_SECONDS:.0f}")
        grace = float(grace)
    return check_id("mcp_session_id", data["mcp_session_id"]), at, grace


@_guard
def parse_register_transport(payload: Any) -> TransportSession:
    """``register_transport``: a transport session record (``TransportSession.to_json`` shape)."""
    if not isinstance(payload, Mapping):
        raise InvalidPayload(f"register_transport payload must be a JSON object, got {type(payload).__name__}")
    record = TransportSession.from_json(payload)
    now = utcnow()
    _not_future("created_at", record.created_at, now)
    _not_future("last_heartbeat", record.last_heartbeat, now)
    _not_future("disconnected_at", record.disconnected_at, now)
    _not_future("grace_expires_at", record.grace_expires_at, now, grace=True)
    return record


@_guard
def parse_archive(payload: Any) -> tuple[str, datetime]:
    """``archive_session``: ``{"session_id", "at"}``."""
    data = _object("archive_session", payload, {"session_id", "at"}, ("session_id", "at"))
    at = check_datetime("at", data["at"])
    _not_future("at", at, utcnow())
    return check_id("session_id", data["session_id"]), at


@_guard
def parse_file(payload: Any) -> FileRecord:
    """``save_file``: a file record (``FileRecord.to_json`` shape)."""
    if not isinstance(payload, Mapping):
        raise InvalidPayload(f"save_file payload must be a JSON object, got {type(payload).__name__}")
    record = FileRecord.from_json(payload)
    _not_future("uploaded_at", record.uploaded_at, utcnow())
    return record


@_guard
def parse_agent_state(payload: Any) -> AgentState:
    """``put_agent_state``: an agent-state record (``AgentState.to_json`` shape)."""
    if not isinstance(payload, Mapping):
        raise InvalidPayload(f"put_agent_state payload must be a JSON object, got {type(payload).__name__}")
    record = AgentState.from_json(payload)
    _not_future("updated_at", record.updated_at, utcnow())
    return record


def parse_sweep(kind: Any) -> str:
    """``run_sweep``: one of ``sessionq.scheduler.sweeps.SWEEP_KINDS``."""
    from sessionq.scheduler.sweeps import SWEEP_KINDS

    try:
        return check_choice("kind", kind, frozenset(SWEEP_KINDS))
    except ValidationError as exc:
        raise InvalidPayload(f"run_sweep: {exc}") from None


# Characters an export file name keeps; every other one is percent-encoded.
_EXPORT_NAME_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
# Longest encoded id kept whole in an export file name (a file name holds 255 bytes at most).
_MAX_EXPORT_STEM = 240


def parse_tool_task(payload: Any) -> tuple[str, int]:
    """``run_tool_task``: ``{"task_id": str, "leg": int >= 0}`` (one leg of an MCP task)."""
    data = _object("run_tool_task", payload, {"task_id", "leg"}, ("task_id", "leg"))
    try:
        task_id = check_id("task_id", data["task_id"])
    except ValidationError as exc:
        raise InvalidPayload(f"run_tool_task: {exc}") from None
    leg = data["leg"]
    if isinstance(leg, bool) or not isinstance(leg, int) or not 0 <= leg < 1_000_000:
        raise InvalidPayload("run_tool_task: leg must be an integer from 0")
    return task_id, leg


def export_filename(session_id: str, fmt: str) -> str:
    """The default file name for an export: the percent-encoded id (README, "Producer API")."""
    stem = "".join(c if c in _EXPORT_NAME_SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in session_id)
    if len(stem) > _MAX_EXPORT_STEM:  # "~" never occurs in a whole encoding (it is %7E there)
        stem = f"{stem[:_MAX_EXPORT_STEM - 65]}~{hashlib.sha256(session_id.encode()).hexdigest()}"
    return f"{stem}.{EXPORT_FORMATS[fmt]}"


@_guard
def parse_export(payload: Any, export_dir: str | Path) -> ExportRequest:
    """``export_session``: ``{"session_id", "format", "path"?}``; ``path`` is relative
    to the export dir and may not leave it (``..``, absolute paths and symlinks out are refused)."""
    data = _object("export_session", payload, {"session_id", "format", "path"}, ("session_id",))
    session_id = check_id("session_id", data["session_id"])
    fmt = check_choice("format", data.get("format", "json"), frozenset(EXPORT_FORMATS))
    name = data.get("path") or export_filename(session_id, fmt)
    if not isinstance(name, str) or "\x00" in name:
        raise InvalidPayload("path must be a string without NUL characters")
    root = Path(export_dir).resolve()
    try:
        target = (root / name).resolve()
    except (OSError, RuntimeError):  # RuntimeError up to Python 3.12, OSError (ELOOP) after
        raise InvalidPayload(
            f"export path {name!r:.200} cannot be resolved (a symlink loop or an unreadable directory)"
        ) from None
    if target == root or not target.is_relative_to(root):
        raise InvalidPayload(f"export path {name!r:.200} is outside the export directory")
    return ExportRequest(session_id, fmt, target)


def save_payload(session: ChatSession, messages: Sequence[ChatMessage] = ()) -> dict[str, Any]:
    """The save payload (= the JSON export shape) of a session and its messages."""
    return {
        "session_id": session.session_id,
        "model": session.model,
        "created_at": session.created_at.isoformat(),
        "updated_at": session.last_activity.isoformat(),
        "status": session.status,
        "metadata": session.metadata,
        "messages": [message_payload(m) for m in messages],
    }


def message_payload(message: ChatMessage) -> dict[str, Any]:
    """One message of a save/append payload (``metadata`` only when not empty)."""
    out: dict[str, Any] = {
        "message_id": message.message_id,
        "role": message.role,
        "content": message.content,
        "created_at": message.created_at.isoformat(),
    }
    if message.metadata:
        out["metadata"] = message.metadata
    return out


def store_reference(target: str) -> str:
    """What a job may carry for ``target``: ``@NAME`` as is, or a URL without a password.

    Raises :class:`InvalidPayload` for a URL with a password (name it instead) or a
    malformed name. The worker resolves a name with ``Settings.resolve_store``.
    """
    if target.startswith("@"):
        try:
            store_name(target)
        except ConfigError as exc:
            raise InvalidPayload(str(exc)) from None
        return target
    if redact_url(target) != target:
        raise InvalidPayload(
            f"{redact_url(target)} includes a password; refer to the store by name instead (@NAME, with "
            f"{STORE_ENV_PREFIX}NAME set on the workers) so that the password stays off the queue"
        )
    return target


@dataclass(frozen=True, slots=True)
class MigrateBatch:
    """A parsed ``migrate_batch`` job: one planned range of one record kind."""

    source: str
    destination: str
    #: ``sessions`` (with their messages) or a kind of :mod:`sessionq.models.kinds` (``files``, ...).
    kind: str
    after: str | None
    until: str | None
    limit: int

    def to_json(self) -> dict[str, Any]:
        """The canonical payload (``kind`` only when it is not ``sessions``, so that a
        session batch stays readable by workers that predate the field)."""
        out: dict[str, Any] = {"source": self.source, "destination": self.destination}
        if self.kind != "sessions":
            out["kind"] = self.kind
        return out | {"after": self.after, "until": self.until, "limit": self.limit}


def parse_migrate_batch(payload: Any) -> MigrateBatch:
    """``migrate_batch``: ``{"source", "destination", "after", "until", "limit"}`` and
    optionally ``"kind"`` (``sessions`` by default, or ``files``, ``transports``,
    ``agent_states``; ``after``/``until`` are then that kind's cursors)."""
    if not isinstance(payload, dict):
        raise InvalidPayload(f"migrate_batch payload must be a JSON object, got {type(payload).__name__}")
    allowed = {"source", "destination", "kind", "after", "until", "limit"}
    unknown = sorted(str(k) for k in payload if k not in allowed)
    if unknown:
        raise InvalidPayload(f"migrate_batch payload has unknown field(s): {', '.join(unknown)[:200]}")
    source, destination = payload.get("source"), payload.get("destination")
    if not isinstance(source, str) or not isinstance(destination, str):
        raise InvalidPayload("migrate_batch needs source and destination store references (strings)")
    kinds = ["sessions", *(k.plural for k in KINDS)]
    kind = payload.get("kind", "sessions")
    if kind not in kinds:
        raise InvalidPayload(f"kind must be one of {', '.join(kinds)}, got {kind!r:.40}")
    after, until = payload.get("after"), payload.get("until")
    for name, value in (("after", after), ("until", until)):
        if value is not None and not isinstance(value, str):
            raise InvalidPayload(f"{name} must be a session id (or a cursor of the kind) or null")
        if value is not None and kind != "sessions":
            try:
                kind_named(kind).parse_cursor(value)
            except ValidationError as exc:
                raise InvalidPayload(f"{name}: {exc}") from None
    limit = payload.get("limit", 500)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= DEFAULT_MAX_BATCH:
        raise InvalidPayload(f"limit must be an integer between 1 and {DEFAULT_MAX_BATCH}")
    return MigrateBatch(store_reference(source), store_reference(destination), kind, after, until, limit)
