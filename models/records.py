"""The records every store reads and writes: plain, validated, frozen dataclasses.

No ORM or BSON type leaks past a backend module; a backend turns rows into these
records and back. Constructing a record validates it, so a record that exists is
valid; :meth:`to_json` / :meth:`from_json` round-trip through JSON-compatible dicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from .errors import Conflict, ValidationError
from .validation import (
    check_choice,
    check_datetime,
    check_id,
    check_int,
    check_json_object,
    check_optional_datetime,
    check_optional_json_object,
    check_text,
)

SESSION_STATUSES = frozenset({"active", "archived", "expired"})
MESSAGE_ROLES = frozenset({"user", "assistant", "system", "tool"})
TRANSPORT_STATUSES = frozenset({"active", "disconnected", "recovered", "expired"})

# How long a disconnected transport session may be recovered.
DEFAULT_GRACE_PERIOD = timedelta(minutes=10)
# How many times one transport session may be recovered.
DEFAULT_MAX_RECOVERY_ATTEMPTS = 3
# Longest model name.
MAX_MODEL_LENGTH = 255

R = TypeVar("R", bound="Record")


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class Record:
    """Behaviour shared by all records: validation on construction and JSON round trips."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check and normalise every field; raise :class:`ValidationError` on the first bad one."""
        raise NotImplementedError

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def to_json(self) -> dict[str, Any]:
        """A JSON-compatible dict (datetimes as ISO 8601 strings in UTC)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.isoformat() if isinstance(value, datetime) else value
        return out

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any]) -> R:
        """Build a record from :meth:`to_json` output (or an equivalent payload).

        Unknown fields are rejected so that a typo never silently drops data.
        """
        if not isinstance(data, Mapping):
            raise ValidationError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise ValidationError(f"{cls.__name__} has unknown field(s): {', '.join(unknown)[:200]}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValidationError(f"{cls.__name__}: {exc}") from None

    def replace(self: R, **changes: Any) -> R:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True, slots=True)
class ChatSession(Record):
    """A conversation: its model, lifecycle status and free-form metadata.

    ``updated_at`` is the last activity; a store never moves it backwards, so a save
    that arrives late with an older ``updated_at`` does not overwrite newer state.
    ``message_count`` is maintained by the store.
    """

    session_id: str
    model: str = ""
    status: str = "active"
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    message_count: int = 0

    def validate(self) -> None:
        """Check every field (see the module docs for the limits)."""
        check_id("session_id", self.session_id)
        check_text("model", self.model, max_bytes=MAX_MODEL_LENGTH)
        check_choice("status", self.status, SESSION_STATUSES)
        self._set("created_at", check_datetime("created_at", self.created_at))
        updated = self.created_at if self.updated_at is None else check_datetime("updated_at", self.updated_at)
        if updated < self.created_at:
            raise ValidationError("updated_at must not be earlier than created_at")
        self._set("updated_at", updated)
        self._set("metadata", check_json_object("metadata", self.metadata))
        check_int("message_count", self.message_count)

    @property
    def last_activity(self) -> datetime:
        """``updated_at``, typed as always present (validation fills it in)."""
        assert self.updated_at is not None
        return self.updated_at


@dataclass(frozen=True, slots=True)
class ChatMessage(Record):
    """One message of a session, keyed by ``(session_id, message_id)``.

    ``seq`` is the message's position in the session (1-based), assigned by the store
    on first insert; producers leave it at 0.
    """

    message_id: str
    session_id: str
    role: str
    content: str
    created_at: datetime = field(default_factory=utcnow)
    metadata: dict[str, Any] = field(default_factory=dict)
    seq: int = 0

    def validate(self) -> None:
        """Check every field."""
        check_id("message_id", self.message_id)
        check_id("session_id", self.session_id)
        check_choice("role", self.role, MESSAGE_ROLES)
        check_text("content", self.content)
        self._set("created_at", check_datetime("created_at", self.created_at))
        self._set("metadata", check_json_object("metadata", self.metadata))
        check_int("seq", self.seq)


@dataclass(frozen=True, slots=True)
class FileRecord(Record):
    """A file a provider holds for a session (an upload), until ``expires_at``."""

    file_id: str
    provider_name: str
    uri: str
    display_name: str = ""
    size: int = 0
    mime_type: str = "application/octet-stream"
    uploaded_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check every field."""
        check_id("file_id", self.file_id)
        check_id("provider_name", self.provider_name)
        check_text("uri", self.uri, max_bytes=4096, allow_empty=False)
        check_text("display_name", self.display_name, max_bytes=1024)
        check_int("size", self.size)
        check_text("mime_type", self.mime_type, max_bytes=255, allow_empty=False)
        self._set("uploaded_at", check_datetime("uploaded_at", self.uploaded_at))
        self._set("expires_at", check_optional_datetime("expires_at", self.expires_at))
        self._set("metadata", check_json_object("metadata", self.metadata))


