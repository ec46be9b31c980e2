"""Seed-era rows and documents turned into sessionq records: the one mapping used by the
legacy stores (:mod:`.sql`, :mod:`.mongo`) and by the import of the seed system's JSON
exports (:mod:`sessionq.models.archive_io`).

What maps to what:

* ``chat_sessions`` row / session document / exported session → :class:`ChatSession`
  with every field; a missing ``status`` is ``active``, a missing ``updated_at`` is the
  latest of ``created_at`` and the messages' times. ``message_count`` is checked against
  the messages found (a mismatch is a :class:`Problems` note) and the count found is kept,
  so the migrated session agrees with its messages.
* ``chat_messages`` row / embedded message → :class:`ChatMessage`; ``seq`` is the
  message's position in its session (1-based) in ``(created_at, message_id)`` order, or
  in array order for embedded and exported messages. A message without ``message_id``
  (the seed's JSON exports) gets :func:`derived_message_id`.
* ``uploaded_files`` row → :class:`FileRecord` with ``provider_name="gemini"``,
  ``uri=gemini_file_uri`` and the provider's own name kept as
  ``metadata["gemini_file_name"]``; a missing size is 0, a missing MIME type
  ``application/octet-stream``.

Times without a zone (the seed system wrote naive ones) are read in the zone of
:attr:`LegacyOptions.tz` (UTC unless ``--legacy-tz``). Metadata may be JSON text (SQLite),
JSONB (PostgreSQL) or an embedded document (MongoDB).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import ValidationError
from ..records import ChatMessage, ChatSession, FileRecord
from ..validation import check_datetime

#: The two layouts a source may have (``--from-layout``).
LAYOUTS = ("sessionq", "legacy")
#: The seed system's SQL tables (SQLite and PostgreSQL).
SQL_TABLES = ("chat_sessions", "chat_messages", "uploaded_files")
#: Collections a seed-era MongoDB session store may be called, in the order they are looked for.
MONGO_SESSION_COLLECTIONS = ("chat_sessions", "sessions")
#: The collection of seed-era file records on MongoDB (documents with the SQL table's fields).
MONGO_FILES_COLLECTION = "uploaded_files"
#: The provider every seed-era file record belongs to.
PROVIDER = "gemini"
#: The metadata key that keeps a seed-era file's own name (``files/abc123``).
FILE_NAME_KEY = "gemini_file_name"
#: Prefix of the message ids :func:`derived_message_id` makes.
DERIVED_ID_PREFIX = "legacy-"
# Problems kept by a Problems list (the counts keep going past it).
DEFAULT_MAX_PROBLEMS = 1000

_SESSION_FIELDS = frozenset(
    {"session_id", "model", "created_at", "updated_at", "message_count", "messages", "metadata", "status"}
)
_MESSAGE_FIELDS = frozenset({"message_id", "session_id", "role", "content", "created_at", "metadata"})
_FILE_FIELDS = frozenset(
    {"file_id", "gemini_file_name", "gemini_file_uri", "display_name", "size", "mime_type", "uploaded_at",
     "expires_at", "metadata"}
)


def zone(name: str) -> tzinfo:
    """The IANA zone ``name`` (``Europe/Berlin``, ``UTC``); :class:`ValidationError` if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(f"unknown time zone {name!r:.80} (an IANA name such as UTC or Europe/Berlin)") from None


@dataclass(frozen=True)
class LegacyOptions:
    """How to read a source: its layout (``None``: detect), the zone of naive times and
    the MongoDB session collection (``None``: ``chat_sessions``, else ``sessions``)."""

    layout: str | None = None
    tz: tzinfo = UTC
    collection: str | None = None


@dataclass
class Problems:
    """What reading a seed-era source found: rows that break sessionq's rules (left out,
    the run exits 1) and notes (a wrong ``message_count``: reported, not fatal). Each is
    ``"table 'key': why"``; a row read twice (a resumed batch, a verify after the
    migration) is listed once."""

    bad: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    bad_count: int = 0
    note_count: int = 0

    def reject(self, where: str, why: str) -> None:
        """Record a row left out."""
        if where not in self.bad:
            self.bad_count += 1
            if len(self.bad) < DEFAULT_MAX_PROBLEMS:
                self.bad[where] = why

    def note(self, where: str, what: str) -> None:
        """Record something odd that does not stop the row."""
        if where not in self.notes:
            self.note_count += 1
            if len(self.notes) < DEFAULT_MAX_PROBLEMS:
                self.notes[where] = what

    def lines(self) -> list[str]:
        """``note: ...`` and ``bad row: ...`` lines for the user, with how many are not listed."""
        out = [f"note: {where}: {what}" for where, what in self.notes.items()]
        if self.note_count > len(self.notes):
            out.append(f"note: ... and {self.note_count - len(self.notes)} more")
        out += [f"bad row: {where}: {why} (left out)" for where, why in self.bad.items()]
        if self.bad_count > len(self.bad):
            out.append(f"bad row: ... and {self.bad_count - len(self.bad)} more")
        return out


def where(table: str, key: Any) -> str:
    """How a problem names a row: its table or collection and key."""
    return f"{table} {key!r:.120}"


def derived_message_id(session_id: str, position: int, content: str) -> str:
    """The id of a seed-era message that has none: ``legacy-`` and the first 32 hex
    digits of sha256(session id, NUL, position, NUL, content) in UTF-8 — the same for
    the same message every time, so importing a file twice adds nothing."""
    data = f"{session_id}\x00{position}\x00{content}".encode("utf-8", "surrogatepass")
    return DERIVED_ID_PREFIX + hashlib.sha256(data).hexdigest()[:32]


