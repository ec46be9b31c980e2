"""Streaming migration between any two stores, and verification of the result.

A migration carries every durable record kind: sessions with their messages, then
file records, transport sessions and agent state (:mod:`sessionq.models.transfer_kinds`).
The MCP event log stays behind: it is a short-lived replay buffer.

It walks the source's sessions in keyset pages (``batch_size`` sessions per
batch). Each batch is independent (:func:`migrate_batch`): it writes the page's
sessions into the destination with :meth:`Store.import_records` (fields, ``seq`` and
``message_count`` kept exactly), then streams each session's messages across in
chunks. Memory holds one page of sessions and one chunk of messages, whatever the
size of the store.

Each other kind is then copied ``batch_size`` records at a time
(:func:`~sessionq.models.transfer_kinds.migrate_kind_batch`).

Re-running a batch is harmless (imports are idempotent and never regress newer
data), so a checkpoint only needs the last session id (and per other kind the
cursor) of the last *finished* batch: after a kill, ``resume`` starts from there
and the half-done batch is simply imported again. The same property lets
a queue fan the batches out to several workers (see :func:`plan_batches`).

:func:`verify` compares two stores session by session: fields, every message and a
sha256 checksum over the canonical JSON of each session; then each other kind by
count, record by record and by content digest, reporting every difference.

:func:`open_pair` opens the two stores of a migration or a verification by URL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

from sessionq.errors import NotFound, SchemaOutdated, SealedValueError, SessionqError, ValidationError

from .atomic_write import atomic_text_file
from .kinds import KINDS
from .legacy.records import LegacyOptions
from .records import ChatMessage, ChatSession
from .rotation import key_counts
from .sealing import PLAINTEXT, SETTING, Sealer
from .settings import redact_url
from .store import Store
from .transfer_kinds import KindCheck, canonical, count_in, migrate_kind_batch, verify_kind

logger = logging.getLogger(__name__)

# Sessions per migration batch (one keyset page of the source).
DEFAULT_BATCH_SIZE = 200
# Messages per import_records call (and per page read from the source).
DEFAULT_MESSAGE_CHUNK = 1000
# Differences kept in a VerifyReport (counts keep going past it).
DEFAULT_MAX_DIFFERENCES = 1000

Progress = Callable[[int, int], None]


def open_url(url: str, role: str, *, sealer: Sealer | None = None) -> Store:
    """Open and ping the store at ``url``, sealing values at rest with ``sealer``; an
    error names the ``role`` (``source``, ``destination``) and the URL with its password
    masked, and keeps its class."""
    from . import open_store

    try:
        store = open_store(url, sealer=sealer)
        store.ping()
    except SessionqError as exc:
        raise type(exc)(f"{role} {redact_url(url)}: {exc}") from None
    return store


@contextmanager
def open_pair(
    source: str,
    destination: str,
    *,
    upgrade: bool = False,
    source_options: LegacyOptions | None = None,
    sealer: Sealer | None = None,
) -> Iterator[tuple[Store, Store]]:
    """Open and ping the stores at ``source`` and ``destination`` (see :func:`open_url`),
    check their schemas (:class:`~sessionq.errors.SchemaOutdated` names the role), or
    bring the destination's up to date if ``upgrade``, and close both at the end.

    The source is read in its layout (:func:`sessionq.models.legacy.open_source`: a
    sessionq store or a seed-era one, as ``source_options`` says or as detected). Both
    open sealed values with ``sealer`` (the configured key ring) and the destination
    seals with it: a migration and a verification see plaintext."""
    from .legacy import open_source

    with ExitStack() as stack:
        src = open_source(source, source_options, sealer=sealer)
        stack.callback(src.close)
        dst = open_url(destination, "destination", sealer=sealer)
        stack.callback(dst.close)
        if upgrade:
            dst.upgrade()
        for role, store in (("source", src), ("destination", dst)):
            try:
                store.check_schema()
            except SchemaOutdated as exc:
                raise SchemaOutdated(f"{role} {exc}") from None
        yield src, dst


@dataclass
class BatchResult:
    """What one batch moved: the last session id it covered (``None`` when the
    source had no session after ``after_session_id``), sessions and messages."""

    last_session_id: str | None
    sessions: int = 0
    messages: int = 0
    sessions_written: int = 0
    messages_inserted: int = 0


def migrate_batch(
    src: Store,
    dst: Store,
    after_session_id: str | None,
    limit: int = DEFAULT_BATCH_SIZE,
    *,
    until: str | None = None,
    message_chunk: int = DEFAULT_MESSAGE_CHUNK,
    progress: Progress | None = None,
) -> BatchResult:
    """Copy the ``limit`` sessions that follow ``after_session_id`` (in the source's
    keyset order) with all their messages; idempotent, so safe to run again.

    With ``until`` the batch instead covers every session after ``after_session_id``
    up to and including ``until`` (read ``limit`` at a time), so that batches planned
    up front by :func:`plan_batches` still cover everything when sessions are added
    meanwhile. ``progress(sessions, messages)`` is called with increments.
    """
    result = BatchResult(None)
    cursor = after_session_id
    while True:
        page = src.list_sessions(limit=limit, cursor=cursor)
        items = page.items
        ids = [s.session_id for s in items]
        reached = until is not None and until in ids
        if until is not None and reached:
            items = items[: ids.index(until) + 1]
        if items:
            _copy_sessions(src, dst, items, result, message_chunk, progress)
        if until is None or reached or page.next_cursor is None:
            return result
        cursor = page.next_cursor


def _copy_sessions(
    src: Store, dst: Store, sessions: list[ChatSession], result: BatchResult, message_chunk: int,
    progress: Progress | None,
) -> None:
    # Sessions first (messages need them), then their messages in bounded chunks.
    result.sessions_written += dst.import_records(sessions, []).sessions_written
    result.sessions += len(sessions)
    result.last_session_id = sessions[-1].session_id
    if progress:
        progress(len(sessions), 0)
    chunk: list[ChatMessage] = []

    def flush() -> None:
        result.messages_inserted += dst.import_records([], chunk).messages_inserted
        result.messages += len(chunk)
        if progress:
            progress(0, len(chunk))
        chunk.clear()

    for message in src.iter_messages_of([s.session_id for s in sessions], page_size=message_chunk):
        chunk.append(message)
        if len(chunk) >= message_chunk:
            flush()
    if chunk:
        flush()


def plan_batches(
    src: Store, batch_size: int = DEFAULT_BATCH_SIZE, *, after: str | None = None
) -> Iterator[tuple[str | None, str]]:
    """``(after_session_id, until)`` for every batch of a migration, for fanning it
    out: each pair is one independent ``migrate_batch(src, dst, after, batch_size,
    until=until)`` call. Only session ids are kept, one page at a time."""
    cursor = after
    while True:
        page = src.list_sessions(limit=batch_size, cursor=cursor)
        if not page.items:
            return
        yield cursor, page.items[-1].session_id
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


@dataclass
class Checkpoint:
    """Where a migration stands, saved as JSON after every finished batch."""

    last_session_id: str | None = None
    sessions: int = 0
    messages: int = 0
    done: bool = False
    source: str = ""
    destination: str = ""
    #: Per other kind (``files``, ...): the cursor after its last finished batch.
    cursors: dict[str, str | None] = field(default_factory=dict)
    #: Per other kind: records moved so far.
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """Read a checkpoint file; a missing file is a fresh start."""
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{k: data[k] for k in data if k in cls.__dataclass_fields__})
        except (OSError, ValueError, TypeError) as exc:
            raise ValidationError(f"checkpoint {path} is unreadable: {exc}") from None

    @classmethod
    def load_for(cls, path: Path, labels: tuple[str, str]) -> Checkpoint:
        """The checkpoint a migration between ``labels`` (redacted URLs; empty: not
        checked) resumes from.

        Raises :class:`~sessionq.errors.ValidationError` if it was written by a
        migration between other stores.
        """
        saved = cls.load(path)
        if saved.source and any(labels) and (saved.source, saved.destination) != labels:
            raise ValidationError(
                f"checkpoint {path} belongs to {saved.source} -> {saved.destination}; use another --checkpoint"
            )
        return saved

    def save(self, path: Path) -> None:
        """Write atomically (a kill never leaves half a file)."""
        with atomic_text_file(path) as out:
            out.write(json.dumps(asdict(self), indent=2))


@dataclass
class MigrationReport:
    """What :func:`migrate` did."""

    sessions: int
    messages: int
    seconds: float
    last_session_id: str | None
    resumed_from: str | None = None
    sessions_written: int = 0
    messages_inserted: int = 0
    #: Per other kind (``files``, ``transports``, ``agent_states``): records read.
    kinds: dict[str, int] = field(default_factory=dict)
    #: Per other kind: records inserted or replaced in the destination.
    kinds_written: dict[str, int] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        """Records of every kind (sessions, messages, the rest) moved per second."""
        rows = self.sessions + self.messages + sum(self.kinds.values())
        return rows / self.seconds if self.seconds > 0 else 0.0


def migrate(
    src: Store,
    dst: Store,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    message_chunk: int = DEFAULT_MESSAGE_CHUNK,
    checkpoint: Path | None = None,
    resume: bool = False,
    show_progress: bool | None = None,
    pause: float = 0.0,
    labels: tuple[str, str] = ("", ""),
) -> MigrationReport:
    """Copy every session and message of ``src`` into ``dst``, batch by batch, then
    every file record, transport session and agent-state entry.

    With ``checkpoint`` the position is saved after each batch; with ``resume`` the
    migration continues after the checkpoint's last session (and each other kind
    after its cursor). ``show_progress`` draws a tqdm bar on stderr (``None``: only
    when stderr is a terminal). ``pause`` sleeps between batches to spare a busy
    source. ``labels`` (redacted URLs) are recorded in the checkpoint.
    """
    from tqdm import tqdm

    state = Checkpoint.load_for(checkpoint, labels) if (checkpoint and resume) else Checkpoint()
    state.source, state.destination = labels
    resumed_from = state.last_session_id
    if resume and state.done:
        logger.info("checkpoint says the migration finished; checking for sessions after %r", state.last_session_id)
    state.done = False
    total = src.stats().total_sessions
    started = time.monotonic()
    moved = [0, 0]
    written = [0, 0]
    earlier_messages = state.messages  # moved by the run this one resumes
    bar = tqdm(
        total=total,
        initial=min(state.sessions, total),
        unit="session",
        desc="migrate",
        file=sys.stderr,
        disable=(not sys.stderr.isatty()) if show_progress is None else not show_progress,
        dynamic_ncols=True,
    )

    def progress(sessions: int, messages: int) -> None:
        moved[0] += sessions
        moved[1] += messages
        bar.update(sessions)
        elapsed = max(time.monotonic() - started, 1e-9)
        bar.set_postfix(
            messages=str(earlier_messages + moved[1]), msg_rate=f"{moved[1] / elapsed:.0f}/s", refresh=False
        )

    try:
        cursor = state.last_session_id
        while True:
            result = migrate_batch(src, dst, cursor, batch_size, message_chunk=message_chunk, progress=progress)
            if result.last_session_id is None:
                break
            written[0] += result.sessions_written
            written[1] += result.messages_inserted
            cursor = result.last_session_id
            state.last_session_id = cursor
            state.sessions += result.sessions
            state.messages += result.messages
            if checkpoint:
                state.save(checkpoint)
            logger.debug("batch done up to %r (%d sessions, %d messages)", cursor, result.sessions, result.messages)
            if result.sessions < batch_size:
                break
            if pause > 0:
                time.sleep(pause)
        kinds, kinds_written = _migrate_kinds(src, dst, batch_size, state, checkpoint, pause, bar)
        state.done = True
        if checkpoint:
            state.save(checkpoint)
    finally:
        bar.close()
    return MigrationReport(
        moved[0], moved[1], time.monotonic() - started, state.last_session_id, resumed_from, written[0], written[1],
        kinds, kinds_written,
    )


def _migrate_kinds(
    src: Store, dst: Store, batch_size: int, state: Checkpoint, checkpoint: Path | None, pause: float, bar: Any
) -> tuple[dict[str, int], dict[str, int]]:
    """The part of :func:`migrate` after the sessions: every other kind, each from
    its checkpointed cursor. Returns records read and written per kind."""
    moved: dict[str, int] = {}
    written: dict[str, int] = {}
    for kind in KINDS:
        moved[kind.plural] = written[kind.plural] = 0
        cursor = state.cursors.get(kind.plural)
        while True:
            result = migrate_kind_batch(src, dst, kind, cursor, batch_size)
            if result.last_cursor is None:
                break
            moved[kind.plural] += result.records
            written[kind.plural] += result.written
            cursor = state.cursors[kind.plural] = result.last_cursor
            state.counts[kind.plural] = state.counts.get(kind.plural, 0) + result.records
            if checkpoint:
                state.save(checkpoint)
            bar.set_postfix({name: str(n) for name, n in moved.items()}, refresh=True)
            if result.records < batch_size:
                break
            if pause > 0:
                time.sleep(pause)
    return moved, written


# -- verification -------------------------------------------------------------------


@dataclass
class VerifyReport:
    """Counts on both sides and every difference found (``equal`` when there is none)."""

    source_sessions: int = 0
    destination_sessions: int = 0
    source_messages: int = 0
    destination_messages: int = 0
    sessions_checked: int = 0
    messages_checked: int = 0
    difference_count: int = 0
    differences: list[str] = field(default_factory=list)
    #: Per other kind (``files``, ``transports``, ``agent_states``): counts, records checked, digests.
    kinds: dict[str, KindCheck] = field(default_factory=dict)

    @property
    def equal(self) -> bool:
        """True when both stores hold the same records of every kind."""
        return self.difference_count == 0

    def add(self, text: str) -> None:
        """Record a difference (the text is kept up to DEFAULT_MAX_DIFFERENCES)."""
        self.difference_count += 1
        if len(self.differences) < DEFAULT_MAX_DIFFERENCES:
            self.differences.append(text)


def session_checksum(store: Store, session: ChatSession, *, page_size: int = DEFAULT_MESSAGE_CHUNK) -> str:
    """sha256 over the canonical JSON of the session and its messages in seq order."""
    digest = hashlib.sha256(canonical(session))
    for message in store.iter_messages(session.session_id, page_size=page_size):
        digest.update(b"\n" + canonical(message))
    return digest.hexdigest()


def verify(
    src: Store, dst: Store, *, page_size: int = DEFAULT_MESSAGE_CHUNK, show_progress: bool | None = False
) -> VerifyReport:
    """Compare ``dst`` against ``src``: counts, and per session the fields, every
    message and a checksum; then every other kind (counts, each record, a content
    digest). Records only in ``dst`` are reported too. Values sealed at rest are
    compared in clear; values sealed under a key the ring lacks (or altered) are
    reported, with counts per key id, instead of compared."""
    report = VerifyReport()
    try:
        _verify(src, dst, report, page_size, show_progress)
    except SealedValueError as exc:
        report.add(f"comparison stopped: {exc}")
        for role, store in (("source", src), ("destination", dst)):
            for kid, count in sorted(key_counts(store).total().items()):
                if kid != PLAINTEXT and kid not in store.sealer.key_ids:
                    report.add(f"{role}: {count} value(s) sealed under key {kid}, which is not in {SETTING}")
    return report


def _verify(src: Store, dst: Store, report: VerifyReport, page_size: int, show_progress: bool | None) -> None:
    from tqdm import tqdm

    src_stats, dst_stats = src.stats(), dst.stats()
    report.source_sessions, report.destination_sessions = src_stats.total_sessions, dst_stats.total_sessions
    report.source_messages, report.destination_messages = src_stats.total_messages, dst_stats.total_messages
    if report.source_sessions != report.destination_sessions:
        report.add(f"session count differs: source {report.source_sessions}, destination {report.destination_sessions}")
    if report.source_messages != report.destination_messages:
        report.add(f"message count differs: source {report.source_messages}, destination {report.destination_messages}")
    matched = 0
    disable = (not sys.stderr.isatty()) if show_progress is None else not show_progress
    with tqdm(total=report.source_sessions, unit="session", desc="verify", file=sys.stderr, disable=disable) as bar:
        for session in src.iter_sessions(page_size=page_size):
            bar.update(1)
            report.sessions_checked += 1
            try:
                other = dst.load_session(session.session_id)
            except NotFound:
                report.add(f"session {session.session_id!r}: missing in destination")
                continue
            matched += 1
            _compare_session(src, dst, session, other, report, page_size)
    if report.destination_sessions > matched:
        for session in dst.iter_sessions(page_size=page_size):
            try:
                src.load_session(session.session_id)
            except NotFound:
                report.add(f"session {session.session_id!r}: only in destination")
    for kind in KINDS:
        counts = (count_in(src_stats, kind), count_in(dst_stats, kind))
        report.kinds[kind.plural] = verify_kind(src, dst, kind, counts, report.add, page_size=page_size)


def _compare_session(
    src: Store, dst: Store, a: ChatSession, b: ChatSession, report: VerifyReport, page_size: int
) -> None:
    sid = a.session_id
    left, right = a.to_json(), b.to_json()
    for name in left:
        if left[name] != right[name]:
            report.add(f"session {sid!r}: {name} differs: source {left[name]!r:.80}, destination {right[name]!r:.80}")
    ha, hb = hashlib.sha256(canonical(a)), hashlib.sha256(canonical(b))
    first_bad: str | None = None
    bad = 0
    pairs = zip_longest(src.iter_messages(sid, page_size=page_size), dst.iter_messages(sid, page_size=page_size))
    for ma, mb in pairs:
        report.messages_checked += 1
        if ma is not None:
            ha.update(b"\n" + canonical(ma))
        if mb is not None:
            hb.update(b"\n" + canonical(mb))
        if ma is None or mb is None or ma != mb:
            bad += 1
            if first_bad is None:
                first_bad = _describe_message_difference(ma, mb)
    if bad:
        report.add(f"session {sid!r}: {bad} message(s) differ; first: {first_bad}")
    if ha.hexdigest() != hb.hexdigest() and not bad and left == right:
        report.add(f"session {sid!r}: checksum differs ({ha.hexdigest()[:12]} vs {hb.hexdigest()[:12]})")


def _describe_message_difference(a: ChatMessage | None, b: ChatMessage | None) -> str:
    if a is None:
        assert b is not None
        return f"seq {b.seq} ({b.message_id!r}) only in destination"
    if b is None:
        return f"seq {a.seq} ({a.message_id!r}) missing in destination"
    left, right = a.to_json(), b.to_json()
    names = [name for name in left if left[name] != right[name]]
    return f"seq {a.seq} ({a.message_id!r}) differs in {', '.join(names)}"


def describe(report: VerifyReport, *, limit: int | None = None) -> Iterator[str]:
    """Human-readable lines for a report: the summary, then the differences (the first
    ``limit`` of them; ``None``: all that were kept), then how many more there are."""
    verdict = "EQUAL" if report.equal else f"{report.difference_count} DIFFERENCE(S)"
    others = "".join(f", {name} source={c.source} destination={c.destination}" for name, c in report.kinds.items())
    checked = "".join(f" / {c.checked} {name}" for name, c in report.kinds.items())
    yield (
        f"{verdict}: sessions source={report.source_sessions} destination={report.destination_sessions}, "
        f"messages source={report.source_messages} destination={report.destination_messages}{others}, "
        f"checked {report.sessions_checked} sessions / {report.messages_checked} messages{checked}"
    )
    shown = report.differences if limit is None else report.differences[:limit]
    yield from (f"  - {line}" for line in shown)
    if report.difference_count > len(shown):
        hidden, listed = report.difference_count - len(shown), len(report.differences) - len(shown)
        hint = "" if not listed else " (--all lists them)" if listed == hidden else f" (--all lists {listed} of them)"
        yield f"  ... and {hidden} more{hint}"