@dataclass(frozen=True, slots=True)
class TransportSession(Record):
    """The server-side state of one MCP transport session (``Mcp-Session-Id``).

    Heartbeats keep it ``active``; a disconnect opens a grace window
    (``grace_expires_at``) during which it may be recovered at most
    ``DEFAULT_MAX_RECOVERY_ATTEMPTS`` times.
    """

    mcp_session_id: str
    status: str = "active"
    created_at: datetime = field(default_factory=utcnow)
    last_heartbeat: datetime | None = None
    disconnected_at: datetime | None = None
    grace_expires_at: datetime | None = None
    recovery_attempts: int = 0
    working_directory: str = ""
    transport_state: dict[str, Any] | None = None
    agent_context: dict[str, Any] | None = None
    conversation_state: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check every field."""
        check_id("mcp_session_id", self.mcp_session_id)
        check_choice("status", self.status, TRANSPORT_STATUSES)
        self._set("created_at", check_datetime("created_at", self.created_at))
        heartbeat = (
            self.created_at if self.last_heartbeat is None else check_datetime("last_heartbeat", self.last_heartbeat)
        )
        self._set("last_heartbeat", heartbeat)
        self._set("disconnected_at", check_optional_datetime("disconnected_at", self.disconnected_at))
        self._set("grace_expires_at", check_optional_datetime("grace_expires_at", self.grace_expires_at))
        check_int("recovery_attempts", self.recovery_attempts, maximum=1_000_000)
        check_text("working_directory", self.working_directory, max_bytes=4096)
        for name in ("transport_state", "agent_context", "conversation_state"):
            self._set(name, check_optional_json_object(name, getattr(self, name)))
        self._set("metadata", check_json_object("metadata", self.metadata))

    def recoverable_at(self, now: datetime, *, max_attempts: int = DEFAULT_MAX_RECOVERY_ATTEMPTS) -> bool:
        """True when the session may be recovered at ``now``.

        A live session (active or recovered) is recoverable — its process may have
        died without marking it disconnected; a disconnected one only within its grace
        window; an expired one never. Attempts are capped either way.
        """
        if self.status == "expired" or self.recovery_attempts >= max_attempts:
            return False
        if self.status == "disconnected":
            return self.grace_expires_at is not None and now < self.grace_expires_at
        return True

    def recovery_changes(
        self, now: datetime, *, max_attempts: int = DEFAULT_MAX_RECOVERY_ATTEMPTS
    ) -> dict[str, Any]:
        """The fields one recovery at ``now`` changes (status ``recovered``, one more
        attempt, a fresh heartbeat, no grace window); :class:`~sessionq.models.errors.Conflict`
        if the session may not be recovered."""
        if not self.recoverable_at(now, max_attempts=max_attempts):
            raise Conflict(
                f"transport session {self.mcp_session_id!r} cannot be recovered "
                f"(status {self.status}, {self.recovery_attempts} of {max_attempts} attempts used)"
            )
        return {
            "status": "recovered",
            "recovery_attempts": self.recovery_attempts + 1,
            "last_heartbeat": max(now, self.last_heartbeat or now),
            "disconnected_at": None,
            "grace_expires_at": None,
        }


@dataclass(frozen=True, slots=True)
class AgentState(Record):
    """One key/value pair of an agent's state, optionally expiring."""

    agent_id: str
    key: str
    value: Any = None
    mcp_session_id: str | None = None
    updated_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None

    def validate(self) -> None:
        """Check every field (the value must be JSON, like metadata)."""
        check_id("agent_id", self.agent_id)
        check_id("key", self.key)
        check_json_object("value", {"v": self.value})
        if self.mcp_session_id is not None:
            check_id("mcp_session_id", self.mcp_session_id)
        self._set("updated_at", check_datetime("updated_at", self.updated_at))
        self._set("expires_at", check_optional_datetime("expires_at", self.expires_at))


@dataclass(frozen=True, slots=True)
class StreamEvent(Record):
    """One entry of an MCP resumability log; ``message`` is ``None`` for priming events."""

    event_id: str
    mcp_session_id: str
    stream_id: str
    message: dict[str, Any] | None = None
    created_at: datetime = field(default_factory=utcnow)

    def validate(self) -> None:
        """Check every field."""
        check_id("event_id", self.event_id)
        check_id("mcp_session_id", self.mcp_session_id)
        check_text("stream_id", self.stream_id, max_bytes=255)
        self._set("message", check_optional_json_object("message", self.message, field_names=False))
        self._set("created_at", check_datetime("created_at", self.created_at))
