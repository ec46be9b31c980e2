"""The task part of the Store contract (SEP-2663 tasks), run against every backend."""

from __future__ import annotations

import asyncio
import socket
import threading
from datetime import timedelta
from typing import Any

import pytest
from peewee import PostgresqlDatabase

from sessionq.models import Conflict, Store, StoreUnavailable, ValidationError
from sessionq.models.kinds import TASKS
from sessionq.models.sql.async_tasks import AsyncTaskInsert, asyncpg_connect_args
from sessionq.models.tasks import McpTask, new_task_id
from tests.conftest import T0

LEASE = timedelta(seconds=30)
ARGS = {"n": 3, "$weird.key": ["ü", None, 1.5], "nested": {"a.b": {"$c": True}}}


def make_task(**fields: object) -> McpTask:
    """A new working task created at T0 (one hour TTL, dispatch deadline T0+60s)."""
    values: dict[str, object] = {
        "task_id": new_task_id(), "tool": "slow", "owner": "alice", "arguments": ARGS, "created_at": T0,
        "expires_at": T0 + timedelta(hours=1), "lease_until": T0 + timedelta(seconds=60), "poll_interval_ms": 500,
    }
    values.update(fields)
    return McpTask(**values)  # type: ignore[arg-type]


def test_created_task_reads_back_exactly_and_only_for_its_owner(store: Store) -> None:
    # Given a task created for alice with arguments whose keys MongoDB could not store as fields
    task = store.create_task(make_task())
    # Then it loads back exactly, alice gets it, bob and anonymous callers do not
    assert store.load_task(task.task_id) == task
    assert store.get_task(task.task_id, "alice", T0) == task
    assert store.get_task(task.task_id, "bob", T0) is None
    assert store.get_task(task.task_id, None, T0) is None
    assert store.get_task("no-such-task", "alice", T0) is None
    # And once its TTL has passed it is gone for everybody
    assert store.get_task(task.task_id, "alice", T0 + timedelta(hours=1)) is None
    assert len(task.task_id) >= 43 and task.ttl_ms() == 3_600_000


def test_a_task_id_is_created_once(store: Store) -> None:
    task = store.create_task(make_task())
    with pytest.raises(Conflict):
        store.create_task(make_task(task_id=task.task_id, owner="bob"))
    assert store.load_task(task.task_id).owner == "alice"


def test_claim_is_exclusive_while_the_lease_lives_and_a_stale_claim_counts_an_attempt(store: Store) -> None:
    task = store.create_task(make_task())
    # When worker w1 claims leg 0
    claimed = store.claim_task(task.task_id, 0, "w1", T0, T0 + LEASE)
    assert claimed is not None and (claimed.worker_id, claimed.attempt) == ("w1", 1)
    # Then a duplicate delivery, another leg, or another worker within the lease gets nothing
    assert store.claim_task(task.task_id, 0, "w1", T0, T0 + LEASE) is None
    assert store.claim_task(task.task_id, 1, "w2", T0, T0 + LEASE) is None
    assert store.claim_task(task.task_id, 0, "w2", T0 + timedelta(seconds=29), T0 + LEASE) is None
    # When w1's lease passes, w2 takes the task for a second attempt
    later = T0 + LEASE
    second = store.claim_task(task.task_id, 0, "w2", later, later + LEASE)
    assert second is not None and (second.worker_id, second.attempt) == ("w2", 2)
    # Then w1 (the lost worker, back from a pause) can no longer finish it; w2 finishes it once
    assert not store.finish_task(task.task_id, "w1", later, result={"content": [], "isError": False})
    assert store.finish_task(task.task_id, "w2", later, result={"content": [{"type": "text", "text": "ok"}]})
    assert not store.finish_task(task.task_id, "w2", later, error={"code": -32603, "message": "late"})
    done = store.load_task(task.task_id)
    assert (done.status, done.result, done.error, done.worker_id) == (
        "completed", {"content": [{"type": "text", "text": "ok"}]}, None, None)
    # And a redelivered job cannot claim a finished task
    assert store.claim_task(task.task_id, 0, "w3", later + LEASE * 2, later + LEASE * 3) is None
    assert store.load_task(task.task_id).status == "completed"


