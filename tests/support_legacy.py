"""Seed-era stores for the legacy tests: the seed document's exact DDL on SQLite and
PostgreSQL (a database of its own, ``<test db>_legacy``, so its tables never meet
sessionq's), and its MongoDB document structure (a database ``<test db>_legacy``)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from sessionq.models.legacy.sql import SEED_DDL
from tests.conftest import MONGO_URL, POSTGRES_URL, service_missing

#: Content with unicode and SQL/format metacharacters (quotes, comment, %s, ?, backslash, tab, newline).
NASTY = "Robert'); DROP TABLE chat_sessions;-- ünïcode 😀 \"quoted\" %s %(x)s ? \\ back\tslash\nnew line"
#: Rows per seed-era table.
Rows = dict[str, list[tuple[Any, ...]]]
#: A naive wall time (the seed system wrote naive times).
BASE = datetime(2025, 10, 16, 10, 0, 0)


def seed_rows() -> Rows:
    """Rows for the three tables: every status, unicode and metacharacters, metadata,
    a wrong message_count (``s-archived`` says 5, holds 2), a session without messages,
    and two file records (one without size and MIME type)."""
    at = BASE
    sessions = [
        ("s-active", "gemini-2.5-flash", at, at + timedelta(minutes=5), 3,
         json.dumps({"user": "zoë", "tags": ["a", "b"], "q": "it's"}), "active"),
        ("s-archived", "gemini-2.5-pro", at, at + timedelta(minutes=1), 5, None, "archived"),
        ("s-expired", "gemini-2.5-flash", at, at, 0, "{}", "expired"),
        (f"s-{NASTY[:8].replace(' ', '_')}", "m", at, at, 1, None, None),  # "s-Robert')": odd but a valid id
    ]
    messages = [
        ("msg-1", "s-active", "user", "Hello!", at + timedelta(seconds=1), json.dumps({"lang": "en"})),
        ("msg-2", "s-active", "assistant", NASTY, at + timedelta(seconds=2), None),
        ("msg-3", "s-active", "user", "日本語のテキスト", at + timedelta(seconds=3), json.dumps({"n": 3})),
        ("a-1", "s-archived", "user", "first", at + timedelta(seconds=1), None),
        ("a-2", "s-archived", "assistant", "second", at + timedelta(seconds=1), None),  # same time: id orders
        ("o-1", sessions[3][0], "user", "%s ? ; --", at + timedelta(seconds=9), None),
    ]
    files = [
        ("file-1", "files/abc123", "https://generativelanguage.googleapis.com/v1beta/files/abc123", "report.pdf",
         2048, "application/pdf", at, at + timedelta(hours=48), json.dumps({"purpose": "rag"})),
        ("file-2", "files/def456", "https://generativelanguage.googleapis.com/v1beta/files/def456", "nötes 'x'.txt",
         None, None, at, at + timedelta(hours=48), None),
    ]
    return {"chat_sessions": sessions, "chat_messages": messages, "uploaded_files": files}


def _sqlite_time(value: Any) -> Any:
    # Both spellings the seed system may have written: isoformat() and str(datetime).
    if isinstance(value, datetime):
        return value.isoformat() if value.second % 2 else str(value)
    return value


def build_sqlite(path: Path, rows: Rows | None = None) -> str:
    """A seed-era SQLite file made with :data:`SEED_DDL`; returns its URL."""
    with sqlite3.connect(path) as conn:
        conn.executescript(SEED_DDL)
        for table, items in (rows or seed_rows()).items():
            for row in items:
                marks = ", ".join("?" * len(row))
                conn.execute(f"INSERT INTO {table} VALUES ({marks})", [_sqlite_time(v) for v in row])
    conn.close()
    return f"sqlite:///{path}"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def legacy_postgres_url() -> str:
    """The URL of the private seed-era PostgreSQL database (created on first use)."""
    import psycopg2

    name = urlsplit(POSTGRES_URL).path.lstrip("/") + "_legacy"
    try:
        conn = psycopg2.connect(POSTGRES_URL.replace("postgresql://", "postgres://", 1), connect_timeout=5)
    except psycopg2.Error as exc:
        service_missing("postgresql", exc)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return _with_database(POSTGRES_URL, name)


def build_postgres(rows: Rows | None = None, *, jsonb: bool = False) -> str:
    """The seed-era tables made afresh with :data:`SEED_DDL` in the private database
    (``jsonb``: then turned into the JSONB metadata the seed's PostgreSQL backend used)."""
    import psycopg2

    url = legacy_postgres_url()
    conn = psycopg2.connect(url.replace("postgresql://", "postgres://", 1))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS chat_messages, chat_sessions, uploaded_files CASCADE")
        cur.execute(SEED_DDL)
        for table, items in (rows or seed_rows()).items():
            for row in items:
                cur.execute(f"INSERT INTO {table} VALUES ({', '.join(['%s'] * len(row))})", row)
        if jsonb:
            for table in ("chat_sessions", "chat_messages", "uploaded_files"):
                cur.execute(f"ALTER TABLE {table} ALTER COLUMN metadata TYPE JSONB USING metadata::jsonb")
    conn.close()
    return url


def legacy_mongo_url() -> str:
    """The URL of the private seed-era MongoDB database."""
    name = urlsplit(MONGO_URL).path.lstrip("/") + "_legacy"
    return _with_database(MONGO_URL, name)


def mongo_documents(rows: Rows | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The same data in the seed's MongoDB document structure (messages embedded)."""
    rows = rows or seed_rows()
    docs = []
    for sid, model, created, updated, count, metadata, status in rows["chat_sessions"]:
        doc: dict[str, Any] = {
            "_id": sid, "session_id": sid, "model": model, "created_at": created, "updated_at": updated,
            "message_count": count, "metadata": json.loads(metadata) if metadata else {},
            "messages": [
                {"message_id": mid, "role": role, "content": content, "created_at": at,
                 "metadata": json.loads(meta) if meta else {}}
                for mid, owner, role, content, at, meta in rows["chat_messages"] if owner == sid
            ],
        }
        if status is not None:
            doc["status"] = status
        docs.append(doc)
    files = [
        dict(zip(("_id", "gemini_file_name", "gemini_file_uri", "display_name", "size", "mime_type", "uploaded_at",
                  "expires_at", "metadata"), row, strict=True))
        for row in rows["uploaded_files"]
    ]
    for doc in files:
        doc["file_id"] = doc["_id"]
        doc["metadata"] = json.loads(doc["metadata"]) if doc["metadata"] else {}
    return docs, files


def build_mongo(collection: str = "chat_sessions", rows: Rows | None = None,
                extra: list[dict[str, Any]] | None = None) -> str:
    """The seed-era documents in the private MongoDB database (dropped first)."""
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    url = legacy_mongo_url()
    client: MongoClient[dict[str, Any]] = MongoClient(url, serverSelectionTimeoutMS=5000)
    try:
        db = client.get_default_database()
        client.drop_database(db.name)
        docs, files = mongo_documents(rows)
        db[collection].insert_many(docs + (extra or []))
        db["uploaded_files"].insert_many(files)
    except PyMongoError as exc:
        service_missing("mongodb", exc)
    finally:
        client.close()
    return url


@pytest.fixture
def legacy_source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A seed-era store holding :func:`seed_rows` on the backend named by the param."""
    kind = request.param
    if kind == "sqlite":
        yield build_sqlite(tmp_path / "legacy.db")
    elif kind == "postgresql":
        yield build_postgres()
    elif kind == "postgresql-jsonb":
        yield build_postgres(jsonb=True)
    else:
        yield build_mongo()
