"""Fault case R7 of issue #9: one session saved concurrently and out of order.

Many producers (threads, each with its own :class:`Producer` or store) save the same
session with shuffled ``updated_at`` values and overlapping message sets. Whatever
the arrival order, the session ends with the newest save's fields, its messages are
the union of all saves, none is stored twice, and ``seq`` runs 1..N without gaps —
on PostgreSQL through real worker processes, and on MongoDB through the store API.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from sessionq.models import ChatMessage, ChatSession, Settings, Store, open_store, utcnow
from sessionq.workers.producer import Producer
from tests.conftest import MONGO_URL, POSTGRES_URL, REDIS_URL, make_store, reset_store
from tests.support_faults import SessionqWorker, assert_no_secrets, record_figures, wait_until, with_password
from tests.support_jobs import dead_letters, pending_jobs

WINDOW = 5


def _plan(saves: int, producers: int, seed: int) -> list[list[int]]:
    """Save numbers 0..saves-1, shuffled and dealt round-robin to the producers."""
    order = list(range(saves))
    random.Random(seed).shuffle(order)
    return [order[p::producers] for p in range(producers)]


def _message_ids(k: int) -> list[str]:
    """Save k carries a window of messages overlapping its neighbours'."""
    return [f"m{i}" for i in range(k // 2, k // 2 + WINDOW)]


def _session_payload(sid: str, k: int, base: datetime) -> dict[str, Any]:
    return {
        "session_id": sid, "model": f"v{k:03d}", "created_at": base.isoformat(),
        "updated_at": (base + timedelta(seconds=k)).isoformat(), "metadata": {"k": k},
        "messages": [{"message_id": mid, "role": "user", "content": f"content of {mid}",
                      "created_at": (base + timedelta(seconds=int(mid[1:]))).isoformat()} for mid in _message_ids(k)],
    }


def _run_threads(plans: list[list[int]], work: Callable[[int, list[int]], None]) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(len(plans))

    def run(index: int, plan: list[int]) -> None:
        try:
            start.wait()
            work(index, plan)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, plan)) for i, plan in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []


def _check(store: Store, sid: str, saves: int, base: datetime) -> dict[str, Any]:
    newest = saves - 1
    union = sorted({mid for k in range(saves) for mid in _message_ids(k)}, key=lambda m: int(m[1:]))
    session = store.load_session(sid)
    stored = store.load_messages(sid)
    ids = [m.message_id for m in stored]
    figures = {"saves": saves, "union": len(union), "persisted": len(set(ids)), "duplicated": len(ids) - len(set(ids)),
               "lost": len(set(union) - set(ids)), "final_model": session.model}
    assert (session.model, session.metadata, session.updated_at) == (
        f"v{newest:03d}", {"k": newest}, base + timedelta(seconds=newest))
    assert sorted(ids) == sorted(union)
    assert [m.seq for m in stored] == list(range(1, len(union) + 1))
    assert session.message_count == len(union)
    assert all(m.content == f"content of {m.message_id}" for m in stored)
    return figures



@pytest.mark.slow
def test_r7_concurrent_out_of_order_saves_through_workers_on_postgresql(
    pg_store: Store, redis_client: redis.Redis, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    saves, producers = 200, 8
    base = (utcnow() - timedelta(hours=2)).replace(microsecond=0)
    sids = ["r7-one", "r7-two"]
    plans = _plan(saves, producers, seed=11)
    # Given two worker processes with 8 threads each on the queue
    worker = SessionqWorker(with_password(POSTGRES_URL), REDIS_URL, log=tmp_path / "worker.log", processes=2)
    try:
        # When 8 producers, each with its own Producer, send the saves of two sessions
        # in shuffled order (half of them buffered)
        def produce(index: int, plan: list[int]) -> None:
            settings = Settings(storage_url="sqlite:///unused.db", redis_url=REDIS_URL,
                                outbox_path=str(tmp_path / f"outbox-{index}.db"))
            producer = Producer(settings)
            for n, k in enumerate(plan):
                for sid in sids:
                    producer.save_session(_session_payload(sid, k, base), buffered=bool((n + index) % 2))
            producer.close()

        _run_threads(plans, produce)
        wait_until(lambda: pending_jobs(redis_client) == 0 or not worker.alive(), timeout=180, what="queue drained")
        assert worker.alive(), worker.output()[-3000:]
    finally:
        worker.stop()
    # Then each session holds the newest save's fields and the union of all messages, once each
    assert dead_letters(redis_client) == []
    for sid in sids:
        figures = _check(pg_store, sid, saves, base)
        record_figures(request, "R7-postgresql", session=sid, producers=producers, jobs_sent=saves,
                       **figures)
    assert_no_secrets([("worker.log", worker.output())])


@pytest.mark.slow
def test_r7_concurrent_out_of_order_saves_on_mongodb_store(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    saves, writers = 40, 4
    base = (utcnow() - timedelta(hours=2)).replace(microsecond=0)
    admin = make_store("mongodb", tmp_path)
    reset_store(admin)
    plans = _plan(saves, writers, seed=5)
    try:
        # When 4 writers, each with its own store (own client), save one session out of order
        def write(index: int, plan: list[int]) -> None:
            store = open_store(MONGO_URL)
            try:
                for k in plan:
                    payload = _session_payload("r7m", k, base)
                    items = payload.pop("messages")
                    session = ChatSession(**payload)
                    store.save_session(session, [ChatMessage(session_id="r7m", **m) for m in items])
            finally:
                store.close()

        _run_threads(plans, write)
        # Then the newest save won and the messages are the union, once each, seq gap-free
        figures = _check(admin, "r7m", saves, base)
        record_figures(request, "R7-mongodb", session="r7m", producers=writers, jobs_sent=saves, **figures)
    finally:
        reset_store(admin)
        admin.close()