def test_a_task_whose_worker_is_lost_on_every_attempt_fails(store: Store) -> None:
    task = store.create_task(make_task(max_attempts=1))
    assert store.claim_task(task.task_id, 0, "w1", T0, T0 + LEASE) is not None
    # When the lease passes and the job comes back
    assert store.claim_task(task.task_id, 0, "w2", T0 + LEASE, T0 + LEASE * 2) is None
    failed = store.load_task(task.task_id)
    assert failed.status == "failed" and failed.error is not None and failed.error["code"] == -32603


def test_requeue_hands_out_stale_tasks_once_and_fails_exhausted_ones(store: Store) -> None:
    # Given a task whose worker died, one never dispatched, one that used its attempts, a live one
    dead = store.create_task(make_task())
    store.claim_task(dead.task_id, 0, "w1", T0, T0 + LEASE)
    lost = store.create_task(make_task())
    spent = store.create_task(make_task(max_attempts=1))
    store.claim_task(spent.task_id, 0, "w1", T0, T0 + LEASE)
    live = store.create_task(make_task())
    store.claim_task(live.task_id, 0, "w1", T0, T0 + LEASE * 10)
    # When the sweep runs after the leases and the dispatch deadline passed
    now = T0 + timedelta(seconds=61)
    handed = store.requeue_stale_tasks(now, now + LEASE)
    # Then the dead and the lost one are handed out again (released), the spent one failed
    assert sorted(t.task_id for t in handed) == sorted([dead.task_id, lost.task_id])
    assert all(t.worker_id is None and t.lease_until == now + LEASE for t in handed)
    assert store.load_task(spent.task_id).status == "failed"
    assert store.load_task(live.task_id).worker_id == "w1"
    # And a second sweep at the same time hands out nothing
    assert store.requeue_stale_tasks(now, now + LEASE) == []


def test_racing_claims_have_one_winner(store: Store) -> None:
    task = store.create_task(make_task())
    winners: list[str] = []
    barrier = threading.Barrier(6)

    def claim(worker: str) -> None:
        barrier.wait()
        if store.claim_task(task.task_id, 0, worker, T0, T0 + LEASE) is not None:
            winners.append(worker)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert store.load_task(task.task_id).attempt == 1


def test_input_legs_gather_answers_under_fresh_keys(store: Store) -> None:
    task = store.create_task(make_task())
    store.claim_task(task.task_id, 0, "w1", T0, T0 + LEASE)
    # Given the tool asked two questions, parked under fresh wire keys
    requests = {"name.k1": {"method": "elicitation/create"}, "age.k2": {"method": "elicitation/create"}}
    assert store.park_task(task.task_id, "w1", T0, input_requests=requests,
                           input_keys={"name.k1": "name", "age.k2": "age"}, request_state="state-1")
    # When alice answers one of them plus a key nobody asked for
    answer = {"action": "accept", "content": {"v": "Ada"}}
    after, resumed = store.answer_task(task.task_id, "alice", {"name.k1": answer, "stale.k0": answer}, T0, T0 + LEASE)
    # Then the task still waits for the other one
    assert after is not None and not resumed
    assert (after.status, list(after.input_requests or {})) == ("input_required", ["age.k2"])
    # And bob cannot answer it, nor can a repeated or unknown key change anything
    assert store.answer_task(task.task_id, "bob", {"age.k2": answer}, T0, T0 + LEASE) == (None, False)
    same, resumed = store.answer_task(task.task_id, "alice", {"name.k1": answer}, T0, T0 + LEASE)
    assert same == after and not resumed
    # When the last one is answered the next leg is ready to run with the tool's own keys
    done, resumed = store.answer_task(task.task_id, "alice", {"age.k2": {"action": "decline"}}, T0, T0 + LEASE)
    assert resumed and done is not None
    assert (done.status, done.leg, done.attempt, done.request_state) == ("working", 1, 0, "state-1")
    assert done.input_responses == {"name": answer, "age": {"action": "decline"}}
    assert store.claim_task(task.task_id, 0, "w2", T0, T0 + LEASE) is None
    assert store.claim_task(task.task_id, 1, "w2", T0, T0 + LEASE) is not None


