"""GET /metrics and the queue-state reader, against real PostgreSQL, Redis and Dramatiq's broker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from sessionq.models import Settings, Store
from sessionq.scheduler.status import SweepBook
from sessionq.workers.http import create_app
from sessionq.workers.metrics import (
    DRAMATIQ_METRICS,
    OUTCOMES,
    exported_metric_names,
    observe_job,
    observe_save,
    observe_sweep,
    timed_job,
)
from sessionq.workers.queue_state import QUEUES, read_queues
from tests.conftest import POSTGRES_URL, REDIS_URL, messages, session
from tests.support_http import REPO_ROOT, ServerThread, pg_store, subprocess_env

__all__ = ["pg_store"]

TOKEN = "metrics-token"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Fetch and parse /metrics with Prometheus' own text parser: {(sample, labels): value}."""
    response = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """One sample's value, 0 if absent (counters start absent for a new label set)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def dramatiq_broker(redis_client: Any) -> Iterator[RedisBroker]:
    """Dramatiq's own Redis broker on the test Redis db, with the sessionq queues declared."""
    broker = RedisBroker(client=redis_client)
    for queue in QUEUES:
        broker.declare_queue(queue)
    yield broker
    broker.close()


def test_metrics_parse_and_move(pg_store: Store, redis_client: Any, dramatiq_broker: RedisBroker) -> None:
    # Given two active sessions and a server scraped once
    pg_store.save_session(session("a1"), messages("a1", 1))
    pg_store.save_session(session("a2"))
    settings = Settings(storage_url=POSTGRES_URL, redis_url=REDIS_URL, api_token=TOKEN)
    app = create_app(settings, store=pg_store, redis_client=redis_client)
    with ServerThread(app) as server:
        before = scrape(server.url)

        # When jobs run, saves and a sweep are observed, messages are queued and one is dead-lettered
        observe_job("save_session", "ok", 0.01)
        observe_job("save_session", "ok", 0.02)
        observe_job("save_session", "dead", 0.01)
        observe_save(0.005)
        observe_sweep("expire_sessions", ok=True, seconds=0.3, rows=7)
        observe_sweep("expire_sessions", ok=False, seconds=0.1)
        SweepBook(redis_client).record("expire_sessions", ok=False, duration=0.1, error="boom")
        for i in range(3):
            dramatiq_broker.enqueue(
                Message(queue_name="sessions", actor_name="save_session", args=(i,), kwargs={}, options={})
            )
        dramatiq_broker.enqueue(
            Message(queue_name="bulk", actor_name="export", args=(), kwargs={}, options={}), delay=60_000
        )
        consumer = dramatiq_broker.consume("sessions", prefetch=1, timeout=1000)
        fetched = next(iter(consumer))
        assert fetched is not None
        consumer.nack(fetched)
        consumer.close()
        pg_store.save_session(session("x1", status="expired"))
        after = scrape(server.url)

    # Then the counters moved by exactly what was observed
    assert value(after, "sessionq_jobs_total", actor="save_session", outcome="ok") - \
        value(before, "sessionq_jobs_total", actor="save_session", outcome="ok") == 2
    assert value(after, "sessionq_jobs_total", actor="save_session", outcome="dead") - \
        value(before, "sessionq_jobs_total", actor="save_session", outcome="dead") == 1
    assert value(after, "sessionq_save_seconds_count") - value(before, "sessionq_save_seconds_count") == 1
    assert value(after, "sessionq_sweep_rows_total", kind="expire_sessions") - \
        value(before, "sessionq_sweep_rows_total", kind="expire_sessions") == 7
    assert value(after, "sessionq_sweep_failures_total", kind="expire_sessions") - \
        value(before, "sessionq_sweep_failures_total", kind="expire_sessions") == 1
    assert value(after, "sessionq_sweep_duration_seconds_count", kind="expire_sessions") - \
        value(before, "sessionq_sweep_duration_seconds_count", kind="expire_sessions") == 2
    # And the state gauges follow the store, the real broker's keys and the sweep book
    assert value(before, "sessionq_sessions", status="active") == 2
    assert value(after, "sessionq_sessions", status="expired") == 1
    assert value(before, "sessionq_queue_depth", queue="sessions", state="ready") == 0
    assert value(after, "sessionq_queue_depth", queue="sessions", state="ready") == 2
    assert value(after, "sessionq_queue_depth", queue="bulk", state="delayed") == 1
    assert value(after, "sessionq_dead_letters", queue="sessions") == 1
    assert value(after, "sessionq_sweep_consecutive_failures", kind="expire_sessions") == 1
    assert value(after, "sessionq_up", component="database") == 1
    assert value(after, "sessionq_up", component="broker") == 1
    assert value(after, "sessionq_healthy") == 1


