"""The data layer's part of :mod:`sessionq.errors` (re-exported; stated there once).

Every error a store raises is a :class:`StoreError`; callers that only care whether
to retry check :class:`StoreUnavailable` (transient) against the rest (permanent).
:class:`ConfigError` is not a store error: it is a sibling under
:class:`~sessionq.errors.SessionqError`.
"""

from __future__ import annotations

from sessionq.errors import (
    ConfigError,
    Conflict,
    NotFound,
    SchemaOutdated,
    SessionqError,
    StoreError,
    StoreUnavailable,
    ValidationError,
)

__all__ = [
    "ConfigError",
    "Conflict",
    "NotFound",
    "SchemaOutdated",
    "SessionqError",
    "StoreError",
    "StoreUnavailable",
    "ValidationError",
]
