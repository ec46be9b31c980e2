"""PostgreSQL bulk loading: ``COPY`` into a staging table, then one
``INSERT ... SELECT ... ON CONFLICT DO NOTHING``.

Used by :meth:`models.sql.SqlStore.import_records` for message batches on
PostgreSQL, where it skips building a multi-row INSERT statement in Python (the
cost that dominates a migration into PostgreSQL; see ops/bench/transfer_bench.py, P4).
The staging table is a temporary table of the session, emptied after each load, so
it never holds more than one batch.
"""

from __future__ import annotations

import io
import json
from datetime import datetime
from typing import Any, Iterable, Sequence

import peewee as pw

# Messages below this count go through a plain multi-row INSERT (COPY has a fixed cost).
DEFAULT_COPY_THRESHOLD = 200
STAGING_TABLE = "sessionq_import_messages"
MESSAGE_COLUMNS = ("session_id", "message_id", "seq", "role", "content", "created_at", "metadata")

_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _text(value: Any) -> str:
    """One field in COPY text format."""
    if value is None:
        return "\\N"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
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
    cursor.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {STAGING_TABLE} "
        f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    buf = copy_rows(
        (r["session"], r["message_id"], r["seq"], r["role"], r["content"], r["created_at"], r["metadata"]) for r in rows
    )
    cursor.copy_expert(f"COPY {STAGING_TABLE} ({columns}) FROM STDIN", buf)
    cursor.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {STAGING_TABLE} ON CONFLICT DO NOTHING")
    inserted = int(cursor.rowcount)
    cursor.execute(f"TRUNCATE {STAGING_TABLE}")
    return inserted
