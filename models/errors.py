"""The error hierarchy of the data layer.

Every error a store raises is a :class:`StoreError`; callers that only care whether
to retry check :class:`StoreUnavailable` (transient) against the rest (permanent).
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error raised by the data layer."""


class ValidationError(StoreError, ValueError):
    """A record or setting failed validation; the message names the field and why."""


class NotFound(StoreError, LookupError):
    """The record addressed by id does not exist."""


class Conflict(StoreError):
    """The operation is not allowed in the record's current state."""


class StoreUnavailable(StoreError):
    """The backend could not be reached or timed out; the operation may be retried."""


class ConfigError(StoreError, ValueError):
    """A configuration value is invalid; the message names the setting."""
