"""PostgreSQL fast path of a session save batch: every session of the batch that is
not stored yet, with all its messages, written by ONE prepared statement sent
together with the transaction's ``BEGIN`` (one round trip instead of a lock query,
a session INSERT and a message INSERT, each a round trip with its parameters quoted
one by one, and no parse/plan per batch on the server).

:meth:`sessionq.models.sql.SqlStore.save_sessions` plans every session of the batch as if it
were new (the plan of a new session depends only on the batch), sends the rows as
two JSON documents, and the statement inserts the sessions with ``ON CONFLICT DO
NOTHING`` and the messages of the sessions it did insert. The ids it returns are
done; the other writes (sessions already stored, or inserted concurrently by another
worker) then go through the general path in the same transaction.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import weakref
from collections.abc import Sequence
from typing import Any

import peewee as pw

from .database import driver_code
from .schema import MESSAGE_COLUMNS

logger = logging.getLogger(__name__)

SESSION_COLUMNS = ("session_id", "model", "status", "created_at", "updated_at", "metadata", "message_count")


def _statement(
    session_table: str, message_table: str, tombstone_table: str | None,
    first: str = "$1", second: str = "$2", third: str = "$3",
) -> str:
    sessions = ", ".join(SESSION_COLUMNS)
    messages = ", ".join(f"r.{c}" for c in MESSAGE_COLUMNS)
    rows = f'json_populate_recordset(NULL::"{session_table}", {first})'
    # With a tombstone table, the sessions it holds live at ``third`` are neither inserted
    # nor left to the general path: they come back flagged (the group committer's save,
    # sessionq.models.erasure), at no extra round trip.
    refused, keep = "", ""
    if tombstone_table is not None:
        refused = (f'WITH t AS (SELECT session_id FROM "{tombstone_table}" WHERE expires_at > {third} '
                   f"AND session_id IN (SELECT session_id FROM {rows})), ")
        keep = "WHERE session_id NOT IN (SELECT session_id FROM t) "
    # Sessions are inserted in id order, as the general path locks them, so two
    # batches never wait on each other's new rows in opposite orders.
    return (
        f'{refused or "WITH "}s AS (INSERT INTO "{session_table}" ({sessions}) '
        f"SELECT {sessions} FROM {rows} {keep}ORDER BY session_id "
        f"ON CONFLICT (session_id) DO NOTHING RETURNING session_id), "
        f'm AS (INSERT INTO "{message_table}" ({", ".join(MESSAGE_COLUMNS)}) '
        f'SELECT {messages} FROM json_populate_recordset(NULL::"{message_table}", {second}) r '
        f"WHERE r.session_id IN (SELECT session_id FROM s)) "
        f"SELECT session_id, false FROM s"
        + (" UNION ALL SELECT session_id, true FROM t" if tombstone_table is not None else "")
    )


@functools.cache
def _prepared(session_table: str, message_table: str, tombstone_table: str | None) -> tuple[str, str]:
    """The save statement and its name. The name is derived from the text, so a server
    connection that prepared another version's statement (behind a pooler, across a
    rolling upgrade) is never asked to run it."""
    statement = _statement(session_table, message_table, tombstone_table)
    return f'"sq_save:{hashlib.sha1(statement.encode()).hexdigest()[:16]}"', statement


# The names each connection has prepared (a prepared statement lives as long as its connection).
_PREPARED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
# Databases on which prepared statements do not hold: behind a transaction-mode pooler
# (pgbouncer) consecutive statements may reach different server connections.
_UNPREPARED: weakref.WeakSet[pw.Database] = weakref.WeakSet()
# SQLSTATEs of a prepared statement missing on, or already defined by, the server connection.
_PREPARE_ERRORS = {"26000", "42P05"}


def session_json(row: dict[str, Any]) -> dict[str, Any]:
    """A planned session row (field names as in ``SqlRecords._session_row``) as a JSON object."""
    return {
        "session_id": row["session_id"],
        "model": row["model"],
        "status": row["status"],
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
        "metadata": row["metadata"],
        "message_count": row["message_count"],
    }


def message_json(row: dict[str, Any]) -> dict[str, Any]:
    """A message row (field names as in ``SqlRecords._message_row``, values as stored)
    as a JSON object of the messages table."""
    return {
        "session_id": row["session"],
        "message_id": row["message_id"],
        "seq": row["seq"],
        "role": row["role"],
        "content": row["content"],
        "created_at": row["created_at"].isoformat(),
        "metadata": row["metadata"],
    }


def begin_and_insert_new(
    db: pw.Database,
    session_table: str,
    message_table: str,
    sessions: Sequence[dict[str, Any]],
    messages: Sequence[dict[str, Any]],
    *,
    tombstones: tuple[str, Any] | None = None,
) -> tuple[set[str], set[str]]:
    """Open a transaction and insert the ``sessions`` not stored yet with their ``messages``
    (JSON objects from :func:`session_json` / :func:`message_json`); return the ids
    inserted and, with ``tombstones`` (the tombstone table and the instant, as the
    driver takes it), the ids refused because a tombstone lives for them.

    The caller must be in ``db.manual_commit()`` and must COMMIT or :func:`rollback`.
    """
    table = tombstones[0] if tombstones is not None else None
    name, statement = _prepared(session_table, message_table, table)
    params: tuple[Any, ...] = (
        json.dumps(sessions, separators=(",", ":"), ensure_ascii=False),
        json.dumps(messages, separators=(",", ":"), ensure_ascii=False),
    )
    if tombstones is not None:
        params += (tombstones[1],)
    types = "json, json, timestamptz" if tombstones is not None else "json, json"
    marks = ", ".join(["%s"] * len(params))
    if db not in _UNPREPARED:
        conn = db.connection()
        prepared = _PREPARED.get(conn)
        if prepared is None:
            prepared = _PREPARED[conn] = set()
        try:
            if name not in prepared:
                db.execute_sql(f"PREPARE {name}({types}) AS {statement}")
                prepared.add(name)
            return _split(db.execute_sql(f"BEGIN; EXECUTE {name}({marks})", params).fetchall())
        except pw.DatabaseError as exc:
            if driver_code(exc) not in _PREPARE_ERRORS:
                raise
            rollback(db)
            _UNPREPARED.add(db)
            logger.warning(
                "prepared statements do not hold on %s (%s); saving without them from now on "
                "(a transaction-mode pooler such as pgbouncer?)", db.database, str(exc).strip()
            )
    # Named parameters: the sessions' JSON is read twice when tombstones are checked.
    statement = _statement(session_table, message_table, table, "%(s)s::json", "%(m)s::json", "%(at)s::timestamptz")
    named = dict(zip(("s", "m", "at"), params, strict=False))
    return _split(db.execute_sql(f"BEGIN; {statement}", named).fetchall())


def _split(rows: list[tuple[str, bool]]) -> tuple[set[str], set[str]]:
    """(inserted ids, refused ids) from the statement's rows."""
    return {sid for sid, refused in rows if not refused}, {sid for sid, refused in rows if refused}


def rollback(db: pw.Database) -> None:
    """Roll the transaction back after a failure (a broken connection is left to the caller)."""
    try:
        db.rollback()
    except Exception as exc:  # the original error matters more
        logger.debug("rollback after a failed save batch failed: %s", exc)
