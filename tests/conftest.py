"""Shared fixtures: real-service stores, flushed before each test.

A service that does not answer skips its tests on a laptop and FAILS them in CI
(``CI=true``), so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sessionq.models import ChatMessage, ChatSession, Store, open_store
from sessionq.models.errors import StoreError

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

POSTGRES_URL = os.environ.get("SESSIONQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/sessionq_test")
MYSQL_URL = os.environ.get("SESSIONQ_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/sessionq_test")
# Redis database 15, never 0: the suite FLUSHDBs it (the benchmark's scratch database too).
REDIS_URL = os.environ.get("SESSIONQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
MONGO_URL = os.environ.get("SESSIONQ_TEST_MONGO_URL", "mongodb://127.0.0.1:27017/sessionq_test?retryWrites=false")

SERVICE_URLS = {"postgresql": POSTGRES_URL, "mysql": MYSQL_URL, "mongodb": MONGO_URL}
SQL_BACKENDS = ["sqlite", "postgresql", "mysql"]
ALL_BACKENDS = [*SQL_BACKENDS, "mongodb"]

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)


def service_missing(name: str, error: BaseException) -> None:
    """Skip (laptop) or fail (CI) because a real service does not answer."""
    message = f"{name} is not reachable: {error}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing service is a failure)")
    pytest.skip(message)


def reset_store(store: Store) -> None:
    """Delete every row/document the store holds (schema and version stay)."""
    store.clear()


def make_store(backend: str, tmp_path: Path) -> Store:
    """A migrated store on ``backend`` (sqlite in ``tmp_path``), or skip/fail."""
    url = f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite" else SERVICE_URLS[backend]
    try:
        store = open_store(url, max_pool_size=10)
        store.ping()
        store.upgrade()
    except (StoreError, ImportError) as exc:
        service_missing(backend, exc)
    return store


_open: dict[str, Store] = {}


@pytest.fixture(params=ALL_BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A clean store on every backend (server stores are shared and flushed)."""
    yield from _store_for(request.param, tmp_path)


@pytest.fixture(params=SQL_BACKENDS)
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A clean store on every SQL backend."""
    yield from _store_for(request.param, tmp_path)


def _store_for(backend: str, tmp_path: Path) -> Iterator[Store]:
    if backend == "sqlite":
        s = make_store(backend, tmp_path)
        yield s
        s.close()
        return
    if backend not in _open:
        _open[backend] = make_store(backend, tmp_path)
    s = _open[backend]
    reset_store(s)
    yield s
    reset_store(s)


@pytest.fixture
def pg_store(tmp_path: Path) -> Iterator[Store]:
    """The PostgreSQL test store on its own connection pool, migrated and emptied before
    and after (for tests that also run processes writing to it)."""
    store = make_store("postgresql", tmp_path)
    reset_store(store)
    yield store
    reset_store(store)
    store.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for s in _open.values():
        s.close()


@pytest.fixture
def redis_client() -> Iterator[Any]:
    """A client on the test Redis database, flushed before and after (FLUSHDB: that db only)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        service_missing("redis", exc)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def uid() -> Callable[[str], str]:
    """Unique ids for one test (``uid("s")`` -> ``s-3f2a...``)."""
    token = uuid.uuid4().hex[:8]
    return lambda prefix: f"{prefix}-{token}"


def session(session_id: str = "s1", *, at: datetime = T0, **fields: Any) -> ChatSession:
    """A session created and updated at ``at``."""
    fields.setdefault("model", "gpt-test")
    return ChatSession(session_id=session_id, created_at=fields.pop("created_at", at), updated_at=at, **fields)


def messages(session_id: str, count: int, *, start: int = 0, at: datetime = T0) -> list[ChatMessage]:
    """``count`` messages ``m{start}..`` one second apart from ``at``."""
    return [
        ChatMessage(
            message_id=f"m{i}",
            session_id=session_id,
            role="user" if i % 2 == 0 else "assistant",
            content=f"message {i}",
            created_at=at + timedelta(seconds=i),
        )
        for i in range(start, start + count)
    ]
