"""PostgreSQL bulk loading of messages with ``COPY``.

Used by :meth:`sessionq.models.sql.SqlStore.import_records` for message batches on
PostgreSQL, where it skips building a multi-row INSERT statement in Python (the
cost that dominates a migration into PostgreSQL; see ops/bench/transfer_bench.py, P4).

A batch is first copied straight into the messages table under a savepoint: on a
fresh destination (the common case: a first migration) that is the whole cost. If
any row already exists (a resumed or repeated import), the copy fails with a unique
violation, the savepoint is rolled back and the batch goes through a staging table
and one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` instead, so re-running stays
idempotent. The staging table is a temporary table of the session, emptied after
each load, so it never holds more than one batch.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import peewee as pw
from psycopg2 import errors as pg_errors

from .schema import MESSAGE_COLUMNS

# Messages below this count go through a plain multi-row INSERT (COPY has a fixed cost).
DEFAULT_COPY_THRESHOLD = 200
STAGING_TABLE = "sessionq_import_messages"

NULL = "\\N"
_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _text(value: Any) -> str:
    """One field in COPY text format."""
    if value is None:
        return NULL
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        value = _json(value)
    return str(value).translate(_ESCAPES)


def copy_rows(rows: Iterable[Sequence[Any]]) -> io.StringIO:
    """Rows rendered as a COPY text-format buffer."""
    buf = io.StringIO()
    for row in rows:
        buf.write("\t".join(_text(v) for v in row))
        buf.write("\n")
    buf.seek(0)
    return buf


def copy_messages(db: pw.Database, table: str, rows: list[dict[str, Any]]) -> int:
    """Insert message rows (``session`` key = session id) unless their key or
    ``(session_id, seq)`` exists; return how many were inserted. Runs in the
    caller's transaction."""
    columns = ", ".join(MESSAGE_COLUMNS)
    cursor = db.cursor()
    cursor.execute("SAVEPOINT sessionq_copy")
    try:
        cursor.copy_expert(f"COPY {table} ({columns}) FROM STDIN", _message_buffer(rows))
    except pg_errors.UniqueViolation:
        cursor.execute("ROLLBACK TO SAVEPOINT sessionq_copy")
    else:
        cursor.execute("RELEASE SAVEPOINT sessionq_copy")
        return len(rows)
    cursor.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {STAGING_TABLE} "
        f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    cursor.copy_expert(f"COPY {STAGING_TABLE} ({columns}) FROM STDIN", _message_buffer(rows))
    cursor.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {STAGING_TABLE} ON CONFLICT DO NOTHING")
    inserted = int(cursor.rowcount)
    cursor.execute(f"TRUNCATE {STAGING_TABLE}")
    return inserted


def _message_buffer(rows: list[dict[str, Any]]) -> io.StringIO:
    """Message rows in COPY text format, one specialised line per row (the generic
    :func:`copy_rows` costs as much as the COPY itself on a migration)."""
    buf = io.StringIO()
    write = buf.write
    for r in rows:
        metadata = r["metadata"]
        created = r["created_at"]
        write(
            f"{r['session'].translate(_ESCAPES)}\t{r['message_id'].translate(_ESCAPES)}\t{int(r['seq'])}\t"
            f"{r['role'].translate(_ESCAPES)}\t{r['content'].translate(_ESCAPES)}\t"
            f"{created.isoformat() if created is not None else NULL}\t"
            f"{_json(metadata).translate(_ESCAPES) if metadata is not None else NULL}\n"
        )
    buf.seek(0)
    return buf
