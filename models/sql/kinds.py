"""Files, transport sessions and agent state on the SQL backend: the single-record
operations and the bulk ones (see :mod:`sessionq.models.kinds`), as
:class:`SqlKinds`, a part of :class:`~sessionq.models.sql.SqlStore`.

Bulk listings are keyset pages over the primary key (for a composite key, one index
range query per key prefix: :meth:`RecordKind.ranges_after`). An import round
(:meth:`Store.import_kind` runs them) handles a chunk of records in one transaction:
it locks the stored rows of the chunk's keys (``SELECT ... FOR UPDATE``, or
``BEGIN IMMEDIATE`` on SQLite), decides per record with :meth:`RecordKind.replaces`,
then writes the new rows with one multi-row ``INSERT ... ON CONFLICT DO NOTHING``
and the newer ones with one multi-row upsert. A key another writer inserted between
the lock and the insert is skipped by the insert and compared again in the next round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import peewee as pw

from ..errors import NotFound, ValidationError
from ..kinds import Key, RecordKind
from ..records import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_RECOVERY_ATTEMPTS,
    AgentState,
    FileRecord,
    Record,
    TransportSession,
)
from ..store import DEFAULT_PAGE_SIZE, Page, chunked
from .database import (
    DEFAULT_CHUNK,
    DEFAULT_WRITE_ATTEMPTS,
    SqlStoreBase,
    is_retryable,
    translate_errors,
)

logger = logging.getLogger(__name__)
R = TypeVar("R", bound=Record)
V = TypeVar("V")


def _key_in(columns: Sequence[pw.Field], keys: Sequence[Key]) -> pw.Expression:
    if len(columns) == 1:
        return columns[0].in_([key[0] for key in keys])
    return pw.Tuple(*columns).in_([tuple(key) for key in keys])


class SqlKinds(SqlStoreBase):
    """Files, transport sessions and agent state: one at a time and in bulk
    (:meth:`Store.list_kind`, :meth:`Store.find_kind`, the rounds of :meth:`Store.import_kind`)."""

    def _upsert(
        self, model: type[pw.Model], row: dict[str, Any], target: list[pw.Field], preserve: list[pw.Field]
    ) -> None:
        """INSERT, or on a key conflict overwrite the ``preserve`` columns with the new values."""
        conflict_target = None if self.backend == "mysql" else target
        model.insert(**row).on_conflict(conflict_target=conflict_target, preserve=preserve).execute()

    # -- files -----------------------------------------------------------------------

    @translate_errors
    def save_file(self, record: FileRecord) -> None:
        """See :meth:`Store.save_file`."""
        F_ = self.m.File
        row = record.to_json() | {"uploaded_at": record.uploaded_at, "expires_at": record.expires_at}
        fields = [F_._meta.fields[name] for name in row if name != "file_id"]
        with self._db.atomic():
            self._upsert(F_, row, [F_.file_id], fields)

    @translate_errors
    def load_file(self, file_id: str) -> FileRecord:
        """See :meth:`Store.load_file`."""
        F_ = self.m.File
        row = F_.select().where(F_.file_id == file_id).dicts().first()
        if row is None:
            raise NotFound(f"file {file_id!r} does not exist")
        return FileRecord(**row)

    @translate_errors
    def delete_file(self, file_id: str) -> bool:
        """See :meth:`Store.delete_file`."""
        F_ = self.m.File
        with self._db.atomic():
            return bool(F_.delete().where(F_.file_id == file_id).execute())

    # -- transport sessions ------------------------------------------------------------

    @translate_errors
    def register_transport(self, session: TransportSession) -> TransportSession:
        """See :meth:`Store.register_transport`."""
        T_ = self.m.Transport
        row = {f: getattr(session, f) for f in T_._meta.fields}
        preserve = [
            T_.working_directory,
            T_.transport_state,
            T_.agent_context,
            T_.conversation_state,
            T_.metadata,
        ]
        with self._db.atomic():
            self._upsert(T_, row, [T_.mcp_session_id], preserve)
        return self.load_transport(session.mcp_session_id)

    def _transport_row(self, mcp_session_id: str, *, lock: bool) -> dict[str, Any] | None:
        T_ = self.m.Transport
        query = T_.select().where(T_.mcp_session_id == mcp_session_id)
        return cast("dict[str, Any] | None", (self._locked(query) if lock else query).dicts().first())

    @translate_errors
    def load_transport(self, mcp_session_id: str) -> TransportSession:
        """See :meth:`Store.load_transport`."""
        row = self._transport_row(mcp_session_id, lock=False)
        if row is None:
            raise NotFound(f"transport session {mcp_session_id!r} does not exist")
        return TransportSession(**row)

    def _update_transport(self, mcp_session_id: str, **changes: Any) -> None:
        T_ = self.m.Transport
        T_.update(**changes).where(T_.mcp_session_id == mcp_session_id).execute()

    @translate_errors
    def heartbeat(self, mcp_session_id: str, at: datetime) -> bool:
        """See :meth:`Store.heartbeat`."""
        with self._txn():
            row = self._transport_row(mcp_session_id, lock=True)
            if row is None or row["status"] == "expired":
                return False
            changes: dict[str, Any] = {}
            if at > row["last_heartbeat"]:
                changes["last_heartbeat"] = at
            if row["status"] == "disconnected" and row["disconnected_at"] is not None and at > row["disconnected_at"]:
                changes.update(status="active", disconnected_at=None, grace_expires_at=None)
            if changes:
                self._update_transport(mcp_session_id, **changes)
            return True

    @translate_errors
    def mark_disconnected(self, mcp_session_id: str, at: datetime, grace: timedelta = DEFAULT_GRACE_PERIOD) -> bool:
        """See :meth:`Store.mark_disconnected`."""
        with self._txn():
            row = self._transport_row(mcp_session_id, lock=True)
            if row is None or row["status"] == "expired":
                return False
            if row["status"] == "disconnected":
                return True
            if row["last_heartbeat"] > at:
                return False
            self._update_transport(
                mcp_session_id, status="disconnected", disconnected_at=at, grace_expires_at=at + grace
            )
            return True

    @translate_errors
    def recover(
        self, mcp_session_id: str, now: datetime, *, max_attempts: int = DEFAULT_MAX_RECOVERY_ATTEMPTS
    ) -> TransportSession:
        """See :meth:`Store.recover`."""
        with self._txn():
            row = self._transport_row(mcp_session_id, lock=True)
            if row is None:
                raise NotFound(f"transport session {mcp_session_id!r} does not exist")
            session = TransportSession(**row)
            changes = session.recovery_changes(now, max_attempts=max_attempts)
            self._update_transport(mcp_session_id, **changes)
            return session.replace(**changes)

    # -- agent state ------------------------------------------------------------------------

    @translate_errors
    def put_agent_state(self, state: AgentState) -> bool:
        """See :meth:`Store.put_agent_state`."""
        A = self.m.AgentState
        row = {f: getattr(state, f) for f in A._meta.fields}
        with self._txn():
            current = self._locked(A.select(A.updated_at).where((A.agent_id == state.agent_id) & (A.key == state.key)))
            existing = current.first()
            if existing is not None and existing.updated_at > state.updated_at:
                return False
            preserve = [A.value, A.mcp_session_id, A.updated_at, A.expires_at]
            self._upsert(A, row, [A.agent_id, A.key], preserve)
            return True

    @translate_errors
    def get_agent_state(self, agent_id: str, key: str, now: datetime) -> AgentState | None:
        """See :meth:`Store.get_agent_state`."""
        A = self.m.AgentState
        row = A.select().where((A.agent_id == agent_id) & (A.key == key)).dicts().first()
        if row is None or (row["expires_at"] is not None and row["expires_at"] <= now):
            return None
        return AgentState(**row)

    # -- in bulk ------------------------------------------------------------------

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
        for chunk in chunked(wanted, DEFAULT_CHUNK):
            found.extend(kind.record(**row) for row in model.select().where(_key_in(columns, chunk)).dicts())
        return found

    @translate_errors
    def _import_round(self, kind: RecordKind[R], records: Sequence[R]) -> tuple[int, bool]:
        """See :meth:`Store._import_round`: one transaction over the chunk, run again
        when the database picks it as a deadlock victim."""
        model = self._kind_model(kind)
        return self._retrying(lambda: self._import_locked(kind, model, records))

    def _import_locked(self, kind: RecordKind[R], model: Any, records: Sequence[R]) -> tuple[int, bool]:
        """The round's transaction: lock, compare, insert the new rows, upsert the newer."""
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

