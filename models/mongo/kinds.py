"""Files, transport sessions and agent state on the MongoDB backend: the single-record
operations and the bulk ones (see :mod:`sessionq.models.kinds`), as
:class:`MongoKinds`, a part of :class:`~sessionq.models.mongo.MongoStore`.

Multi-field state changes (heartbeat, disconnect, recover) are compare-and-set
updates: read the document, decide, then update with a filter that matches only
the state that was read; a lost race reads again.

Bulk listings are keyset pages over the key (``_id``, or the unique
``(agent_id, key)`` index; for the composite key one range query per key prefix:
:meth:`RecordKind.ranges_after`). An import round (:meth:`Store.import_kind` runs
them) reads the stored documents of a chunk's keys in one query, decides per record
with :meth:`RecordKind.replaces`, and sends one unordered ``bulk_write``:
``InsertOne`` for a new key, and for a newer copy a ``ReplaceOne`` whose filter also
names the version fields as read (compare-and-set). A write that matched nothing
(the document changed meanwhile) or hit the unique index (another writer inserted
the key) is decided again in the next round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from pymongo import ASCENDING, InsertOne, ReplaceOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, DuplicateKeyError

from ..errors import NotFound, StoreUnavailable, ValidationError
from ..kinds import DEFAULT_IMPORT_CHUNK, Key, RecordKind
from ..records import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_RECOVERY_ATTEMPTS,
    AgentState,
    FileRecord,
    Record,
    TransportSession,
)
from ..store import DEFAULT_PAGE_SIZE, Page, chunked
from . import schema as ms
from .database import Doc, MongoStoreBase, only_duplicates, translate_errors
from .schema import opt_us, to_us

R = TypeVar("R", bound=Record)

# Rounds of compare-and-set before a state change gives up under contention.
DEFAULT_CAS_ATTEMPTS = 50


@dataclass(frozen=True)
class _Layout:
    """How one record kind is kept: its collection, key fields and document shape."""

    collection: str
    #: Document fields holding the key, in keyset order.
    key_paths: tuple[str, ...]
    #: Fields a replacement must find as they were read (the kind's version inputs).
    guard: tuple[str, ...]
    to_doc: Callable[[Any], Doc]
    from_doc: Callable[[Doc], Any]


_LAYOUTS = {
    "files": _Layout(ms.FILES, ("_id",), ("uploaded_at",), ms.file_doc, ms.doc_to_file),
    "transports": _Layout(
        ms.TRANSPORTS,
        ("_id",),
        ("recovery_attempts", "last_heartbeat", "disconnected_at", "status"),
        ms.transport_doc,
        ms.doc_to_transport,
    ),
    "agent_states": _Layout(
        ms.AGENT_STATE, ("agent_id", "key"), ("updated_at",), ms.agent_state_doc, ms.doc_to_agent_state
    ),
}


class MongoKinds(MongoStoreBase):
    """Files, transport sessions and agent state: one at a time and in bulk
    (:meth:`Store.list_kind`, :meth:`Store.find_kind`, the rounds of :meth:`Store.import_kind`)."""

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

    # -- in bulk ------------------------------------------------------------------

    def _layout(self, kind: RecordKind[Any]) -> tuple[_Layout, Collection[Doc]]:
        layout = _LAYOUTS.get(kind.plural)
        if layout is None:
            raise ValidationError(f"the MongoDB store holds no bulk record kind {kind.plural!r}")
        return layout, self._db[layout.collection]

    @translate_errors
    def list_kind(self, kind: RecordKind[R], *, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None) -> Page[R]:
        """See :meth:`Store.list_kind`."""
        if limit < 1:
            raise ValidationError("limit must be at least 1")
        layout, collection = self._layout(kind)
        order = [(path, ASCENDING) for path in layout.key_paths]
        paths = dict(zip(kind.key_fields, layout.key_paths, strict=False))
        if cursor is None:
            docs = list(collection.find({}).sort(order).limit(limit + 1))
        else:
            docs = []
            for equal, (name, bound) in kind.ranges_after(kind.parse_cursor(cursor)):
                query = {paths[field]: value for field, value in equal} | {paths[name]: {"$gt": bound}}
                docs.extend(collection.find(query).sort(order).limit(limit + 1 - len(docs)))
                if len(docs) > limit:
                    break
        items: list[R] = [layout.from_doc(doc) for doc in docs[:limit]]
        return Page(items, kind.cursor(items[-1]) if len(docs) > limit else None)

    @translate_errors
    def find_kind(self, kind: RecordKind[R], keys: Sequence[Key]) -> list[R]:
        """See :meth:`Store.find_kind`."""
        layout, collection = self._layout(kind)
        wanted = list(dict.fromkeys(kind.check_key(key) for key in keys))
        found: list[R] = []
        for chunk in chunked(wanted, DEFAULT_IMPORT_CHUNK):
            found.extend(layout.from_doc(doc) for doc in self._stored(layout, collection, chunk).values())
        return found

    @staticmethod
    def _stored(layout: _Layout, collection: Collection[Doc], keys: Sequence[Key]) -> dict[Key, Doc]:
        """The stored documents of ``keys``, by key: one query (per key field ``$in``,
        then exact pairs picked out here for composite keys)."""
        query = {path: {"$in": sorted({key[i] for key in keys})} for i, path in enumerate(layout.key_paths)}
        wanted = set(keys)
        out: dict[Key, Doc] = {}
        for doc in collection.find(query):
            key = tuple(doc[path] for path in layout.key_paths)
            if key in wanted:
                out[key] = doc
        return out

    @translate_errors
    def _import_round(self, kind: RecordKind[R], records: Sequence[R]) -> tuple[int, bool]:
        """See :meth:`Store._import_round`: one compare-and-set ``bulk_write`` over the chunk."""
        layout, collection = self._layout(kind)
        stored = self._stored(layout, collection, [kind.key(r) for r in records])
        ops: list[InsertOne[Doc] | ReplaceOne[Doc]] = []
        for record in records:
            key = kind.key(record)
            current = stored.get(key)
            if current is None:
                ops.append(InsertOne(layout.to_doc(record)))
            elif kind.replaces(record, layout.from_doc(current)):
                where: dict[str, Any] = dict(zip(layout.key_paths, key, strict=False))
                where |= {name: current.get(name) for name in layout.guard}
                ops.append(ReplaceOne(where, layout.to_doc(record)))
        if not ops:
            return 0, True
        try:
            result = collection.bulk_write(ops, ordered=False)
            done = result.inserted_count + result.matched_count
        except BulkWriteError as exc:
            if not only_duplicates(exc):
                raise
            done = int(exc.details.get("nInserted", 0)) + int(exc.details.get("nMatched", 0))
        return done, done == len(ops)