def legacy_time(name: str, value: Any, tz: tzinfo) -> datetime:
    """A seed-era time (a ``datetime`` or ISO 8601 text) as an aware UTC datetime; a
    naive one is read in ``tz``."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValidationError(f"{name} is not an ISO 8601 datetime: {value!r:.80}") from None
    if isinstance(value, datetime) and value.tzinfo is None:
        value = value.replace(tzinfo=tz)
    return check_datetime(name, value)


def legacy_json(name: str, value: Any) -> dict[str, Any]:
    """Seed-era metadata: ``None`` (empty), JSON text, or an object already decoded."""
    if value is None or value == "":
        return {}
    if isinstance(value, bytes | memoryview):
        value = bytes(value).decode("utf-8", "surrogateescape")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValidationError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValidationError(f"{name} must be a JSON object, got {type(value).__name__}")
    return dict(value)


def _unknown(data: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise ValidationError(f"{what} has unknown field(s): {', '.join(unknown)[:200]}")


def legacy_session(
    data: Mapping[str, Any], found: int, tz: tzinfo, problems: Problems, table: str,
    *, last_message_at: datetime | None = None,
) -> ChatSession:
    """The session of a seed-era row or document holding ``found`` messages; a
    ``message_count`` that says otherwise is noted. ``last_message_at`` stands in for a
    missing ``updated_at``. Raises :class:`ValidationError` for a row sessionq refuses."""
    _unknown(data, _SESSION_FIELDS | {"_id"}, "session")
    session_id = data.get("session_id")
    created = legacy_time("created_at", data.get("created_at"), tz)
    raw_updated = data.get("updated_at")
    if raw_updated is None:
        updated = max(created, last_message_at) if last_message_at else created
    else:
        updated = legacy_time("updated_at", raw_updated, tz)
    session = ChatSession(
        session_id=session_id,  # type: ignore[arg-type]  # validated by ChatSession
        model=data.get("model") or "",
        status=data.get("status") or "active",
        created_at=created,
        updated_at=updated,
        metadata=legacy_json("metadata", data.get("metadata")),
        message_count=found,
    )
    stated = data.get("message_count")
    if stated is not None and stated != found:
        problems.note(where(table, session.session_id), f"message_count says {stated}, {found} message(s) found")
    return session


def legacy_message(data: Mapping[str, Any], session_id: str, position: int, tz: tzinfo) -> ChatMessage:
    """The message at ``position`` (1-based) of a session, from a row, an embedded
    message or an exported one (whose missing id is :func:`derived_message_id`)."""
    _unknown(data, _MESSAGE_FIELDS, "message")
    owner = data.get("session_id", session_id)
    if owner != session_id:
        raise ValidationError(f"message belongs to session {owner!r:.80}, not {session_id!r:.80}")
    content = data.get("content")
    message_id = data.get("message_id")
    if message_id is None and isinstance(content, str):
        message_id = derived_message_id(session_id, position, content)
    return ChatMessage(
        message_id=message_id,  # type: ignore[arg-type]  # validated by ChatMessage
        session_id=session_id,
        role=data.get("role"),  # type: ignore[arg-type]
        content=content,  # type: ignore[arg-type]
        created_at=legacy_time("created_at", data.get("created_at"), tz),
        metadata=legacy_json("metadata", data.get("metadata")),
        seq=position,
    )


def legacy_file(data: Mapping[str, Any], tz: tzinfo) -> FileRecord:
    """The file record of an ``uploaded_files`` row or document (see the module docs)."""
    _unknown(data, _FILE_FIELDS | {"_id"}, "file record")
    metadata = legacy_json("metadata", data.get("metadata"))
    name = data.get("gemini_file_name")
    if not isinstance(name, str) or not name:
        raise ValidationError("gemini_file_name must be a non-empty string")
    metadata[FILE_NAME_KEY] = name
    expires = data.get("expires_at")
    return FileRecord(
        file_id=data.get("file_id"),  # type: ignore[arg-type]  # validated by FileRecord
        provider_name=PROVIDER,
        uri=data.get("gemini_file_uri"),  # type: ignore[arg-type]
        display_name=data.get("display_name") or "",
        size=data.get("size") or 0,
        mime_type=data.get("mime_type") or "application/octet-stream",
        uploaded_at=legacy_time("uploaded_at", data.get("uploaded_at"), tz),
        expires_at=None if expires is None else legacy_time("expires_at", expires, tz),
        metadata=metadata,
    )


def is_legacy_file(data: Any) -> bool:
    """True for a file record in the seed system's shape (it names ``gemini_file_uri``)."""
    return isinstance(data, Mapping) and ("gemini_file_uri" in data or "gemini_file_name" in data)


def legacy_export_session(
    data: Any, tz: tzinfo, problems: Problems, label: str
) -> tuple[ChatSession, list[ChatMessage]]:
    """A session of the seed system's JSON export (``export_session`` / ``export_to_json``)
    with its messages; ``label`` names it in a note. Raises :class:`ValidationError`."""
    if not isinstance(data, Mapping):
        raise ValidationError(f"a session must be a JSON object, got {type(data).__name__}")
    raw_messages = data.get("messages", [])
    if not isinstance(raw_messages, list):
        raise ValidationError("messages must be a list")
    sid = data.get("session_id")
    if not isinstance(sid, str):
        raise ValidationError("session_id must be a string")
    messages = []
    for position, raw in enumerate(raw_messages, start=1):
        if not isinstance(raw, Mapping):
            raise ValidationError(f"message {position} must be a JSON object")
        try:
            messages.append(legacy_message(raw, sid, position, tz))
        except ValidationError as exc:
            raise ValidationError(f"message {position}: {exc}") from None
    last = max((m.created_at for m in messages), default=None)
    session = legacy_session(data, len(messages), tz, problems, label, last_message_at=last)
    return session, messages
