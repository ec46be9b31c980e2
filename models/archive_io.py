"""Export, import, backup and restore of every durable record kind, streamed so
memory stays flat.

Two formats, both carrying sessions with their messages, then file records,
transport sessions, agent state and MCP tasks (:mod:`sessionq.models.kinds`; the
short-lived MCP event log is not exported):

* **JSON Lines** (``sessionq-jsonl`` version 3): the first line is a header
  ``{"format": "sessionq-jsonl", "version": 3, ...}``, then one record per line,
  each session (``"type": "session"``) followed by its messages (``"type": "message"``),
  then the ``"file"``, ``"transport"``, ``"agent_state"`` and ``"task"`` records. Every field of
  the records is kept, ``seq`` and ``message_count`` included.
* **Plain JSON**: ``{"format": "sessionq-json", "version": 3, "sessions": [...],
  "files": [...], "transports": [...], "agent_states": [...], "tasks": [...]}`` where each session
  has the single-session export shape (``session_id``, ``model``, ``created_at``,
  ``updated_at``, ``status``, ``metadata``, ``messages`` with ``message_id``,
  ``role``, ``content``, ``created_at``) and the other arrays hold records as
  :meth:`Record.to_json` writes them. It is written and read one element at a time;
  a file holding one bare session object imports too.

Version 1 files (sessions and messages only) import unchanged. Imports are
idempotent (:meth:`Store.import_records`, :meth:`Store.import_kind`: an older copy
never overwrites newer data) and validate every record: a bad record is reported
with its line number (JSON Lines) or its position (JSON) and the rest is imported.
Files ending in ``.gz`` are gzip-compressed.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from .atomic_write import atomic_text_file
from .errors import StoreError, StoreUnavailable, ValidationError
from .json_stream import iter_members
from .kinds import KINDS, RecordKind
from .records import ChatMessage, ChatSession, Record, utcnow
from .store import Store

logger = logging.getLogger(__name__)

FORMAT_JSONL = "sessionq-jsonl"
FORMAT_JSON = "sessionq-json"
# Version 2 added the file, transport and agent_state records, version 3 the task
# records; files of every earlier version still import.
FORMAT_VERSION = 3
# Records per import_records call during an import.
DEFAULT_IMPORT_BATCH = 500
# Messages read per page while exporting.
DEFAULT_EXPORT_PAGE = 1000
# Backups kept by default.
DEFAULT_KEEP = 7
# Errors kept in an ImportReport (the count keeps going past it).
DEFAULT_MAX_ERRORS = 1000
BACKUP_PREFIX = "sessionq-backup-"
_BACKUP_RE = re.compile(r"^sessionq-backup-(\d{8}T\d{6}Z)(?:-(\d+))?\.jsonl\.gz$")
#: The kinds by their JSON Lines record type and by their plain-JSON section.
_BY_TYPE: dict[str, RecordKind[Any]] = {kind.name: kind for kind in KINDS}
_BY_SECTION: dict[str, RecordKind[Any]] = {kind.plural: kind for kind in KINDS}


def _per_kind() -> dict[str, int]:
    return {kind.plural: 0 for kind in KINDS}


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def open_text(path: Path, mode: str) -> IO[str]:
    """Open a UTF-8 text file, gzip-compressed when the name ends in ``.gz``.

    Reading keeps bytes that are not UTF-8 as lone surrogates (``surrogateescape``):
    the record holding them then fails validation ("not valid UTF-8") and is reported
    with its line, instead of a decode error aborting the whole import.
    """
    errors = "surrogateescape" if mode.startswith("r") else "strict"
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.GzipFile(path, mode + "b"), encoding="utf-8", errors=errors, newline="\n")
    return open(path, mode, encoding="utf-8", errors=errors, newline="\n")


# -- export -----------------------------------------------------------------------


@dataclass
class ExportReport:
    """What an export wrote."""

    sessions: int = 0
    messages: int = 0
    #: Records written per other kind (``files``, ``transports``, ``agent_states``).
    kinds: dict[str, int] = field(default_factory=_per_kind)


def export_jsonl(store: Store, out: IO[str]) -> ExportReport:
    """Write every session, each followed by its messages, then every record of the
    other kinds, as JSON Lines."""
    report = ExportReport()
    header = {"format": FORMAT_JSONL, "version": FORMAT_VERSION, "exported_at": utcnow().isoformat(),
              "backend": store.backend, "records": ["session", "message", *_BY_TYPE]}
    out.write(_dumps(header) + "\n")
    for session in store.iter_sessions():
        out.write(_dumps({"type": "session", **session.to_json()}) + "\n")
        report.sessions += 1
        for message in store.iter_messages(session.session_id, page_size=DEFAULT_EXPORT_PAGE):
            out.write(_dumps({"type": "message", **message.to_json()}) + "\n")
            report.messages += 1
    for kind in KINDS:
        for record in store.iter_kind(kind, page_size=DEFAULT_EXPORT_PAGE):
            out.write(_dumps({"type": kind.name, **record.to_json()}) + "\n")
            report.kinds[kind.plural] += 1
    return report


def export_json(store: Store, out: IO[str]) -> ExportReport:
    """Write every session with its messages, then every record of the other kinds,
    as one JSON document, an element at a time."""
    report = ExportReport()
    out.write(f'{{"format": "{FORMAT_JSON}", "version": {FORMAT_VERSION}, ')
    out.write(f'"exported_at": {_dumps(utcnow().isoformat())}, "sessions": [')
    for index, session in enumerate(store.iter_sessions()):
        out.write(",\n" if index else "\n")
        head = _dumps(session.to_json())[:-1]  # the session object, still open for "messages"
        out.write(head + ',"messages":[')
        for position, message in enumerate(store.iter_messages(session.session_id, page_size=DEFAULT_EXPORT_PAGE)):
            data = message.to_json()
            del data["session_id"]
            out.write(("," if position else "") + _dumps(data))
            report.messages += 1
        out.write("]}")
        report.sessions += 1
    out.write("\n]")
    for kind in KINDS:
        out.write(f', "{kind.plural}": [')
        for index, record in enumerate(store.iter_kind(kind, page_size=DEFAULT_EXPORT_PAGE)):
            out.write((",\n" if index else "\n") + _dumps(record.to_json()))
            report.kinds[kind.plural] += 1
        out.write("\n]")
    out.write("}\n")
    return report


def export_file(store: Store, path: Path, fmt: str | None = None) -> ExportReport:
    """Export to ``path`` (``jsonl`` unless ``fmt`` or a ``.json`` name says otherwise),
    written to a temporary name first so a partial file never looks complete."""
    fmt = fmt or ("json" if path.name.endswith((".json", ".json.gz")) else "jsonl")
    with atomic_text_file(path, compress=path.suffix == ".gz") as out:
        return export_json(store, out) if fmt == "json" else export_jsonl(store, out)


# -- import -----------------------------------------------------------------------


@dataclass
class ImportReport:
    """What an import read and wrote, and every bad record (``where: why``)."""

    sessions_read: int = 0
    messages_read: int = 0
    sessions_written: int = 0
    messages_inserted: int = 0
    #: Records read per other kind (``files``, ``transports``, ``agent_states``).
    kinds_read: dict[str, int] = field(default_factory=_per_kind)
    #: Records inserted or replaced per other kind.
    kinds_written: dict[str, int] = field(default_factory=_per_kind)
    error_count: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, where: str, why: str) -> None:
        """Record a rejected record."""
        self.error_count += 1
        if len(self.errors) < DEFAULT_MAX_ERRORS:
            self.errors.append(f"{where}: {why}")


class _Importer:
    """Buffers validated records and writes them in batches; a batch the store rejects
    is retried record by record so that only the bad ones are reported."""

    def __init__(self, store: Store, report: ImportReport, batch: int = DEFAULT_IMPORT_BATCH) -> None:
        self.store, self.report, self.batch = store, report, batch
        self.pending: list[tuple[str, Record]] = []
        self.failed_sessions: dict[str, str] = {}

    def add(self, where: str, record: Record) -> None:
        if isinstance(record, ChatSession):
            self.report.sessions_read += 1
        elif isinstance(record, ChatMessage):
            self.report.messages_read += 1
            if record.session_id in self.failed_sessions:
                self.report.error(
                    where, f"skipped: its session was rejected ({self.failed_sessions[record.session_id]})"
                )
                return
        else:
            self.report.kinds_read[_kind_of(record).plural] += 1
        self.pending.append((where, record))
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        try:
            self._write([record for _, record in self.pending])
        except StoreUnavailable:
            raise
        except StoreError:
            for where, record in self.pending:
                try:
                    self._write([record])
                except StoreUnavailable:
                    raise
                except StoreError as exc:
                    self.report.error(where, str(exc))
        self.pending.clear()

    def _write(self, records: list[Record]) -> None:
        sessions = [r for r in records if isinstance(r, ChatSession)]
        messages = [r for r in records if isinstance(r, ChatMessage)]
        if sessions or messages:
            result = self.store.import_records(sessions, messages)
            self.report.sessions_written += result.sessions_written
            self.report.messages_inserted += result.messages_inserted
        for kind in KINDS:
            batch = [r for r in records if isinstance(r, kind.record)]
            if batch:
                self.report.kinds_written[kind.plural] += self.store.import_kind(kind, batch)

    def reject(self, where: str, why: str, session_id: str | None = None) -> None:
        self.report.error(where, why)
        if session_id:
            self.failed_sessions[session_id] = where


def _kind_of(record: Record) -> RecordKind[Any]:
    return next(kind for kind in KINDS if isinstance(record, kind.record))


def _record_types() -> str:
    return ", ".join(["session", "message", *_BY_TYPE])


def import_jsonl(store: Store, lines: Iterable[str], *, batch: int = DEFAULT_IMPORT_BATCH) -> ImportReport:
    """Import a ``sessionq-jsonl`` stream (version 1 to 3); bad lines are reported by
    line number."""
    report = ImportReport()
    importer = _Importer(store, report, batch)
    header_seen = False
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            data = json.loads(line)
        except ValueError as exc:
            if not header_seen:
                raise ValidationError(f"{where}: not a {FORMAT_JSONL} file (no JSON header: {exc})") from None
            importer.reject(where, f"not JSON: {exc}")
            continue
        if not header_seen:
            _check_header(data, where)
            header_seen = True
            continue
        kind = data.pop("type", None) if isinstance(data, dict) else None
        session_id = (
            data.get("session_id") if isinstance(data, dict) and isinstance(data.get("session_id"), str) else None
        )
        try:
            if kind == "session":
                importer.add(where, ChatSession.from_json(data))
            elif kind == "message":
                importer.add(where, ChatMessage.from_json(data))
            elif isinstance(kind, str) and kind in _BY_TYPE:
                importer.add(where, _BY_TYPE[kind].record.from_json(data))
            else:
                raise ValidationError(f"unknown record type {kind!r:.40} (expected {_record_types()})")
        except ValidationError as exc:
            importer.reject(where, str(exc), session_id if kind == "session" else None)
    if not header_seen:
        raise ValidationError(f"empty file: not a {FORMAT_JSONL} file")
    importer.flush()
    return report


def _check_header(data: Any, where: str) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT_JSONL:
        raise ValidationError(f"{where}: not a {FORMAT_JSONL} file (the first line must be its header)")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ValidationError(
            f"{where}: unsupported {FORMAT_JSONL} version {version!r} (this build reads 1 to {FORMAT_VERSION})"
        )


def import_json(store: Store, fp: IO[str], *, batch: int = DEFAULT_IMPORT_BATCH) -> ImportReport:
    """Import a plain JSON export (or one bare session object), an element at a time."""
    report = ImportReport()
    importer = _Importer(store, report, batch)
    top: dict[str, Any] = {}
    found = False
    numbers = dict.fromkeys(("sessions", *_BY_SECTION), 0)
    for section, data in iter_members(fp, numbers):
        if section not in numbers:
            top[section] = data
            continue
        found = True
        numbers[section] += 1
        if section == "sessions":
            _import_json_session(importer, numbers[section], data)
            continue
        kind = _BY_SECTION[section]
        key = data.get(kind.key_fields[0]) if isinstance(data, dict) else None
        where = f"{kind.name} #{numbers[section]}" + (f" ({key!r:.80})" if isinstance(key, str) else "")
        try:
            importer.add(where, kind.record.from_json(data))
        except ValidationError as exc:
            importer.reject(where, str(exc))
    if not found and "session_id" in top:
        _import_json_session(importer, 1, top)
    elif not found:
        raise ValidationError("not a sessionq JSON export: no \"sessions\" array and no session_id")
    importer.flush()
    return report


def _import_json_session(importer: _Importer, number: int, data: Any) -> None:
    sid = data.get("session_id") if isinstance(data, dict) else None
    where = f"session #{number}" + (f" ({sid!r:.80})" if isinstance(sid, str) else "")
    try:
        session, messages = _session_from_json(data)
    except ValidationError as exc:
        importer.reject(where, str(exc), sid if isinstance(sid, str) else None)
        return
    importer.add(where, session)
    for message in messages:
        importer.add(f"{where} message seq {message.seq}", message)


def _session_from_json(data: Any) -> tuple[ChatSession, list[ChatMessage]]:
    if not isinstance(data, dict):
        raise ValidationError(f"a session must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    raw_messages = data.pop("messages", [])
    if not isinstance(raw_messages, list):
        raise ValidationError("messages must be a list")
    data.setdefault("message_count", len(raw_messages))
    session = ChatSession.from_json(data)
    messages = []
    for position, raw in enumerate(raw_messages, start=1):
        if not isinstance(raw, dict):
            raise ValidationError(f"message {position} must be a JSON object")
        raw = {"session_id": session.session_id, "seq": position, **raw}
        if raw["session_id"] != session.session_id:
            raise ValidationError(f"message {position} belongs to session {raw['session_id']!r:.80}")
        try:
            messages.append(ChatMessage.from_json(raw))
        except ValidationError as exc:
            raise ValidationError(f"message {position}: {exc}") from None
    return session, messages


def import_file(store: Store, path: Path, *, batch: int = DEFAULT_IMPORT_BATCH) -> ImportReport:
    """Import ``.jsonl``/``.json`` (optionally ``.gz``); the content decides the format."""
    with open_text(path, "r") as fp:
        first = fp.readline()
        fp.seek(0)
        try:
            head = json.loads(first) if first.strip() else None
        except ValueError:
            head = None
        if isinstance(head, dict) and head.get("format") == FORMAT_JSONL:
            return import_jsonl(store, fp, batch=batch)
        return import_json(store, fp, batch=batch)


# -- backup and restore -----------------------------------------------------------------


@dataclass
class BackupReport:
    """The backup written, what it holds, and the old backups deleted."""

    path: Path
    sessions: int
    messages: int
    removed: list[Path]
    #: Records written per other kind (``files``, ``transports``, ``agent_states``).
    kinds: dict[str, int] = field(default_factory=_per_kind)


def list_backups(directory: Path) -> list[Path]:
    """The backups in ``directory``, oldest first."""
    found = []
    for entry in directory.iterdir() if directory.is_dir() else []:
        match = _BACKUP_RE.match(entry.name)
        if match:
            found.append(((match.group(1), int(match.group(2) or 0)), entry))
    return [entry for _, entry in sorted(found)]


def backup(store: Store, directory: Path, *, keep: int = DEFAULT_KEEP, now: datetime | None = None) -> BackupReport:
    """Write ``sessionq-backup-YYYYmmddTHHMMSSZ.jsonl.gz`` into ``directory`` and delete
    the oldest backups beyond ``keep``."""
    if keep < 1:
        raise ValidationError("keep must be at least 1")
    directory.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"{BACKUP_PREFIX}{stamp}.jsonl.gz"
    serial = 0
    while path.exists():
        serial += 1
        path = directory / f"{BACKUP_PREFIX}{stamp}-{serial}.jsonl.gz"
    report = export_file(store, path, "jsonl")
    removed = []
    backups = list_backups(directory)
    for old in backups[: max(0, len(backups) - keep)]:
        old.unlink()
        removed.append(old)
    logger.info(
        "backup %s: %d sessions, %d messages, %s; removed %d old",
        path.name, report.sessions, report.messages, report.kinds, len(removed),
    )
    return BackupReport(path, report.sessions, report.messages, removed, report.kinds)


def restore(store: Store, path: Path, *, batch: int = DEFAULT_IMPORT_BATCH) -> ImportReport:
    """Restore a backup or export file into ``store`` (idempotent)."""
    return import_file(store, path, batch=batch)
