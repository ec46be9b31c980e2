"""Sessions and messages on the SQL backend, as :class:`SqlRecords`, a part of
:class:`~sessionq.models.sql.SqlStore`: the session and message rows and their
conversion to records, saves and appends, raw imports, reads and deletes.

Writes lock the sessions they touch (``FOR UPDATE``, or ``BEGIN IMMEDIATE`` on
SQLite), so concurrent workers never assign the same ``seq`` twice, and a whole batch
of saves costs a handful of statements and one commit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import peewee as pw

from ..errors import NotFound, ValidationError
from ..kinds import Key
from ..records import ChatMessage, ChatSession
from ..sealing import identity, is_sealed, table_named
from ..store import (
    DEFAULT_PAGE_SIZE,
    Page,
    PendingWrite,
    SessionQuery,
    SessionWrite,
    WriteResult,
    check_message_owners,
    chunked,
)
from . import fast_save
from .copy import DEFAULT_COPY_THRESHOLD, copy_messages
from .database import (
    DEFAULT_CHUNK,
    DEFAULT_WRITE_ATTEMPTS,
    SqlStoreBase,
    is_retryable,
    translate_errors,
)

logger = logging.getLogger(__name__)

# A PostgreSQL save batch carrying at least this many messages per save on average
# (re-saves of sessions with their histories) first asks which sessions are stored.
PROBE_MESSAGES_PER_SAVE = 8


class SqlRecords(SqlStoreBase):
    """Sessions and messages: the session and message half of the Store contract on SQL."""

    # -- sessions and messages -------------------------------------------------

    @translate_errors
    def save_sessions(self, writes: Sequence[SessionWrite]) -> WriteResult:
        """See :meth:`Store.save_sessions`."""
        return self._write([(session, session.session_id, list(messages)) for session, messages in writes])[0]

    @translate_errors
    def save_sessions_unless_forgotten(
        self, writes: Sequence[SessionWrite], now: datetime
    ) -> tuple[WriteResult, set[str]]:
        """See :meth:`Store.save_sessions_unless_forgotten`: on PostgreSQL the tombstone
        lookup rides in the save's own statement (:mod:`~sessionq.models.sql.fast_save`)."""
        pending: list[PendingWrite] = [(session, session.session_id, list(messages)) for session, messages in writes]
        if not self._fast_path(pending):
            return super().save_sessions_unless_forgotten(writes, now)  # type: ignore[misc]
        return self._write(pending, refuse_at=now)

    @translate_errors
    def append_messages(self, session_id: str, messages: Sequence[ChatMessage]) -> int:
        """See :meth:`Store.append_messages`."""
        return self._write([(None, session_id, list(messages))])[0].messages_inserted

    def _fast_path(self, writes: list[PendingWrite]) -> bool:
        return (self.backend == "postgresql" and any(session is not None for session, _, _ in writes)
                and not self._db.in_transaction())  # inside the caller's transaction: a savepoint

    def _write(self, writes: list[PendingWrite], refuse_at: datetime | None = None) -> tuple[WriteResult, set[str]]:
        """Write in one transaction (retried on a lost race or deadlock); with ``refuse_at``
        (PostgreSQL's fast path only), sessions tombstoned then are refused and returned."""
        check_message_owners(writes)
        for attempt in range(1, DEFAULT_WRITE_ATTEMPTS + 1):
            try:
                if self._fast_path(writes):
                    return self._write_postgresql(writes, refuse_at)
                with self._txn():
                    return self._write_once(writes), set()
            except pw.IntegrityError:
                if attempt == DEFAULT_WRITE_ATTEMPTS:
                    raise
                logger.debug("session insert raced another writer; retrying (attempt %d)", attempt)
            except pw.OperationalError as exc:
                if attempt == DEFAULT_WRITE_ATTEMPTS or not is_retryable(exc):
                    raise
                logger.debug("write transaction deadlocked; retrying (attempt %d)", attempt)
        raise AssertionError("unreachable")

    def _write_postgresql(
        self, writes: list[PendingWrite], refuse_at: datetime | None = None
    ) -> tuple[WriteResult, set[str]]:
        """One transaction: the sessions not stored yet go through :mod:`~sessionq.models.sql.fast_save`
        (planned as new, one statement that also begins the transaction), the rest
        (stored sessions, appends) through :meth:`_write_once`."""
        appended = {session_id for session, session_id, _ in writes if session is None}
        saves = [w for w in writes if w[1] not in appended]
        if saves and sum(len(m) for _, _, m in saves) >= PROBE_MESSAGES_PER_SAVE * len(saves):
            # Saves carrying histories are mostly re-saves of stored sessions: planning them
            # as new would send (and have the server parse) every message of every history
            # for nothing. Sessions stored now skip the fast statement (one more round trip);
            # one stored in between still lands in the general path below.
            stored = self._stored_session_ids([sid for _, sid, _ in saves])
            saves = [w for w in saves if w[1] not in stored]
        state, _, pending = self._merge(saves, {})
        new_rows: list[dict[str, Any]] = []
        messages: list[dict[str, Any]] = []
        for session_id, batch in pending.items():
            current = state[session_id]
            for message in batch.values():
                current["message_count"] += 1
                current["updated_at"] = max(current["updated_at"], message.created_at)
                messages.append(fast_save.message_json(self._message_row(message, current["message_count"])))
        for session_id in sorted(state):
            new_rows.append(fast_save.session_json(self._sealed_session(state[session_id])))
        db = self._db
        db.connect(reuse_if_open=True)  # (opening a connection resets Peewee's transaction stack)
        with db.manual_commit():
            try:
                tombstones = None if refuse_at is None else (
                    "sessionq_tombstones", self.m.Session.created_at.db_value(refuse_at))
                inserted, refused = fast_save.begin_and_insert_new(
                    db, self.m.Session._meta.table_name, self.m.Message._meta.table_name, new_rows, messages,
                    tombstones=tombstones,
                )
                rest = [w for w in writes if w[1] not in inserted and w[1] not in refused]
                result = self._write_once(rest) if rest else WriteResult(0, 0)
                db.commit()
            except BaseException:
                fast_save.rollback(db)
                raise
        fast_messages = sum(state[sid]["message_count"] for sid in inserted)
        return WriteResult(result.sessions_written + len(inserted), result.messages_inserted + fast_messages), refused

    def _merge(
        self, writes: list[PendingWrite], stored: dict[str, dict[str, Any]]
    ) -> tuple[dict[str, dict[str, Any]], set[str], dict[str, dict[str, ChatMessage]]]:
        """Apply the session fields of ``writes`` to the ``stored`` rows (not changed):
        the new state of every session, the ids changed, and each session's incoming
        messages by id (first occurrence wins). Raises NotFound for an append to a
        session that is not stored."""
        state = {sid: dict(row) for sid, row in stored.items()}
        dirty: set[str] = set()
        pending: dict[str, dict[str, ChatMessage]] = {}
        for session, session_id, messages in writes:
            current = state.get(session_id)
            if session is None and current is None:
                raise NotFound(f"session {session_id!r} does not exist")
            if session is not None:
                if current is None:
                    state[session_id] = self._session_row(session)
                    dirty.add(session_id)
                elif session.last_activity >= current["updated_at"]:
                    incoming = {
                        "model": session.model,
                        "status": session.status,
                        "metadata": session.metadata,
                        "updated_at": session.last_activity,
                    }
                    if any(current[k] != v for k, v in incoming.items()):
                        current.update(incoming)
                        dirty.add(session_id)
            batch = pending.setdefault(session_id, {})
            for message in messages:
                batch.setdefault(message.message_id, message)
        return state, dirty, pending

    def _write_once(self, writes: list[PendingWrite]) -> WriteResult:
        S, M = self.m.Session, self.m.Message
        ids = sorted({session_id for _, session_id, _ in writes})
        stored: dict[str, dict[str, Any]] = {}
        for chunk in chunked(ids, DEFAULT_CHUNK):
            for found in self._lock_sessions(list(chunk)):
                stored[found["session_id"]] = found
        state, dirty, pending = self._merge(writes, stored)
        known = self._existing_message_ids([sid for sid in pending if sid in stored and pending[sid]], pending)
        rows: list[dict[str, Any]] = []
        for session_id, batch in pending.items():
            current = state[session_id]
            for message in batch.values():
                if (session_id, message.message_id) in known:
                    continue
                current["message_count"] += 1
                current["updated_at"] = max(current["updated_at"], message.created_at)
                rows.append(self._message_row(message, current["message_count"]))
                dirty.add(session_id)
        new = [state[sid] for sid in ids if sid in dirty and sid not in stored]
        for session_rows in chunked(new, DEFAULT_CHUNK):
            self._insert_rows(S, [self._sealed_session(row) for row in session_rows])
        changed = [self._sealed_session(state[sid]) for sid in ids if sid in dirty and sid in stored]
        if self.backend == "postgresql" and len(changed) > 1:
            self._update_sessions_postgresql(changed)
            changed = []
        for row in changed:
            S.update(
                model=row["model"],
                status=row["status"],
                metadata=row["metadata"],
                updated_at=row["updated_at"],
                message_count=row["message_count"],
            ).where(S.session_id == row["session_id"]).execute()
        for message_rows in chunked(rows, DEFAULT_CHUNK):
            self._insert_rows(M, message_rows)
        return WriteResult(sessions_written=len(dirty), messages_inserted=len(rows))

    def _stored_session_ids(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` are stored (PostgreSQL, no lock: a hint for planning)."""
        cursor = self.database.execute_sql(
            f'SELECT "session_id" FROM "{self.m.Session._meta.table_name}" WHERE "session_id" = ANY(%s)', (ids,))
        return {sid for (sid,) in cursor.fetchall()}

    def _update_sessions_postgresql(self, rows: list[dict[str, Any]]) -> None:
        """The changed fields of many stored (and locked) sessions in one ``UPDATE ... FROM
        VALUES`` (a Peewee update per session cost more than the rest of a re-save batch)."""
        S = self.m.Session
        names = ("model", "status", "metadata", "updated_at", "message_count")
        fields = [S._meta.fields[name] for name in names]
        params: list[Any] = []
        for row in rows:
            params.append(row["session_id"])
            params.extend(f.db_value(row[f.name]) for f in fields)
        one = "(%s, %s, %s, %s::jsonb, %s::timestamptz, %s::integer)"
        sets = ", ".join(f'"{f.column_name}" = v."{f.column_name}"' for f in fields)
        columns = ", ".join(f'"{f.column_name}"' for f in fields)
        self.database.execute_sql(
            f'UPDATE "{S._meta.table_name}" AS s SET {sets} FROM (VALUES {", ".join([one] * len(rows))}) '
            f'AS v("session_id", {columns}) WHERE s."session_id" = v."session_id"',
            params,
        )

    def _lock_sessions(self, ids: list[str]) -> list[dict[str, Any]]:
        """The stored rows of ``ids``, locked for this transaction, in id order.

        On PostgreSQL the statement is written directly (Peewee's query compilation
        cost more CPU per group-commit batch than the query itself); values still go
        through each field's ``python_value``.
        """
        S = self.m.Session
        if self.backend != "postgresql":
            query = self._locked(S.select().where(S.session_id.in_(ids)).order_by(S.session_id))
            return [self._opened_session(row) for row in query.dicts()]
        fields = S._meta.sorted_fields
        columns = ", ".join(f'"{f.column_name}"' for f in fields)
        marks = ", ".join(["%s"] * len(ids))
        cursor = self.database.execute_sql(
            f'SELECT {columns} FROM "{S._meta.table_name}" WHERE "session_id" IN ({marks}) '
            'ORDER BY "session_id" FOR UPDATE',
            ids,
        )
        return [self._opened_session({f.name: f.python_value(v) for f, v in zip(fields, row, strict=False)})
                for row in cursor.fetchall()]

    def _insert_sql(self, model: Any, rows: Sequence[dict[str, Any]]) -> tuple[str, list[Any]] | None:
        """A multi-row INSERT of rows keyed by field name (all with the same keys) as
        SQL and parameters, or ``None`` when a value needs SQL wrapping (JSON on
        SQLite/MySQL), which only Peewee's own ``insert_many`` renders."""
        fields = [model._meta.fields[name] for name in rows[0]]
        params: list[Any] = []
        for row in rows:
            for f in fields:
                value = f.db_value(row[f.name])
                if isinstance(value, pw.Node):
                    return None
                params.append(value)
        db = self.database
        left, right = db.quote[0], db.quote[-1]
        columns = ", ".join(f"{left}{f.column_name}{right}" for f in fields)
        one = "(" + ", ".join([db.param] * len(fields)) + ")"
        table = f"{left}{model._meta.table_name}{right}"
        return f"INSERT INTO {table} ({columns}) VALUES {', '.join([one] * len(rows))}", params

    @translate_errors
    def import_records(self, sessions: Sequence[ChatSession], messages: Sequence[ChatMessage]) -> WriteResult:
        """See :meth:`Store.import_records` (INSERT ... ON CONFLICT DO NOTHING, in one transaction)."""
        S: Any = self.m.Session
        M: Any = self.m.Message
        for message in messages:
            if message.seq < 1:
                raise ValidationError(f"message {message.message_id!r} has no seq; imports keep the source's seq")
        incoming = {s.session_id: self._session_row(s) | {"message_count": s.message_count} for s in sessions}
        written = inserted = 0
        with self._txn():
            stored: dict[str, dict[str, Any]] = {}
            for chunk in chunked(list(incoming), DEFAULT_CHUNK):
                found_rows = S.select().where(S.session_id.in_(list(chunk))).dicts()
                stored.update((row["session_id"], self._opened_session(row)) for row in found_rows)
            new = [self._sealed_session(row) for sid, row in incoming.items() if sid not in stored]
            for session_rows in chunked(new, DEFAULT_CHUNK):
                written += int(S.insert_many(session_rows).on_conflict_ignore().as_rowcount().execute())
            for sid, old in stored.items():
                row = incoming[sid]
                if row["updated_at"] >= old["updated_at"] and any(old[k] != v for k, v in row.items()):
                    sealed = self._sealed_session(row)
                    S.update(**{k: v for k, v in sealed.items() if k != "session_id"}).where(
                        S.session_id == sid).execute()
                    written += 1
            others = sorted({m.session_id for m in messages} - set(incoming))
            for chunk in chunked(others, DEFAULT_CHUNK):
                found = {sid for (sid,) in S.select(S.session_id).where(S.session_id.in_(list(chunk))).tuples()}
                missing = [sid for sid in chunk if sid not in found]
                if missing:
                    raise NotFound(f"session {missing[0]!r} does not exist")
            rows = [self._message_row(m, m.seq) for m in messages]
            if self.backend == "postgresql" and self.use_copy and len(rows) >= DEFAULT_COPY_THRESHOLD:
                return WriteResult(written, copy_messages(self._db, M._meta.table_name, rows))
            for message_rows in chunked(rows, DEFAULT_CHUNK):
                inserted += int(M.insert_many(message_rows).on_conflict_ignore().as_rowcount().execute())
        return WriteResult(sessions_written=written, messages_inserted=inserted)

    def _insert_rows(self, model: Any, rows: Sequence[dict[str, Any]]) -> None:
        """A multi-row INSERT of rows keyed by field name, all with the same keys.

        Peewee compiles every value into a query node, which on the save path costs
        more CPU than the database spends on the insert; when every value converts to
        a plain driver parameter (PostgreSQL) the statement is written directly.
        Values that need SQL wrapping (JSON on SQLite/MySQL) take Peewee's path.
        """
        statement = self._insert_sql(model, rows)
        if statement is None:
            model.insert_many(rows).execute()
        else:
            self.database.execute_sql(*statement)

    def _existing_message_ids(
        self, session_ids: list[str], pending: dict[str, dict[str, ChatMessage]]
    ) -> set[tuple[str, str]]:
        M = self.m.Message
        found: set[tuple[str, str]] = set()
        if self.backend == "postgresql" and session_ids:
            # One statement for the whole batch (a group commit of re-saves carries each
            # session's history again): the (session, id) pairs joined on the primary key.
            pairs = [(sid, mid) for sid in session_ids for mid in pending[sid]]
            table = M._meta.table_name
            for some in chunked(pairs, DEFAULT_CHUNK * 10):
                cursor = self.database.execute_sql(
                    f'SELECT m."session_id", m."message_id" FROM "{table}" m '
                    "JOIN unnest(%s::text[], %s::text[]) AS x(sid, mid) "
                    'ON m."session_id" = x.sid AND m."message_id" = x.mid',
                    ([sid for sid, _ in some], [mid for _, mid in some]),
                )
                found.update(cursor.fetchall())
            return found
        for session_id in session_ids:
            for chunk in chunked(list(pending[session_id]), DEFAULT_CHUNK):
                query = M.select(M.message_id).where((M.session == session_id) & M.message_id.in_(list(chunk)))
                found.update((session_id, mid) for (mid,) in query.tuples())
        return found

    @staticmethod
    def _session_row(session: ChatSession) -> dict[str, Any]:
        return {
            "session_id": session.session_id,
            "model": session.model,
            "status": session.status,
            "created_at": session.created_at,
            "updated_at": session.last_activity,
            "metadata": session.metadata,
            "message_count": 0,
        }

    # -- the one place rows are sealed and opened (models/sealing.py) ---------------------

    def _sealed_session(self, row: dict[str, Any]) -> dict[str, Any]:
        """A planned session row (plaintext, as :meth:`_session_row`) as it is written."""
        if not self.sealer.enabled:
            return row
        return row | {"metadata": self.sealer.seal_json(row["metadata"], identity("session", row["session_id"],
                                                                                   "metadata"))}

    def _opened_session(self, row: dict[str, Any]) -> dict[str, Any]:
        """A stored session row with its metadata opened."""
        metadata = row["metadata"]
        if isinstance(metadata, str):
            row["metadata"] = self.sealer.open_json(metadata, identity("session", row["session_id"], "metadata"))
        return row

    def _message_row(self, message: ChatMessage, seq: int) -> dict[str, Any]:
        """A message as its row is written (content and metadata sealed)."""
        seal, sid, mid = self.sealer, message.session_id, message.message_id
        content, metadata = message.content, message.metadata
        if seal.enabled:
            content = seal.seal(content, identity("message", sid, mid, "content"))
            metadata = seal.seal_json(metadata, identity("message", sid, mid, "metadata"))
        return {"session": sid, "message_id": mid, "seq": seq, "role": message.role, "content": content,
                "created_at": message.created_at, "metadata": metadata}

    def _to_message(self, mid: str, sid: str, seq: int, role: str, content: str, at: datetime,
                    metadata: Any) -> ChatMessage:
        """A stored message row (content and metadata opened) as a record."""
        if is_sealed(content):
            content = self.sealer.open(content, identity("message", sid, mid, "content"))
        if isinstance(metadata, str):
            metadata = self.sealer.open_json(metadata, identity("message", sid, mid, "metadata"))
        return ChatMessage(message_id=mid, session_id=sid, seq=seq, role=role, content=content, created_at=at,
                           metadata=metadata or {})

    def _to_session(self, row: dict[str, Any]) -> ChatSession:
        return ChatSession(
            session_id=row["session_id"],
            model=row["model"],
            status=row["status"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            metadata=self._opened_session(row)["metadata"] or {},
            message_count=row["message_count"],
        )

    @translate_errors
    def load_session(self, session_id: str) -> ChatSession:
        """See :meth:`Store.load_session`."""
        S = self.m.Session
        row = S.select().where(S.session_id == session_id).dicts().first()
        if row is None:
            raise NotFound(f"session {session_id!r} does not exist")
        return self._to_session(row)

    @translate_errors
    def list_sessions(
        self,
        *,
        status: str | None = None,
        updated_before: datetime | None = None,
        updated_after: datetime | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> Page[ChatSession]:
        """See :meth:`Store.list_sessions`."""
        S = self.m.Session
        query = S.select()
        if status is not None:
            query = query.where(S.status == status)
        if updated_before is not None:
            query = query.where(S.updated_at < updated_before)
        if updated_after is not None:
            query = query.where(S.updated_at > updated_after)
        if cursor is not None:
            query = query.where(S.session_id > cursor)
        rows = list(query.order_by(S.session_id).limit(limit + 1).dicts())
        items = [self._to_session(row) for row in rows[:limit]]
        return Page(items, items[-1].session_id if len(rows) > limit else None)

    def _metadata_equals(self, key: str, value: str) -> pw.Node:
        """SQL true when the metadata value at ``key`` is the string ``value``."""
        p = self._db.param
        if self.backend == "postgresql":
            return pw.SQL(f"jsonb_typeof(metadata::jsonb -> {p}) = 'string' AND (metadata::jsonb ->> {p}) = {p}",
                          (key, key, value))
        path = f'$."{key}"'  # keys are [A-Za-z0-9_-] (SessionQuery checks), so nothing to escape
        if self.backend == "mysql":
            return pw.SQL(f"JSON_TYPE(JSON_EXTRACT(metadata, {p})) = 'STRING' "
                          f"AND BINARY JSON_UNQUOTE(JSON_EXTRACT(metadata, {p})) = BINARY {p}", (path, path, value))
        return pw.SQL(f"json_type(metadata, {p}) = 'text' AND json_extract(metadata, {p}) = {p}", (path, path, value))

    @translate_errors
    def _search_status(
        self, status: str, query: SessionQuery, after: tuple[datetime, str] | None, limit: int, scan: int
    ) -> tuple[list[ChatSession], tuple[datetime, str] | None]:
        """See :meth:`Store._search_status`: two walks down the ``(status, updated_at)`` index,
        one to find where ``scan`` sessions end, one for the matches above that point."""
        S = self.m.Session
        newest_first = (S.updated_at.desc(), S.session_id.desc())
        walk = S.select().where(S.status == status)
        if query.id_prefix:
            # Ids compare by code point on every backend (binary collations), so the
            # prefix is a primary-key range; the substring test keeps it exact.
            prefix = query.id_prefix
            walk = walk.where(
                (S.session_id >= prefix) & (S.session_id < prefix + "\U0010ffff")
                & (pw.fn.SUBSTR(S.session_id, 1, len(prefix)) == prefix)
            )
        if query.updated_after is not None:
            walk = walk.where(S.updated_at > query.updated_after)
        if query.updated_before is not None:
            walk = walk.where(S.updated_at < query.updated_before)
        if after is not None:
            at, session_id = after
            walk = walk.where((S.updated_at <= at) & ((S.updated_at < at) | (S.session_id < session_id)))
        edge = None
        if query.model is not None or query.metadata:
            # Filters no index serves: bound the walk at the updated_at ``scan`` sessions down
            # (the index alone answers; sessions sharing that instant are all examined).
            edge = walk.select(S.updated_at).order_by(S.updated_at.desc()).offset(scan - 1).limit(1).scalar()
        matches = walk
        if query.model is not None:
            matches = matches.where(S.model == query.model)
        for key, value in query.metadata:
            matches = matches.where(self._metadata_equals(key, value))
        if edge is not None:
            matches = matches.where(S.updated_at >= edge)
        items = [self._to_session(row) for row in matches.order_by(*newest_first).limit(limit).dicts()]
        if len(items) == limit:
            return items, (items[-1].last_activity, items[-1].session_id)
        # ("" sorts before every id: the walk examined every session of that instant.)
        return items, (S.updated_at.python_value(edge), "") if edge is not None else None

    @translate_errors
    def load_messages(self, session_id: str, *, after_seq: int = 0, limit: int | None = None) -> list[ChatMessage]:
        """See :meth:`Store.load_messages`."""
        M = self.m.Message
        query = M.select().where((M.session == session_id) & (M.seq > after_seq)).order_by(M.seq)
        if limit is not None:
            query = query.limit(limit)
        return [
            self._to_message(row["message_id"], row["session"], row["seq"], row["role"], row["content"],
                             row["created_at"], row["metadata"])
            for row in query.dicts()
        ]

    def iter_messages_of(
        self, session_ids: Sequence[str], *, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[ChatMessage]:
        """See :meth:`Store.iter_messages_of`: one keyset-paged query over ``(session_id, seq)``."""
        ids = list(dict.fromkeys(session_ids))
        after: tuple[str, int] | None = None
        while ids:
            page = self._messages_of(ids, after, page_size)
            yield from page
            if len(page) < page_size:
                return
            after = (page[-1].session_id, page[-1].seq)

    @translate_errors
    def _messages_of(self, session_ids: list[str], after: tuple[str, int] | None, limit: int) -> list[ChatMessage]:
        M = self.m.Message
        where = M.session.in_(session_ids)
        if after is not None:
            where &= pw.Tuple(M.session, M.seq) > pw.Tuple(*after)
        query = (M.select(M.message_id, M.session, M.seq, M.role, M.content, M.created_at, M.metadata)
                 .where(where).order_by(M.session, M.seq).limit(limit))
        # A raw cursor: only the two columns that need it are converted (Peewee's row
        # iteration converts every column and costs as much as the migration's COPY).
        at_value, metadata_value = M.created_at.python_value, M.metadata.python_value
        return [
            self._to_message(mid, sid, seq, role, content, at_value(at), metadata_value(metadata))
            for mid, sid, seq, role, content, at, metadata in self._db.execute(query).fetchall()
        ]

    @translate_errors
    def delete_session(self, session_id: str) -> bool:
        """See :meth:`Store.delete_session`."""
        S = self.m.Session
        with self._db.atomic():
            return bool(S.delete().where(S.session_id == session_id).execute())

    @translate_errors
    def archive_session(self, session_id: str, at: datetime) -> ChatSession:
        """See :meth:`Store.archive_session`."""
        S = self.m.Session
        with self._txn():
            row = self._locked(S.select().where(S.session_id == session_id)).dicts().first()
            if row is None:
                raise NotFound(f"session {session_id!r} does not exist")
            updated = max(row["updated_at"], at)
            if row["status"] != "archived" or updated != row["updated_at"]:
                S.update(status="archived", updated_at=updated).where(S.session_id == session_id).execute()
            row.update(status="archived", updated_at=updated)
        return self._to_session(row)

    # -- values sealed at rest: raw rows for rotation and key counts ----------------------

    def _sealed_model(self, table: str) -> tuple[Any, list[Any], list[Any]]:
        """The model of a sealed table, its key columns and its sealed columns."""
        spec = table_named(table)
        models = {"sessions": self.m.Session, "messages": self.m.Message, "agent_states": self.m.AgentState,
                  "tasks": self.mt}  # type: ignore[attr-defined]
        model = models[spec.name]
        fields = model._meta.fields
        keys = [fields["session" if name == "session_id" and spec.name == "messages" else name]
                for name in spec.key_fields]
        return model, keys, [fields[name] for name, _ in spec.fields]

    @translate_errors
    def sealed_page(
        self,
        table: str,
        *,
        after: Key | None = None,
        until: Key | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        keys_only: bool = False,
    ) -> list[tuple[Key, dict[str, Any]]]:
        """See :meth:`Store.sealed_page`."""
        model, keys, values = self._sealed_model(table)
        query = model.select(*keys, *([] if keys_only else values))
        if after is not None:
            query = query.where(pw.Tuple(*keys) > pw.Tuple(*after))
        if until is not None:
            query = query.where(pw.Tuple(*keys) <= pw.Tuple(*until))
        width = len(keys)
        convert = self._stored_values(table, values)
        return [
            (tuple(row[:width]), {} if keys_only else convert(row[width:]))
            for row in self._db.execute(query.order_by(*keys).limit(limit)).fetchall()
        ]

    @staticmethod
    def _stored_values(table: str, values: list[Any]) -> Any:
        """Raw column values as stored values: JSON columns parsed (a sealed one is a
        JSON string), text columns as they are (a task's JSON text, sealed or not)."""
        forms = dict(table_named(table).fields)
        parse = [(f.name, f.python_value if forms[f.name] else None) for f in values]

        def convert(raw: Sequence[Any]) -> dict[str, Any]:
            return {name: fn(v) if fn is not None else v for (name, fn), v in zip(parse, raw, strict=True)}

        return convert

    @translate_errors
    def reseal_rows(self, table: str, changes: Sequence[tuple[Key, dict[str, Any], dict[str, Any]]]) -> int:
        """See :meth:`Store.reseal_rows`: one transaction, the rows locked and compared."""
        model, keys, values = self._sealed_model(table)
        convert = self._stored_values(table, values)
        width = len(keys)
        done = 0
        with self._txn():
            for chunk in chunked(list(changes), DEFAULT_CHUNK):
                wanted = {key: (old, new) for key, old, new in chunk}
                where = pw.Tuple(*keys).in_(list(wanted)) if width > 1 else keys[0].in_([k[0] for k in wanted])
                for row in self._db.execute(self._locked(model.select(*keys, *values).where(where))).fetchall():
                    key = tuple(row[:width])
                    current = convert(row[width:])
                    old, new = wanted[key]
                    if all(current[name] == value for name, value in old.items()):
                        match = [column == part for column, part in zip(keys, key, strict=True)]
                        model.update(**new).where(*match).execute()
                        done += 1
        return done
