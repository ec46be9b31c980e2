"""Bulk listing and import of file records, transport sessions and agent state for
the SQL backend (see :mod:`sessionq.models.kinds`), a mixin of :class:`~sessionq.models.sql.SqlStore`.

Listings are keyset pages over the primary key (for a composite key, one index
range query per key prefix: :meth:`RecordKind.ranges_after`). An import handles a
chunk of records in one transaction: it locks the stored rows of the chunk's keys
(``SELECT ... FOR UPDATE``, or ``BEGIN IMMEDIATE`` on SQLite), decides per record
with :meth:`RecordKind.replaces`, then writes the new rows with one multi-row
``INSERT ... ON CONFLICT DO NOTHING`` and the newer ones with one multi-row upsert.
A key another writer inserted between the lock and the insert is skipped by the
insert and compared again in the next round.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence, TypeVar

import peewee as pw

from .errors import StoreUnavailable, ValidationError
from .kinds import DEFAULT_IMPORT_CHUNK, DEFAULT_IMPORT_ROUNDS, Key, RecordKind, chunked
from .records import Record
from .sql_base import (
    DEFAULT_WRITE_ATTEMPTS,
    SqlBase,
    chunks,
    is_retryable,
    translate_errors,
)
from .store import DEFAULT_PAGE_SIZE, Page

logger = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)
V = TypeVar("V")


def _key_in(columns: Sequence[pw.Field], keys: Sequence[Key]) -> pw.Expression:
    if len(columns) == 1:
        return columns[0].in_([key[0] for key in keys])
    return pw.Tuple(*columns).in_([tuple(key) for key in keys])


class SqlKindOps(SqlBase):
    """:meth:`Store.list_kind`, :meth:`Store.find_kind` and :meth:`Store.import_kind` on SQL."""

    def _kind_model(self, kind: RecordKind[Any]) -> Any:
        models = {"files": self.m.File, "transports": self.m.Transport, "agent_states": self.m.AgentState}
        model = models.get(kind.plural)
        if model is None:
            raise ValidationError(f"the SQL store holds no bulk record kind {kind.plural!r}")
        return model

    @staticmethod
    def _key_columns(model: Any, kind: RecordKind[Any]) -> list[pw.Field]:
        return [model._meta.fields[name] for name in kind.key_fields]

    @translate_errors
    def list_kind(self, kind: RecordKind[R], *, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None) -> Page[R]:
        """See :meth:`Store.list_kind`."""
        if limit < 1:
            raise ValidationError("limit must be at least 1")
        model = self._kind_model(kind)
        columns = self._key_columns(model, kind)
        fields = model._meta.fields
        if cursor is None:
            rows = list(model.select().order_by(*columns).limit(limit + 1).dicts())
        else:
            rows = []
            for equal, (name, bound) in kind.ranges_after(kind.parse_cursor(cursor)):
                where = fields[name] > bound
                for field_name, value in equal:
                    where &= fields[field_name] == value
                rows.extend(model.select().where(where).order_by(*columns).limit(limit + 1 - len(rows)).dicts())
                if len(rows) > limit:
                    break
        items = [kind.record(**row) for row in rows[:limit]]
        return Page(items, kind.cursor(items[-1]) if len(rows) > limit else None)

    @translate_errors
    def find_kind(self, kind: RecordKind[R], keys: Sequence[Key]) -> list[R]:
        """See :meth:`Store.find_kind`."""
        model = self._kind_model(kind)
        columns = self._key_columns(model, kind)
        wanted = list(dict.fromkeys(kind.check_key(key) for key in keys))
        found: list[R] = []
        for chunk in chunks(wanted):
            found.extend(kind.record(**row) for row in model.select().where(_key_in(columns, chunk)).dicts())
        return found

    @translate_errors
    def import_kind(self, kind: RecordKind[R], records: Sequence[R]) -> int:
        """See :meth:`Store.import_kind`."""
        model = self._kind_model(kind)
        latest = kind.latest(records)
        # Key order everywhere, so that concurrent importers lock rows in the same order.
        ordered = [latest[key] for key in sorted(latest)]
        written = 0
        for chunk in chunked(ordered, DEFAULT_IMPORT_CHUNK):
            for _ in range(DEFAULT_IMPORT_ROUNDS):
                count, complete = self._retrying(lambda: self._import_round(kind, model, chunk))
                written += count
                if complete:
                    break
                logger.debug("another writer inserted %s keys during an import; comparing again", kind.name)
            else:
                raise StoreUnavailable(f"{kind.plural} import kept racing other writers; try again")
        return written

    def _import_round(self, kind: RecordKind[R], model: Any, records: Sequence[R]) -> tuple[int, bool]:
        """One transaction over a chunk: returns ``(records written, complete)``, not
        complete when a key was inserted by another writer after the lock."""
        columns = self._key_columns(model, kind)
        with self._txn():
            query = model.select().where(_key_in(columns, [kind.key(r) for r in records])).order_by(*columns)
            stored = {kind.key(r): r for r in (kind.record(**row) for row in self._locked(query).dicts())}
            new, newer = [], []
            for record in records:
                current = stored.get(kind.key(record))
                if current is None:
                    new.append(self._kind_row(model, record))
                elif kind.replaces(record, current):
                    newer.append(self._kind_row(model, record))
            inserted = int(model.insert_many(new).on_conflict_ignore().as_rowcount().execute()) if new else 0
            if newer:
                values = [f for name, f in model._meta.fields.items() if name not in kind.key_fields]
                target = None if self.backend == "mysql" else columns
                model.insert_many(newer).on_conflict(conflict_target=target, preserve=values).as_rowcount().execute()
        return inserted + len(newer), inserted == len(new)

    @staticmethod
    def _kind_row(model: Any, record: Record) -> dict[str, Any]:
        return {name: getattr(record, name) for name in model._meta.fields}

    def _retrying(self, attempt: Callable[[], V]) -> V:
        """Run one write transaction again when the database chose it as a deadlock
        victim or a lock wait timed out."""
        for number in range(1, DEFAULT_WRITE_ATTEMPTS + 1):
            try:
                return attempt()
            except pw.OperationalError as exc:
                if number == DEFAULT_WRITE_ATTEMPTS or not is_retryable(exc):
                    raise
                logger.debug("import transaction deadlocked; retrying (attempt %d)", number)
        raise AssertionError("unreachable")

