"""Every error sessionq raises on purpose, under one root: :class:`SessionqError`.

The hierarchy (each class stated here once; ``sessionq.models.errors`` and
``sessionq.workers.errors`` re-export their part)::

    SessionqError
    ├── StoreError                  the data layer
    │   ├── ValidationError         a record or value failed validation
    │   ├── NotFound                no record with that id
    │   ├── Conflict                not allowed in the record's current state
    │   ├── StoreUnavailable        unreachable or timed out (transient: retry)
    │   └── SchemaOutdated          schema missing or behind: run `sessionq db upgrade`
    ├── ConfigError                 a setting is invalid or missing
    └── JobError                    jobs and the producer
        ├── InvalidPayload          malformed job arguments (never retried)
        ├── TransientJobError       may succeed later (retried with backoff)
        │   └── SessionNotReady     the session's save is still queued
        └── ProducerError           neither enqueued nor spooled

The CLI turns any :class:`SessionqError` into one ``Error: ...`` line. This module
imports nothing, so any layer (and any host application) may import it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "Conflict",
    "InvalidPayload",
    "JobError",
    "NotFound",
    "ProducerError",
    "SchemaOutdated",
    "SessionNotReady",
    "SessionqError",
    "StoreError",
    "StoreUnavailable",
    "TransientJobError",
    "ValidationError",
]


class SessionqError(Exception):
    """Base class of every error sessionq raises on purpose; the message says what and why."""


class StoreError(SessionqError):
    """Base class for every error raised by the data layer."""


class ValidationError(StoreError, ValueError):
    """A record or value failed validation; the message names the field and why."""


class NotFound(StoreError, LookupError):
    """The record addressed by id does not exist."""


class Conflict(StoreError):
    """The operation is not allowed in the record's current state."""


class StoreUnavailable(StoreError):
    """The backend could not be reached or timed out; the operation may be retried."""


class SchemaOutdated(StoreError):
    """The store answers, but its schema is missing or older than this sessionq's; the
    message names the store (password masked) and says to run ``sessionq db upgrade``.
    Not transient: waiting does not help, an upgrade does."""


class ConfigError(SessionqError, ValueError):
    """A configuration value is invalid or missing; the message names the setting."""


class JobError(SessionqError):
    """Base class for errors raised by jobs and the producer."""


class InvalidPayload(JobError, ValueError):
    """A job's arguments are malformed; the message names the field and why. Never retried."""


class TransientJobError(JobError):
    """The job may succeed later (a dependency is not ready yet); it is retried with backoff.

    Expected, so the worker logs no traceback for it (see
    :class:`sessionq.workers.broker.TransientTracebacks`).
    """


class SessionNotReady(TransientJobError):
    """The job addresses a session not saved yet (its save is still queued); retried."""


class ProducerError(JobError):
    """The producer could neither enqueue a job nor spool it to its outbox."""
