"""The seed system's SQL layout (SQLite, PostgreSQL) read as a sessionq source.

Tables ``chat_sessions``, ``chat_messages`` and ``uploaded_files`` exactly as the seed
document creates them (timestamps without a zone, metadata as JSON text or JSONB), read
with plain SQL over the same Peewee connection as :class:`~sessionq.models.sql.SqlStore`
(pooled on PostgreSQL). Every read is a keyset page: sessions by ``session_id``, files
by ``file_id``, the messages of a batch of sessions by ``(session_id, created_at,
message_id)`` — the order that numbers them (``seq``; on SQLite the time is compared as
an instant, ``julianday``, whichever way the text spells it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import NotFound, ValidationError
from ..records import ChatMessage, ChatSession, FileRecord
from ..settings import redact_url
from ..sql.database import DEFAULT_CHUNK, SqlStoreBase, open_database, translate_errors
from ..store import Page, chunked
from .base import LegacyStore, fill_page
from .records import LegacyOptions, Problems, legacy_file, legacy_message, legacy_session, where

logger = logging.getLogger(__name__)

# Connections a legacy source keeps (reads are sequential).
DEFAULT_LEGACY_POOL = 4

#: The layout read here: the seed document's schema, verbatim (its "Database Schema"; the
#: PostgreSQL backend used the same tables, metadata as JSONB). Tests and benchmarks build
#: seed-era stores with it.
SEED_DDL = """
-- Sessions table
CREATE TABLE chat_sessions (
    session_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL,
    message_count INTEGER DEFAULT 0,
    metadata TEXT,  -- JSON
    status TEXT DEFAULT 'active'
);

-- Messages table
CREATE TABLE chat_messages (
    message_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL,
    metadata TEXT,  -- JSON
    FOREIGN KEY (session_id) REFERENCES chat_sessions(session_id)
        ON DELETE CASCADE
);

-- Files table
CREATE TABLE uploaded_files (
    file_id TEXT PRIMARY KEY,
    gemini_file_name TEXT NOT NULL,
    gemini_file_uri TEXT NOT NULL,
    display_name TEXT NOT NULL,
    size INTEGER,
    mime_type TEXT,
    uploaded_at TIMESTAMP NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    metadata TEXT  -- JSON
);