def test_cancel_ends_queued_and_waiting_tasks_marks_running_ones_and_leaves_final_ones(store: Store) -> None:
    queued = store.create_task(make_task())
    waiting = store.create_task(make_task())
    store.claim_task(waiting.task_id, 0, "w1", T0, T0 + LEASE)
    store.park_task(waiting.task_id, "w1", T0, input_requests={"k.x": {}}, input_keys={"k.x": "k"}, request_state=None)
    running = store.create_task(make_task())
    store.claim_task(running.task_id, 0, "w1", T0, T0 + LEASE)
    finished = store.create_task(make_task())
    store.claim_task(finished.task_id, 0, "w1", T0, T0 + LEASE)
    store.finish_task(finished.task_id, "w1", T0, result={"content": []})

    assert store.request_cancel(queued.task_id, "bob", T0) == (None, False)
    task, live = store.request_cancel(queued.task_id, "alice", T0)
    assert task is not None and task.status == "cancelled" and not live
    assert store.claim_task(queued.task_id, 0, "w2", T0, T0 + LEASE) is None
    task, live = store.request_cancel(waiting.task_id, "alice", T0)
    assert task is not None and task.status == "cancelled" and not live
    task, live = store.request_cancel(running.task_id, "alice", T0)
    assert task is not None and task.status == "working" and task.cancel_requested_at == T0 and live
    assert store.renew_task(running.task_id, "w1", T0, T0 + LEASE) is not None  # the worker sees the marker
    assert store.finish_task(running.task_id, "w1", T0, cancelled=True)
    assert store.load_task(running.task_id).status == "cancelled"
    task, live = store.request_cancel(finished.task_id, "alice", T0)
    assert task is not None and task.status == "completed" and not live


def test_a_cancelled_task_whose_worker_died_is_not_run_again(store: Store) -> None:
    task = store.create_task(make_task())
    store.claim_task(task.task_id, 0, "w1", T0, T0 + LEASE)
    store.request_cancel(task.task_id, "alice", T0)
    assert store.requeue_stale_tasks(T0 + LEASE, T0 + LEASE * 2) == []
    assert store.load_task(task.task_id).status == "cancelled"


def test_renewal_extends_the_lease_and_a_running_task_outlives_its_ttl(store: Store) -> None:
    task = store.create_task(make_task(expires_at=T0 + timedelta(seconds=10)))
    store.claim_task(task.task_id, 0, "w1", T0, T0 + LEASE)
    renewed = store.renew_task(task.task_id, "w1", T0 + timedelta(seconds=20), T0 + timedelta(seconds=50))
    assert renewed is not None and renewed.lease_until == renewed.expires_at == T0 + timedelta(seconds=50)
    assert store.renew_task(task.task_id, "w2", T0, T0 + LEASE) is None
    assert store.set_task_message(task.task_id, "w1", "half way", T0 + timedelta(seconds=21))
    assert store.load_task(task.task_id).status_message == "half way"


def test_expired_tasks_are_swept_in_the_database(store: Store) -> None:
    for i in range(5):
        store.create_task(make_task(expires_at=T0 + timedelta(seconds=i)))
    keep = store.create_task(make_task(expires_at=None))
    assert store.delete_expired_tasks(T0 + timedelta(seconds=2), dry_run=True) == 3
    assert store.delete_expired_tasks(T0 + timedelta(seconds=2), batch_size=2) == 3
    assert store.list_tasks().items[-1:] != [] and store.stats().tasks == 3
    assert store.get_task(keep.task_id, "alice", T0 + timedelta(days=3650)) == keep


def test_listing_pages_filters_and_counts(store: Store) -> None:
    tasks = [store.create_task(make_task()) for _ in range(5)]
    store.claim_task(tasks[0].task_id, 0, "w1", T0, T0 + LEASE)
    store.finish_task(tasks[0].task_id, "w1", T0, error={"code": -32603, "message": "boom"})
    first = store.list_tasks(limit=3)
    second = store.list_tasks(limit=3, cursor=first.next_cursor)
    assert [t.task_id for t in first.items + second.items] == sorted(t.task_id for t in tasks)
    assert second.next_cursor is None
    assert [t.task_id for t in store.list_tasks(status="failed").items] == [tasks[0].task_id]
    stats = store.task_stats(T0 + timedelta(seconds=90))
    assert stats.by_status == {"working": 4, "failed": 1}
    assert stats.oldest_working_seconds == 90.0 and stats.expired_leases == 4


def test_tasks_are_a_record_kind_that_imports_without_regressing(store: Store) -> None:
    task = store.create_task(make_task())
    store.claim_task(task.task_id, 0, "w1", T0, T0 + LEASE)
    store.finish_task(task.task_id, "w1", T0, result={"content": [], "structuredContent": {"$x.y": 1}})
    done = store.load_task(task.task_id)
    # When an older copy (the queued one) is imported, nothing changes; a new task is inserted
    other = make_task()
    assert store.import_kind(TASKS, [task, other]) == 1
    assert store.load_task(task.task_id) == done
    assert sorted(store.find_kind(TASKS, [(task.task_id,), (other.task_id,)]), key=lambda t: t.task_id) == sorted(
        [done, other], key=lambda t: t.task_id)
    assert {t.task_id for t in store.iter_kind(TASKS)} == {task.task_id, other.task_id}
    assert McpTask.from_json(done.to_json()) == done


