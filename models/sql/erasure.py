"""Erasure tombstones and receipts on the SQL backends (a mixin of
:class:`~sessionq.models.sql.SqlStore`; the contract is
:class:`~sessionq.models.erasure.ErasureStore`).

Two tables, made by schema step 7: ``sessionq_tombstones`` keyed by ``session_id``
with an index on ``expires_at`` (the sweep), and ``sessionq_forget_receipts`` keyed
by ``receipt_id``, its selector and counts as JSON text.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import peewee as pw

from ..erasure import DEFAULT_TOMBSTONE_CHUNK, ForgetReceipt, Tombstone
from ..errors import NotFound
from ..store import chunked
from .database import SqlStoreBase, translate_errors
from .schema import UTCDateTimeField
from .tasks import JsonTextField, dialect_of


def build_erasure_models(db: pw.Database, dialect: str) -> tuple[Any, Any]:
    """The tombstone and receipt models bound to ``db``."""
    collation = "utf8mb4_bin" if dialect == "mysql" else None

    def dt(**kwargs: Any) -> UTCDateTimeField:
        return UTCDateTimeField(dialect, **kwargs)

    class Tombstone(pw.Model):
        session_id = pw.CharField(max_length=255, collation=collation, primary_key=True)
        forgotten_at = dt()
        expires_at = dt(index=True)

        class Meta:
            database = db
            table_name = "sessionq_tombstones"

    class Receipt(pw.Model):
        receipt_id = pw.CharField(max_length=255, collation=collation, primary_key=True)
        selector = JsonTextField()
        places = JsonTextField()
        tombstones = pw.IntegerField(default=0)
        tombstone_until = dt(null=True)
        created_at = dt()
        finished_at = dt(null=True)

        class Meta:
            database = db
            table_name = "sessionq_forget_receipts"

    return Tombstone, Receipt


def create_erasure_tables(db: pw.Database) -> None:
    """Schema step: the tombstone and receipt tables (idempotent)."""
    db.create_tables(list(build_erasure_models(db, dialect_of(db))), safe=True)


class SqlErasure(SqlStoreBase):
    """Tombstones and receipts on SQL (:meth:`_init_erasure` binds the models)."""

    def _init_erasure(self) -> None:
        self._tombstone_model, self._receipt_model = build_erasure_models(self._db, self.backend)
        q = "`" if self.backend == "mysql" else '"'
        self._forgotten_sql = (f"SELECT {q}session_id{q} FROM {q}sessionq_tombstones{q} "
                               f"WHERE {q}session_id{q} IN ({{}}) AND {q}expires_at{q} > {self._db.param}")
        #: The models :meth:`SqlStore.clear` empties too.
        self.erasure_models = (self._tombstone_model, self._receipt_model)

    @translate_errors
    def put_tombstones(self, session_ids: Sequence[str], forgotten_at: datetime, expires_at: datetime) -> int:
        """See :meth:`ErasureStore.put_tombstones`."""
        T = self._tombstone_model
        ids = sorted(set(session_ids))
        for chunk in chunked(ids, DEFAULT_TOMBSTONE_CHUNK):
            with self._txn():
                stored = {row.session_id: row.expires_at
                          for row in self._locked(T.select().where(T.session_id.in_(list(chunk))))}
                later = [sid for sid in chunk if sid in stored and stored[sid] < expires_at]
                if later:
                    T.update(forgotten_at=forgotten_at, expires_at=expires_at).where(T.session_id.in_(later)).execute()
                new = [{"session_id": sid, "forgotten_at": forgotten_at, "expires_at": expires_at}
                       for sid in chunk if sid not in stored]
                if new:
                    T.insert_many(new).on_conflict_ignore().execute()
        return len(ids)

    @translate_errors
    def forgotten_among(self, session_ids: Sequence[str], now: datetime) -> set[str]:
        """See :meth:`ErasureStore.forgotten_among`. On the save path (once per group-commit
        batch), so the statement is SQL text, not a Peewee query: building one cost more
        than the round trip itself (the P2 save drain lost a quarter of its rate)."""
        found: set[str] = set()
        expires = self._tombstone_model.expires_at.db_value(now)
        for chunk in chunked(list(dict.fromkeys(session_ids)), DEFAULT_TOMBSTONE_CHUNK):
            marks = ", ".join([self._db.param] * len(chunk))
            cursor = self._db.execute_sql(self._forgotten_sql.format(marks), (*chunk, expires))
            found.update(sid for (sid,) in cursor.fetchall())
        return found

    @translate_errors
    def load_tombstone(self, session_id: str) -> Tombstone:
        """See :meth:`ErasureStore.load_tombstone`."""
        T = self._tombstone_model
        row = T.select().where(T.session_id == session_id).dicts().first()
        if row is None:
            raise NotFound(f"no tombstone for session {session_id!r}")
        return Tombstone(**row)

    @translate_errors
    def delete_expired_tombstones(self, now: datetime, *, batch_size: int = 1000, dry_run: bool = False) -> int:
        """See :meth:`ErasureStore.delete_expired_tombstones`."""
        T = self._tombstone_model
        return self._batched(T, T.delete, T.expires_at <= now, batch_size, dry_run)

    @translate_errors
    def save_receipt(self, receipt: ForgetReceipt) -> None:
        """See :meth:`ErasureStore.save_receipt`."""
        R = self._receipt_model
        row = receipt.to_json() | {
            "created_at": receipt.created_at, "tombstone_until": receipt.tombstone_until,
            "finished_at": receipt.finished_at,
        }
        with self._txn():
            R.delete().where(R.receipt_id == receipt.receipt_id).execute()
            R.insert(**row).execute()

    @translate_errors
    def load_receipt(self, receipt_id: str) -> ForgetReceipt:
        """See :meth:`ErasureStore.load_receipt`."""
        R = self._receipt_model
        row = R.select().where(R.receipt_id == receipt_id).dicts().first()
        if row is None:
            raise NotFound(f"no forget receipt {receipt_id!r}")
        return ForgetReceipt(**row)
