"""The job table (``sessionq.workers.jobs``) is the one place a job's queue and canonical
form are stated (pure logic)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sessionq.models import utcnow
from sessionq.workers.errors import InvalidPayload
from sessionq.workers.jobs import JOBS, QUEUES, normalize


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
    assert QUEUES == ("sessions", "maintenance", "bulk")


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
