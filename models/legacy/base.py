"""What the seed-era sources share: a read-only :class:`~sessionq.models.store.Store`
that yields sessionq records, so that migrate, verify, export-all and backup read it
like any store.

A source lists sessions and file records in keyset pages of valid records: a row that
breaks sessionq's rules is left out and recorded in :attr:`LegacyStore.problems` (with
its table and key), and the page is filled from the following rows, so a short page
still means the end (migrations rely on it). Messages get ``seq`` = their position in
the session, counted over every row (a bad row leaves a gap), so fixing a bad row and
migrating again inserts it where it belongs. Transport sessions, agent state and MCP
tasks did not exist in the seed system: their listings are empty.

Every writing method refuses with :class:`~sessionq.errors.ValidationError`: sessionq
never writes a seed-era store.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, NoReturn, TypeVar

from ..errors import NotFound, ValidationError
from ..kinds import FILES, Key, RecordKind
from ..records import ChatMessage, ChatSession, FileRecord
from ..store import DEFAULT_PAGE_SIZE, Page, Store, StoreStats
from .records import LegacyOptions, Problems

R = TypeVar("R")
Row = TypeVar("Row")


def fill_page(
    fetch: Callable[[str | None, int], list[Row]],
    convert: Callable[[Row], R | None],
    key: Callable[[Row], str],
    limit: int,
    cursor: str | None,
) -> Page[R]:
    """A keyset page of ``limit`` converted rows: ``fetch(after, n)`` reads up to ``n``
    rows after the key ``after``, ``convert`` returns ``None`` for a row left out; rows
    are read until the page is full or the table ends (``next_cursor`` is then ``None``)."""
    items: list[R] = []
    while True:
        wanted = limit - len(items)
        rows = fetch(cursor, wanted)
        for row in rows:
            record = convert(row)
            if record is not None:
                items.append(record)
        if len(rows) < wanted:
            return Page(items, None)
        cursor = key(rows[-1])
        if len(items) >= limit:
            return Page(items, cursor)


class LegacyStore(Store):
    """A seed-era store read as sessionq records (read-only; see the module docs)."""

    #: How the source is read (zone of naive times, MongoDB collection).
    options: LegacyOptions
    #: Bad rows and notes found so far.
    problems: Problems

    # -- reading, per backend ------------------------------------------------

    @abc.abstractmethod
    def has_layout(self) -> bool:
        """True when the seed system's session table (collection) is there."""

    @abc.abstractmethod
    def _file_page(self, limit: int, cursor: str | None) -> Page[FileRecord]:
        """A keyset page of valid file records after the file id ``cursor``."""

    @abc.abstractmethod
    def _files_by_id(self, file_ids: Sequence[str]) -> list[FileRecord]:
        """The valid file records among ``file_ids``."""

    @abc.abstractmethod
    def _messages(self, session_ids: Sequence[str], page_size: int) -> Iterator[ChatMessage]:
        """Every valid message of the sessions, grouped by session, each in ``seq`` order."""

    def iter_messages_of(
        self, session_ids: Sequence[str], *, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[ChatMessage]:
        """See :meth:`Store.iter_messages_of` (one stream over the batch)."""
        return self._messages(list(dict.fromkeys(session_ids)), page_size)

    def iter_messages(self, session_id: str, *, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[ChatMessage]:
        """See :meth:`Store.iter_messages` (one stream, seq counted as it goes)."""
        return self._messages([session_id], page_size)

    def load_messages(self, session_id: str, *, after_seq: int = 0, limit: int | None = None) -> list[ChatMessage]:
        """See :meth:`Store.load_messages`."""
        out = []
        for message in self._messages([session_id], DEFAULT_PAGE_SIZE):
            if message.seq > after_seq:
                out.append(message)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def list_kind(
        self, kind: RecordKind[Any], *, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None
    ) -> Page[Any]:
        """File records; the kinds the seed system did not have are empty."""
        return self._file_page(limit, cursor) if kind is FILES else Page([], None)

    def find_kind(self, kind: RecordKind[Any], keys: Sequence[Key]) -> list[Any]:
        """See :meth:`Store.find_kind`."""
        return self._files_by_id([k[0] for k in keys]) if kind is FILES and keys else []

    def load_file(self, file_id: str) -> FileRecord:
        """See :meth:`Store.load_file`."""
        found = self._files_by_id([file_id])
        if not found:
            raise NotFound(f"file {file_id!r} not found")
        return found[0]

    def list_sessions(
        self,
        *,
        status: str | None = None,
        updated_before: datetime | None = None,
        updated_after: datetime | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> Page[ChatSession]:
        """See :meth:`Store.list_sessions` (bulk reading only: no filters)."""
        if status is not None or updated_before is not None or updated_after is not None:
            raise ValidationError(f"{self.location}: a seed-era source is read whole, without filters")
        return self._session_page(limit, cursor)

    def _search_status(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Refused: a seed-era source is read whole (migrate it, then search sessionq's store)."""
        raise ValidationError(f"{self.location}: a seed-era source is read whole, without filters")

    @abc.abstractmethod
    def _session_page(self, limit: int, cursor: str | None) -> Page[ChatSession]:
        """A keyset page of valid sessions after the session id ``cursor``."""

    # -- schema: none of sessionq's ------------------------------------------

    def schema_version(self) -> int:
        """0: a seed-era store has no sessionq schema (and needs none to be read)."""
        return 0

    def latest_schema_version(self) -> int:
        """0, so :meth:`check_schema` passes."""
        return 0

    def stats(self) -> StoreStats:
        """Sessions by status, messages and file records, counted by the database."""
        by_status, messages, files = self._counts()
        return StoreStats(sessions_by_status=by_status, total_messages=messages, total_files=files)

    @abc.abstractmethod
    def _counts(self) -> tuple[dict[str, int], int, int]:
        """Sessions by status (rows), messages of existing sessions, file records."""

    # -- writing: refused ----------------------------------------------------

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise ValidationError(f"{self.location} is a seed-era store: sessionq reads it and never writes it")

    upgrade = clear = save_sessions = append_messages = import_records = delete_session = _read_only
    archive_session = save_file = delete_file = register_transport = heartbeat = _read_only
    mark_disconnected = recover = put_agent_state = _import_round = append_event = _read_only
    expire_idle_sessions = purge_expired_sessions = expire_transports = _read_only
    disconnect_stale_transports = delete_expired_files = delete_expired_agent_state = trim_events = _read_only
    _insert_task = _update_task = delete_expired_tasks = _read_only
    _insert_handle = _update_handle = delete_dead_handles = reseal_rows = _read_only
    _insert_idempotency = _replace_idempotency = _delete_idempotency = delete_expired_idempotency = _read_only
    put_tombstones = delete_expired_tombstones = save_receipt = delete_kind = delete_events = _read_only

    # -- the kinds the seed system did not have ------------------------------

    def load_transport(self, mcp_session_id: str) -> NoReturn:
        """Always :class:`NotFound`."""
        raise NotFound(f"transport session {mcp_session_id!r} not found (a seed-era store has none)")

    def get_agent_state(self, agent_id: str, key: str, now: datetime) -> None:
        """Always ``None``."""
        return None

    def events_after(self, mcp_session_id: str, event_id: str, *, limit: int = 10_000) -> None:
        """Always ``None``."""
        return None

    def load_task(self, task_id: str) -> NoReturn:
        """Always :class:`NotFound`."""
        raise NotFound(f"task {task_id!r} not found (a seed-era store has none)")

    def sealed_page(self, table: str, **page: Any) -> list[tuple[Any, dict[str, Any]]]:
        """Always empty: a seed-era store holds nothing sealed."""
        return []

    def forgotten_among(self, session_ids: Sequence[str], now: datetime) -> set[str]:
        """Always empty: sessionq never erased anything here."""
        return set()

    def load_tombstone(self, session_id: str) -> NoReturn:
        """Always :class:`NotFound`."""
        raise NotFound(f"no tombstone for session {session_id!r} (a seed-era store has none)")

    def load_receipt(self, receipt_id: str) -> NoReturn:
        """Always :class:`NotFound`."""
        raise NotFound(f"forget receipt {receipt_id!r} not found (a seed-era store has none)")

    def load_handle(self, handle_id: str) -> NoReturn:
        """Always :class:`NotFound`."""
        raise NotFound(f"handle {handle_id!r} not found (a seed-era store has none)")

    def list_handles(self, *args: Any, **kwargs: Any) -> Page[Any]:
        """Always empty."""
        return Page([], None)

    def load_idempotency(self, entry_id: str) -> NoReturn:
        """Always :class:`NotFound`."""
        raise NotFound(f"idempotency entry {entry_id!r} not found (a seed-era store has none)")

    def list_tasks(self, *, status: str | None = None, limit: int = 100, cursor: str | None = None) -> Page[Any]:
        """Always empty."""
        return Page([], None)

    def stale_tasks(self, now: datetime, *, limit: int = 1000) -> list[Any]:
        """Always empty."""
        return []

    def task_stats(self, now: datetime) -> Any:
        """No tasks."""
        from ..tasks import TaskStats

        return TaskStats()
