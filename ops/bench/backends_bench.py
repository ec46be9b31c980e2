"""P9: the migration (SQLite → MariaDB, SQLite → the MongoDB-compatible server) against
each backend's own raw bulk-insert ceiling, as ratios.

The ceilings write the same source rows with the driver's own bulk call, no sessionq
code: pymysql ``executemany`` of one INSERT (sent as multi-row INSERTs), pymongo
``insert_many`` (unordered). Absolute figures on the MongoDB-compatible test server say
nothing about MongoDB itself: only the ratio is reported as a result. Each run proves
its work by counting the destination's sessions and messages.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .harness import Result, prove, ratio_result, repeats
from .transfer_bench import MESSAGE_COLUMNS, RAW_COPY_CHUNK, SESSION_COLUMNS, _migrate, build_source, source_counts

BENCH_MYSQL_URL = os.environ.get("SESSIONQ_BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306/sessionq_bench")
BENCH_MONGO_URL = os.environ.get("SESSIONQ_BENCH_MONGO_URL",
                                 "mongodb://127.0.0.1:27017/sessionq_bench?retryWrites=false")


def _open(url: str) -> Any:
    """A migrated, emptied store at ``url`` (a MariaDB database is created if needed)."""
    from sessionq.models import open_store

    if url.startswith("mysql"):
        import pymysql

        parts = urlsplit(url)
        conn = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                               password=parts.password or "")
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{parts.path.lstrip('/')}`")
        finally:
            conn.close()
    store = open_store(url)
    store.upgrade()
    store.clear()
    return store


def _counts(store: Any) -> tuple[int, int]:
    stats = store.stats()
    return stats.total_sessions, stats.total_messages


def _raw_mysql(url: str, source: Path) -> float:
    """Rows/s of pymysql ``executemany`` INSERTs of the source's rows (a transaction per chunk)."""
    import pymysql

    parts = urlsplit(url)
    conn = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
                           password=parts.password or "", database=parts.path.lstrip("/"))
    src = sqlite3.connect(source)
    rows = 0
    started = time.perf_counter()
    try:
        with conn.cursor() as cur:
            for table, columns in (("sessionq_sessions", SESSION_COLUMNS), ("sessionq_messages", MESSAGE_COLUMNS)):
                marks = ", ".join(["%s"] * len(columns.split(",")))
                reader = src.execute(f"SELECT {columns} FROM {table}")
                while chunk := reader.fetchmany(RAW_COPY_CHUNK):
                    cur.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", chunk)
                    conn.commit()
                    rows += len(chunk)
    finally:
        seconds = time.perf_counter() - started
        src.close()
        conn.close()
    return rows / seconds


def _us(text: str) -> int:
    from sessionq.models.mongo.schema import to_us

    return to_us(datetime.fromisoformat(text + "+00:00"))


def _raw_mongo(url: str, source: Path) -> float:
    """Rows/s of pymongo ``insert_many`` of the source's rows as the store's documents."""
    import pymongo

    client: Any = pymongo.MongoClient(url)
    db = client.get_default_database()
    src = sqlite3.connect(source)
    rows = 0
    started = time.perf_counter()
    try:
        reader = src.execute(f"SELECT {SESSION_COLUMNS} FROM sessionq_sessions")
        while chunk := reader.fetchmany(RAW_COPY_CHUNK):
            db["sessionq_sessions"].insert_many(
                [{"_id": sid, "model": model, "status": status, "created_at": _us(created),
                  "updated_at": _us(updated), "metadata": json.loads(meta), "message_count": count}
                 for sid, model, status, created, updated, meta, count in chunk], ordered=False)
            rows += len(chunk)
        reader = src.execute(f"SELECT {MESSAGE_COLUMNS} FROM sessionq_messages")
        while chunk := reader.fetchmany(RAW_COPY_CHUNK):
            db["sessionq_messages"].insert_many(
                [{"session_id": sid, "message_id": mid, "seq": seq, "role": role, "content": content,
                  "created_at": _us(created), "metadata": json.loads(meta)}
                 for sid, mid, seq, role, content, created, meta in chunk], ordered=False)
            rows += len(chunk)
    finally:
        seconds = time.perf_counter() - started
        src.close()
        client.close()
    return rows / seconds


def _migrate_to(source: Path, url: str) -> float:
    outcome = _migrate(source, url)
    return outcome["rows"] / outcome["seconds"]


def bench_backends(*, quick: bool) -> list[Result]:
    """P9: migration rows/s vs the backend's raw bulk insert, on MariaDB and the Mongo-compatible server."""
    messages = 4_000 if quick else 100_000
    source = build_source(messages)
    expected = source_counts(source)
    results = []
    for key, name, url, raw in (("P9-mysql", "MariaDB", BENCH_MYSQL_URL, _raw_mysql),
                                ("P9-mongo", "MongoDB-compatible server", BENCH_MONGO_URL, _raw_mongo)):
        store = _open(url)
        ours, ceiling = [], []
        try:
            for rep in range(repeats(quick)):
                for which in (("ours", "raw") if rep % 2 == 0 else ("raw", "ours")):
                    store.clear()
                    if which == "ours":
                        ours.append(_migrate_to(source, url))
                    else:
                        ceiling.append(raw(url, source))
                    prove(f"{key} {which}: destination (sessions, messages)", _counts(store), expected)
        finally:
            store.clear()
            store.close()
        results.append(ratio_result(
            key, f"migrate SQLite → {name} ({messages:,} messages) vs the driver's raw bulk insert of the same rows",
            ours, ceiling, "rows/s", goal_op="info", goal=0, higher_is_better=True, sanity=(0.02, 5.0),
            proof={"sessions": expected[0], "messages": expected[1], "counted_after_each_run": True},
            notes="ratio only" + ("; absolute figures on the test server say nothing about MongoDB"
                                  if "mongo" in key else "")))
    return results

