"""The Store contract: what every backend (SQL, MongoDB) must do, and how.

Rules that make at-least-once delivery safe, shared by every backend:

* Every write is idempotent. Messages are keyed by ``(session_id, message_id)``;
  re-delivering an append inserts nothing new.
* A session save never moves ``updated_at`` backwards: a save older than the stored
  state loses (its new messages are still inserted: messages are a union).
* Appending N messages costs O(N) statements and rows, never O(session length).
* Bulk reads are keyset pages; sweeps run inside the database in bounded batches and
  return counts; rows are never pulled into Python to be deleted one by one.
* Every durable record kind can be listed in keyset pages and bulk-imported without
  regressing newer data (sessions and messages through :meth:`Store.import_records`,
  files, transport sessions and agent state through :meth:`Store.import_kind`; see
  :mod:`sessionq.models.kinds` for what "newer" means per kind), so migrations, exports and
  backups carry all of them.

The contract suite in ``tests/test_store_contract.py`` runs against every backend.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, Self, TypeVar

from .errors import NotFound, SchemaOutdated, StoreUnavailable, ValidationError
from .kinds import (
    AGENT_STATES,
    DEFAULT_IMPORT_CHUNK,
    DEFAULT_IMPORT_ROUNDS,
    FILES,
    TRANSPORTS,
    Key,
    RecordKind,
)
from .records import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_RECOVERY_ATTEMPTS,
    AgentState,
    ChatMessage,
    ChatSession,
    FileRecord,
    Record,
    StreamEvent,
    TransportSession,
)
from .tasks import TaskStore

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R", bound=Record)

# Rows a sweep deletes or updates per statement.
DEFAULT_SWEEP_BATCH_SIZE = 1000
# Rows per keyset page when listing or streaming.
DEFAULT_PAGE_SIZE = 500

SessionWrite = tuple[ChatSession, Sequence[ChatMessage]]
#: One write as backends process it: (session to upsert or None for an append, session id, messages).
PendingWrite = tuple[ChatSession | None, str, list[ChatMessage]]


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items (multi-row writes, ``IN`` lists)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 300 characters (driver and
    server errors span several lines), for the one-line errors the backends raise."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def check_message_owners(writes: Sequence[PendingWrite]) -> None:
    """Raise :class:`~sessionq.models.errors.ValidationError` if a message names another session."""
    for _, session_id, messages in writes:
        for message in messages:
            if message.session_id != session_id:
                raise ValidationError(
                    f"message {message.message_id!r} belongs to session {message.session_id!r}, not {session_id!r}"
                )


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One keyset page: the items and the cursor for the next page (``None`` at the end)."""

    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a write changed: sessions inserted or updated, messages inserted."""

    sessions_written: int = 0
    messages_inserted: int = 0

    def __add__(self, other: WriteResult) -> WriteResult:
        return WriteResult(
            self.sessions_written + other.sessions_written,
            self.messages_inserted + other.messages_inserted,
        )


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counts for ``sessionq stats`` and the health endpoint."""

    sessions_by_status: dict[str, int] = field(default_factory=dict)
    total_messages: int = 0
    total_files: int = 0
    transports_by_status: dict[str, int] = field(default_factory=dict)
    agent_states: int = 0
    stream_events: int = 0
    tasks: int = 0

    @property
    def total_sessions(self) -> int:
        """Sessions in every status."""
        return sum(self.sessions_by_status.values())

    def to_json(self) -> dict[str, Any]:
        """The flat JSON shape ``sessionq stats --json`` prints."""
        return {
            "total_sessions": self.total_sessions,
            "active_sessions": self.sessions_by_status.get("active", 0),
            "archived_sessions": self.sessions_by_status.get("archived", 0),
            "expired_sessions": self.sessions_by_status.get("expired", 0),
            "total_messages": self.total_messages,
            "total_files": self.total_files,
            "transport_sessions": dict(self.transports_by_status),
            "agent_states": self.agent_states,
            "stream_events": self.stream_events,
            "tasks": self.tasks,
        }


