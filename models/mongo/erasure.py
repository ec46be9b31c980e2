"""Erasure tombstones and receipts on MongoDB (a mixin of
:class:`~sessionq.models.mongo.MongoStore`; the contract is
:class:`~sessionq.models.erasure.ErasureStore`).

``sessionq_tombstones``: ``{_id: session_id, forgotten_at, expires_at}`` (times in
microseconds, like every other collection) with an ``expires_at`` index made by schema
step 5; ``sessionq_forget_receipts``: ``{_id: receipt_id, ...}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from pymongo import ASCENDING, UpdateOne
from pymongo.database import Database

from ..erasure import DEFAULT_TOMBSTONE_CHUNK, ForgetReceipt, Tombstone
from ..errors import NotFound
from ..store import chunked
from . import schema as ms
from .database import MongoStoreBase, translate_errors
from .schema import from_us, opt_us, to_us


def create_erasure_indexes(db: Database[Any]) -> None:
    """Schema step: the index the tombstone sweep uses (idempotent)."""
    db[ms.TOMBSTONES].create_index([("expires_at", ASCENDING)], name="expires_at")


class MongoErasure(MongoStoreBase):
    """Tombstones and receipts on MongoDB."""

    @translate_errors
    def put_tombstones(self, session_ids: Sequence[str], forgotten_at: datetime, expires_at: datetime) -> int:
        """See :meth:`ErasureStore.put_tombstones`: one upsert per id that never moves
        ``expires_at`` earlier."""
        ids = sorted(set(session_ids))
        until, at = to_us(expires_at), to_us(forgotten_at)
        for chunk in chunked(ids, DEFAULT_TOMBSTONE_CHUNK):
            ops = [UpdateOne({"_id": sid}, [{"$set": {
                "forgotten_at": {"$cond": [{"$lt": [{"$ifNull": ["$expires_at", 0]}, until]}, at, "$forgotten_at"]},
                "expires_at": {"$max": [{"$ifNull": ["$expires_at", 0]}, until]},
            }}], upsert=True) for sid in chunk]
            self._db[ms.TOMBSTONES].bulk_write(ops, ordered=False)
        return len(ids)

    @translate_errors
    def forgotten_among(self, session_ids: Sequence[str], now: datetime) -> set[str]:
        """See :meth:`ErasureStore.forgotten_among`."""
        found: set[str] = set()
        for chunk in chunked(list(dict.fromkeys(session_ids)), DEFAULT_TOMBSTONE_CHUNK):
            query = {"_id": {"$in": list(chunk)}, "expires_at": {"$gt": to_us(now)}}
            found.update(doc["_id"] for doc in self._db[ms.TOMBSTONES].find(query, {"_id": 1}))
        return found

    @translate_errors
    def load_tombstone(self, session_id: str) -> Tombstone:
        """See :meth:`ErasureStore.load_tombstone`."""
        doc = self._db[ms.TOMBSTONES].find_one({"_id": session_id})
        if doc is None:
            raise NotFound(f"no tombstone for session {session_id!r}")
        return Tombstone(doc["_id"], cast(datetime, from_us(doc["forgotten_at"])),
                         cast(datetime, from_us(doc["expires_at"])))

    @translate_errors
    def delete_expired_tombstones(self, now: datetime, *, batch_size: int = 1000, dry_run: bool = False) -> int:
        """See :meth:`ErasureStore.delete_expired_tombstones` (batches of ``_id`` values)."""
        collection = self._db[ms.TOMBSTONES]
        query = {"expires_at": {"$lte": to_us(now)}}
        if dry_run:
            return int(collection.count_documents(query))
        total = 0
        while True:
            ids = [doc["_id"] for doc in collection.find(query, {"_id": 1}).limit(batch_size)]
            if not ids:
                return total
            total += collection.delete_many({**query, "_id": {"$in": ids}}).deleted_count
            if len(ids) < batch_size:
                return total

    @translate_errors
    def save_receipt(self, receipt: ForgetReceipt) -> None:
        """See :meth:`ErasureStore.save_receipt`."""
        doc = receipt.to_json() | {
            "created_at": to_us(receipt.created_at), "tombstone_until": opt_us(receipt.tombstone_until),
            "finished_at": opt_us(receipt.finished_at),
        }
        doc["_id"] = doc.pop("receipt_id")
        self._db[ms.RECEIPTS].replace_one({"_id": doc["_id"]}, doc, upsert=True)

    @translate_errors
    def load_receipt(self, receipt_id: str) -> ForgetReceipt:
        """See :meth:`ErasureStore.load_receipt`."""
        doc = self._db[ms.RECEIPTS].find_one({"_id": receipt_id})
        if doc is None:
            raise NotFound(f"no forget receipt {receipt_id!r}")
        fields = {k: v for k, v in doc.items() if k != "_id"}
        for name in ("created_at", "tombstone_until", "finished_at"):
            fields[name] = from_us(fields.get(name))
        return ForgetReceipt(receipt_id=doc["_id"], **fields)
