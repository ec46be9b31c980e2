"""Sessions and messages on the MongoDB backend, as :class:`MongoRecords`, a part of
:class:`~sessionq.models.mongo.MongoStore`: their documents and conversion to
records, saves and appends, raw imports, reads and deletes.

Messages live in their own collection keyed by ``(session_id, message_id)`` with a
unique ``(session_id, seq)`` index, never in an array inside the session document.
There are no multi-document transactions; concurrency is made safe by the indexes:

* ``seq`` values are proposed from the session's ``message_count`` and inserted with
  an *ordered* ``insert_many``. A writer that loses a race hits the unique
  ``(session_id, seq)`` index, re-reads the highest stored ``seq`` (an index lookup),
  drops the messages another writer already stored and tries again. Ordered inserts
  stop at the first conflict, so seqs stay gapless: ``message_count`` is the highest
  ``seq``.
* The session counters move with ``$max`` only, computed from the messages a write
  inserted *or found already stored*, so a write redelivered after a crash between
  the message insert and the counter update repairs the counters.
* A session save is one conditional upsert (``updated_at <= incoming``); a duplicate
  key error on it means the stored state is newer, and the save loses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError

from ..errors import NotFound, StoreUnavailable, ValidationError
from ..records import ChatMessage, ChatSession
from ..store import (
    DEFAULT_PAGE_SIZE,
    Page,
    PendingWrite,
    SessionWrite,
    WriteResult,
    check_message_owners,
    chunked,
)
from .database import (
    DEFAULT_CHUNK,
    Doc,
    MongoStoreBase,
    only_duplicates,
    translate_errors,
)
from .schema import from_us, to_us

logger = logging.getLogger(__name__)

# Rounds of seq re-basing before a write gives up under contention.
DEFAULT_WRITE_ATTEMPTS = 50


class MongoRecords(MongoStoreBase):
    """Sessions and messages: the session and message half of the Store contract on MongoDB."""

    # -- conversions -------------------------------------------------------------

    @staticmethod
    def _to_session(doc: Doc) -> ChatSession:
        return ChatSession(
            session_id=doc["_id"],
            model=doc.get("model", ""),
            status=doc["status"],
            created_at=from_us(doc["created_at"]),  # type: ignore[arg-type]
            updated_at=from_us(doc["updated_at"]),
            metadata=doc.get("metadata") or {},
            message_count=int(doc.get("message_count", 0)),
        )

    @staticmethod
    def _session_doc(session: ChatSession) -> Doc:
        return {
            "_id": session.session_id,
            "model": session.model,
            "status": session.status,
            "created_at": to_us(session.created_at),
            "updated_at": to_us(session.last_activity),
            "metadata": session.metadata,
            "message_count": session.message_count,
        }

    @staticmethod
    def _message_doc(message: ChatMessage, seq: int) -> Doc:
        return {
            "session_id": message.session_id,
            "message_id": message.message_id,
            "seq": seq,
            "role": message.role,
            "content": message.content,
            "created_at": to_us(message.created_at),
            "metadata": message.metadata,
        }

    @staticmethod
    def _to_message(doc: Doc) -> ChatMessage:
        return ChatMessage(
            message_id=doc["message_id"],
            session_id=doc["session_id"],
            seq=int(doc["seq"]),
            role=doc["role"],
            content=doc["content"],
            created_at=from_us(doc["created_at"]),  # type: ignore[arg-type]
            metadata=doc.get("metadata") or {},
        )

    # -- sessions and messages -----------------------------------------------------

    @translate_errors
    def save_sessions(self, writes: Sequence[SessionWrite]) -> WriteResult:
        """See :meth:`Store.save_sessions`."""
        return self._write([(session, session.session_id, list(messages)) for session, messages in writes])

    @translate_errors
    def append_messages(self, session_id: str, messages: Sequence[ChatMessage]) -> int:
        """See :meth:`Store.append_messages`."""
        return self._write([(None, session_id, list(messages))]).messages_inserted

    def _write(self, writes: list[PendingWrite]) -> WriteResult:
        check_message_owners(writes)
        saved = {s.session_id for s, _, _ in writes if s is not None}
        append_only = sorted({sid for s, sid, _ in writes if s is None and sid not in saved})
        if append_only:
            found = {d["_id"] for d in self._sessions.find({"_id": {"$in": append_only}}, {"_id": 1})}
            missing = [sid for sid in append_only if sid not in found]
            if missing:
                raise NotFound(f"session {missing[0]!r} does not exist")
        written = self._upsert_sessions([s for s, _, _ in writes if s is not None])
        pending: dict[str, dict[str, ChatMessage]] = {}
        for _, session_id, messages in writes:
            batch = pending.setdefault(session_id, {})
            for message in messages:
                batch.setdefault(message.message_id, message)
        pending = {sid: batch for sid, batch in pending.items() if batch}
        inserted = self._insert_new_messages(pending, written) if pending else 0
        return WriteResult(sessions_written=len(written), messages_inserted=inserted)

    def _upsert_sessions(self, sessions: list[ChatSession]) -> set[str]:
        """Apply each save in order (newer-or-equal ``updated_at`` wins); return the ids written."""
        written: set[str] = set()
        specs = [
            (
                {"_id": s.session_id, "updated_at": {"$lte": to_us(s.last_activity)}},
                {
                    "$set": {
                        "model": s.model,
                        "status": s.status,
                        "metadata": s.metadata,
                        "updated_at": to_us(s.last_activity),
                    },
                    "$setOnInsert": {"created_at": to_us(s.created_at), "message_count": 0},
                },
            )
            for s in sessions
        ]
        ops = [UpdateOne(query, update, upsert=True) for query, update in specs]
        start = 0
        while start < len(ops):
            try:
                self._sessions.bulk_write(ops[start:], ordered=True)
                written.update(s.session_id for s in sessions[start:])
                return written
            except BulkWriteError as exc:
                if not only_duplicates(exc):
                    raise
                failed = start + int(exc.details["writeErrors"][0]["index"])
                written.update(s.session_id for s in sessions[start:failed])
                # The document exists (newer, or inserted by a racing writer): retry without upsert.
                query, update = specs[failed]
                result = self._sessions.update_one(query, {"$set": update["$set"]})
                if result.matched_count:
                    written.add(sessions[failed].session_id)
                start = failed + 1
        return written

    def _insert_new_messages(self, pending: dict[str, dict[str, ChatMessage]], written: set[str]) -> int:
        sids = list(pending)
        mids = sorted({mid for batch in pending.values() for mid in batch})
        counters: dict[str, tuple[int, int]] = {}  # session -> (highest seq, latest message time)

        def note(doc: Doc) -> None:
            seq, at = counters.get(doc["session_id"], (0, 0))
            counters[doc["session_id"]] = (max(seq, int(doc["seq"])), max(at, int(doc["created_at"])))

        known: set[tuple[str, str]] = set()
        for chunk in chunked(mids, DEFAULT_CHUNK):
            query = {"session_id": {"$in": sids}, "message_id": {"$in": list(chunk)}}
            for doc in self._messages.find(query, {"session_id": 1, "message_id": 1, "seq": 1, "created_at": 1}):
                if doc["message_id"] in pending.get(doc["session_id"], {}):
                    known.add((doc["session_id"], doc["message_id"]))
                    note(doc)
        bases = {
            d["_id"]: int(d.get("message_count", 0))
            for d in self._sessions.find({"_id": {"$in": sids}}, {"message_count": 1})
        }
        missing = [sid for sid in sids if sid not in bases]
        if missing:
            raise NotFound(f"session {missing[0]!r} does not exist")
        docs: list[Doc] = []
        for sid, batch in pending.items():
            seq = bases[sid]
            for message in batch.values():
                if (sid, message.message_id) not in known:
                    seq += 1
                    docs.append(self._message_doc(message, seq))
        inserted = self._insert_ordered(docs)
        for doc in inserted:
            note(doc)
            written.add(doc["session_id"])
        if counters:
            self._sessions.bulk_write(
                [
                    UpdateOne({"_id": sid}, {"$max": {"message_count": seq, "updated_at": at}})
                    for sid, (seq, at) in counters.items()
                ],
                ordered=False,
            )
        if inserted:
            self._drop_orphans({doc["session_id"] for doc in inserted})
        return len(inserted)

    def _drop_orphans(self, session_ids: set[str]) -> None:
        """Delete the messages just written for sessions a racing delete removed meanwhile.

        MongoDB gives no transaction around a write and :meth:`delete_session`: that
        removes the session, then its messages, while a write checks the session, then
        inserts messages, then (here) checks it again. Whichever of the two runs last
        removes the messages, so the outcome is that of the write coming first, never
        messages left without their session.
        """
        live = {d["_id"] for d in self._sessions.find({"_id": {"$in": sorted(session_ids)}}, {"_id": 1})}
        gone = sorted(session_ids - live)
        if gone:
            logger.info("session(s) %s deleted while messages were written to them; removing those messages",
                        ", ".join(gone[:5]))
            self._messages.delete_many({"session_id": {"$in": gone}})

    def _insert_ordered(self, docs: list[Doc]) -> list[Doc]:
        """Insert messages in order; on a conflict, re-base the rest and go on. Returns those inserted."""
        inserted: list[Doc] = []
        remaining = docs
        for _ in range(DEFAULT_WRITE_ATTEMPTS):
            if not remaining:
                return inserted
            try:
                self._messages.insert_many(remaining, ordered=True)
                return inserted + remaining
            except BulkWriteError as exc:
                if not only_duplicates(exc):
                    raise
                done = int(exc.details.get("nInserted", 0))
                inserted.extend(remaining[:done])
                logger.debug("message insert raced another writer after %d documents; re-basing", done)
                remaining = self._rebase(remaining[done:])
        raise StoreUnavailable("message insert kept racing other writers; try again")

    def _rebase(self, docs: list[Doc]) -> list[Doc]:
        """Drop messages stored meanwhile and renumber the rest after the highest stored seq."""
        sids = sorted({d["session_id"] for d in docs})
        query = {"session_id": {"$in": sids}, "message_id": {"$in": sorted({d["message_id"] for d in docs})}}
        stored = {
            (d["session_id"], d["message_id"]) for d in self._messages.find(query, {"session_id": 1, "message_id": 1})
        }
        tops: dict[str, int] = {}
        for sid in sids:
            top = self._messages.find_one({"session_id": sid}, {"seq": 1}, sort=[("seq", DESCENDING)])
            tops[sid] = int(top["seq"]) if top else 0
        out: list[Doc] = []
        for doc in docs:
            if (doc["session_id"], doc["message_id"]) in stored:
                continue
            tops[doc["session_id"]] += 1
            out.append({k: v for k, v in doc.items() if k != "_id"} | {"seq": tops[doc["session_id"]]})
        return out

    @translate_errors
    def import_records(self, sessions: Sequence[ChatSession], messages: Sequence[ChatMessage]) -> WriteResult:
        """See :meth:`Store.import_records`."""
        written = 0
        incoming = {s.session_id: self._session_doc(s) for s in sessions}
        for chunk in chunked(list(incoming), DEFAULT_CHUNK):
            stored = {d["_id"]: d for d in self._sessions.find({"_id": {"$in": list(chunk)}})}
            new = [incoming[sid] for sid in chunk if sid not in stored]
            if new:
                try:
                    written += len(self._sessions.insert_many(new, ordered=False).inserted_ids)
                except BulkWriteError as exc:
                    if not only_duplicates(exc):
                        raise
                    written += int(exc.details.get("nInserted", 0))
            for sid, old in stored.items():
                doc = incoming[sid]
                changed = doc["updated_at"] >= old["updated_at"] and any(old.get(k) != v for k, v in doc.items())
                guard = {"_id": sid, "updated_at": old["updated_at"]}
                if changed and self._sessions.replace_one(guard, doc).matched_count:
                    written += 1
        self._check_sessions_exist({m.session_id for m in messages} - set(incoming))
        inserted = 0
        docs = []
        for message in messages:
            if message.seq < 1:
                raise ValidationError(f"message {message.message_id!r} has no seq; imports keep the source's seq")
            docs.append(self._message_doc(message, message.seq))
        for part in chunked(docs, DEFAULT_CHUNK):
            try:
                inserted += len(self._messages.insert_many(list(part), ordered=False).inserted_ids)
            except BulkWriteError as exc:
                if not only_duplicates(exc):
                    raise
                inserted += int(exc.details.get("nInserted", 0))
        return WriteResult(sessions_written=written, messages_inserted=inserted)

    def _check_sessions_exist(self, session_ids: set[str]) -> None:
        wanted = sorted(session_ids)
        for chunk in chunked(wanted, DEFAULT_CHUNK):
            found = {d["_id"] for d in self._sessions.find({"_id": {"$in": list(chunk)}}, {"_id": 1})}
            missing = [sid for sid in chunk if sid not in found]
            if missing:
                raise NotFound(f"session {missing[0]!r} does not exist")

    @translate_errors
    def load_session(self, session_id: str) -> ChatSession:
        """See :meth:`Store.load_session`."""
        doc = self._sessions.find_one({"_id": session_id})
        if doc is None:
            raise NotFound(f"session {session_id!r} does not exist")
        return self._to_session(doc)

    @translate_errors
    def list_sessions(
        self,
        *,
        status: str | None = None,
        updated_before: datetime | None = None,
        updated_after: datetime | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> Page[ChatSession]:
        """See :meth:`Store.list_sessions`."""
        query: Doc = {}
        if status is not None:
            query["status"] = status
        window: Doc = {}
        if updated_before is not None:
            window["$lt"] = to_us(updated_before)
        if updated_after is not None:
            window["$gt"] = to_us(updated_after)
        if window:
            query["updated_at"] = window
        if cursor is not None:
            query["_id"] = {"$gt": cursor}
        docs = list(self._sessions.find(query).sort("_id", ASCENDING).limit(limit + 1))
        items = [self._to_session(doc) for doc in docs[:limit]]
        return Page(items, items[-1].session_id if len(docs) > limit else None)

    @translate_errors
    def load_messages(self, session_id: str, *, after_seq: int = 0, limit: int | None = None) -> list[ChatMessage]:
        """See :meth:`Store.load_messages`."""
        found = self._messages.find({"session_id": session_id, "seq": {"$gt": after_seq}}).sort("seq", ASCENDING)
        if limit is not None:
            found = found.limit(limit)
        return [self._to_message(doc) for doc in found]

    @translate_errors
    def delete_session(self, session_id: str) -> bool:
        """See :meth:`Store.delete_session`."""
        deleted = self._sessions.delete_one({"_id": session_id}).deleted_count
        # Always sweep the messages, so a redelivered delete cleans up after a crash.
        self._messages.delete_many({"session_id": session_id})
        return bool(deleted)

    @translate_errors
    def archive_session(self, session_id: str, at: datetime) -> ChatSession:
        """See :meth:`Store.archive_session`."""
        doc = self._sessions.find_one_and_update(
            {"_id": session_id},
            {"$set": {"status": "archived"}, "$max": {"updated_at": to_us(at)}},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            raise NotFound(f"session {session_id!r} does not exist")
        return self._to_session(doc)
