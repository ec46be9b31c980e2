"""Collections, indexes and schema versions of the MongoDB backend.

Every collection is prefixed ``sessionq_``. Indexes are created by versioned steps
recorded in ``sessionq_schema`` (one document per applied version), the MongoDB
counterpart of :mod:`sessionq.models.sql.schema`. ``create_index`` is idempotent, so a step
interrupted half-way is simply applied again.

Timestamps are stored as integer microseconds since the Unix epoch: BSON dates
only keep milliseconds, and a store must return exactly the instant it was given
(``updated_at`` comparisons decide which save wins). The document shapes of file
records, transport sessions and agent state are defined here, once, for the
single-record operations and the bulk ones alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database

from ..records import AgentState, FileRecord, TransportSession

logger = logging.getLogger(__name__)

SCHEMA = "sessionq_schema"
SESSIONS = "sessionq_sessions"
MESSAGES = "sessionq_messages"
FILES = "sessionq_files"
TRANSPORTS = "sessionq_transports"
AGENT_STATE = "sessionq_agent_state"
EVENTS = "sessionq_events"
COUNTERS = "sessionq_counters"
TASKS = "sessionq_tasks"
HANDLES = "sessionq_handles"
IDEMPOTENCY = "sessionq_idempotency"
TOMBSTONES = "sessionq_tombstones"
RECEIPTS = "sessionq_forget_receipts"
#: Every data collection (the schema collection excluded).
DATA_COLLECTIONS = (SESSIONS, MESSAGES, FILES, TRANSPORTS, AGENT_STATE, EVENTS, COUNTERS, TASKS, HANDLES, IDEMPOTENCY,
                    TOMBSTONES, RECEIPTS)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(value: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (exact, orderable)."""
    delta = value.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def opt_us(value: datetime | None) -> int | None:
    """:func:`to_us`, passing ``None`` through."""
    return None if value is None else to_us(value)


def from_us(value: int | None) -> datetime | None:
    """The inverse of :func:`to_us` (``None`` stays ``None``)."""
    return None if value is None else _EPOCH + timedelta(microseconds=int(value))


TRANSPORT_TIMES = ("created_at", "last_heartbeat", "disconnected_at", "grace_expires_at")


def file_doc(record: FileRecord) -> dict[str, Any]:
    """A file record as its document (``_id`` = ``file_id``)."""
    doc = record.to_json() | {"uploaded_at": to_us(record.uploaded_at), "expires_at": opt_us(record.expires_at)}
    doc["_id"] = doc.pop("file_id")
    return doc


def doc_to_file(doc: dict[str, Any]) -> FileRecord:
    """The inverse of :func:`file_doc`."""
    fields = {k: v for k, v in doc.items() if k != "_id"}
    fields["uploaded_at"] = from_us(fields["uploaded_at"])
    fields["expires_at"] = from_us(fields.get("expires_at"))
    return FileRecord(file_id=doc["_id"], **fields)


def transport_doc(session: TransportSession) -> dict[str, Any]:
    """A transport session as its document (``_id`` = ``mcp_session_id``)."""
    doc = session.to_json() | {name: opt_us(getattr(session, name)) for name in TRANSPORT_TIMES}
    doc["_id"] = doc.pop("mcp_session_id")
    return doc


def doc_to_transport(doc: dict[str, Any]) -> TransportSession:
    """The inverse of :func:`transport_doc`."""
    fields = {k: v for k, v in doc.items() if k != "_id"}
    for name in TRANSPORT_TIMES:
        fields[name] = from_us(fields.get(name))
    return TransportSession(mcp_session_id=doc["_id"], **fields)


def agent_state_doc(state: AgentState) -> dict[str, Any]:
    """An agent-state entry as its document (keyed by the unique ``(agent_id, key)`` index)."""
    return {
        "agent_id": state.agent_id,
        "key": state.key,
        "value": state.value,
        "mcp_session_id": state.mcp_session_id,
        "updated_at": to_us(state.updated_at),
        "expires_at": opt_us(state.expires_at),
    }


