"""The producer's plain path: common, plainly valid save and append payloads
canonicalised without building records.

A job's ``normalize`` (:mod:`sessionq.workers.jobs`) builds the records (which validate)
and turns them back into JSON; for saves and appends the producer first tries
:func:`plain_save` / :func:`plain_append`, which accept only payloads made of exact
built-in types that pass every check with room to spare, and return exactly what
``normalize`` returns for them (tests/test_producer_plain.py compares both). Anything
else -- a bad payload included -- returns None and goes through ``normalize``, which
raises the specific error. Only fields ``payloads`` still accepts are handled here: a
rule added to the records must be added here too, or the plain path must step aside
for the field.

Measured with timeit (a save of 2 messages and metadata, the append of the same
messages): save 4.1 µs here vs 19.4 µs through ``normalize``, append 2.8 vs 12.7 µs.
A heartbeat was 3.01 vs 3.06 µs, so it has no plain path.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sessionq.models.errors import ValidationError
from sessionq.models.records import MAX_MODEL_LENGTH, MESSAGE_ROLES, SESSION_STATUSES
from sessionq.models.validation import (
    DEFAULT_MAX_CONTENT_BYTES,
    DEFAULT_MAX_ID_LENGTH,
    check_datetime,
    check_json_object,
    utf8_encodable,
)

from . import payloads

# One difference from ``normalize``, on purpose: a job's defaulted timestamps ("now")
# are one clock reading, not one per record microseconds apart.
_MISSING: Any = object()
_PLAIN_SAVE_FIELDS = payloads._SESSION_FIELDS & {
    "session_id", "model", "created_at", "updated_at", "status", "metadata", "messages"}
_PLAIN_MESSAGE_FIELDS = payloads._MESSAGE_FIELDS & {
    "message_id", "session_id", "role", "content", "created_at", "metadata"}
_PLAIN_APPEND_FIELDS = {"session_id", "messages"}


def _plain_id(value: Any) -> bool:
    return (type(value) is str and 0 < len(value) <= DEFAULT_MAX_ID_LENGTH and value.isascii()
            and value.isprintable() and " " not in value)


def _plain_text(value: Any, max_bytes: int) -> bool:
    # Non-ASCII text is plain too (users write it): UTF-8 takes at most 4 bytes a
    # character, and a lone surrogate (not valid UTF-8) steps aside to the full check.
    if type(value) is not str or "\x00" in value:
        return False
    if value.isascii():
        return len(value) <= max_bytes
    return len(value) * 4 <= max_bytes and utf8_encodable(value)


class _Clock:
    #: (a whole second since the epoch, its ISO 8601 text up to the seconds).
    second: tuple[int, str] = (-1, "")


def utc_now_iso() -> str:
    """``utcnow().isoformat()``, the date and time formatted once a second."""
    ns = time.time_ns()
    second, micro = ns // 1_000_000_000, ns // 1000 % 1_000_000  # datetime.now floors too
    cached, text = _Clock.second
    if cached != second:
        text = datetime.fromtimestamp(second, UTC).isoformat()[:-6]  # without +00:00
        _Clock.second = (second, text)
    return f"{text}.{micro:06d}+00:00" if micro else f"{text}+00:00"  # isoformat drops .000000


def _plain_time(value: Any, now_iso: str) -> datetime | None:
    try:
        at = check_datetime("at", value)
    except ValidationError:
        return None
    return None if at > datetime.fromisoformat(now_iso) + payloads.DEFAULT_MAX_FUTURE_SKEW else at


def _plain_iso_or_now(value: Any, now_iso: str) -> str | None:
    """A plain timestamp's ISO text, ``now_iso`` when it is missing, None when not plain."""
    if value is _MISSING:
        return now_iso
    at = _plain_time(value, now_iso)
    return None if at is None else at.isoformat()


def _plain_metadata(value: Any) -> dict[str, Any] | None:
    try:
        return check_json_object("metadata", value)
    except ValidationError:
        return None


def _plain_messages(session_id: str, items: Any, now_iso: str) -> list[dict[str, Any]] | None:
    # The checks of _plain_id and _plain_text inlined: this loop runs once per message
    # (a re-save carries the session's whole history), where a call costs as much as a check.
    if type(items) is not list or len(items) > payloads.DEFAULT_MAX_MESSAGES_PER_JOB:
        return None
    out: list[dict[str, Any]] = []
    append = out.append
    fields, roles = _PLAIN_MESSAGE_FIELDS, MESSAGE_ROLES
    for item in items:
        if type(item) is not dict or not item.keys() <= fields:
            return None
        get = item.get
        message_id, role, content = get("message_id"), get("role"), get("content")
        if (type(message_id) is not str or not 0 < len(message_id) <= DEFAULT_MAX_ID_LENGTH
                or not message_id.isascii() or not message_id.isprintable() or " " in message_id
                or type(role) is not str or role not in roles
                or type(content) is not str or "\x00" in content
                or not (len(content) <= DEFAULT_MAX_CONTENT_BYTES if content.isascii()
                        else _plain_text(content, DEFAULT_MAX_CONTENT_BYTES))):
            return None
        owner = get("session_id", session_id)
        if owner is not session_id and (type(owner) is not str or owner != session_id):
            return None
        created = get("created_at", _MISSING)
        if created is _MISSING:
            created_iso = now_iso
        else:
            created_iso = _plain_iso_or_now(created, now_iso)  # type: ignore[assignment]
            if created_iso is None:
                return None
        metadata = get("metadata")
        if metadata is None or (type(metadata) is dict and not metadata):
            append({"message_id": message_id, "role": role, "content": content, "created_at": created_iso})
            continue
        metadata = _plain_metadata(metadata)
        if metadata is None:
            return None
        message: dict[str, Any] = {
            "message_id": message_id, "role": role, "content": content, "created_at": created_iso}
        if metadata:
            message["metadata"] = metadata
        append(message)
    return out