def test_queue_state_matches_a_real_dramatiq_broker(redis_client: Any, dramatiq_broker: RedisBroker) -> None:
    # Given messages enqueued, one fetched but not acked, one delayed, through Dramatiq itself
    for i in range(2):
        dramatiq_broker.enqueue(Message(queue_name="maintenance", actor_name="sweep", args=(i,), kwargs={}, options={}))
    dramatiq_broker.enqueue(
        Message(queue_name="maintenance", actor_name="sweep", args=(), kwargs={}, options={}), delay=60_000
    )
    consumer = dramatiq_broker.consume("maintenance", prefetch=1, timeout=1000)
    assert next(iter(consumer)) is not None
    # When the queues are read without the broker
    depths = read_queues(redis_client)
    consumer.close()
    # Then ready / in-flight / delayed add up to Dramatiq's own count
    maintenance = depths["maintenance"]
    assert (maintenance.ready, maintenance.in_flight, maintenance.delayed, maintenance.dead) == (1, 1, 1, 0)
    assert maintenance.backlog == 2
    assert set(depths) == set(QUEUES)


def test_observe_job_rejects_unknown_outcomes() -> None:
    # Given the fixed outcome set, When an unknown outcome is observed, Then it is refused
    assert "ok" in OUTCOMES
    with pytest.raises(ValueError, match="outcome must be one of"):
        observe_job("save_session", "exploded")


def test_timed_job_counts_errors_and_reraises() -> None:
    # Given the job counter for an actor
    from sessionq.workers.metrics import JOBS

    errors = JOBS.labels("timed_actor", "error")._value.get()
    oks = JOBS.labels("timed_actor", "ok")._value.get()
    # When one block succeeds and one raises
    with timed_job("timed_actor"):
        pass
    with pytest.raises(RuntimeError), timed_job("timed_actor"):
        raise RuntimeError("x")
    # Then each was counted under its outcome
    assert JOBS.labels("timed_actor", "ok")._value.get() == oks + 1
    assert JOBS.labels("timed_actor", "error")._value.get() == errors + 1


def test_exported_names_cover_every_family() -> None:
    # The names alert rules may use: event metrics, state gauges, Dramatiq's middleware
    names = exported_metric_names()
    for name in ("sessionq_jobs_total", "sessionq_save_seconds_bucket", "sessionq_sweep_rows_total",
                 "sessionq_sweep_duration_seconds_count", "sessionq_sweep_failures_total", "sessionq_sessions",
                 "sessionq_queue_depth", "sessionq_dead_letters", "sessionq_up", "sessionq_healthy",
                 "sessionq_sweep_consecutive_failures", *DRAMATIQ_METRICS):
        assert name in names
    assert "sessionq_jobs" not in names


def test_worker_process_metrics_reach_the_multiprocess_directory(tmp_path: Path) -> None:
    # Given a worker process (it imports the actors, which configures it from the environment)
    # with the multiprocess directory set as compose/systemd set it, not created yet
    directory = tmp_path / "prometheus"
    env = subprocess_env(PROMETHEUS_MULTIPROC_DIR=str(directory), dramatiq_prom_db=str(directory))
    code = (
        "import sessionq.workers.actors\n"
        "from sessionq.workers.metrics import observe_job, observe_save, observe_sweep\n"
        "observe_job('append_messages', 'retry', 0.02)\n"
        "observe_save(0.004)\n"
        "observe_sweep('files', ok=False, seconds=0.1)\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, check=True, timeout=60)
    # When the directory is read the way Dramatiq's exposition server (:9191) reads it
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    # Then that process's job, save and sweep metrics are served
    assert samples[("sessionq_jobs_total", (("actor", "append_messages"), ("outcome", "retry")))] == 1
    assert samples[("sessionq_save_seconds_count", ())] == 1
    assert samples[("sessionq_sweep_failures_total", (("kind", "files"),))] == 1
