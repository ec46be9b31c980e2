"""State handles and idempotency entries on MongoDB (a mixin of
:class:`~sessionq.models.mongo.MongoStore`).

One document per handle in ``sessionq_handles`` (``_id`` = ``handle_id``) and per
entry in ``sessionq_idempotency`` (``_id`` = ``entry_id``), written with
``w=majority`` and read from the primary like tasks, so a handle returned by one
replica is there for the next call on any other, and exactly one insert of an
idempotency key wins. Times are integer microseconds; data and results are JSON
text (their keys are never field names).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, WriteConcern
from pymongo.collection import Collection
from pymongo.database import Database

from ..errors import NotFound, ValidationError
from ..handles import StateHandle
from ..idempotency import IdempotencyEntry
from ..kinds import RecordKind
from ..store import DEFAULT_PAGE_SIZE, DEFAULT_SWEEP_BATCH_SIZE, Page
from . import schema as ms
from .database import Doc, MongoStoreBase, translate_errors
from .kinds import _Layout
from .schema import from_us, opt_us, to_us

_JSON_FIELDS = ("data", "result")
_TIME_FIELDS = ("created_at", "updated_at", "expires_at", "idle_until", "revoked_at")


def _encode(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _JSON_FIELDS:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if name in _TIME_FIELDS:
        return opt_us(value)
    return value


def _to_doc(record: Any, key: str) -> Doc:
    doc = {f.name: _encode(f.name, getattr(record, f.name)) for f in dataclasses.fields(record)}
    doc["_id"] = doc.pop(key)
    return doc


def _fields(doc: Doc) -> dict[str, Any]:
    fields: dict[str, Any] = {k: v for k, v in doc.items() if k != "_id"}
    for name in _JSON_FIELDS:
        if fields.get(name) is not None:
            fields[name] = json.loads(fields[name])
    for name in _TIME_FIELDS:
        if name in fields:
            fields[name] = from_us(fields[name])
    return fields


def handle_doc(handle: StateHandle) -> Doc:
    """A handle as its document (``_id`` = ``handle_id``)."""
    return _to_doc(handle, "handle_id")


def doc_to_handle(doc: Doc) -> StateHandle:
    """The inverse of :func:`handle_doc`."""
    return StateHandle(handle_id=doc["_id"], **_fields(doc))


def entry_doc(entry: IdempotencyEntry) -> Doc:
    """An idempotency entry as its document (``_id`` = ``entry_id``)."""
    return _to_doc(entry, "entry_id")


def doc_to_entry(doc: Doc) -> IdempotencyEntry:
    """The inverse of :func:`entry_doc`."""
    return IdempotencyEntry(entry_id=doc["_id"], **_fields(doc))


def create_handle_indexes(db: Database[Any]) -> None:
    """Schema step: the indexes of both collections (idempotent)."""
    handles = db[ms.HANDLES]
    handles.create_index([("owner", ASCENDING), ("kind", ASCENDING), ("_id", ASCENDING)], name="owner_kind_id")
    for name in ("expires_at", "idle_until", "revoked_at"):
        handles.create_index([(name, ASCENDING)], name=name)
    db[ms.IDEMPOTENCY].create_index([("expires_at", ASCENDING)], name="expires_at")


_HANDLE_LAYOUT = _Layout(ms.HANDLES, ("_id",), ("version",), handle_doc, doc_to_handle)
_ENTRY_LAYOUT = _Layout(ms.IDEMPOTENCY, ("_id",), ("version",), entry_doc, doc_to_entry)


class MongoHandles(MongoStoreBase):
    """The primitives of :class:`~sessionq.models.handles.HandleRecords` and
    :class:`~sessionq.models.idempotency.IdempotencyRecords` on MongoDB."""

    @property
    def _handles(self) -> Collection[Doc]:
        return self._db.get_collection(ms.HANDLES, write_concern=WriteConcern("majority"))

    @property
    def _idempotency(self) -> Collection[Doc]:
        return self._db.get_collection(ms.IDEMPOTENCY, write_concern=WriteConcern("majority"))

    # -- handles ---------------------------------------------------------------------

    @translate_errors
    def _insert_handle(self, handle: StateHandle) -> None:
        """See :meth:`HandleRecords._insert_handle`."""
        self._handles.insert_one(handle_doc(handle))

    @translate_errors
    def load_handle(self, handle_id: str) -> StateHandle:
        """See :meth:`HandleRecords.load_handle`."""
        doc = self._handles.find_one({"_id": handle_id})
        if doc is None:
            raise NotFound(f"handle {handle_id!r} does not exist")
        return doc_to_handle(doc)

    @translate_errors
    def _update_handle(self, handle_id: str, expected_version: int, changes: dict[str, Any]) -> bool:
        """See :meth:`HandleRecords._update_handle`."""
        update = {name: _encode(name, value) for name, value in changes.items()}
        return self._handles.update_one({"_id": handle_id, "version": expected_version},
                                        {"$set": update}).matched_count == 1

    @translate_errors
    def list_handles(
        self, owner: str | None, kind: str | None, now: datetime, *, limit: int = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> Page[StateHandle]:
        """See :meth:`HandleRecords.list_handles`."""
        if limit < 1:
            raise ValidationError("limit must be at least 1")
        at = to_us(now)
        query: Doc = {"owner": owner, "revoked_at": None,
                      "$and": [{"$or": [{"expires_at": None}, {"expires_at": {"$gt": at}}]},
                               {"$or": [{"idle_until": None}, {"idle_until": {"$gt": at}}]}]}
        if kind is not None:
            query["kind"] = kind
        if cursor is not None:
            query["_id"] = {"$gt": cursor}
        docs = list(self._handles.find(query).sort("_id", ASCENDING).limit(limit + 1))
        items = [doc_to_handle(doc) for doc in docs[:limit]]
        return Page(items, items[-1].handle_id if len(docs) > limit else None)

    @translate_errors
    def delete_dead_handles(
        self, before: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`HandleRecords.delete_dead_handles`."""
        at = to_us(before)
        query = {"$or": [{name: {"$ne": None, "$lte": at}} for name in ("expires_at", "idle_until", "revoked_at")]}
        return int(self._delete_batched(self._handles, query, batch_size, dry_run))  # type: ignore[attr-defined]

    # -- idempotency -----------------------------------------------------------------

    @translate_errors
    def _insert_idempotency(self, entry: IdempotencyEntry) -> None:
        """See :meth:`IdempotencyRecords._insert_idempotency`."""
        self._idempotency.insert_one(entry_doc(entry))

    @translate_errors
    def load_idempotency(self, entry_id: str) -> IdempotencyEntry:
        """See :meth:`IdempotencyRecords.load_idempotency`."""
        doc = self._idempotency.find_one({"_id": entry_id})
        if doc is None:
            raise NotFound(f"idempotency entry {entry_id!r} does not exist")
        return doc_to_entry(doc)

    @translate_errors
    def _replace_idempotency(self, expected_version: int, entry: IdempotencyEntry) -> bool:
        """See :meth:`IdempotencyRecords._replace_idempotency`."""
        doc = entry_doc(entry)
        return self._idempotency.replace_one({"_id": doc["_id"], "version": expected_version},
                                             doc).matched_count == 1

    @translate_errors
    def _delete_idempotency(self, entry_id: str, expected_version: int) -> bool:
        """See :meth:`IdempotencyRecords._delete_idempotency`."""
        return self._idempotency.delete_one({"_id": entry_id, "version": expected_version}).deleted_count == 1

    @translate_errors
    def delete_expired_idempotency(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`IdempotencyRecords.delete_expired_idempotency`."""
        query = {"expires_at": {"$lte": to_us(now)}}
        return int(self._delete_batched(self._idempotency, query, batch_size, dry_run))  # type: ignore[attr-defined]

    # -- both kinds in bulk operations --------------

    def _layout(self, kind: RecordKind[Any]) -> tuple[_Layout, Collection[Doc]]:
        if kind.plural == "handles":
            return _HANDLE_LAYOUT, self._handles
        if kind.plural == "idempotency_entries":
            return _ENTRY_LAYOUT, self._idempotency
        return super()._layout(kind)  # type: ignore[misc]
