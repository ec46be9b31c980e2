"""C1: the ops console's pages with a million sessions in PostgreSQL.

Loads 1,000,000 sessions (``--quick``: 20,000) with ``COPY`` (streamed, memory flat),
then times each console page as the server sees it: the ASGI app called in process
(no socket, no browser), so the figure is routing, the store and Redis queries and
the template. The raw ceiling of each page is its main query, run by hand on the same
driver (``psycopg2``) or Redis client. The goal is a p99 under 200 ms per page; every
timed response is checked for what the page must show. The sessions are deleted
afterwards (the benchmark owns its database).
"""

from __future__ import annotations

import asyncio
import io
import re
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import redis

from sessionq.models import ChatMessage, ChatSession, Settings
from sessionq.models.sql import SqlStore
from sessionq.models.store import DEFAULT_SEARCH_SCAN
from sessionq.workers.http import create_app

from .harness import BENCH_POSTGRES_URL, BENCH_REDIS_URL, Result
from .store_bench import empty, open_bench_store

# Server-time goal per page (milliseconds, p99).
GOAL_MS = 200.0
STATUSES = ("active",) * 16 + ("archived",) * 3 + ("expired",)
MODELS = ("gpt-test", "claude-test", "llama-test", "mistral-test", "qwen-test")
# Distinct metadata values of "team": a metadata search matches one session in TEAMS.
TEAMS = 1000
NOW = datetime(2026, 6, 1, tzinfo=UTC)
SPAN = timedelta(days=30)


def session_id(i: int) -> str:
    """Session ``i``'s id: a scrambled hex prefix (so prefix searches hit few rows) and ``i``."""
    return f"{(i * 2654435761) % (1 << 32):08x}-{i}"


class _CopySource(io.RawIOBase):
    """The sessions as COPY text, produced chunk by chunk (never all in memory)."""

    def __init__(self, count: int) -> None:
        self.rows = self._rows(count)
        self.buffer = b""

    @staticmethod
    def _rows(count: int) -> Iterator[bytes]:
        span_us = int(SPAN.total_seconds() * 1_000_000)
        batch: list[str] = []
        for i in range(count):
            updated = NOW - timedelta(microseconds=(i * 2654435761) % span_us)  # scattered over the span
            created = updated - timedelta(hours=1)
            meta = f'{{"team": "t{i % TEAMS}", "n": {i}}}'
            batch.append(f"{session_id(i)}\t{MODELS[i % len(MODELS)]}\t{STATUSES[i % len(STATUSES)]}\t"
                         f"{created.isoformat()}\t{updated.isoformat()}\t{meta}\t0\n")
            if len(batch) == 5000:
                yield "".join(batch).encode()
                batch = []
        if batch:
            yield "".join(batch).encode()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.buffer) < size:
            chunk = next(self.rows, None)
            if chunk is None:
                break
            self.buffer += chunk
        if size < 0:
            out, self.buffer = self.buffer, b""
        else:
            out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out


def load_sessions(store: SqlStore, count: int) -> None:
    """COPY ``count`` sessions into the store, then VACUUM ANALYZE (what autovacuum does to a
    table after a bulk load: statistics, and the visibility map index-only scans need)."""
    table = store.m.Session._meta.table_name
    conn = store.database.connection()
    with conn.cursor() as cur:
        cur.copy_expert(f"COPY {table} (session_id, model, status, created_at, updated_at, metadata, message_count) "
                        "FROM STDIN", _CopySource(count))
    conn.commit()
    autocommit, conn.autocommit = conn.autocommit, True  # VACUUM runs outside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(f"VACUUM ANALYZE {table}")
    finally:
        conn.autocommit = autocommit


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _Page:
    def __init__(self, key: str, title: str, path: str, check: Callable[[str], bool], raw: Callable[[], Any]) -> None:
        self.key, self.title, self.path, self.check, self.raw = key, title, path, check, raw


def _links(html: str) -> int:
    return len(re.findall(r'href="/ui/sessions/[^"/?]+"', html))


def bench_console(*, quick: bool) -> list[Result]:
    """C1: p50/p99 server time of each console page with 1M sessions (quick: 20k)."""
    count = 20_000 if quick else 1_000_000
    repeats = 15 if quick else 60
    store = open_bench_store()
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    try:
        started = time.perf_counter()
        load_sessions(store, count)
        load_seconds = time.perf_counter() - started
        transcript = [ChatMessage(f"m{i}", "transcript", "user" if i % 2 else "assistant", f"message {i} " * 20,
                                  created_at=NOW) for i in range(300)]
        store.save_session(ChatSession("transcript", created_at=NOW - SPAN * 2), transcript)
        client.flushdb()
        settings = Settings(storage_url=BENCH_POSTGRES_URL, redis_url=BENCH_REDIS_URL)
        app = create_app(settings, store=store, redis_client=client)
        results = asyncio.run(_measure(app, store, client, count, repeats))
    finally:
        empty(store)
        store.close()
        client.flushdb()
        client.close()
    for result in results:
        result.notes = f"{count:,} sessions loaded by COPY in {load_seconds:.1f}s; " + result.notes
    return results


