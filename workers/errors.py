"""The error hierarchy of jobs: what is retried and what is dead-lettered.

``JobError`` is the root. :class:`InvalidPayload` is permanent: the message can never
succeed, so it is never retried and goes straight to the dead-letter queue with its
reason. :class:`TransientJobError` (and the store's
:class:`~sessionq.models.errors.StoreUnavailable`, Redis connection errors) are retried with
exponential backoff. Any other exception is a bug or a permanent store refusal and is
dead-lettered too: retrying it would only repeat the failure.
"""

from __future__ import annotations

import redis
from dramatiq.errors import Retry

from sessionq.models.errors import StoreUnavailable


class JobError(Exception):
    """Base class for errors raised by jobs and the producer."""


class InvalidPayload(JobError, ValueError):
    """A job's arguments are malformed; the message names the field and why. Never retried."""


class TransientJobError(JobError, Retry):
    """The job may succeed later (a dependency is not ready yet); it is retried with backoff.

    It is a Dramatiq ``Retry``, so the worker logs no traceback for it.
    """


class SessionNotReady(TransientJobError):
    """The job addresses a session not saved yet (its save is still queued); retried."""


class ProducerError(JobError):
    """The producer could neither enqueue a job nor spool it to its outbox."""


#: Exceptions that retry a job with backoff; everything else dead-letters it.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    StoreUnavailable,
    TransientJobError,
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
    TimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """True if a job that raised ``exc`` should be retried."""
    return isinstance(exc, TRANSIENT_ERRORS)