def plain_save(payload: Any) -> dict[str, Any] | None:
    """The canonical ``save_session`` argument of a plainly valid payload, else None."""
    if type(payload) is not dict or not payload.keys() <= _PLAIN_SAVE_FIELDS:
        return None
    session_id: str = payload.get("session_id")  # type: ignore[assignment]  # checked next
    model, status = payload.get("model", ""), payload.get("status", "active")
    if (not _plain_id(session_id) or not _plain_text(model, MAX_MODEL_LENGTH)
            or type(status) is not str or status not in SESSION_STATUSES):
        return None
    now_iso = utc_now_iso()
    created_iso = _plain_iso_or_now(payload.get("created_at", _MISSING), now_iso)
    if created_iso is None:
        return None
    updated = payload.get("updated_at")
    if updated is None:
        updated_iso = created_iso
    else:
        updated = _plain_time(updated, now_iso)
        if updated is None or updated < datetime.fromisoformat(created_iso):
            return None
        updated_iso = updated.isoformat()
    metadata = _plain_metadata(payload.get("metadata"))
    messages = _plain_messages(session_id, payload.get("messages", []), now_iso)
    if metadata is None or messages is None:
        return None
    return {"session_id": session_id, "model": model, "created_at": created_iso,
            "updated_at": updated_iso, "status": status, "metadata": metadata, "messages": messages}


def plain_append(payload: Any) -> dict[str, Any] | None:
    """The canonical ``append_messages`` argument of a plainly valid payload, else None."""
    if type(payload) is not dict or payload.keys() != _PLAIN_APPEND_FIELDS or not _plain_id(payload["session_id"]):
        return None
    messages = _plain_messages(payload["session_id"], payload["messages"], utc_now_iso())
    return None if messages is None else {"session_id": payload["session_id"], "messages": messages}


_NOT_CONTAINERS = frozenset({str, int, float, bool, type(None)})
# Bytes of JSON per character of a string at most (an astral character: two \uXXXX).
_JSON_BYTES_PER_CHAR = 12


def _flat_bound(document: dict[str, Any]) -> int:
    """An upper bound of the JSON size of a checked document whose values are all
    scalars (-1 if one is a container, which the caller could still change)."""
    size = 2
    for key, value in document.items():
        kind = type(value)
        if kind not in _NOT_CONTAINERS:
            return -1
        size += _JSON_BYTES_PER_CHAR * (len(key) + (len(value) if kind is str else 3)) + 8
    return size


def _copy_bound(value: Any) -> tuple[Any, int]:
    """A copy of a checked JSON value whose containers are new (exact dicts and lists)
    and an upper bound of its JSON size; size -1 if a container is of another type."""
    kind = type(value)
    if kind is str:
        return value, _JSON_BYTES_PER_CHAR * len(value) + 2
    if kind in _NOT_CONTAINERS:
        return value, 32
    size = 2
    if kind is dict:
        out: dict[str, Any] = {}
        for key, item in value.items():
            copied, item_size = _copy_bound(item)
            if item_size < 0 or type(key) is not str:
                return value, -1
            out[key] = copied
            size += _JSON_BYTES_PER_CHAR * len(key) + 4 + item_size
        return out, size
    if kind is list or kind is tuple:
        items = []
        for item in value:
            copied, item_size = _copy_bound(item)
            if item_size < 0:
                return value, -1
            items.append(copied)
            size += item_size + 1
        return items, size
    return value, -1


def _metadata_bound(owner: dict[str, Any]) -> int:
    """The size bound of ``owner["metadata"]``, first replaced by a snapshot (a deep copy)
    if it holds containers, which the caller could still change; -1 if it cannot be."""
    metadata = owner["metadata"]
    size = _flat_bound(metadata)
    if size < 0:
        metadata, size = _copy_bound(metadata)
        if size >= 0:
            owner["metadata"] = metadata
    return size


def deferred_bound(arg: dict[str, Any]) -> int:
    """An upper bound of the encoded size of a deferrable job's canonical argument
    (``Job.deferrable``), or -1 if encoding it later could see the caller's changes.

    Every container of such an argument is its own, except the values of the metadata
    copies: metadata holding containers (nested metadata) is replaced here by a deep
    copy, so that the argument is a snapshot; one holding a container of a type other
    than dict, list or tuple is not copied (-1: encode it now).
    """
    size = 256
    for message in arg.get("messages", ()):
        meta = _metadata_bound(message) if "metadata" in message else 0
        if meta < 0:
            return -1
        size += meta + _JSON_BYTES_PER_CHAR * (len(message["message_id"]) + len(message["content"])) + 128
    if "metadata" in arg:
        meta = _metadata_bound(arg)
        if meta < 0:
            return -1
        size += meta
    for key in ("session_id", "model", "mcp_session_id"):
        if key in arg:
            size += _JSON_BYTES_PER_CHAR * len(arg[key])
    return size
