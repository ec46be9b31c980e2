"""Files, transport sessions, agent state, the MCP event log, sweeps and statistics
for the SQL backend (a mixin of :class:`~sessionq.models.sql.SqlStore`)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from typing import Any, cast

import peewee as pw

from .errors import NotFound
from .records import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_RECOVERY_ATTEMPTS,
    AgentState,
    FileRecord,
    StreamEvent,
    TransportSession,
)
from .sql_aux import SqlKindOps
from .sql_base import translate_errors
from .store import (
    DEFAULT_SWEEP_BATCH_SIZE,
    StoreStats,
)

logger = logging.getLogger(__name__)


class SqlRecordOps(SqlKindOps):
    """The non-session parts of the SQL store (bulk listing and import of files,
    transports and agent state come from :class:`~sessionq.models.sql_aux.SqlKindOps`)."""

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
            self._update_transport(mcp_session_id, status="disconnected", disconnected_at=at, grace_expires_at=at + grace)
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

    # -- MCP event log ---------------------------------------------------------------------

    @translate_errors
    def append_event(
        self, mcp_session_id: str, stream_id: str, message: dict[str, Any] | None, created_at: datetime
    ) -> StreamEvent:
        """See :meth:`Store.append_event`."""
        E = self.m.Event
        body = None if message is None else json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        probe = StreamEvent("0", mcp_session_id, stream_id, message, created_at)
        with self._db.atomic():
            event_id = E.insert(
                mcp_session_id=mcp_session_id, stream_id=stream_id, message=body, created_at=probe.created_at
            ).execute()
        return probe.replace(event_id=str(event_id))

    @translate_errors
    def events_after(self, mcp_session_id: str, event_id: str, *, limit: int = 10_000) -> tuple[str, list[StreamEvent]] | None:
        """See :meth:`Store.events_after`."""
        E = self.m.Event
        if not event_id.isdigit():
            return None
        anchor = E.select(E.stream_id).where((E.id == int(event_id)) & (E.mcp_session_id == mcp_session_id)).first()
        if anchor is None:
            return None
        query = (
            E.select()
            .where((E.mcp_session_id == mcp_session_id) & (E.stream_id == anchor.stream_id) & (E.id > int(event_id)))
            .order_by(E.id)
            .limit(limit)
        )
        events = [
            StreamEvent(
                event_id=str(row["id"]),
                mcp_session_id=row["mcp_session_id"],
                stream_id=row["stream_id"],
                message=None if row["message"] is None else json.loads(row["message"]),
                created_at=row["created_at"],
            )
            for row in query.dicts()
        ]
        return anchor.stream_id, events

    # -- sweeps ------------------------------------------------------------------------------

    @translate_errors
    def expire_idle_sessions(
        self, idle_before: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.expire_idle_sessions`."""
        S = self.m.Session
        where = (S.status == "active") & (S.updated_at < idle_before)
        return self._batched(S, lambda: S.update(status="expired"), where, batch_size, dry_run)

    @translate_errors
    def purge_expired_sessions(
        self, expired_before: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.purge_expired_sessions`."""
        S = self.m.Session
        where = (S.status == "expired") & (S.updated_at < expired_before)
        return self._batched(S, S.delete, where, batch_size, dry_run)

    @translate_errors
    def expire_transports(self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False) -> int:
        """See :meth:`Store.expire_transports`."""
        T_ = self.m.Transport
        where = (T_.status == "disconnected") & (T_.grace_expires_at <= now)
        return self._batched(T_, lambda: T_.update(status="expired"), where, batch_size, dry_run)

    @translate_errors
    def disconnect_stale_transports(
        self,
        heartbeat_before: datetime,
        now: datetime,
        grace: timedelta = DEFAULT_GRACE_PERIOD,
        *,
        batch_size: int = DEFAULT_SWEEP_BATCH_SIZE,
        dry_run: bool = False,
    ) -> int:
        """See :meth:`Store.disconnect_stale_transports`."""
        T_ = self.m.Transport
        where = T_.status.in_(["active", "recovered"]) & (T_.last_heartbeat < heartbeat_before)
        changes = {"status": "disconnected", "disconnected_at": now, "grace_expires_at": now + grace}
        return self._batched(T_, lambda: T_.update(**changes), where, batch_size, dry_run)

    @translate_errors
    def delete_expired_files(self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False) -> int:
        """See :meth:`Store.delete_expired_files`."""
        F_ = self.m.File
        return self._batched(F_, F_.delete, F_.expires_at <= now, batch_size, dry_run)

    @translate_errors
    def delete_expired_agent_state(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.delete_expired_agent_state`."""
        A = self.m.AgentState
        return self._batched(A, A.delete, A.expires_at <= now, batch_size, dry_run)

    @translate_errors
    def trim_events(
        self,
        *,
        max_per_session: int,
        created_before: datetime,
        batch_size: int = DEFAULT_SWEEP_BATCH_SIZE,
        dry_run: bool = False,
    ) -> int:
        """See :meth:`Store.trim_events`."""
        E = self.m.Event
        total = self._batched(E, E.delete, E.created_at < created_before, batch_size, dry_run)
        over = E.select(E.mcp_session_id, pw.fn.COUNT(E.id).alias("n"))
        if dry_run:
            # The old events were only counted, so the cap applies to the rest.
            over = over.where(E.created_at >= created_before)
        over = over.group_by(E.mcp_session_id).having(pw.fn.COUNT(E.id) > max_per_session)
        if dry_run:
            excess = over.select_from(pw.fn.SUM(over.c.n - max_per_session))
            return total + int(excess.scalar() or 0)
        for mcp_session_id, _ in list(over.tuples()):
            cutoff = (
                E.select(E.id)
                .where(E.mcp_session_id == mcp_session_id)
                .order_by(E.id.desc())
                .offset(max_per_session)
                .limit(1)
                .scalar()
            )
            if cutoff is not None:
                where = (E.mcp_session_id == mcp_session_id) & (E.id <= cutoff)
                total += self._batched(E, E.delete, where, batch_size)
        return total

    # -- statistics -----------------------------------------------------------------------------

    @translate_errors
    def stats(self) -> StoreStats:
        """See :meth:`Store.stats`."""
        m = self.m
        by_status = dict(m.Session.select(m.Session.status, pw.fn.COUNT(m.Session.session_id)).group_by(m.Session.status).tuples())
        messages = m.Session.select(pw.fn.SUM(m.Session.message_count)).scalar() or 0
        transports = dict(
            m.Transport.select(m.Transport.status, pw.fn.COUNT(m.Transport.mcp_session_id)).group_by(m.Transport.status).tuples()
        )
        return StoreStats(
            sessions_by_status={k: int(v) for k, v in by_status.items()},
            total_messages=int(messages),
            total_files=int(m.File.select().count()),
            transports_by_status={k: int(v) for k, v in transports.items()},
            agent_states=int(m.AgentState.select().count()),
            stream_events=int(m.Event.select().count()),
        )

