"""JobObserver on a real Dramatiq RedisBroker and Worker: outcomes counted once, log context bound."""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq import Message, Worker
from dramatiq.brokers.redis import RedisBroker

from sessionq.workers.logs import ContextFilter, current_context
from sessionq.workers.metrics import JOB_SECONDS, JOBS
from sessionq.workers.middleware import JobObserver, session_id_of

# Seconds to wait for the worker to settle the messages of one test.
SETTLE_TIMEOUT = 30.0
log = logging.getLogger("tests.job_observer")


class Records(logging.Handler):
    """Keep records after the context filter ran, as a real handler would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(ContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def broker(redis_client: Any) -> Iterator[RedisBroker]:
    """Dramatiq's Redis broker on the test db, with the observer installed."""
    b = RedisBroker(client=redis_client)
    b.add_middleware(JobObserver())
    yield b
    b.close()


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)


def count(actor: str, outcome: str) -> float:
    return float(JOBS.labels(actor, outcome)._value.get())


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "the worker did not settle the messages in time"
        time.sleep(0.02)


def test_outcomes_and_context(broker: RedisBroker, redis_client: Any, records: Records) -> None:
    # Given three actors: one that works, one that fails once then works, one that always fails
    def obs_ok(payload: dict[str, str]) -> None:
        log.info("saving")

    def obs_flaky() -> None:
        if redis_client.incr("tests:flaky") == 1:
            raise RuntimeError("transient")

    def obs_dead() -> None:
        raise ValueError("permanent")

    ok = dramatiq.actor(broker=broker, queue_name="sessions", max_retries=0)(obs_ok)
    flaky = dramatiq.actor(
        broker=broker, queue_name="sessions", max_retries=3, min_backoff=10, max_backoff=20
    )(obs_flaky)
    dead = dramatiq.actor(broker=broker, queue_name="sessions", max_retries=0)(obs_dead)
    before = {(a, o): count(a, o) for a in ("obs_ok", "obs_flaky", "obs_dead") for o in ("ok", "retry", "dead")}
    runs_before = JOB_SECONDS.labels("obs_ok")._sum.get()

    # When each is sent once and a worker runs them
    message = ok.send({"session_id": "s-77"})
    flaky.send()
    dead.send()
    worker = Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        wait_for(lambda: count("obs_flaky", "ok") > before[("obs_flaky", "ok")]
                 and count("obs_dead", "dead") > before[("obs_dead", "dead")]
                 and count("obs_ok", "ok") > before[("obs_ok", "ok")])
    finally:
        worker.stop()

    # Then each delivery counted once under its outcome
    delta = {k: count(*k) - v for k, v in before.items()}
    assert delta == {
        ("obs_ok", "ok"): 1, ("obs_ok", "retry"): 0, ("obs_ok", "dead"): 0,
        ("obs_flaky", "ok"): 1, ("obs_flaky", "retry"): 1, ("obs_flaky", "dead"): 0,
        ("obs_dead", "ok"): 0, ("obs_dead", "retry"): 0, ("obs_dead", "dead"): 1,
    }
    assert JOB_SECONDS.labels("obs_ok")._sum.get() > runs_before
    # And the actor's log line carried the job's context
    saving = [r for r in records.records if r.getMessage() == "saving"]
    assert len(saving) == 1
    # (ContextFilter sets these attributes, which LogRecord does not declare)
    context = operator.attrgetter("job_id", "actor", "queue", "session_id")(saving[0])
    assert context == (message.message_id, "obs_ok", "sessions", "s-77")
    # And the dead one sits in Dramatiq's dead-letter set
    assert redis_client.zcard("dramatiq:sessions.XQ") == 1
    assert current_context() == {}


def test_age_limited_message_counts_as_dead(broker: RedisBroker) -> None:
    # Given a message already older than its max_age (AgeLimit skips it before our hook runs)
    def obs_old() -> None:
        raise AssertionError("must not run")

    dramatiq.actor(broker=broker, queue_name="maintenance")(obs_old)
    dead_before = count("obs_old", "dead")
    broker.enqueue(Message(queue_name="maintenance", actor_name="obs_old", args=(), kwargs={},
                           options={"max_age": 1}, message_timestamp=int(time.time() * 1000) - 60_000))
    # When a worker gets it
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        wait_for(lambda: count("obs_old", "dead") > dead_before)
    finally:
        worker.stop()
    # Then it was counted once, as dead-lettered
    assert count("obs_old", "dead") - dead_before == 1


def test_session_id_of() -> None:
    class M:
        def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.args, self.kwargs = args, kwargs

    assert session_id_of(M(({"session_id": "a"},), {})) == "a"
    assert session_id_of(M((), {"session_id": 5})) == "5"
    assert session_id_of(M(("x",), {})) is None
