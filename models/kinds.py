"""The record kinds that bulk operations carry besides sessions and messages.

Migration, verification, export/import and backup/restore move every durable record
kind: sessions with their messages (:meth:`Store.import_records`) and the kinds
described here — file records, transport sessions, agent state and MCP tasks — through the
generic :meth:`Store.list_kind`, :meth:`Store.find_kind` and :meth:`Store.import_kind`.
The MCP event log is left out on purpose: it is a short-lived replay buffer
(trimmed every few minutes), not state to carry between backends.

A :class:`RecordKind` says, for its record class, what the primary key is (and so
the keyset order of listings) and which copy of a record is *newer*, the rule that
makes imports safe to repeat and never regress data:

* **file records** — ``uploaded_at``: a file uploaded again is a newer record.
* **agent state** — ``updated_at``, the same rule :meth:`Store.put_agent_state` applies.
* **transport sessions** — no single field moves forward on every change, so the
  version is ``(recovery_attempts, last seen, status rank)``: recoveries only ever
  add up; "last seen" is the later of ``last_heartbeat`` and ``disconnected_at``
  (a heartbeat after a disconnect is later than it, a disconnect is never earlier
  than the last heartbeat); and at the same instant ``disconnected`` is later than
  a live status and ``expired`` (set by the grace sweep without touching any time)
  is later than ``disconnected``.
* **MCP tasks** — ``version``, which every compare-and-set change of a task
  increments (:mod:`sessionq.models.tasks`).

A stored record is replaced by an incoming one only when the incoming version is
not older and some field differs, exactly as sessions are imported: re-importing
the same data changes nothing, an older copy never overwrites a newer one, and of
two copies with the same version the incoming one wins.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import ValidationError
from .records import AgentState, FileRecord, Record, TransportSession
from .tasks import McpTask

R = TypeVar("R", bound=Record)
Key = tuple[str, ...]

# Records per multi-row statement / bulk_write in Store.import_kind.
DEFAULT_IMPORT_CHUNK = 500
# Rounds of Store.import_kind for one chunk when concurrent writers keep inserting the same keys.
DEFAULT_IMPORT_ROUNDS = 10

# Where each transport status stands among changes made at the same instant.
_STATUS_RANK = {"active": 0, "recovered": 0, "disconnected": 1, "expired": 2}


@dataclass(frozen=True, eq=False)
class RecordKind(Generic[R]):
    """A record kind bulk operations carry: its record class, key and version rule."""

    #: Singular name: the ``"type"`` of its JSON Lines records (``"file"``).
    name: str
    #: Plural name: report keys, JSON export sections, checkpoints, job payloads (``"files"``).
    plural: str
    #: The record class.
    record: type[R]
    #: The primary-key fields, in keyset order.
    key_fields: tuple[str, ...]
    #: Which of two copies of one record is newer (compared as tuples).
    version: Callable[[R], tuple[Any, ...]]

    def key(self, record: R) -> Key:
        """The record's primary key."""
        return tuple(getattr(record, name) for name in self.key_fields)

    def cursor(self, record: R) -> str:
        """The keyset cursor that resumes a listing after ``record`` (opaque text)."""
        key = self.key(record)
        return key[0] if len(key) == 1 else json.dumps(list(key), ensure_ascii=False)

    def parse_cursor(self, cursor: str) -> Key:
        """The key a :meth:`cursor` stands for; :class:`ValidationError` if it is not one."""
        if len(self.key_fields) == 1:
            return (cursor,)
        try:
            key = json.loads(cursor)
        except ValueError:
            key = None
        if not (isinstance(key, list) and len(key) == len(self.key_fields) and all(isinstance(k, str) for k in key)):
            raise ValidationError(f"{self.name} cursor must be a JSON list of {len(self.key_fields)} strings")
        return tuple(key)

    def ranges_after(self, key: Key) -> list[tuple[tuple[tuple[str, str], ...], tuple[str, str]]]:
        """The keys strictly after ``key`` as disjoint ranges, in key order: each is
        ``(equal fields, (field, lower bound))``, meaning "these fields equal these
        values and the next field is greater than the bound". A listing reads them one
        after another until its page is full, so that every query is a single index
        range on any backend (an ``OR`` of column comparisons would make the database
        scan every key of the current agent again on each page)."""
        pairs = list(zip(self.key_fields, key, strict=False))
        return [(tuple(pairs[:depth]), pairs[depth]) for depth in range(len(pairs) - 1, -1, -1)]

    def check_key(self, key: Any) -> Key:
        """``key`` as a tuple of strings of this kind's arity; :class:`ValidationError` otherwise."""
        key = tuple(key) if isinstance(key, tuple | list) else None
        if key is None or len(key) != len(self.key_fields) or not all(isinstance(part, str) for part in key):
            raise ValidationError(f"a {self.name} key is a tuple of {len(self.key_fields)} string(s)")
        return key

    def replaces(self, incoming: R, stored: R) -> bool:
        """True when an import of ``incoming`` must overwrite ``stored`` (same key):
        it differs and is not older."""
        return incoming != stored and self.version(incoming) >= self.version(stored)

    def latest(self, records: Iterable[R]) -> dict[Key, R]:
        """The records by key, keeping the newest copy of a key given twice (the
        later one of equal versions); raises :class:`ValidationError` for a record
        of another class."""
        out: dict[Key, R] = {}
        for record in records:
            if not isinstance(record, self.record):
                raise ValidationError(f"expected a {self.record.__name__}, got {type(record).__name__}")
            key = self.key(record)
            seen = out.get(key)
            if seen is None or self.version(record) >= self.version(seen):
                out[key] = record
        return out


def _transport_version(t: TransportSession) -> tuple[Any, ...]:
    heartbeat = t.last_heartbeat or t.created_at
    seen = heartbeat if t.disconnected_at is None else max(heartbeat, t.disconnected_at)
    return (t.recovery_attempts, seen, _STATUS_RANK[t.status])


FILES: RecordKind[FileRecord] = RecordKind("file", "files", FileRecord, ("file_id",), lambda f: (f.uploaded_at,))
TRANSPORTS: RecordKind[TransportSession] = RecordKind(
    "transport", "transports", TransportSession, ("mcp_session_id",), _transport_version
)
AGENT_STATES: RecordKind[AgentState] = RecordKind(
    "agent_state", "agent_states", AgentState, ("agent_id", "key"), lambda a: (a.updated_at,)
)
TASKS: RecordKind[McpTask] = RecordKind("task", "tasks", McpTask, ("task_id",), lambda t: (t.version,))
#: Every kind, in the order bulk operations move them (after sessions and messages).
KINDS: tuple[RecordKind[Any], ...] = (FILES, TRANSPORTS, AGENT_STATES, TASKS)
#: Kinds by singular and by plural name.
KINDS_BY_NAME: dict[str, RecordKind[Any]] = {k.name: k for k in KINDS} | {k.plural: k for k in KINDS}


def kind_named(name: str) -> RecordKind[Any]:
    """The kind called ``name`` (singular or plural); :class:`ValidationError` otherwise."""
    try:
        return KINDS_BY_NAME[name]
    except (KeyError, TypeError):
        names = ", ".join(k.plural for k in KINDS)
        raise ValidationError(f"unknown record kind {name!r:.40} (expected one of {names})") from None

