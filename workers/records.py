"""File-record and agent-state jobs (queue ``maintenance``).

Their expiry is a sweep (``run_sweep("files")`` / ``run_sweep("agent_state")``).
"""

from __future__ import annotations

import logging
from typing import Any

from . import payloads
from .broker import get_store
from .jobs import job_actor

logger = logging.getLogger(__name__)


@job_actor
def save_file(payload: dict[str, Any]) -> None:
    """Insert or replace a file record (idempotent)."""
    get_store().save_file(payloads.parse_file(payload))


@job_actor
def put_agent_state(payload: dict[str, Any]) -> None:
    """Upsert one agent-state key; an older write than the stored one loses."""
    state = payloads.parse_agent_state(payload)
    if not get_store().put_agent_state(state):
        logger.debug("stale agent-state write %s/%s ignored", state.agent_id, state.key)