async def _measure(app: Any, store: SqlStore, client: Any, count: int, repeats: int) -> list[Result]:
    db = store.database
    t = store.m.Session._meta.table_name

    def raw_sql(sql: str, params: tuple[Any, ...] = ()) -> Callable[[], Any]:
        return lambda: db.execute_sql(sql, params).fetchall()

    def newest(where: str, params: tuple[Any, ...] = ()) -> Callable[[], Any]:
        # The page's query by hand: per status, newest first, one page (+1) each.
        sql = (f"SELECT * FROM {t} WHERE status = %s AND {where} ORDER BY updated_at DESC, session_id DESC LIMIT 51")
        return lambda: [db.execute_sql(sql, (s, *params)).fetchall() for s in ("active", "archived", "expired")]

    def bounded(where: str, params: tuple[Any, ...] = ()) -> Callable[[], Any]:
        # The same walk by hand: where DEFAULT_SEARCH_SCAN sessions of the status end, then the matches above.
        edge_sql = (f"SELECT updated_at FROM {t} WHERE status = %s "
                    f"ORDER BY updated_at DESC OFFSET {DEFAULT_SEARCH_SCAN - 1} LIMIT 1")
        sql = (f"SELECT * FROM {t} WHERE status = %s AND {where} AND updated_at >= %s "
               "ORDER BY updated_at DESC, session_id DESC LIMIT 51")

        def run() -> list[Any]:
            out = []
            for status in ("active", "archived", "expired"):
                edge = db.execute_sql(edge_sql, (status,)).fetchone()
                out.append(db.execute_sql(sql, (status, *params, *edge)).fetchall() if edge else [])
            return out

        return run

    team = "t7"
    prefix = session_id(count // 2)[:4]
    window_after = (NOW - timedelta(days=10)).isoformat()
    window_before = (NOW - timedelta(days=9, hours=23)).isoformat()
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://console") as http:
        # A cursor twenty pages in (the keyset page a user reaches by clicking "Older" 20 times).
        path = "/ui/sessions"
        for _ in range(20):
            html = (await http.get(path)).text
            found = re.search(r'href="([^"]+)" rel="next"', html)
            assert found, "no next page"
            path = found.group(1).replace("&amp;", "&")
        deep = path
        pages = [
            _Page("C1-overview", "overview", "/ui/", lambda h: 'data-queue="sessions"' in h,
                  lambda: (db.execute_sql("SELECT 1").fetchall(),
                           client.pipeline().llen("dramatiq:sessions").execute())),
            _Page("C1-sessions", "sessions, newest 50", "/ui/sessions", lambda h: _links(h) == 50,
                  newest("TRUE")),
            _Page("C1-sessions-deep", "sessions, 21st page (keyset)", deep, lambda h: _links(h) == 50,
                  newest("TRUE")),
            _Page("C1-status", "sessions, status=expired", "/ui/sessions?status=expired", lambda h: _links(h) == 50,
                  raw_sql(f"SELECT * FROM {t} WHERE status = 'expired' ORDER BY updated_at DESC, session_id DESC "
                          "LIMIT 51")),
            _Page("C1-prefix", f"sessions, id prefix {prefix!r}", f"/ui/sessions?id={prefix}", lambda h: _links(h) >= 1,
                  newest("session_id >= %s AND session_id < %s", (prefix, prefix + "\U0010ffff"))),
            _Page("C1-model", "sessions, model filter", "/ui/sessions?model=llama-test", lambda h: _links(h) == 50,
                  bounded("model = %s", ("llama-test",))),
            _Page("C1-window", "sessions, 1-hour updated window",
                  "/ui/sessions?" + urlencode({"after": window_after, "before": window_before}),
                  lambda h: _links(h) >= 1,
                  newest("updated_at > %s AND updated_at < %s", (window_after, window_before))),
            _Page("C1-metadata", f"sessions, metadata team={team} (1 in {TEAMS})", f"/ui/sessions?meta=team%3D{team}",
                  lambda h: _links(h) >= 1 and 'rel="next"' in h,
                  bounded("(metadata::jsonb ->> 'team') = %s", (team,))),
            _Page("C1-session", "one session + 200-message transcript", "/ui/sessions/transcript",
                  lambda h: h.count('class="msg') == 200,
                  raw_sql(f"SELECT * FROM {store.m.Message._meta.table_name} WHERE session_id = 'transcript' "
                          "ORDER BY seq LIMIT 201")),
            _Page("C1-mcp", "MCP transports and tasks", "/ui/mcp", lambda h: 'id="tasks"' in h,
                  raw_sql(f"SELECT * FROM {store.m.Transport._meta.table_name} ORDER BY mcp_session_id LIMIT 51")),
            _Page("C1-dlq", "dead letters (empty)", "/ui/dead-letters", lambda h: "No dead letters" in h,
                  lambda: client.zrange("dramatiq:sessions.XQ", 0, -1)),
        ]
        results = []
        for page in pages:
            ours: list[float] = []
            ceiling: list[float] = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                answer = await http.get(page.path)
                ours.append((time.perf_counter() - t0) * 1000)
                if answer.status_code != 200 or not page.check(answer.text):
                    shown = re.search(r'class="error"[^>]*>([^<]*)', answer.text)
                    raise AssertionError(f"{page.key}: {page.path} answered {answer.status_code} without its content"
                                         f" ({_links(answer.text)} rows; {shown.group(1) if shown else 'no error'})")
                t0 = time.perf_counter()
                page.raw()
                ceiling.append((time.perf_counter() - t0) * 1000)
            p99, raw99 = _percentile(ours, 0.99), _percentile(ceiling, 0.99)
            results.append(Result(
                page.key, f"console page: {page.title} (p99 server ms)", p99, raw99, "ms",
                p99 / raw99 if raw99 else float("inf"), f"p99 < {GOAL_MS:.0f} ms", p99 < GOAL_MS, ours + ceiling,
                f"p50 {statistics.median(ours):.1f} ms (raw query p50 {statistics.median(ceiling):.1f} ms), "
                f"{repeats} requests",
            ))
    return results
