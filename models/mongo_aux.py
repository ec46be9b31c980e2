"""Bulk listing and import of file records, transport sessions and agent state for
the MongoDB backend (see :mod:`sessionq.models.kinds`), a mixin of :class:`~sessionq.models.mongo.MongoStore`.

Listings are keyset pages over the key (``_id``, or the unique ``(agent_id, key)``
index; for the composite key one range query per key prefix:
:meth:`RecordKind.ranges_after`). An import reads the stored documents of a
chunk's keys in one query, decides per record with :meth:`RecordKind.replaces`,
and sends one unordered
``bulk_write``: ``InsertOne`` for a new key, and for a newer copy a ``ReplaceOne``
whose filter also names the version fields as read (compare-and-set). A write that
matched nothing (the document changed meanwhile) or hit the unique index (another
writer inserted the key) is decided again in the next round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from pymongo import ASCENDING, InsertOne, ReplaceOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError

from . import mongo_schema as ms
from .errors import StoreUnavailable, ValidationError
from .kinds import DEFAULT_IMPORT_CHUNK, DEFAULT_IMPORT_ROUNDS, Key, RecordKind, chunked
from .mongo_ops import Doc, only_duplicates, translate_errors
from .records import Record
from .store import DEFAULT_PAGE_SIZE, Page

logger = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)


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


class MongoKindMixin:
    """:meth:`Store.list_kind`, :meth:`Store.find_kind` and :meth:`Store.import_kind` on MongoDB."""

    _db: Any

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
        paths = dict(zip(kind.key_fields, layout.key_paths))
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
    def import_kind(self, kind: RecordKind[R], records: Sequence[R]) -> int:
        """See :meth:`Store.import_kind`."""
        layout, collection = self._layout(kind)
        latest = kind.latest(records)
        written = 0
        for chunk in chunked([latest[key] for key in sorted(latest)], DEFAULT_IMPORT_CHUNK):
            for _ in range(DEFAULT_IMPORT_ROUNDS):
                count, complete = self._import_round(kind, layout, collection, chunk)
                written += count
                if complete:
                    break
                logger.debug("%s documents changed during an import; comparing again", kind.name)
            else:
                raise StoreUnavailable(f"{kind.plural} import kept racing other writers; try again")
        return written

    @staticmethod
    def _import_round(
        kind: RecordKind[R], layout: _Layout, collection: Collection[Doc], records: Sequence[R]
    ) -> tuple[int, bool]:
        """One compare-and-set pass over a chunk: ``(documents written, complete)``."""
        stored = MongoKindMixin._stored(layout, collection, [kind.key(r) for r in records])
        ops: list[InsertOne[Doc] | ReplaceOne[Doc]] = []
        for record in records:
            key = kind.key(record)
            current = stored.get(key)
            if current is None:
                ops.append(InsertOne(layout.to_doc(record)))
            elif kind.replaces(record, layout.from_doc(current)):
                where = dict(zip(layout.key_paths, key)) | {name: current.get(name) for name in layout.guard}
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
