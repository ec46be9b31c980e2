"""The seed system's MongoDB layout read as a sessionq source.

One document per session (``_id`` = ``session_id``) with its messages embedded in
``messages``, in the collection ``chat_sessions`` or ``sessions`` (``--legacy-collection``
for another); file records, if any, in ``uploaded_files`` with the SQL table's fields
(``_id`` = ``file_id``). Sessions are read in keyset pages by ``_id`` without their
messages (an aggregation counts them); messages are then read one session document at a
time, numbered in array order.

BSON dates carry no zone and the seed system wrote naive times, so dates are read as
naive wall times and placed in :attr:`LegacyOptions.tz` like every other seed-era time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from bson.codec_options import CodecOptions
from pymongo.collection import Collection

from ..errors import NotFound, ValidationError
from ..mongo.database import DEFAULT_CHUNK, DEFAULT_DATABASE, Doc, open_client, translate_errors
from ..records import ChatMessage, ChatSession, FileRecord
from ..settings import redact_url
from ..store import Page, chunked
from .base import LegacyStore, fill_page
from .records import (
    MONGO_FILES_COLLECTION,
    MONGO_SESSION_COLLECTIONS,
    LegacyOptions,
    Problems,
    legacy_file,
    legacy_message,
    legacy_session,
    where,
)

# Connections a legacy source keeps (reads are sequential).
DEFAULT_LEGACY_POOL = 4
_FOUND = "__sessionq_found"
# The number of embedded messages: 0 when there is no ``messages``, -1 when it is not an array.
_MISSING_OR_BAD = {"$cond": [{"$ifNull": ["$messages", False]}, -1, 0]}
_COUNT = {"$cond": [{"$isArray": "$messages"}, {"$size": "$messages"}, _MISSING_OR_BAD]}


class LegacyMongoStore(LegacyStore):
    """A seed-era MongoDB database, read-only (see the module docs)."""

    backend = "mongodb"

    def __init__(self, url: str, *, options: LegacyOptions | None = None) -> None:
        self._client = open_client(url, max_pool_size=DEFAULT_LEGACY_POOL)
        name = self._client.get_default_database(default=DEFAULT_DATABASE).name
        self._db = self._client.get_database(name, codec_options=CodecOptions())  # naive dates
        self.location = redact_url(url)
        self.options = options or LegacyOptions()
        self.problems = Problems()
        self._collection_name: str | None = None

    @translate_errors
    def ping(self) -> None:
        """See :meth:`Store.ping`."""
        self._client.admin.command("ping")

    def close(self) -> None:
        """See :meth:`Store.close`."""
        self._client.close()

    @translate_errors
    def _collection(self) -> Collection[Doc] | None:
        if self._collection_name is None:
            present = set(self._db.list_collection_names())
            wanted = [self.options.collection] if self.options.collection else list(MONGO_SESSION_COLLECTIONS)
            self._collection_name = next((name for name in wanted if name in present), "")
        return self._db[self._collection_name] if self._collection_name else None

    @property
    def table(self) -> str:
        """The session collection's name, as problems name it."""
        self._collection()
        return self._collection_name or MONGO_SESSION_COLLECTIONS[0]

    def has_layout(self) -> bool:
        """See :meth:`LegacyStore.has_layout`: the session collection exists."""
        return self._collection() is not None

    # -- sessions ------------------------------------------------------------

    def _session(self, row: Doc) -> ChatSession | None:
        doc = dict(row)  # the page keeps the row: its _id is the next cursor
        key = doc.pop("_id")
        found = doc.pop(_FOUND, 0)
        try:
            if doc.setdefault("session_id", key) != key:
                raise ValidationError(f"session_id {doc['session_id']!r:.80} differs from _id")
            if found < 0:
                raise ValidationError("messages must be an array")
            return legacy_session(doc, found, self.options.tz, self.problems, self.table)
        except ValidationError as exc:
            self.problems.reject(where(self.table, key), str(exc))
            return None

    @translate_errors
    def _session_docs(self, after: str | None, limit: int, *, only: str | None = None) -> list[Doc]:
        collection = self._collection()
        if collection is None:
            return []
        match: Doc = {"_id": only} if only is not None else {"_id": {"$gt": after}} if after is not None else {}
        return list(collection.aggregate([
            {"$match": match}, {"$sort": {"_id": 1}}, {"$limit": limit},
            {"$addFields": {_FOUND: _COUNT}}, {"$project": {"messages": 0}},
        ]))

    def _session_page(self, limit: int, cursor: str | None) -> Page[ChatSession]:
        return fill_page(self._session_docs, self._session, lambda doc: str(doc["_id"]), limit, cursor)

    def load_session(self, session_id: str) -> ChatSession:
        """See :meth:`Store.load_session` (a bad document is :class:`NotFound`, and recorded)."""
        docs = self._session_docs(None, 1, only=session_id)
        session = self._session(docs[0]) if docs else None
        if session is None:
            raise NotFound(f"session {session_id!r} does not exist (as a valid document)")
        return session

    # -- messages ------------------------------------------------------------

    @translate_errors
    def _embedded(self, session_id: str) -> list[Any]:
        collection = self._collection()
        doc = collection.find_one({"_id": session_id}, {"messages": 1}) if collection is not None else None
        messages = doc.get("messages") if doc else None
        return messages if isinstance(messages, list) else []

    def _messages(self, session_ids: Sequence[str], page_size: int) -> Iterator[ChatMessage]:
        for session_id in session_ids:
            for position, raw in enumerate(self._embedded(session_id), start=1):
                try:
                    if not isinstance(raw, dict):
                        raise ValidationError(f"message must be a document, got {type(raw).__name__}")
                    yield legacy_message(raw, session_id, position, self.options.tz)
                except ValidationError as exc:
                    label = raw.get("message_id") if isinstance(raw, dict) else None
                    self.problems.reject(
                        where(f"{self.table}.messages", f"{session_id}/{label or f'#{position}'}"), str(exc)
                    )

    # -- files ---------------------------------------------------------------

    def _file(self, row: Doc) -> FileRecord | None:
        doc = dict(row)
        key = doc.pop("_id")
        try:
            if doc.setdefault("file_id", key) != key:
                raise ValidationError(f"file_id {doc['file_id']!r:.80} differs from _id")
            return legacy_file(doc, self.options.tz)
        except ValidationError as exc:
            self.problems.reject(where(MONGO_FILES_COLLECTION, key), str(exc))
            return None

    @translate_errors
    def _file_docs(self, after: str | None, limit: int) -> list[Doc]:
        match: Doc = {"_id": {"$gt": after}} if after is not None else {}
        return list(self._db[MONGO_FILES_COLLECTION].find(match).sort("_id", 1).limit(limit))

    def _file_page(self, limit: int, cursor: str | None) -> Page[FileRecord]:
        return fill_page(self._file_docs, self._file, lambda doc: str(doc["_id"]), limit, cursor)

    @translate_errors
    def _files_by_id(self, file_ids: Sequence[str]) -> list[FileRecord]:
        out = []
        for chunk in chunked(list(file_ids), DEFAULT_CHUNK):
            docs = self._db[MONGO_FILES_COLLECTION].find({"_id": {"$in": list(chunk)}})
            out += [record for record in map(self._file, docs) if record is not None]
        return out

    # -- counts --------------------------------------------------------------

    @translate_errors
    def _counts(self) -> tuple[dict[str, int], int, int]:
        collection = self._collection()
        by_status: dict[str, int] = {}
        messages = 0
        if collection is not None:
            groups = collection.aggregate([{"$group": {
                "_id": {"$ifNull": ["$status", "active"]}, "n": {"$sum": 1},
                "m": {"$sum": {"$cond": [{"$isArray": "$messages"}, {"$size": "$messages"}, 0]}},
            }}])
            for group in groups:
                by_status[str(group["_id"])] = int(group["n"])
                messages += int(group["m"])
        return by_status, messages, int(self._db[MONGO_FILES_COLLECTION].count_documents({}))
