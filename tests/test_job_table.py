"""The job table (``sessionq.workers.jobs``) is the one place a job's queue and canonical
form are stated, and every timestamp of every job goes through its parsers' one rule.

Pure logic, SQLite, and the embedded runtime (the real actors on the in-process broker).
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import dramatiq
import pytest

from sessionq.models import Settings, open_store, utcnow
from sessionq.models.errors import NotFound
from sessionq.workers.embedded import EmbeddedRuntime
from sessionq.workers.errors import InvalidPayload
from sessionq.workers.jobs import JOBS, QUEUES, normalize
from sessionq.workers.mcp.registry import apply_transport_job
from sessionq.workers.producer import Producer

FAR = "2150-01-01T00:00:00+00:00"
FAR_HEARTBEAT = r"^last_heartbeat 2150-01-01T00:00:00\+00:00 is more than a day in the future$"


def test_every_actor_consumes_the_queue_of_its_job() -> None:
    import sessionq.workers.actors  # noqa: F401  (declares every actor)
    from sessionq.workers.broker import get_broker

    # Given every actor sessionq declares
    actors = {name: actor for name, actor in get_broker().actors.items()
              if actor.fn.__module__.startswith("sessionq.workers.")}
    # Then there is one per job of the table, on the table's queue, never retrying a bad payload
    assert sorted(actors) == sorted(JOBS)
    for name, actor in actors.items():
        assert actor.queue_name == JOBS[name].queue, name
        assert InvalidPayload in actor.options["throws"]
    assert QUEUES == ("sessions", "maintenance", "bulk", "tasks")


def test_the_producer_and_the_mcp_package_load_no_broker() -> None:
    code = ("import sys, sessionq.workers.producer, sessionq.workers.mcp, sessionq.workers.jobs; "
            "print(sorted(m for m in sys.modules if m.startswith('sessionq.workers.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "sessionq.workers.jobs" in out and "sessionq.workers.broker" not in out


def _samples(now: str) -> dict[str, Any]:
    return {
        "save_session": {"session_id": "s", "created_at": now, "messages": [
            {"message_id": "m", "role": "user", "content": "hi", "metadata": {"n": 1}}]},
        "append_messages": {"session_id": "s", "messages": [{"message_id": "m2", "role": "tool", "content": "x"}]},
        "heartbeat": {"mcp_session_id": "t", "at": now},
        "mark_disconnected": {"mcp_session_id": "t", "at": now, "grace_seconds": 0},
        "register_transport": {"mcp_session_id": "t", "created_at": now, "transport_state": {"p": "2025-11-25"}},
        "archive_session": {"session_id": "s", "at": now},
        "run_sweep": "files",
        "save_file": {"file_id": "f", "provider_name": "p", "uri": "file:///x", "uploaded_at": now},
        "put_agent_state": {"agent_id": "a", "key": "k", "value": [1], "updated_at": now},
        "export_session": {"session_id": "s", "format": "markdown", "path": "out/s.md"},
        "migrate_batch": {"source": "@A", "destination": "@B", "kind": "files", "after": None, "until": "f9",
                          "limit": 10},
        "run_tool_task": {"task_id": "t" * 43, "leg": 2},
    }


def test_each_jobs_canonical_form_is_a_fixed_point(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SESSIONQ_STORE_A", "sqlite:///a.db")
    monkeypatch.setenv("SESSIONQ_STORE_B", "sqlite:///b.db")
    samples = _samples(utcnow().isoformat())
    # Given a sample of every job of the table (a job added without one fails here)
    assert sorted(samples) == sorted(JOBS)
    for name, payload in samples.items():
        # When it is normalised, and normalised again
        canonical = normalize(name, [payload], tmp_path)
        # Then the second pass changes nothing: producers and workers agree on the form
        assert normalize(name, [canonical], tmp_path) == canonical, name


def test_a_far_future_transport_heartbeat_is_refused_by_the_producer(tmp_path: Path) -> None:
    producer = Producer(url="redis://127.0.0.1:9/0", outbox_path=tmp_path / "outbox.db")  # never connects
    try:
        # Given a transport registration whose last heartbeat is in 2150 (it would never go stale)
        payload = {"mcp_session_id": "t1", "last_heartbeat": FAR}
        # When the producer is asked to send it, at once or buffered / Then it is refused, one line
        for buffered in (False, True):
            with pytest.raises(InvalidPayload, match=FAR_HEARTBEAT):
                producer.register_transport(payload, buffered=buffered)
        assert producer.pending() == 0
    finally:
        producer.close()


def test_far_future_times_and_long_graces_are_refused_by_the_registry_jobs(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 't.db'}")
    store.upgrade()
    now = utcnow()
    try:
        # Given transport jobs a foreign server got wrong: each time too far ahead, a grace over the cap
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("register_transport", {"mcp_session_id": "t1", "last_heartbeat": FAR}, FAR_HEARTBEAT),
            ("register_transport", {"mcp_session_id": "t1", "status": "disconnected",
                                    "disconnected_at": now.isoformat(),
                                    "grace_expires_at": (now + timedelta(days=30)).isoformat()},
             r"^grace_expires_at .* is more than 7 days \(the longest grace\) and a day in the future$"),
            ("heartbeat", {"mcp_session_id": "t1", "at": FAR}, r"^at 2150-01-01T00:00:00\+00:00 is more than a day"),
            ("mark_disconnected", {"mcp_session_id": "t1", "at": FAR}, r"^at 2150-01-01T00:00:00\+00:00 is more than"),
            ("mark_disconnected", {"mcp_session_id": "t1", "at": now.isoformat(), "grace_seconds": 30 * 86400},
             r"^grace_seconds must be a number between 0 and 604800$"),
        ]
        for name, payload, message in cases:
            # When a worker applies it / Then InvalidPayload says why, and nothing is stored
            with pytest.raises(InvalidPayload, match=message):
                apply_transport_job(store, name, payload)
        with pytest.raises(NotFound):
            store.load_transport("t1")
        # ... while a grace window of the longest allowed length is accepted
        apply_transport_job(store, "register_transport", {"mcp_session_id": "t1", "created_at": now.isoformat()})
        assert apply_transport_job(store, "mark_disconnected",
                                   {"mcp_session_id": "t1", "at": now.isoformat(), "grace_seconds": 7 * 86400})
    finally:
        store.close()


def test_a_far_future_transport_heartbeat_is_dead_lettered_by_the_worker(tmp_path: Path) -> None:
    settings = Settings(storage_url=f"sqlite:///{tmp_path / 'e.db'}", outbox_path=str(tmp_path / "outbox.db"))
    runtime = EmbeddedRuntime(settings, threads=1).start()
    try:
        # Given the job written by a producer that skipped the checks
        runtime.broker.enqueue(dramatiq.Message(
            queue_name="sessions", actor_name="register_transport",
            args=({"mcp_session_id": "t1", "last_heartbeat": FAR},),
            kwargs={}, options={}))
        # When the worker runs it
        runtime.join(60)
        # Then it is dead-lettered with the reason, never stored
        assert [d.reason for d in runtime.dead_letters()] == [
            "InvalidPayload: last_heartbeat 2150-01-01T00:00:00+00:00 is more than a day in the future"]
        from sessionq.workers.broker import get_store

        with pytest.raises(NotFound):
            get_store().load_transport("t1")
    finally:
        runtime.stop()
