"""Field validators shared by the records.

Each checker takes the field name (for the message) and the value, and returns the
normalised value or raises :class:`~sessionq.models.errors.ValidationError`. The limits are the
ones every backend can honour: PostgreSQL rejects NUL characters in text, MongoDB
rejects ``$``-prefixed and dotted keys, MySQL indexes at most 255 characters of an id.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .errors import ValidationError

# Longest id accepted for sessions, messages, files, agents and keys.
DEFAULT_MAX_ID_LENGTH = 255
# Largest message content, in UTF-8 bytes.
DEFAULT_MAX_CONTENT_BYTES = 4 * 1024 * 1024
# Largest metadata / state document, as compact JSON bytes.
DEFAULT_MAX_JSON_BYTES = 1024 * 1024
# Deepest nesting accepted in a metadata / state document.
DEFAULT_MAX_JSON_DEPTH = 32
# Earliest and latest instants a record may carry.
MIN_DATETIME = datetime(1970, 1, 1, tzinfo=UTC)
MAX_DATETIME = datetime(2200, 1, 1, tzinfo=UTC)


def check_id(name: str, value: Any) -> str:
    """An identifier: a non-empty string of visible ASCII, at most 255 characters."""
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string, got {type(value).__name__}")
    if not value:
        raise ValidationError(f"{name} must not be empty")
    if len(value) > DEFAULT_MAX_ID_LENGTH:
        raise ValidationError(f"{name} is {len(value)} characters long; the limit is {DEFAULT_MAX_ID_LENGTH}")
    # Visible ASCII (0x21-0x7E, the alphabet MCP allows for Mcp-Session-Id): printable ASCII but space.
    if not (value.isascii() and value.isprintable() and " " not in value):
        raise ValidationError(f"{name} must contain only visible ASCII characters (0x21-0x7E)")
    return value


def check_text(name: str, value: Any, *, max_bytes: int = DEFAULT_MAX_CONTENT_BYTES, allow_empty: bool = True) -> str:
    """Free text: valid UTF-8, no NUL characters, at most ``max_bytes`` bytes."""
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise ValidationError(f"{name} must not be empty")
    if value.isascii():  # one byte per character, no surrogates: no need to encode
        size = len(value)
    else:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValidationError(f"{name} is not valid UTF-8 (it contains a lone surrogate)") from None
    if size > max_bytes:
        raise ValidationError(f"{name} is {size} bytes; the limit is {max_bytes}")
    if "\x00" in value:
        raise ValidationError(f"{name} must not contain NUL characters")
    return value


def utf8_encodable(value: str) -> bool:
    """True if ``value`` encodes to UTF-8 (no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_choice(name: str, value: Any, choices: frozenset[str]) -> str:
    """One of a fixed set of strings."""
    if not isinstance(value, str) or value not in choices:
        raise ValidationError(f"{name} must be one of {', '.join(sorted(choices))}; got {value!r:.80}")
    return value


def check_int(name: str, value: Any, *, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    """An integer in ``[minimum, maximum]`` (booleans are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name} must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValidationError(f"{name} must be between {minimum} and {maximum}; got {value}")
    return value


def check_datetime(name: str, value: Any) -> datetime:
    """A timezone-aware datetime between 1970 and 2200, returned in UTC.

    ISO 8601 strings are accepted (JSON payloads carry them); naive values are
    rejected because their meaning depends on the producer's clock settings.
    """
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        except ValueError:
            raise ValidationError(f"{name} is not an ISO 8601 datetime: {value!r:.80}") from None
    if not isinstance(value, datetime):
        raise ValidationError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(f"{name} must be timezone-aware (naive datetimes are ambiguous)")
    try:
        value = value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-01:00 is past the last instant a datetime holds
        raise ValidationError(f"{name} must be between 1970 and 2200; got {value.isoformat()}") from None
    if not MIN_DATETIME <= value < MAX_DATETIME:
        raise ValidationError(f"{name} must be between 1970 and 2200; got {value.isoformat()}")
    return value


def check_optional_datetime(name: str, value: Any) -> datetime | None:
    """Like :func:`check_datetime`, but ``None`` is allowed."""
    return None if value is None else check_datetime(name, value)


def check_json_object(
    name: str, value: Any, *, max_bytes: int = DEFAULT_MAX_JSON_BYTES, field_names: bool = True
) -> dict[str, Any]:
    """A JSON object every backend stores unchanged.

    Keys are non-empty strings, strings carry no NUL characters (PostgreSQL), numbers
    are finite, nesting is at most 32 levels, and the compact JSON is at most
    ``max_bytes`` bytes. With ``field_names`` (documents stored as MongoDB fields)
    keys may not start with ``$`` or contain ``.``; opaque payloads stored as text,
    such as MCP messages, pass ``field_names=False``.
    """
    if value is None or (type(value) is dict and not value):  # the common empty case, cheaply
        return {}
    if type(value) is dict and 0 <= _plain_bound(value, 0, field_names) <= max_bytes:
        return dict(value)  # plainly valid: the full check would pass it unchanged
    return _check_json_object_full(name, value, max_bytes, field_names)


def _check_json_object_full(name: str, value: Any, max_bytes: int, field_names: bool) -> dict[str, Any]:
    """:func:`check_json_object` without its shortcuts: walks every value and encodes it."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(f"{name} must be a JSON object, got {type(value).__name__}")
    _check_json_value(name, value, 0, field_names)
    try:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{name} is not JSON-serialisable: {exc}") from None
    if size > max_bytes:
        raise ValidationError(f"{name} is {size} bytes as JSON; the limit is {max_bytes}")
    return dict(value)


def check_optional_json_object(name: str, value: Any, *, field_names: bool = True) -> dict[str, Any] | None:
    """Like :func:`check_json_object`, but ``None`` stays ``None``."""
    return None if value is None else check_json_object(name, value, field_names=field_names)


# Longest compact JSON of an int in the 64-bit range, of a finite float (repr), of true/false/null.
_INT_JSON_MAX, _FLOAT_JSON_MAX, _CONST_JSON_MAX = 20, 24, 5


def _plain_bound(value: Any, depth: int, field_names: bool) -> int:
    """An upper bound of the compact JSON size of ``value`` when it is made of exact
    built-in JSON types (dict, list, tuple, str, int, float, bool, None) and passes
    every check of :func:`_check_json_value`; -1 otherwise (the full check decides,
    and words the error). A string takes at most 6 bytes a character (``\\u00XX``).
    """
    if depth > DEFAULT_MAX_JSON_DEPTH:
        return -1
    kind = type(value)
    if kind is str:
        # At most 6 bytes a character as JSON (``\u00XX``; a non-ASCII character takes
        # at most 4 in UTF-8); text with a lone surrogate is not plain.
        if ("\x00" in value or len(value) > DEFAULT_MAX_CONTENT_BYTES
                or (not value.isascii() and (4 * len(value) > DEFAULT_MAX_CONTENT_BYTES
                                             or not utf8_encodable(value)))):
            return -1
        return 6 * len(value) + 2
    if kind is int:
        return _INT_JSON_MAX if -(2**63) < value < 2**63 else -1
    if value is None or kind is bool:
        return _CONST_JSON_MAX
    if kind is float:
        return _FLOAT_JSON_MAX if math.isfinite(value) else -1
    total = 2
    if kind is dict:
        for key, item in value.items():
            if (
                type(key) is not str
                or not key
                or len(key) > 1024
                or "\x00" in key
                or not key.isascii()
                or (field_names and (key[0] == "$" or "." in key))
            ):
                return -1
            if (type(item) is str and depth < DEFAULT_MAX_JSON_DEPTH and len(item) <= 4096
                    and "\x00" not in item and (item.isascii() or utf8_encodable(item))):
                size = 6 * len(item) + 2  # the common short string, without the call below
            else:
                size = _plain_bound(item, depth + 1, field_names)
                if size < 0:
                    return -1
            total += 6 * len(key) + 4 + size  # "key":value,
        return total
    if kind is list or kind is tuple:
        for item in value:
            size = _plain_bound(item, depth + 1, field_names)
            if size < 0:
                return -1
            total += size + 1
        return total
    return -1


def _check_json_value(path: str, value: Any, depth: int, field_names: bool) -> None:
    if depth > DEFAULT_MAX_JSON_DEPTH:
        raise ValidationError(f"{path} is nested deeper than {DEFAULT_MAX_JSON_DEPTH} levels")
    # Exact built-in types first: the abstract Mapping check below is several times slower.
    kind = type(value)
    if kind is str:
        check_text(path, value)
        return
    if kind is int and abs(value) < 2**63:
        return
    if value is None or isinstance(value, bool | int):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise ValidationError(f"{path} holds an integer outside the 64-bit range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{path} holds a non-finite number")
        return
    if isinstance(value, str):
        check_text(path, value)
        return
    if kind is dict or isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                raise ValidationError(f"{path} has a key that is not a non-empty string: {key!r:.40}")
            if field_names and (key.startswith("$") or "." in key):
                raise ValidationError(f"{path} has key {key!r:.40}: keys may not start with '$' or contain '.'")
            check_text(f"{path} key", key, max_bytes=1024)
            _check_json_value(f"{path}.{key}", item, depth + 1, field_names)
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json_value(f"{path}[{index}]", item, depth + 1, field_names)
        return
    raise ValidationError(f"{path} holds a {type(value).__name__}, which is not a JSON type")