class Store(TaskStore, abc.ABC):
    """A durable home for sessions, messages, files, transport sessions, agent state,
    MCP event logs and MCP tasks (:class:`~sessionq.models.tasks.TaskStore`). Backends
    subclass it; see the module docs for the rules."""

    #: The URL scheme family, e.g. ``"sqlite"``, ``"postgresql"``, ``"mysql"``, ``"mongodb"``.
    backend: str = ""
    #: Where the store lives, for messages: its URL with the password masked (set by the backend).
    location: str = ""
    #: True for a store that makes its own schema on first use (SQLite, the embedded default)
    #: instead of asking for ``sessionq db upgrade``; see :meth:`check_schema`.
    creates_schema: bool = False

    # -- lifecycle ---------------------------------------------------------

    @abc.abstractmethod
    def upgrade(self, target: int | None = None) -> list[int]:
        """Bring the schema to ``target`` (default: latest); return the versions applied.

        Idempotent: an up-to-date store applies nothing.
        """

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The schema version the store is at (0 for an empty database)."""

    @abc.abstractmethod
    def latest_schema_version(self) -> int:
        """The version :meth:`upgrade` brings this backend to."""

    def check_schema(self, *, create: bool = False) -> None:
        """Raise :class:`~sessionq.errors.SchemaOutdated` unless the schema is at
        :meth:`latest_schema_version`; the message names :attr:`location` and says to run
        ``sessionq db upgrade``. Every entry point calls this once, at start, on the store
        it serves.

        With ``create``, a store that :attr:`creates_schema` and has no schema at all yet
        is given one now instead (a SQLite file sessionq has just created); a schema that
        is behind is never upgraded here: other processes may still run the old version.
        """
        current, latest = self.schema_version(), self.latest_schema_version()
        if current >= latest:
            return
        if current == 0 and create and self.creates_schema:
            logger.info("creating the sessionq schema in %s", self.location)
            self.upgrade()
            return
        state = "has no sessionq schema" if current == 0 else f"is at schema version {current} of {latest}"
        raise SchemaOutdated(f"store {self.location} {state}: run `sessionq db upgrade`")

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise :class:`~sessionq.models.errors.StoreUnavailable` unless the backend answers."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the store may not be used afterwards."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Delete every record of every kind (tests, benchmarks); the schema and its
        version stay, so the store is ready for use at once."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- sessions and messages ----------------------------------------------

    @abc.abstractmethod
    def save_sessions(self, writes: Sequence[SessionWrite]) -> WriteResult:
        """Upsert sessions and insert their new messages, all in one transaction.

        For each ``(session, messages)``: the stored session takes the incoming
        fields only if ``session.updated_at`` is not older than the stored one; the
        messages not already stored (by ``message_id``) are appended in the given
        order with the next ``seq`` values, whatever the session save's age.
        ``message_count`` and ``created_at`` are kept by the store; ``updated_at``
        becomes the latest of the stored, incoming and new messages' times.
        """

    def save_session(self, session: ChatSession, messages: Sequence[ChatMessage] = ()) -> WriteResult:
        """Save one session (see :meth:`save_sessions`)."""
        return self.save_sessions([(session, messages)])

    @abc.abstractmethod
    def append_messages(self, session_id: str, messages: Sequence[ChatMessage]) -> int:
        """Append the messages not stored yet to an existing session; return how many.

        Raises :class:`~sessionq.models.errors.NotFound` if the session does not exist.
        """

    @abc.abstractmethod
    def import_records(self, sessions: Sequence[ChatSession], messages: Sequence[ChatMessage]) -> WriteResult:
        """Raw, idempotent bulk import that keeps every field as given (migration, restore).

        Unlike :meth:`save_sessions`, nothing is recomputed: sessions keep their
        ``created_at``, ``updated_at``, ``status`` and ``message_count``; messages keep
        their ``seq`` (which must be set, >= 1). A stored session is replaced only when
        the incoming ``updated_at`` is not older and some field differs; a message
        whose ``(session_id, message_id)`` or ``(session_id, seq)`` is already stored
        is skipped. Re-importing the same records changes nothing. Every message's
        session must be in ``sessions`` or already stored (else
        :class:`~sessionq.models.errors.NotFound`). Returns sessions written and messages inserted.
        """

    @abc.abstractmethod
    def load_session(self, session_id: str) -> ChatSession:
        """The session, or :class:`~sessionq.models.errors.NotFound`."""

    @abc.abstractmethod
    def list_sessions(
        self,
        *,
        status: str | None = None,
        updated_before: datetime | None = None,
        updated_after: datetime | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> Page[ChatSession]:
        """A page of sessions ordered by ``session_id``, filtered by status and
        ``updated_at`` (before: strictly earlier; after: strictly later)."""

    def iter_sessions(self, *, page_size: int = DEFAULT_PAGE_SIZE, **filters: Any) -> Iterator[ChatSession]:
        """Every session matching the filters, streamed page by page."""
        cursor: str | None = None
        while True:
            page = self.list_sessions(limit=page_size, cursor=cursor, **filters)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    @abc.abstractmethod
    def load_messages(self, session_id: str, *, after_seq: int = 0, limit: int | None = None) -> list[ChatMessage]:
        """Messages of a session with ``seq > after_seq`` in ``seq`` order."""

    def iter_messages(self, session_id: str, *, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[ChatMessage]:
        """Every message of a session, streamed page by page."""
        after = 0
        while True:
            page = self.load_messages(session_id, after_seq=after, limit=page_size)
            yield from page
            if len(page) < page_size:
                return
            after = page[-1].seq

    def iter_messages_of(
        self, session_ids: Sequence[str], *, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[ChatMessage]:
        """Every message of several sessions, streamed page by page: grouped by
        session, each session's in ``seq`` order (the sessions' order may differ).

        Bulk transfer reads a batch of sessions this way. Backends override it to read
        many sessions per query; this default reads one session at a time.
        """
        for session_id in dict.fromkeys(session_ids):
            yield from self.iter_messages(session_id, page_size=page_size)

    @abc.abstractmethod
    def delete_session(self, session_id: str) -> bool:
        """Delete a session and its messages; False if it did not exist."""

    @abc.abstractmethod
    def archive_session(self, session_id: str, at: datetime) -> ChatSession:
        """Set the status to ``archived`` (idempotent); ``updated_at`` moves to ``at``
        only if that is later. Raises :class:`~sessionq.models.errors.NotFound`."""

    # -- files ---------------------------------------------------------------

    @abc.abstractmethod
    def save_file(self, record: FileRecord) -> None:
        """Insert or replace a file record (idempotent)."""

    @abc.abstractmethod
    def load_file(self, file_id: str) -> FileRecord:
        """The file record, or :class:`~sessionq.models.errors.NotFound`."""

    @abc.abstractmethod
    def delete_file(self, file_id: str) -> bool:
        """Delete a file record; False if it did not exist."""

    # -- transport sessions -------------------------------------------------

    @abc.abstractmethod
    def register_transport(self, session: TransportSession) -> TransportSession:
        """Insert a transport session, or update the saved state of an existing one
        (working directory, transport state, agent context, conversation state,
        metadata) without touching its status, heartbeat or recovery count."""

    @abc.abstractmethod
    def load_transport(self, mcp_session_id: str) -> TransportSession:
        """The transport session, or :class:`~sessionq.models.errors.NotFound`."""

    @abc.abstractmethod
    def heartbeat(self, mcp_session_id: str, at: datetime) -> bool:
        """Record a heartbeat at ``at`` (never moving ``last_heartbeat`` backwards).

        A disconnected session heard from after its disconnect becomes active again;
        an expired one stays expired. False if the session is unknown or expired.
        """

    @abc.abstractmethod
    def mark_disconnected(self, mcp_session_id: str, at: datetime, grace: timedelta = DEFAULT_GRACE_PERIOD) -> bool:
        """Mark a live session disconnected at ``at`` with a grace deadline ``at + grace``.

        Idempotent; a heartbeat newer than ``at`` wins (the disconnect is stale).
        False if the session is unknown, expired or the disconnect is stale.
        """

    def can_recover(
        self, mcp_session_id: str, now: datetime, *, max_attempts: int = DEFAULT_MAX_RECOVERY_ATTEMPTS
    ) -> bool:
        """True if the session exists and may be recovered at ``now``."""
        try:
            return self.load_transport(mcp_session_id).recoverable_at(now, max_attempts=max_attempts)
        except NotFound:
            return False

    @abc.abstractmethod
    def recover(
        self, mcp_session_id: str, now: datetime, *, max_attempts: int = DEFAULT_MAX_RECOVERY_ATTEMPTS
    ) -> TransportSession:
        """Atomically count one recovery and return the session with its saved state.

        The session becomes ``recovered`` with a fresh heartbeat. Raises
        :class:`~sessionq.models.errors.Conflict` past the grace deadline or attempt cap,
        :class:`~sessionq.models.errors.NotFound` for an unknown id.
        """

    # -- agent state ---------------------------------------------------------

    @abc.abstractmethod
    def put_agent_state(self, state: AgentState) -> bool:
        """Upsert one key; a write older than the stored ``updated_at`` loses (False)."""

    @abc.abstractmethod
    def get_agent_state(self, agent_id: str, key: str, now: datetime) -> AgentState | None:
        """The value, or ``None`` if missing or expired at ``now``."""

    # -- every other record kind, in bulk (migrate, verify, export, import) --

    @abc.abstractmethod
    def list_kind(self, kind: RecordKind[R], *, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None) -> Page[R]:
        """A keyset page of ``kind``'s records (files, transport sessions, agent state)
        in primary-key order, after ``cursor`` (a :meth:`RecordKind.cursor`, as
        returned in ``next_cursor``). Expired records are listed too."""

    def iter_kind(self, kind: RecordKind[R], *, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[R]:
        """Every record of ``kind``, streamed page by page."""
        cursor: str | None = None
        while True:
            page = self.list_kind(kind, limit=page_size, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def iter_files(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[FileRecord]:
        """Every file record in ``file_id`` order, streamed page by page."""
        return self.iter_kind(FILES, page_size=page_size)

    def iter_transports(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[TransportSession]:
        """Every transport session in ``mcp_session_id`` order, streamed page by page."""
        return self.iter_kind(TRANSPORTS, page_size=page_size)

    def iter_agent_states(self, *, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[AgentState]:
        """Every agent-state entry in ``(agent_id, key)`` order, streamed page by page."""
        return self.iter_kind(AGENT_STATES, page_size=page_size)

    @abc.abstractmethod
    def find_kind(self, kind: RecordKind[R], keys: Sequence[Key]) -> list[R]:
        """The stored records of ``kind`` among ``keys`` (primary keys as tuples), in
        any order; unknown keys are left out. Read in bounded batches."""

    def import_kind(self, kind: RecordKind[R], records: Sequence[R]) -> int:
        """Raw, idempotent bulk upsert (migration, restore) that never regresses.

        Every field is kept as given. A record whose key is not stored is inserted;
        a stored one is replaced only when the incoming copy differs and is not older
        by ``kind.version`` (:meth:`RecordKind.replaces`); of two copies of one key
        in ``records`` the newer counts. Re-importing the same records changes
        nothing. Writes are batched (multi-row statements / ``bulk_write``), safe
        against concurrent writers. Returns how many records were inserted or replaced.

        Records go in key order (so concurrent importers lock rows in the same order)
        and in chunks of ``DEFAULT_IMPORT_CHUNK``, each written by rounds of
        :meth:`_import_round` until one completes.
        """
        latest = kind.latest(records)
        written = 0
        for chunk in chunked([latest[key] for key in sorted(latest)], DEFAULT_IMPORT_CHUNK):
            for _ in range(DEFAULT_IMPORT_ROUNDS):
                count, complete = self._import_round(kind, chunk)
                written += count
                if complete:
                    break
                logger.debug("another writer changed %s records during an import; comparing again", kind.name)
            else:
                raise StoreUnavailable(f"{kind.plural} import kept racing other writers; try again")
        return written

    @abc.abstractmethod
    def _import_round(self, kind: RecordKind[R], records: Sequence[R]) -> tuple[int, bool]:
        """One atomic pass of :meth:`import_kind` over a chunk of distinct keys in key
        order: insert the keys not stored, replace the stored records that
        ``kind.replaces``. Returns ``(records written, complete)``; not complete when
        another writer inserted or changed one of the keys meanwhile, so the next
        round compares those again."""

    # -- MCP event log -------------------------------------------------------

    @abc.abstractmethod
    def append_event(
        self, mcp_session_id: str, stream_id: str, message: dict[str, Any] | None, created_at: datetime
    ) -> StreamEvent:
        """Append an event to a session's log; the store assigns an ``event_id`` that
        sorts (as an integer) after every earlier event of the store."""

    @abc.abstractmethod
    def events_after(
        self, mcp_session_id: str, event_id: str, *, limit: int = 10_000
    ) -> tuple[str, list[StreamEvent]] | None:
        """``(stream_id, events)`` — the events of ``event_id``'s stream that follow it,
        in order — or ``None`` if the event is unknown to this session."""

    # -- sweeps (set-based, batched, return counts) --------------------------
    #
    # Every sweep takes ``dry_run``: with ``dry_run=True`` it changes nothing and
    # returns how many rows (documents) the same call would change right now,
    # counted by the database (``sessionq cleanup --dry-run``).

    @abc.abstractmethod
    def expire_idle_sessions(
        self, idle_before: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """Set ``active`` sessions with ``updated_at < idle_before`` to ``expired``
        (``updated_at`` unchanged); return how many."""

    @abc.abstractmethod
    def purge_expired_sessions(
        self, expired_before: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """Delete ``expired`` sessions with ``updated_at < expired_before`` (messages too);
        return how many sessions."""

    @abc.abstractmethod
    def expire_transports(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """Set ``disconnected`` transport sessions whose grace deadline is ``<= now`` to ``expired``."""

    @abc.abstractmethod
    def disconnect_stale_transports(
        self,
        heartbeat_before: datetime,
        now: datetime,
        grace: timedelta = DEFAULT_GRACE_PERIOD,
        *,
        batch_size: int = DEFAULT_SWEEP_BATCH_SIZE,
        dry_run: bool = False,
    ) -> int:
        """Mark live sessions with ``last_heartbeat < heartbeat_before`` disconnected at ``now``."""

    @abc.abstractmethod
    def delete_expired_files(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """Delete file records with ``expires_at <= now``."""

    @abc.abstractmethod
    def delete_expired_agent_state(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """Delete agent state with ``expires_at <= now``."""

    @abc.abstractmethod
    def trim_events(
        self,
        *,
        max_per_session: int,
        created_before: datetime,
        batch_size: int = DEFAULT_SWEEP_BATCH_SIZE,
        dry_run: bool = False,
    ) -> int:
        """Delete events older than ``created_before`` and, per session, all but the
        newest ``max_per_session`` (a dry run counts both parts: the old events plus,
        per session, the excess over the cap among the events that are not old)."""

    # -- statistics ------------------------------------------------------------

    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """Counts by status and totals (computed by the database)."""
