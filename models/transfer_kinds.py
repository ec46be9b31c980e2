"""Migration and verification of file records, transport sessions and agent state
(the kinds of :mod:`sessionq.models.kinds`); :mod:`sessionq.models.transfer` runs them after the
sessions and messages.

A batch reads a keyset page of the source and writes it with
:meth:`Store.import_kind`, which keeps every field and never lets an older copy
overwrite a newer one, so a batch may run again (a resumed or redelivered one)
without changing anything. Memory holds one page.

Verification compares, per kind, the counts, every record (each source page is
looked up in the destination by key, one query per page) and a content digest of
each side: the sum modulo 2**256 of the sha256 of every record's canonical JSON,
which does not depend on the order the backends list records in (their collations
may differ).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .kinds import Key, RecordKind
from .records import Record
from .store import Store, StoreStats

# Records per batch (one keyset page of the source) when migrating one kind.
DEFAULT_KIND_BATCH = 500
# The digest is a sum of sha256 values modulo this.
_DIGEST_MODULUS = 1 << 256

_COUNTS: dict[str, Callable[[StoreStats], int]] = {
    "files": lambda stats: stats.total_files,
    "transports": lambda stats: sum(stats.transports_by_status.values()),
    "agent_states": lambda stats: stats.agent_states,
    "tasks": lambda stats: stats.tasks,
    "handles": lambda stats: stats.handles,
    "idempotency_entries": lambda stats: stats.idempotency_entries,
}


def canonical(record: Record) -> bytes:
    """The canonical JSON of a record (sorted keys, compact, UTF-8) used by checksums."""
    return json.dumps(record.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def count_in(stats: StoreStats, kind: RecordKind[Any]) -> int:
    """How many records of ``kind`` the statistics count."""
    return _COUNTS[kind.plural](stats)


@dataclass
class KindBatchResult:
    """What one batch of a kind moved: the cursor of its last record (``None`` when
    the source had nothing after the batch's start), records read and written."""

    last_cursor: str | None
    records: int = 0
    written: int = 0


def migrate_kind_batch(
    src: Store,
    dst: Store,
    kind: RecordKind[Any],
    after: str | None,
    limit: int = DEFAULT_KIND_BATCH,
    *,
    until: str | None = None,
) -> KindBatchResult:
    """Copy the ``limit`` records of ``kind`` that follow the cursor ``after``;
    idempotent. With ``until`` (a cursor from :func:`plan_kind_batches`) the batch
    covers every record after ``after`` up to and including ``until`` instead."""
    result = KindBatchResult(None)
    cursor = after
    while True:
        page = src.list_kind(kind, limit=limit, cursor=cursor)
        items = page.items
        reached = False
        if until is not None:
            cursors = [kind.cursor(r) for r in items]
            reached = until in cursors
            if reached:
                items = items[: cursors.index(until) + 1]
        if items:
            result.written += dst.import_kind(kind, items)
            result.records += len(items)
            result.last_cursor = kind.cursor(items[-1])
        if until is None or reached or page.next_cursor is None:
            return result
        cursor = page.next_cursor


def plan_kind_batches(
    src: Store, kind: RecordKind[Any], batch_size: int = DEFAULT_KIND_BATCH, *, after: str | None = None
) -> Iterator[tuple[str | None, str]]:
    """``(after, until)`` cursors of every batch of ``kind``, for fanning a migration
    out; one page is read at a time."""
    cursor = after
    while True:
        page = src.list_kind(kind, limit=batch_size, cursor=cursor)
        if not page.items:
            return
        yield cursor, kind.cursor(page.items[-1])
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


# -- verification -------------------------------------------------------------------


@dataclass
class KindCheck:
    """Verification of one kind: counts on both sides, records checked, digests."""

    source: int = 0
    destination: int = 0
    checked: int = 0
    source_digest: str = ""
    destination_digest: str = ""


def _hash(record: Record) -> int:
    return int.from_bytes(hashlib.sha256(canonical(record)).digest(), "big")


def _label(kind: RecordKind[Any], key: Key) -> str:
    return f"{kind.name} {key[0]!r}" if len(key) == 1 else f"{kind.name} {key!r}"


def _pages(store: Store, kind: RecordKind[Any], page_size: int) -> Iterator[list[Any]]:
    cursor: str | None = None
    while True:
        page = store.list_kind(kind, limit=page_size, cursor=cursor)
        if page.items:
            yield page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def verify_kind(
    src: Store,
    dst: Store,
    kind: RecordKind[Any],
    counts: tuple[int, int],
    add: Callable[[str], None],
    *,
    page_size: int = DEFAULT_KIND_BATCH,
) -> KindCheck:
    """Compare ``kind`` in ``dst`` against ``src``; ``counts`` are the two stores'
    counts, ``add`` records a difference. Records only in ``dst`` are reported too."""
    check = KindCheck(*counts)
    if check.source != check.destination:
        add(f"{kind.plural} count differs: source {check.source}, destination {check.destination}")
    ours = theirs = matched = differences = 0
    for items in _pages(src, kind, page_size):
        found = {kind.key(r): r for r in dst.find_kind(kind, [kind.key(r) for r in items])}
        for record in items:
            check.checked += 1
            ours += _hash(record)
            key = kind.key(record)
            other = found.get(key)
            if other is None:
                differences += 1
                add(f"{_label(kind, key)}: missing in destination")
                continue
            matched += 1
            theirs += _hash(other)
            if other != record:
                differences += 1
                add(f"{_label(kind, key)}: {_describe(record, other)}")
    if check.destination > matched:
        for items in _pages(dst, kind, page_size):
            known = {kind.key(r) for r in src.find_kind(kind, [kind.key(r) for r in items])}
            for record in items:
                if kind.key(record) not in known:
                    theirs += _hash(record)
                    differences += 1
                    add(f"{_label(kind, kind.key(record))}: only in destination")
    check.source_digest = f"{ours % _DIGEST_MODULUS:064x}"
    check.destination_digest = f"{theirs % _DIGEST_MODULUS:064x}"
    if check.source_digest != check.destination_digest and not differences:
        add(f"{kind.plural}: digest differs ({check.source_digest[:12]} vs {check.destination_digest[:12]})")
    return check


def _describe(a: Record, b: Record) -> str:
    left, right = a.to_json(), b.to_json()
    names = [name for name in left if left[name] != right[name]]
    if not names:
        return "differs"
    first = names[0]
    return (
        f"differs in {', '.join(names)} (first: source {left[first]!r:.80}, destination {right[first]!r:.80})"
    )
