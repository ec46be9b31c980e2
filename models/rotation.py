"""Key rotation of values sealed at rest: re-seal every record under the primary key.

``sessionq keys rotate`` plans batches (:func:`plan_rotation`: key ranges of each
sealed table, read a page of keys at a time) and enqueues one ``rotate_batch`` job
each (:mod:`sessionq.workers.bulk`); any worker runs any batch (:func:`rotate_batch`).
A batch reads its rows a page at a time, opens each value sealed under another key
(or stored in clear) and writes it back sealed under the primary key with a
compare-and-set (:meth:`Store.reseal_rows`), so a save that changed the row meanwhile
wins and is never undone, and a redelivered batch changes nothing. Reads never wait:
every key of the ring opens, whichever a row is under.

:func:`key_counts` (``sessionq keys status``) counts sealed values per key id from
their clear prefix, decrypting nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import ValidationError
from .sealing import PLAINTEXT, SEALED_TABLES, key_id, table_named
from .store import DEFAULT_PAGE_SIZE, Store

Key = tuple[str, ...]


def plan_rotation(store: Store, batch_size: int = DEFAULT_PAGE_SIZE) -> Iterator[tuple[str, Key | None, Key]]:
    """``(table, after, until)`` for every batch of a rotation: key ranges of
    ``batch_size`` rows, read one page of keys at a time (no values)."""
    for table in SEALED_TABLES:
        after: Key | None = None
        while True:
            page = store.sealed_page(table.name, after=after, limit=batch_size, keys_only=True)
            if not page:
                break
            until = page[-1][0]
            yield table.name, after, until
            if len(page) < batch_size:
                break
            after = until


@dataclass
class RotateResult:
    """What one batch did: rows read, values re-sealed, rows a concurrent write won."""

    rows: int = 0
    resealed: int = 0
    skipped: int = 0


def rotate_batch(
    store: Store, table_name: str, after: Key | None, until: Key | None, *, page_size: int = DEFAULT_PAGE_SIZE
) -> RotateResult:
    """Re-seal under the primary key every value of ``table_name`` with a key in
    ``(after, until]`` that is under another key or in clear; idempotent."""
    table = table_named(table_name)
    sealer = store.sealer
    if not sealer.enabled:
        raise ValidationError("no SESSIONQ_ENCRYPTION_KEYS: nothing to rotate to")
    result = RotateResult()
    cursor = after
    while True:
        page = store.sealed_page(table.name, after=cursor, until=until, limit=page_size)
        if not page:
            return result
        changes: list[tuple[Key, dict[str, Any], dict[str, Any]]] = []
        for key, values in page:
            new = {}
            for name, is_json in table.fields:
                resealed = sealer.reseal(values[name], table.where(key, name), is_json=is_json)
                if resealed is not None:
                    new[name] = resealed
            if new:
                changes.append((key, {name: values[name] for name in new}, new))
        result.rows += len(page)
        if changes:
            done = store.reseal_rows(table.name, changes)
            result.resealed += done
            result.skipped += len(changes) - done
        if len(page) < page_size:
            return result
        cursor = page[-1][0]


@dataclass
class KeyCounts:
    """Sealed values per table and key id (:data:`~sessionq.models.sealing.PLAINTEXT` for clear)."""

    tables: dict[str, Counter[str]] = field(default_factory=dict)

    def total(self) -> Counter[str]:
        """Values per key id over every table."""
        out: Counter[str] = Counter()
        for counts in self.tables.values():
            out.update(counts)
        return out

    def to_json(self) -> dict[str, dict[str, int]]:
        """Plain dicts, for ``--json``."""
        return {name: dict(sorted(counts.items())) for name, counts in self.tables.items()}


def key_counts(store: Store, *, page_size: int = DEFAULT_PAGE_SIZE) -> KeyCounts:
    """How many stored values each key id seals (and how many are in clear; absent
    values are not counted), table by table, read a page at a time from the values'
    clear prefix: nothing is decrypted."""
    out = KeyCounts()
    for table in SEALED_TABLES:
        counts: Counter[str] = Counter()
        after: Key | None = None
        while True:
            page = store.sealed_page(table.name, after=after, limit=page_size)
            for _, values in page:
                counts.update(key_id(values[name]) for name, _ in table.fields if values[name] is not None)
            if len(page) < page_size:
                break
            after = page[-1][0]
        out.tables[table.name] = counts
    return out


def pending(counts: KeyCounts, primary: str | None) -> int:
    """Values not yet under ``primary`` (in clear included)."""
    return sum(n for kid, n in counts.total().items() if kid != primary or kid == PLAINTEXT)