-- Indexes
CREATE INDEX idx_sessions_status ON chat_sessions(status);
CREATE INDEX idx_sessions_updated ON chat_sessions(updated_at DESC);
CREATE INDEX idx_messages_session ON chat_messages(session_id);
CREATE INDEX idx_files_expires ON uploaded_files(expires_at);
"""

_SESSION_COLUMNS = ("session_id", "model", "created_at", "updated_at", "message_count", "metadata", "status")
_MESSAGE_COLUMNS = ("session_id", "message_id", "role", "content", "created_at", "metadata")
_FILE_COLUMNS = (
    "file_id", "gemini_file_name", "gemini_file_uri", "display_name", "size", "mime_type", "uploaded_at",
    "expires_at", "metadata",
)
_FOUND = "(SELECT COUNT(*) FROM chat_messages m WHERE m.session_id = s.session_id)"


class LegacySqlStore(SqlStoreBase, LegacyStore):
    """A seed-era SQLite or PostgreSQL database, read-only (see the module docs)."""

    def __init__(self, url: str, *, options: LegacyOptions | None = None) -> None:
        self._db, self.backend = open_database(url, max_pool_size=DEFAULT_LEGACY_POOL)
        self._pooled = self.backend != "sqlite"
        self.location = redact_url(url)
        self.options = options or LegacyOptions()
        self.problems = Problems()
        self._p = self._db.param
        self._files_table: bool | None = None

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._db.execute_sql(sql, tuple(params)).fetchall())

    def _in(self, values: Sequence[Any]) -> str:
        return ", ".join([self._p] * len(values))

    @translate_errors
    def ping(self) -> None:
        """See :meth:`Store.ping`."""
        self._rows("SELECT 1")

    def close(self) -> None:
        """See :meth:`Store.close`."""
        if self._pooled:
            self._db.close_all()  # type: ignore[attr-defined]
        elif not self._db.is_closed():
            self._db.close()

    @translate_errors
    def has_layout(self) -> bool:
        """See :meth:`LegacyStore.has_layout`: ``chat_sessions`` and ``chat_messages`` exist."""
        return bool(self._db.table_exists("chat_sessions") and self._db.table_exists("chat_messages"))

    @translate_errors
    def _has_files(self) -> bool:
        if self._files_table is None:
            self._files_table = bool(self._db.table_exists("uploaded_files"))
        return self._files_table

    # -- sessions ------------------------------------------------------------

    def _session(self, row: tuple[Any, ...]) -> ChatSession | None:
        data = dict(zip(_SESSION_COLUMNS, row[:-1], strict=True))
        try:
            return legacy_session(data, int(row[-1]), self.options.tz, self.problems, "chat_sessions")
        except ValidationError as exc:
            self.problems.reject(where("chat_sessions", data["session_id"]), str(exc))
            return None

    @translate_errors
    def _session_rows(self, after: str | None, limit: int) -> list[tuple[Any, ...]]:
        columns = ", ".join(f"s.{c}" for c in _SESSION_COLUMNS)
        condition, params = (f"WHERE s.session_id > {self._p}", [after]) if after is not None else ("", [])
        return self._rows(
            f"SELECT {columns}, {_FOUND} FROM chat_sessions s {condition} ORDER BY s.session_id LIMIT {self._p}",
            [*params, limit],
        )

    def _session_page(self, limit: int, cursor: str | None) -> Page[ChatSession]:
        return fill_page(self._session_rows, self._session, lambda row: str(row[0]), limit, cursor)

    @translate_errors
    def load_session(self, session_id: str) -> ChatSession:
        """See :meth:`Store.load_session` (a bad row is :class:`NotFound`, and recorded)."""
        columns = ", ".join(f"s.{c}" for c in _SESSION_COLUMNS)
        rows = self._rows(f"SELECT {columns}, {_FOUND} FROM chat_sessions s WHERE s.session_id = {self._p}",
                          [session_id])
        session = self._session(rows[0]) if rows else None
        if session is None:
            raise NotFound(f"session {session_id!r} does not exist (as a valid row)")
        return session

    # -- messages ------------------------------------------------------------

    @translate_errors
    def _message_rows(
        self, session_ids: Sequence[str], after: tuple[Any, Any, Any] | None, limit: int
    ) -> list[tuple[Any, ...]]:
        # SQLite keeps times as text, which the seed wrote as isoformat() or str(): order by
        # the instant (julianday reads both), not by the spelling.
        when = "julianday(created_at)" if self.backend == "sqlite" else "created_at"
        condition = f"session_id IN ({self._in(session_ids)})"
        params: list[Any] = list(session_ids)
        if after is not None:
            condition += f" AND (session_id, {when}, message_id) > ({self._p}, {self._p}, {self._p})"
            params += after
        return self._rows(
            f"SELECT {', '.join(_MESSAGE_COLUMNS)}, {when} FROM chat_messages WHERE {condition} "
            f"ORDER BY session_id, {when}, message_id LIMIT {self._p}",
            [*params, limit],
        )

    def _messages(self, session_ids: Sequence[str], page_size: int) -> Iterator[ChatMessage]:
        for chunk in chunked(session_ids, DEFAULT_CHUNK):
            after: tuple[Any, Any, Any] | None = None
            current, position = None, 0
            while True:
                rows = self._message_rows(chunk, after, page_size)
                for row in rows:
                    if row[0] != current:
                        current, position = row[0], 0
                    position += 1
                    data = dict(zip(_MESSAGE_COLUMNS, row[:-1], strict=True))
                    try:
                        yield legacy_message(data, row[0], position, self.options.tz)
                    except ValidationError as exc:
                        self.problems.reject(where("chat_messages", row[1]), str(exc))
                if len(rows) < page_size:
                    break
                after = (rows[-1][0], rows[-1][-1], rows[-1][1])

    # -- files ---------------------------------------------------------------

    def _file(self, row: tuple[Any, ...]) -> FileRecord | None:
        data = dict(zip(_FILE_COLUMNS, row, strict=True))
        try:
            return legacy_file(data, self.options.tz)
        except ValidationError as exc:
            self.problems.reject(where("uploaded_files", data["file_id"]), str(exc))
            return None

    @translate_errors
    def _file_rows(self, after: str | None, limit: int) -> list[tuple[Any, ...]]:
        if not self._has_files():
            return []
        condition, params = (f"WHERE file_id > {self._p}", [after]) if after is not None else ("", [])
        return self._rows(
            f"SELECT {', '.join(_FILE_COLUMNS)} FROM uploaded_files {condition} ORDER BY file_id LIMIT {self._p}",
            [*params, limit],
        )

    def _file_page(self, limit: int, cursor: str | None) -> Page[FileRecord]:
        return fill_page(self._file_rows, self._file, lambda row: str(row[0]), limit, cursor)

    @translate_errors
    def _files_by_id(self, file_ids: Sequence[str]) -> list[FileRecord]:
        if not self._has_files():
            return []
        out = []
        for chunk in chunked(list(file_ids), DEFAULT_CHUNK):
            rows = self._rows(
                f"SELECT {', '.join(_FILE_COLUMNS)} FROM uploaded_files WHERE file_id IN ({self._in(chunk)})", chunk
            )
            out += [record for record in map(self._file, rows) if record is not None]
        return out

    # -- counts --------------------------------------------------------------

    @translate_errors
    def _counts(self) -> tuple[dict[str, int], int, int]:
        by_status: dict[str, int] = {}
        for status, count in self._rows("SELECT status, COUNT(*) FROM chat_sessions GROUP BY status"):
            name = status or "active"
            by_status[name] = by_status.get(name, 0) + int(count)
        (messages,), = self._rows(
            "SELECT COUNT(*) FROM chat_messages m WHERE EXISTS "
            "(SELECT 1 FROM chat_sessions s WHERE s.session_id = m.session_id)"
        )
        files = int(self._rows("SELECT COUNT(*) FROM uploaded_files")[0][0]) if self._has_files() else 0
        return by_status, int(messages), files