def test_bad_tasks_are_refused_with_one_line() -> None:
    with pytest.raises(ValidationError, match="status"):
        make_task(status="running")
    with pytest.raises(ValidationError, match="arguments"):
        make_task(arguments={"x": "nul\x00"})
    with pytest.raises(ValidationError, match="max_attempts"):
        make_task(max_attempts=0)


def test_a_stale_known_copy_costs_a_read_never_a_lost_change(store: Store) -> None:
    # Given a worker's copy of its claimed task, then a cancellation that changed the row
    task = store.create_task(make_task())
    mine = store.claim_task(task.task_id, 0, "w1", T0, T0 + LEASE)
    assert mine is not None
    store.request_cancel(task.task_id, "alice", T0)
    # When the worker renews and finishes with its stale copy
    renewed = store.renew_task(task.task_id, "w1", T0, T0 + LEASE * 2, known=mine)
    # Then the renewal read the row again and carries the cancellation
    assert renewed is not None and renewed.cancel_requested_at == T0 and renewed.lease_until == T0 + LEASE * 2
    assert store.finish_task(task.task_id, "w1", T0, cancelled=True, known=mine)
    assert store.load_task(task.task_id).status == "cancelled"
    # And another worker's copy never ends it
    other = store.create_task(make_task())
    copy = store.claim_task(other.task_id, 0, "w1", T0, T0 + LEASE)
    assert not store.finish_task(other.task_id, "w2", T0, result={"content": []}, known=copy)
    assert store.load_task(other.task_id).status == "working"


def test_only_postgresql_creates_tasks_from_the_event_loop(store: Store) -> None:
    assert (store.async_create is not None) == (getattr(store, "backend", None) == "postgresql")


def test_the_async_create_commits_what_create_task_would(pg_store: Store) -> None:
    create = pg_store.async_create
    assert create is not None

    async def scenario() -> McpTask:
        # When a task is created from a coroutine
        task = make_task()
        assert await create(task) is task
        # Then it is committed: the store's own connections read it back exactly
        assert pg_store.load_task(task.task_id) == task
        # And the contract's refusals are the same: a taken id, a task not at version 0
        with pytest.raises(Conflict):
            await create(make_task(task_id=task.task_id, owner="bob"))
        with pytest.raises(ValidationError):
            await create(make_task(version=1))
        return task

    task = asyncio.run(scenario())
    assert pg_store.load_task(task.task_id).owner == "alice"
    # And each event loop gets its own pool (a second asyncio.run works as the first)
    async def another() -> McpTask:
        return await create(make_task())

    assert asyncio.run(another()).task_id != task.task_id


def test_the_async_create_reports_an_unreachable_database_as_unavailable(pg_store: Store) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = AsyncTaskInsert("INSERT INTO nowhere VALUES ($1)", lambda task: [], {"host": "127.0.0.1", "port": port,
                                                                  "user": "postgres", "database": "x", "timeout": 2})
    with pytest.raises(StoreUnavailable):
        asyncio.run(down(make_task()))


@pytest.mark.parametrize("params,expected", [
    ({"host": "db", "port": 5433, "user": "u", "password": "p", "connect_timeout": 3, "options": "-c timezone=UTC",
      "sslmode": "require"},
     {"database": "d", "host": "db", "port": 5433, "user": "u", "password": "p", "timeout": 3.0, "ssl": "require",
      "server_settings": {"timezone": "UTC"}}),
    ({"host": "db", "options": "-ctimezone=UTC -c statement_timeout=5s"},
     {"database": "d", "host": "db", "server_settings": {"timezone": "UTC", "statement_timeout": "5s"}}),
    ({"host": "db", "keepalives": 1}, None),  # no sure asyncpg equivalent: the store's thread path
    ({"host": "db", "options": "--geqo=off"}, None),
])
def test_asyncpg_connects_as_the_store_does_or_not_at_all(params: dict[str, Any], expected: object) -> None:
    db = PostgresqlDatabase("d", **params)
    assert asyncpg_connect_args(db) == expected