def doc_to_agent_state(doc: dict[str, Any]) -> AgentState:
    """The inverse of :func:`agent_state_doc`."""
    return AgentState(
        agent_id=doc["agent_id"],
        key=doc["key"],
        value=doc.get("value"),
        mcp_session_id=doc.get("mcp_session_id"),
        updated_at=cast(datetime, from_us(doc["updated_at"])),
        expires_at=from_us(doc.get("expires_at")),
    )


@dataclass(frozen=True)
class Migration:
    """One schema step, applied once in version order."""

    version: int
    description: str
    apply: Callable[[Database[Any]], None]


def _v1_core(db: Database[Any]) -> None:
    db[SESSIONS].create_index([("status", ASCENDING), ("updated_at", ASCENDING)], name="status_updated")
    db[MESSAGES].create_index(
        [("session_id", ASCENDING), ("message_id", ASCENDING)], unique=True, name="session_message"
    )
    db[MESSAGES].create_index([("session_id", ASCENDING), ("seq", ASCENDING)], unique=True, name="session_seq")
    db[FILES].create_index([("expires_at", ASCENDING)], name="expires_at")
    db[TRANSPORTS].create_index([("status", ASCENDING), ("grace_expires_at", ASCENDING)], name="status_grace")
    db[TRANSPORTS].create_index([("status", ASCENDING), ("last_heartbeat", ASCENDING)], name="status_heartbeat")
    db[AGENT_STATE].create_index([("agent_id", ASCENDING), ("key", ASCENDING)], unique=True, name="agent_key")
    db[AGENT_STATE].create_index([("expires_at", ASCENDING)], name="expires_at")


def _v2_event_log(db: Database[Any]) -> None:
    db[EVENTS].create_index(
        [("mcp_session_id", ASCENDING), ("stream_id", ASCENDING), ("_id", ASCENDING)], name="session_stream_id"
    )
    db[EVENTS].create_index([("created_at", ASCENDING)], name="created_at")
    db[EVENTS].create_index([("mcp_session_id", ASCENDING), ("_id", DESCENDING)], name="session_newest")


def _v3_mcp_tasks(db: Database[Any]) -> None:
    from .tasks import create_task_indexes  # the task documents live beside the store part using them

    create_task_indexes(db)


def _v4_handles_idempotency(db: Database[Any]) -> None:
    from .handles import create_handle_indexes  # the documents live beside the store part using them

    create_handle_indexes(db)


def _v5_erasure(db: Database[Any]) -> None:
    from .erasure import create_erasure_indexes  # the documents live beside the store part using them

    create_erasure_indexes(db)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "sessions, messages (unique per session and seq), files, transports, agent state", _v1_core),
    Migration(2, "MCP event log", _v2_event_log),
    Migration(3, "MCP tasks (SEP-2663)", _v3_mcp_tasks),
    Migration(4, "MCP state handles (SEP-2567) and idempotency entries", _v4_handles_idempotency),
    Migration(5, "erasure tombstones (expiry index)", _v5_erasure),
)
LATEST_VERSION = MIGRATIONS[-1].version


def current_version(db: Database[Any]) -> int:
    """The highest applied version, 0 for an empty database."""
    doc = db[SCHEMA].find_one({}, sort=[("_id", DESCENDING)], projection={"_id": 1})
    return int(doc["_id"]) if doc else 0


def upgrade(db: Database[Any], target: int | None = None) -> list[int]:
    """Apply the pending steps up to ``target``; return the versions applied."""
    target = LATEST_VERSION if target is None else target
    done = {int(doc["_id"]) for doc in db[SCHEMA].find({}, projection={"_id": 1})}
    applied: list[int] = []
    for step in MIGRATIONS:
        if step.version > target:
            break
        if step.version in done:
            continue
        logger.info("applying MongoDB schema step %d: %s", step.version, step.description)
        step.apply(db)
        db[SCHEMA].update_one(
            {"_id": step.version},
            {"$setOnInsert": {"description": step.description, "applied_at": datetime.now(UTC)}},
            upsert=True,
        )
        applied.append(step.version)
    return applied
