"""The MongoDB backend's files, transport sessions, agent state, event log, sweeps
and statistics (a mixin of :class:`sessionq.models.mongo.MongoStore`), and its error mapping.

Multi-field state changes (heartbeat, disconnect, recover) are compare-and-set
updates: read the document, decide, then update with a filter that matches only
the state that was read; a lost race reads again. Sweeps find a bounded batch of
``_id`` values and update or delete exactly those, so each statement is bounded.
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import datetime, timedelta
from typing import Any, Callable, TypeVar, cast

from bson.errors import BSONError
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    PyMongoError,
    WTimeoutError,
)

from . import mongo_schema as ms
from .errors import Conflict, NotFound, StoreError, StoreUnavailable, ValidationError
from .mongo_schema import from_us, opt_us, to_us
from .records import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_RECOVERY_ATTEMPTS,
    AgentState,
    FileRecord,
    StreamEvent,
    TransportSession,
)
from .store import DEFAULT_SWEEP_BATCH_SIZE, StoreStats

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
Doc = dict[str, Any]

# Rounds of compare-and-set before a state change gives up under contention.
DEFAULT_CAS_ATTEMPTS = 50
# The server's error code for a unique-index violation.
DUPLICATE_KEY = 11000
# The counter document that hands out event ids.
EVENT_COUNTER = "event_id"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def translate_errors(method: F) -> F:
    """Map PyMongo errors to the store's error hierarchy (transient ones to StoreUnavailable)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except StoreError:
            raise
        except (ConnectionFailure, ExecutionTimeout, WTimeoutError) as exc:
            raise StoreUnavailable(f"mongodb unavailable: {_first_line(exc)}") from exc
        except DuplicateKeyError as exc:
            raise Conflict(f"duplicate key: {_first_line(exc)}") from exc
        except BSONError as exc:
            raise ValidationError(f"value rejected by mongodb: {_first_line(exc)}") from exc
        except PyMongoError as exc:
            raise StoreError(f"mongodb rejected an operation: {_first_line(exc)}") from exc

    return cast(F, wrapper)


def only_duplicates(exc: BulkWriteError) -> bool:
    """True when a bulk write failed only on unique-index violations."""
    errors = exc.details.get("writeErrors", [])
    return (
        bool(errors)
        and all(e.get("code") == DUPLICATE_KEY for e in errors)
        and not exc.details.get("writeConcernErrors")
    )


