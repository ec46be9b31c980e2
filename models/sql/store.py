"""The SQL backend: SQLite, PostgreSQL and MariaDB/MySQL through Peewee.

Each :class:`SqlStore` owns its database object and its own model classes (see
:mod:`sessionq.models.sql.schema`). It is composed of :class:`~.records.SqlRecords`
(sessions and messages) and :class:`~.kinds.SqlKinds` (files, transport sessions,
agent state), both on :class:`~.database.SqlStoreBase`; this module adds the
constructor, the schema lifecycle, the MCP event log, the sweeps and statistics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import peewee as pw
from playhouse.pool import PooledMySQLDatabase, PooledPostgresqlDatabase

from ..records import DEFAULT_GRACE_PERIOD, StreamEvent
from ..sealing import identity
from ..settings import redact_url
from ..store import DEFAULT_SWEEP_BATCH_SIZE, Store, StoreStats, chunked
from . import schema
from .database import DEFAULT_CHUNK, DEFAULT_MAX_POOL_SIZE, open_database, translate_errors
from .erasure import SqlErasure
from .handles import SqlHandles
from .kinds import SqlKinds
from .records import SqlRecords
from .tasks import SqlTasks

logger = logging.getLogger(__name__)


class SqlStore(SqlErasure, SqlHandles, SqlTasks, SqlRecords, SqlKinds, Store):
    """A :class:`~sessionq.models.store.Store` on SQLite, PostgreSQL or MariaDB/MySQL.

    Pass a URL (``sqlite:///path``, ``postgresql://user@host/db``, ``mysql://...``)
    or a ready Peewee ``database`` with its ``dialect``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        database: pw.Database | None = None,
        dialect: str | None = None,
        max_pool_size: int = DEFAULT_MAX_POOL_SIZE,
    ) -> None:
        if database is None:
            if url is None:
                raise ValueError("SqlStore needs a url or a database")
            database, dialect = open_database(url, max_pool_size=max_pool_size)
        elif dialect is None:
            raise ValueError("SqlStore needs the dialect of a ready database")
        self._db = database
        self._pooled = isinstance(database, PooledPostgresqlDatabase | PooledMySQLDatabase)
        self.backend = dialect
        self.location = redact_url(url) if url else f"{self.backend} database {database.database!r}"
        self.creates_schema = self.backend == "sqlite"
        self.use_copy = True
        self.m = schema.build_models(database, self.backend)
        self._init_tasks()
        self._init_handles()
        self._init_erasure()

    # -- lifecycle ---------------------------------------------------------------

    @translate_errors
    def upgrade(self, target: int | None = None) -> list[int]:
        """See :meth:`Store.upgrade`."""
        return schema.upgrade(self._db, self.m, target)

    @translate_errors
    def schema_version(self) -> int:
        """See :meth:`Store.schema_version`."""
        return schema.current_version(self._db, self.m)

    def latest_schema_version(self) -> int:
        """See :meth:`Store.latest_schema_version`."""
        return schema.LATEST_VERSION

    @translate_errors
    def ping(self) -> None:
        """See :meth:`Store.ping`."""
        self._db.execute_sql("SELECT 1").fetchall()

    def close(self) -> None:
        """See :meth:`Store.close`."""
        if self._async_insert is not None:
            self._async_insert.close()
        if self._pooled:
            self._db.close_all()  # type: ignore[attr-defined]
        elif not self._db.is_closed():
            self._db.close()

    @translate_errors
    def clear(self) -> None:
        """See :meth:`Store.clear` (children before parents, in one transaction)."""
        with self._txn():
            for model in reversed(self.m.all()[1:]):
                model.delete().execute()
            self.mt.delete().execute()
            self.mh.delete().execute()
            self.mi.delete().execute()
            for model in self.erasure_models:
                model.delete().execute()


    # -- MCP event log ---------------------------------------------------------------------

    @translate_errors
    def append_event(
        self, mcp_session_id: str, stream_id: str, message: dict[str, Any] | None, created_at: datetime
    ) -> StreamEvent:
        """See :meth:`Store.append_event`."""
        E = self.m.Event
        where = identity("event", mcp_session_id, stream_id)
        text = None if message is None else json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        body = None if text is None else self.sealer.seal(text, where)
        probe = StreamEvent("0", mcp_session_id, stream_id, message, created_at)
        with self._db.atomic():
            event_id = E.insert(
                mcp_session_id=mcp_session_id, stream_id=stream_id, message=body, created_at=probe.created_at
            ).execute()
        return probe.replace(event_id=str(event_id))

    @translate_errors
    def events_after(
        self, mcp_session_id: str, event_id: str, *, limit: int = 10_000
    ) -> tuple[str, list[StreamEvent]] | None:
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
                message=None if row["message"] is None else json.loads(
                    self.sealer.open(row["message"], identity("event", mcp_session_id, row["stream_id"]))),
                created_at=row["created_at"],
            )
            for row in query.dicts()
        ]
        return anchor.stream_id, events

    @translate_errors
    def delete_events(self, mcp_session_ids: Sequence[str]) -> int:
        """See :meth:`Store.delete_events`."""
        E = self.m.Event
        deleted = 0
        for chunk in chunked(list(dict.fromkeys(mcp_session_ids)), DEFAULT_CHUNK):
            with self._db.atomic():
                deleted += int(E.delete().where(E.mcp_session_id.in_(chunk)).execute())
        return deleted

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
    def expire_transports(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
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
    def delete_expired_files(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
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
        by_status = dict(
            m.Session.select(m.Session.status, pw.fn.COUNT(m.Session.session_id)).group_by(m.Session.status).tuples()
        )
        messages = m.Session.select(pw.fn.SUM(m.Session.message_count)).scalar() or 0
        transports = dict(
            m.Transport.select(m.Transport.status, pw.fn.COUNT(m.Transport.mcp_session_id))
            .group_by(m.Transport.status)
            .tuples()
        )
        return StoreStats(
            sessions_by_status={k: int(v) for k, v in by_status.items()},
            total_messages=int(messages),
            total_files=int(m.File.select().count()),
            transports_by_status={k: int(v) for k, v in transports.items()},
            agent_states=int(m.AgentState.select().count()),
            stream_events=int(m.Event.select().count()),
            tasks=int(self.mt.select().count()),
            handles=int(self.mh.select().count()),
            idempotency_entries=int(self.mi.select().count()),
        )
