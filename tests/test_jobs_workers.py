"""Real worker processes on real Redis, against PostgreSQL and SQLite.

Thousands of save and append jobs, some delivered twice, some saves out of order,
appends racing their session's save: every message must be stored exactly once and
every session must end at its newest state. Bad payloads pushed straight onto the
wire are dead-lettered with their reason while the worker keeps going.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from sessionq.models import Store, utcnow
from tests.conftest import POSTGRES_URL, make_store, reset_store
from tests.support_jobs import WorkerProcess, dead_letters, push_raw, wait_drained

SESSIONS = 300
MESSAGES_PER_SAVE = 3
APPENDS = 3
MESSAGES_PER_APPEND = 2


@pytest.fixture(params=["postgresql", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, str]]:
    """A clean, migrated store and the URL a worker process opens it with."""
    url = f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite" else POSTGRES_URL
    store = make_store(request.param, tmp_path)
    reset_store(store)
    yield store, url
    reset_store(store)
    store.close()


def _message(i: int, at: Any) -> dict[str, Any]:
    return {"message_id": f"m{i}", "role": "user" if i % 2 else "assistant", "content": f"message {i}",
            "created_at": at.isoformat()}


def _jobs(tag: str) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """Saves (two versions each, newest sometimes first) and appends, shuffled, a third sent twice."""
    base = utcnow() - timedelta(hours=1)
    jobs: list[tuple[str, Any]] = []
    newest_model: dict[str, str] = {}
    for s in range(SESSIONS):
        sid = f"{tag}-{s}"
        msgs = [_message(i, base + timedelta(seconds=i)) for i in range(MESSAGES_PER_SAVE)]
        for version in (1, 2):
            at = base + timedelta(minutes=version)
            jobs.append(("save_session", {"session_id": sid, "model": f"model-v{version}",
                                          "created_at": base.isoformat(), "updated_at": at.isoformat(),
                                          "status": "active", "metadata": {"version": version}, "messages": msgs}))
        newest_model[sid] = "model-v2"
        for a in range(APPENDS):
            start = MESSAGES_PER_SAVE + a * MESSAGES_PER_APPEND
            items = [_message(i, base + timedelta(seconds=i)) for i in range(start, start + MESSAGES_PER_APPEND)]
            jobs.append(("append_messages", {"session_id": sid, "messages": items}))
    rng = random.Random(7)
    jobs += rng.sample(jobs, len(jobs) // 3)
    rng.shuffle(jobs)
    return jobs, newest_model


def test_every_message_stored_exactly_once(
    backend: tuple[Store, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    store, url = backend
    # Given thousands of jobs: two saves per session in random order, appends that may
    # arrive before their session exists, and a third of all jobs delivered twice
    jobs, newest_model = _jobs("w")
    assert len(jobs) >= 2000
    for i in range(0, len(jobs), 500):
        push_raw(redis_client, jobs[i : i + 500])
    # When real worker processes drain the queue
    worker = WorkerProcess(url, processes=2, threads=8, log=tmp_path / "worker.log")
    try:
        wait_drained(redis_client, worker)
    finally:
        assert worker.stop() == 0
    # Then every session holds each of its messages exactly once, in seq order 1..N,
    # and the newest save won whatever the arrival order
    expected = MESSAGES_PER_SAVE + APPENDS * MESSAGES_PER_APPEND
    assert dead_letters(redis_client) == []
    assert store.stats().total_messages == SESSIONS * expected
    for sid, model in newest_model.items():
        session = store.load_session(sid)
        assert (session.model, session.metadata, session.message_count) == (model, {"version": 2}, expected)
        stored = store.load_messages(sid)
        assert sorted(m.message_id for m in stored) == sorted(f"m{i}" for i in range(expected))
        assert [m.seq for m in stored] == list(range(1, expected + 1))


BAD_PAYLOADS: list[tuple[str, Any, str]] = [
    ("save_session", {"model": "m"}, "missing required field(s): session_id"),
    ("save_session", {"session_id": 42}, "session_id must be a string"),
    ("save_session", {"session_id": "s", "messages": [{"message_id": "m", "role": "robot", "content": "x"}]},
     "role must be one of"),
    ("save_session", {"session_id": "has space"}, "visible ASCII"),
    ("save_session", {"session_id": "s", "metadata": {"$where": 1}}, "may not start with '$'"),
    ("save_session",
     {"session_id": "s", "messages": [{"message_id": "m", "role": "user", "content": "x" * (4 * 1024 * 1024 + 1)}]},
     "the limit is"),
    ("save_session", "not an object", "must be a JSON object"),
    ("append_messages", {"session_id": "s", "messages": "nope"}, "messages must be a JSON array"),
    ("heartbeat", {"mcp_session_id": "t", "at": (utcnow() + timedelta(days=3)).isoformat()}, "in the future"),
    ("run_sweep", "vacuum_everything", "kind must be one of"),
]


def test_bad_payloads_are_dead_lettered_with_reason(
    backend: tuple[Store, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    store, url = backend
    # Given bad payloads pushed straight onto the wire (no producer-side check),
    # followed by a good save
    for actor, arg, _ in BAD_PAYLOADS:
        push_raw(redis_client, [(actor, arg)], "maintenance" if actor == "run_sweep" else "sessions")
    push_raw(redis_client, [("export_session", {"session_id": "s", "path": "../../etc/passwd"})], "bulk")
    push_raw(redis_client, [("save_session", {"session_id": "good", "model": "m"})])
    worker = WorkerProcess(url, log=tmp_path / "worker.log")
    try:
        wait_drained(redis_client, worker)
        # Then each bad job is in the dead-letter queue with its reason, never retried,
        # and the worker kept running and stored the good save
        assert worker.alive()
    finally:
        worker.stop()
    letters = [m for queue in ("sessions", "maintenance", "bulk") for m in dead_letters(redis_client, queue)]
    reasons = [m["options"]["dead_letter_reason"] for m in letters]
    assert len(reasons) == len(BAD_PAYLOADS) + 1
    for _, _, expected in BAD_PAYLOADS:
        assert any(expected in r and r.startswith("InvalidPayload") for r in reasons), (expected, reasons)
    assert any("outside the export directory" in r for r in reasons)
    assert all("retries" not in m["options"] or m["options"]["retries"] <= 1 for m in letters)
    assert store.load_session("good").model == "m"
