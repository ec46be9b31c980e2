"""Session jobs (queue ``sessions``): save, append, heartbeat, disconnect, register.

Every job is idempotent: messages are keyed by id, a save never moves ``updated_at``
backwards, heartbeats and disconnects keep the newest instant. Saves go through the
process's group committer, so a burst of saves costs a few transactions.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from dramatiq.middleware import CurrentMessage

from sessionq.models.errors import NotFound

from . import payloads
from .broker import get_committer, get_settings, get_store
from .errors import SessionNotReady
from .jobs import job_actor

logger = logging.getLogger(__name__)


@job_actor
def save_session(payload: dict[str, Any]) -> None:
    """Upsert a session (export JSON shape) and insert its messages not stored yet.

    Returns once the write has committed; on Redis the committer has then acked the
    job already, together with the rest of its batch (see ``SessionqRedisBroker.ack_many``).
    """
    session, messages = payloads.parse_save(payload)
    get_committer().save(session, messages, token=CurrentMessage.get_current_message())


@job_actor
def append_messages(payload: dict[str, Any]) -> None:
    """Append messages to a saved session; retried while the session's save is still queued."""
    session_id, messages = payloads.parse_append(payload)
    try:
        get_store().append_messages(session_id, messages)
    except NotFound:
        raise SessionNotReady(f"session {session_id!r} does not exist (yet)") from None


@job_actor
def heartbeat(payload: dict[str, Any]) -> None:
    """Record a transport session's heartbeat (never moving it backwards)."""
    mcp_session_id, at = payloads.parse_heartbeat(payload)
    if not get_store().heartbeat(mcp_session_id, at):
        logger.debug("heartbeat for unknown or expired transport %s ignored", mcp_session_id)


@job_actor
def mark_disconnected(payload: dict[str, Any]) -> None:
    """Mark a transport session disconnected, opening its recovery grace window."""
    mcp_session_id, at, grace_seconds = payloads.parse_disconnect(payload)
    if grace_seconds is None:
        grace = timedelta(minutes=get_settings().grace_minutes)
    else:
        grace = timedelta(seconds=grace_seconds)
    if not get_store().mark_disconnected(mcp_session_id, at, grace):
        logger.debug("disconnect of %s ignored (unknown, expired or stale)", mcp_session_id)


@job_actor
def register_transport(payload: dict[str, Any]) -> None:
    """Insert a transport session or update its saved state."""
    get_store().register_transport(payloads.parse_register_transport(payload))
