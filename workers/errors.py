"""What is retried and what is dead-lettered.

The job errors live in :mod:`sessionq.errors` (re-exported here). :class:`InvalidPayload`
is permanent: the message can never succeed, so it is never retried and goes straight
to the dead-letter queue with its reason. :class:`TransientJobError` (and the store's
:class:`~sessionq.errors.StoreUnavailable`, Redis connection errors) are retried with
exponential backoff. Any other exception is a bug or a permanent store refusal and is
dead-lettered too: retrying it would only repeat the failure.
"""

from __future__ import annotations

import redis

from sessionq.errors import (
    InvalidPayload,
    JobError,
    ProducerError,
    SessionForgotten,
    SessionNotReady,
    StoreUnavailable,
    TransientJobError,
)

__all__ = [
    "TRANSIENT_ERRORS",
    "InvalidPayload",
    "JobError",
    "ProducerError",
    "SessionForgotten",
    "SessionNotReady",
    "TransientJobError",
    "is_transient",
]

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