class MongoRecordsMixin:
    """Everything of the Store contract except sessions and messages, on MongoDB."""

    _sessions: Collection[Doc]
    _messages: Collection[Doc]
    _files: Collection[Doc]
    _transports: Collection[Doc]
    _agent: Collection[Doc]
    _events: Collection[Doc]
    _counters: Collection[Doc]

    # -- files -------------------------------------------------------------

    @translate_errors
    def save_file(self, record: FileRecord) -> None:
        """See :meth:`Store.save_file`."""
        self._files.replace_one({"_id": record.file_id}, ms.file_doc(record), upsert=True)

    @translate_errors
    def load_file(self, file_id: str) -> FileRecord:
        """See :meth:`Store.load_file`."""
        doc = self._files.find_one({"_id": file_id})
        if doc is None:
            raise NotFound(f"file {file_id!r} does not exist")
        return ms.doc_to_file(doc)

    @translate_errors
    def delete_file(self, file_id: str) -> bool:
        """See :meth:`Store.delete_file`."""
        return bool(self._files.delete_one({"_id": file_id}).deleted_count)

    # -- transport sessions ---------------------------------------------------

    @translate_errors
    def register_transport(self, session: TransportSession) -> TransportSession:
        """See :meth:`Store.register_transport`."""
        saved = {
            "working_directory": session.working_directory,
            "transport_state": session.transport_state,
            "agent_context": session.agent_context,
            "conversation_state": session.conversation_state,
            "metadata": session.metadata,
        }
        initial = {
            "status": session.status,
            "created_at": to_us(session.created_at),
            "last_heartbeat": opt_us(session.last_heartbeat),
            "disconnected_at": opt_us(session.disconnected_at),
            "grace_expires_at": opt_us(session.grace_expires_at),
            "recovery_attempts": session.recovery_attempts,
        }
        update = {"$set": saved, "$setOnInsert": initial}
        try:
            self._transports.update_one({"_id": session.mcp_session_id}, update, upsert=True)
        except DuplicateKeyError:  # a racing registration inserted it first
            self._transports.update_one({"_id": session.mcp_session_id}, {"$set": saved})
        return self.load_transport(session.mcp_session_id)

    @translate_errors
    def load_transport(self, mcp_session_id: str) -> TransportSession:
        """See :meth:`Store.load_transport`."""
        doc = self._transports.find_one({"_id": mcp_session_id})
        if doc is None:
            raise NotFound(f"transport session {mcp_session_id!r} does not exist")
        return ms.doc_to_transport(doc)

    def _change_transport(
        self, mcp_session_id: str, decide: Callable[[TransportSession | None], tuple[Any, dict[str, Any]]]
    ) -> Any:
        """Compare-and-set: ``decide`` returns ``(result, changes)``; changes apply only
        if the document is still as read, else it is read again."""
        for _ in range(DEFAULT_CAS_ATTEMPTS):
            doc = self._transports.find_one({"_id": mcp_session_id})
            result, changes = decide(None if doc is None else ms.doc_to_transport(doc))
            if not changes or doc is None:
                return result
            guard = {k: doc.get(k) for k in ("status", "last_heartbeat", "disconnected_at", "recovery_attempts")}
            values = {k: opt_us(v) if k in ms.TRANSPORT_TIMES else v for k, v in changes.items()}
            if self._transports.update_one({"_id": mcp_session_id, **guard}, {"$set": values}).matched_count:
                return result
        raise StoreUnavailable(f"transport session {mcp_session_id!r} is changing too fast; try again")

    @translate_errors
    def heartbeat(self, mcp_session_id: str, at: datetime) -> bool:
        """See :meth:`Store.heartbeat`."""

        def decide(ts: TransportSession | None) -> tuple[bool, dict[str, Any]]:
            if ts is None or ts.status == "expired":
                return False, {}
            changes: dict[str, Any] = {}
            if ts.last_heartbeat is None or at > ts.last_heartbeat:
                changes["last_heartbeat"] = at
            if ts.status == "disconnected" and ts.disconnected_at is not None and at > ts.disconnected_at:
                changes.update(status="active", disconnected_at=None, grace_expires_at=None)
            return True, changes

        return bool(self._change_transport(mcp_session_id, decide))

    @translate_errors
    def mark_disconnected(self, mcp_session_id: str, at: datetime, grace: timedelta = DEFAULT_GRACE_PERIOD) -> bool:
        """See :meth:`Store.mark_disconnected`."""

        def decide(ts: TransportSession | None) -> tuple[bool, dict[str, Any]]:
            if ts is None or ts.status == "expired":
                return False, {}
            if ts.status == "disconnected":
                return True, {}
            if ts.last_heartbeat is not None and ts.last_heartbeat > at:
                return False, {}
            return True, {"status": "disconnected", "disconnected_at": at, "grace_expires_at": at + grace}

        return bool(self._change_transport(mcp_session_id, decide))

    @translate_errors
    def recover(
        self, mcp_session_id: str, now: datetime, *, max_attempts: int = DEFAULT_MAX_RECOVERY_ATTEMPTS
    ) -> TransportSession:
        """See :meth:`Store.recover`."""

        def decide(ts: TransportSession | None) -> tuple[TransportSession, dict[str, Any]]:
            if ts is None:
                raise NotFound(f"transport session {mcp_session_id!r} does not exist")
            changes = ts.recovery_changes(now, max_attempts=max_attempts)
            return ts.replace(**changes), changes

        return cast(TransportSession, self._change_transport(mcp_session_id, decide))

    # -- agent state -------------------------------------------------------------

    @translate_errors
    def put_agent_state(self, state: AgentState) -> bool:
        """See :meth:`Store.put_agent_state`."""
        key = {"agent_id": state.agent_id, "key": state.key}
        values = {k: v for k, v in ms.agent_state_doc(state).items() if k not in key}
        newer_or_equal = {**key, "updated_at": {"$lte": values["updated_at"]}}
        try:
            self._agent.update_one(newer_or_equal, {"$set": values}, upsert=True)
            return True
        except DuplicateKeyError:  # stored state is newer, or a racing writer inserted it
            return bool(self._agent.update_one(newer_or_equal, {"$set": values}).matched_count)

    @translate_errors
    def get_agent_state(self, agent_id: str, key: str, now: datetime) -> AgentState | None:
        """See :meth:`Store.get_agent_state`."""
        doc = self._agent.find_one({"agent_id": agent_id, "key": key})
        if doc is None or (doc.get("expires_at") is not None and doc["expires_at"] <= to_us(now)):
            return None
        return ms.doc_to_agent_state(doc)

    # -- MCP event log ---------------------------------------------------------------

    @translate_errors
    def append_event(
        self, mcp_session_id: str, stream_id: str, message: dict[str, Any] | None, created_at: datetime
    ) -> StreamEvent:
        """See :meth:`Store.append_event` (ids come from one counter document)."""
        probe = StreamEvent("0", mcp_session_id, stream_id, message, created_at)
        counter = self._counters.find_one_and_update(
            {"_id": EVENT_COUNTER}, {"$inc": {"n": 1}}, upsert=True, return_document=ReturnDocument.AFTER
        )
        assert counter is not None  # upsert=True with ReturnDocument.AFTER always returns the document
        event_id = int(counter["n"])
        # Stored as JSON text: MCP messages may hold keys such as "$schema".
        body = None if message is None else json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        self._events.insert_one(
            {
                "_id": event_id,
                "mcp_session_id": mcp_session_id,
                "stream_id": stream_id,
                "message": body,
                "created_at": to_us(probe.created_at),
            }
        )
        return probe.replace(event_id=str(event_id))

    @translate_errors
    def events_after(
        self, mcp_session_id: str, event_id: str, *, limit: int = 10_000
    ) -> tuple[str, list[StreamEvent]] | None:
        """See :meth:`Store.events_after`."""
        if not event_id.isdigit():
            return None
        anchor = self._events.find_one({"_id": int(event_id), "mcp_session_id": mcp_session_id}, {"stream_id": 1})
        if anchor is None:
            return None
        stream_id = anchor["stream_id"]
        query = {"mcp_session_id": mcp_session_id, "stream_id": stream_id, "_id": {"$gt": int(event_id)}}
        events = [
            StreamEvent(
                event_id=str(doc["_id"]),
                mcp_session_id=doc["mcp_session_id"],
                stream_id=doc["stream_id"],
                message=None if doc.get("message") is None else json.loads(doc["message"]),
                created_at=cast(datetime, from_us(doc["created_at"])),
            )
            for doc in self._events.find(query).sort("_id", ASCENDING).limit(limit)
        ]
        return stream_id, events

    # -- sweeps ------------------------------------------------------------------------

    @staticmethod
    def _batched(
        collection: Collection[Doc],
        query: Doc,
        action: Callable[[Doc, list[Any]], int],
        batch_size: int,
        dry_run: bool = False,
    ) -> int:
        """Apply ``action(filter, ids)`` to the documents matching ``query``, at most
        ``batch_size`` ``_id`` values at a time, until a batch comes back short.
        With ``dry_run`` only count the matching documents (in the database)."""
        if dry_run:
            return int(collection.count_documents(query))
        total = 0
        while True:
            ids = [doc["_id"] for doc in collection.find(query, {"_id": 1}).limit(batch_size)]
            if not ids:
                return total
            total += action({**query, "_id": {"$in": ids}}, ids)
            if len(ids) < batch_size:
                return total

    def _update_batched(
        self, collection: Collection[Doc], query: Doc, changes: Doc, batch_size: int, dry_run: bool = False
    ) -> int:
        return self._batched(
            collection,
            query,
            lambda f, _: collection.update_many(f, {"$set": changes}).modified_count,
            batch_size,
            dry_run,
        )

    def _delete_batched(self, collection: Collection[Doc], query: Doc, batch_size: int, dry_run: bool = False) -> int:
        return self._batched(
            collection, query, lambda f, _: collection.delete_many(f).deleted_count, batch_size, dry_run
        )

    @translate_errors
    def expire_idle_sessions(
        self, idle_before: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.expire_idle_sessions`."""
        query = {"status": "active", "updated_at": {"$lt": to_us(idle_before)}}
        return self._update_batched(self._sessions, query, {"status": "expired"}, batch_size, dry_run)

    @translate_errors
    def purge_expired_sessions(
        self, expired_before: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.purge_expired_sessions` (messages of the deleted sessions too)."""

        def purge(query: Doc, ids: list[Any]) -> int:
            deleted = self._sessions.delete_many(query).deleted_count
            # A session revived between the find and the delete keeps its messages.
            kept = {doc["_id"] for doc in self._sessions.find({"_id": {"$in": ids}}, {"_id": 1})}
            gone = [sid for sid in ids if sid not in kept]
            if gone:
                self._messages.delete_many({"session_id": {"$in": gone}})
            return int(deleted)

        query = {"status": "expired", "updated_at": {"$lt": to_us(expired_before)}}
        return self._batched(self._sessions, query, purge, batch_size, dry_run)

    @translate_errors
    def expire_transports(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.expire_transports`."""
        query = {"status": "disconnected", "grace_expires_at": {"$ne": None, "$lte": to_us(now)}}
        return self._update_batched(self._transports, query, {"status": "expired"}, batch_size, dry_run)

    @translate_errors
    def disconnect_stale_transports(
        self,
        heartbeat_before: datetime,
        now: datetime,
        grace: timedelta = DEFAULT_GRACE_PERIOD,
        *,
        batch_size: int = DEFAULT_SWEEP_BATCH_SIZE,
        dry_run: bool = False,
    ) -> int:
        """See :meth:`Store.disconnect_stale_transports`."""
        query = {"status": {"$in": ["active", "recovered"]}, "last_heartbeat": {"$lt": to_us(heartbeat_before)}}
        changes = {"status": "disconnected", "disconnected_at": to_us(now), "grace_expires_at": to_us(now + grace)}
        return self._update_batched(self._transports, query, changes, batch_size, dry_run)

    @translate_errors
    def delete_expired_files(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.delete_expired_files`."""
        return self._delete_batched(self._files, {"expires_at": {"$ne": None, "$lte": to_us(now)}}, batch_size, dry_run)

    @translate_errors
    def delete_expired_agent_state(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.delete_expired_agent_state`."""
        return self._delete_batched(self._agent, {"expires_at": {"$ne": None, "$lte": to_us(now)}}, batch_size, dry_run)

    @translate_errors
    def trim_events(
        self,
        *,
        max_per_session: int,
        created_before: datetime,
        batch_size: int = DEFAULT_SWEEP_BATCH_SIZE,
        dry_run: bool = False,
    ) -> int:
        """See :meth:`Store.trim_events`."""
        cutoff = to_us(created_before)
        total = self._delete_batched(self._events, {"created_at": {"$lt": cutoff}}, batch_size, dry_run)
        # In a dry run the old events were only counted, so the cap applies to the rest.
        recent = [{"$match": {"created_at": {"$gte": cutoff}}}] if dry_run else []
        over = list(
            self._events.aggregate(
                recent
                + [
                    {"$group": {"_id": "$mcp_session_id", "n": {"$sum": 1}}},
                    {"$match": {"n": {"$gt": max_per_session}}},
                ]
            )
        )
        if dry_run:
            return total + sum(int(group["n"]) - max_per_session for group in over)
        for group in over:
            newest_dropped = list(
                self._events.find({"mcp_session_id": group["_id"]}, {"_id": 1})
                .sort("_id", DESCENDING)
                .skip(max_per_session)
                .limit(1)
            )
            if newest_dropped:
                query = {"mcp_session_id": group["_id"], "_id": {"$lte": newest_dropped[0]["_id"]}}
                total += self._delete_batched(self._events, query, batch_size)
        return total

    # -- statistics ------------------------------------------------------------------------

    @translate_errors
    def stats(self) -> StoreStats:
        """See :meth:`Store.stats`."""
        by_status: dict[str, int] = {}
        messages = 0
        for group in self._sessions.aggregate(
            [{"$group": {"_id": "$status", "n": {"$sum": 1}, "m": {"$sum": "$message_count"}}}]
        ):
            by_status[group["_id"]] = int(group["n"])
            messages += int(group["m"])
        transports = {
            g["_id"]: int(g["n"]) for g in self._transports.aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}])
        }
        return StoreStats(
            sessions_by_status=by_status,
            total_messages=messages,
            total_files=self._files.count_documents({}),
            transports_by_status=transports,
            agent_states=self._agent.count_documents({}),
            stream_events=self._events.count_documents({}),
        )
