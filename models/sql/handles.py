"""State handles and idempotency entries on the SQL backends (a mixin of
:class:`~sessionq.models.sql.SqlStore`).

Two tables: ``sessionq_handles`` (keyed by ``handle_id``, indexed by owner, kind and
id for listings, and by each deadline for the sweep) and ``sessionq_idempotency``
(keyed by ``entry_id``, indexed by ``expires_at``). Data and results are opaque JSON
kept as text, like task payloads. The primary-key read of a handle — what every
tool call that uses one pays — is SQL text prepared once per store, as the task
reads are (:mod:`sessionq.models.sql.tasks` says why).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import peewee as pw

from ..errors import NotFound, ValidationError
from ..handles import StateHandle
from ..idempotency import IdempotencyEntry
from ..kinds import RecordKind
from ..store import DEFAULT_PAGE_SIZE, DEFAULT_SWEEP_BATCH_SIZE, Page
from .database import SqlStoreBase, translate_errors
from .schema import UTCDateTimeField
from .tasks import JsonTextField, dialect_of

HANDLES = "sessionq_handles"
IDEMPOTENCY = "sessionq_idempotency"


def build_handle_models(db: pw.Database, dialect: str) -> tuple[Any, Any]:
    """The ``sessionq_handles`` and ``sessionq_idempotency`` models bound to ``db``."""
    collation = "utf8mb4_bin" if dialect == "mysql" else None

    def dt(**kwargs: Any) -> UTCDateTimeField:
        return UTCDateTimeField(dialect, **kwargs)

    def ident(**kwargs: Any) -> pw.CharField:
        return pw.CharField(max_length=255, collation=collation, **kwargs)

    class Handle(pw.Model):
        handle_id = ident(primary_key=True)
        kind = pw.CharField(max_length=64, collation=collation)
        owner = ident(null=True)
        data = JsonTextField()
        version = pw.BigIntegerField()
        created_at = dt()
        updated_at = dt()
        expires_at = dt(null=True, index=True)
        idle_ttl = pw.BigIntegerField(null=True)
        idle_until = dt(null=True, index=True)
        revoked_at = dt(null=True, index=True)

        class Meta:
            database = db
            table_name = HANDLES
            indexes = ((("owner", "kind", "handle_id"), False),)

    class Idempotency(pw.Model):
        entry_id = ident(primary_key=True)
        key = pw.TextField()
        tool = pw.CharField(max_length=255)
        args_digest = ident()
        expires_at = dt(index=True)
        owner = ident(null=True)
        status = pw.CharField(max_length=16)
        result = JsonTextField(null=True)
        task_id = ident(null=True)
        created_at = dt()
        version = pw.BigIntegerField()

        class Meta:
            database = db
            table_name = IDEMPOTENCY

    return Handle, Idempotency


def create_handle_tables(db: pw.Database) -> None:
    """Schema step: both tables and their indexes (idempotent)."""
    db.create_tables(list(build_handle_models(db, dialect_of(db))), safe=True)


class SqlHandles(SqlStoreBase):
    """The primitives of :class:`~sessionq.models.handles.HandleRecords` and
    :class:`~sessionq.models.idempotency.IdempotencyRecords` on SQL."""

    def _init_handles(self) -> None:
        """Bind the models and prepare the handle read (text, not built per call)."""
        self.mh, self.mi = build_handle_models(self._db, self.backend)
        quote = '"' if self.backend != "mysql" else "`"
        self._handle_fields: list[pw.Field] = list(self.mh._meta.sorted_fields)
        columns = ", ".join(f"{quote}{f.column_name}{quote}" for f in self._handle_fields)
        self._handle_select = (f"SELECT {columns} FROM {quote}{HANDLES}{quote} "
                               f"WHERE {quote}handle_id{quote} = {self._db.param}")

    # -- handles ---------------------------------------------------------------------

    @translate_errors
    def _insert_handle(self, handle: StateHandle) -> None:
        """See :meth:`HandleRecords._insert_handle`."""
        self.mh.insert(**_row(self.mh, handle)).execute()

    @translate_errors
    def load_handle(self, handle_id: str) -> StateHandle:
        """See :meth:`HandleRecords.load_handle`."""
        row = self._db.execute_sql(self._handle_select, (handle_id,)).fetchone()
        if row is None:
            raise NotFound(f"handle {handle_id!r} does not exist")
        return StateHandle(**{f.name: f.python_value(v) for f, v in zip(self._handle_fields, row, strict=True)})

    @translate_errors
    def _update_handle(self, handle_id: str, expected_version: int, changes: dict[str, Any]) -> bool:
        """See :meth:`HandleRecords._update_handle`."""
        H = self.mh
        query = H.update(**changes).where((H.handle_id == handle_id) & (H.version == expected_version))
        return int(query.execute()) == 1

    @translate_errors
    def list_handles(
        self, owner: str | None, kind: str | None, now: datetime, *, limit: int = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> Page[StateHandle]:
        """See :meth:`HandleRecords.list_handles`."""
        if limit < 1:
            raise ValidationError("limit must be at least 1")
        H = self.mh
        where = (H.owner.is_null()) if owner is None else (H.owner == owner)
        if kind is not None:
            where &= H.kind == kind
        if cursor is not None:
            where &= H.handle_id > cursor
        where &= H.revoked_at.is_null() & (H.expires_at.is_null() | (H.expires_at > now))
        where &= H.idle_until.is_null() | (H.idle_until > now)
        rows = list(H.select().where(where).order_by(H.handle_id).limit(limit + 1).dicts())
        items = [StateHandle(**row) for row in rows[:limit]]
        return Page(items, items[-1].handle_id if len(rows) > limit else None)

    @translate_errors
    def delete_dead_handles(
        self, before: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`HandleRecords.delete_dead_handles`."""
        H = self.mh
        where = (H.expires_at <= before) | (H.idle_until <= before) | (H.revoked_at <= before)
        return self._batched(H, H.delete, where, batch_size, dry_run)

    # -- idempotency -----------------------------------------------------------------

    @translate_errors
    def _insert_idempotency(self, entry: IdempotencyEntry) -> None:
        """See :meth:`IdempotencyRecords._insert_idempotency`."""
        self.mi.insert(**_row(self.mi, entry)).execute()

    @translate_errors
    def load_idempotency(self, entry_id: str) -> IdempotencyEntry:
        """See :meth:`IdempotencyRecords.load_idempotency`."""
        row = self.mi.select().where(self.mi.entry_id == entry_id).dicts().first()
        if row is None:
            raise NotFound(f"idempotency entry {entry_id!r} does not exist")
        return IdempotencyEntry(**row)

    @translate_errors
    def _replace_idempotency(self, expected_version: int, entry: IdempotencyEntry) -> bool:
        """See :meth:`IdempotencyRecords._replace_idempotency`."""
        I_ = self.mi
        changes = {k: v for k, v in _row(I_, entry).items() if k != "entry_id"}
        query = I_.update(**changes).where((I_.entry_id == entry.entry_id) & (I_.version == expected_version))
        return int(query.execute()) == 1

    @translate_errors
    def _delete_idempotency(self, entry_id: str, expected_version: int) -> bool:
        """See :meth:`IdempotencyRecords._delete_idempotency`."""
        I_ = self.mi
        return int(I_.delete().where((I_.entry_id == entry_id) & (I_.version == expected_version)).execute()) == 1

    @translate_errors
    def delete_expired_idempotency(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`IdempotencyRecords.delete_expired_idempotency`."""
        I_ = self.mi
        return self._batched(I_, I_.delete, I_.expires_at <= now, batch_size, dry_run)

    # -- both kinds in bulk operations --------------

    def _kind_model(self, kind: RecordKind[Any]) -> Any:
        if kind.plural == "handles":
            return self.mh
        if kind.plural == "idempotency_entries":
            return self.mi
        return super()._kind_model(kind)  # type: ignore[misc]


def _row(model: Any, record: Any) -> dict[str, Any]:
    return {name: getattr(record, name) for name in model._meta.fields}
