"""The job commands of the CLI: enqueue save, export, archive, up --demo, worker, dlq.

Each runs ``python -m cli`` as a real process (as a user would).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from sessionq.models import open_store
from tests.conftest import POSTGRES_URL, REDIS_URL, make_store, reset_store
from tests.support_jobs import ROOT, child_env, dead_letters, push_raw, wait_drained


def sessionq(*args: str, timeout: Any = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``sessionq ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "sessionq.cli", *args], cwd=ROOT, env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)


SAVE = {
    "session_id": "cli-1",
    "model": "m",
    "created_at": "2026-01-01T12:00:00+00:00",
    "updated_at": "2026-01-01T12:00:05+00:00",
    "status": "active",
    "metadata": {"k": [1, "two"]},
    "messages": [
        {"message_id": "a", "role": "user", "content": "first\nline", "created_at": "2026-01-01T12:00:00+00:00"},
        {"message_id": "b", "role": "assistant", "content": "ünïcode", "created_at": "2026-01-01T12:00:05+00:00",
         "metadata": {"tokens": 2}},
    ],
}


def test_enqueue_save_embedded_then_export_round_trips(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'a.db'}"
    src = tmp_path / "in.json"
    src.write_text(json.dumps(SAVE), encoding="utf-8")
    env = {"SESSIONQ_OUTBOX_PATH": str(tmp_path / "outbox.db")}
    # Given no broker configured: enqueue save runs embedded and returns once stored
    done = sessionq("--storage-url", db, "enqueue", "save", str(src), **env)
    assert done.returncode == 0, done.stderr
    assert "saved session cli-1 (2 messages)" in done.stdout
    # When the session is exported as JSON and that file is enqueued into a second store
    out = tmp_path / "out.json"
    assert sessionq("--storage-url", db, "export", "cli-1", "--format", "json", "-o", str(out), **env).returncode == 0
    assert json.loads(out.read_text(encoding="utf-8")) == SAVE
    db2 = f"sqlite:///{tmp_path / 'b.db'}"
    assert sessionq("--storage-url", db2, "enqueue", "save", str(out), **env).returncode == 0
    again = sessionq("--storage-url", db2, "export", "cli-1", "--format", "json", **env)
    # Then the round trip is lossless
    assert json.loads(again.stdout) == SAVE
    text = sessionq("--storage-url", db2, "export", "cli-1", "--format", "markdown", **env).stdout
    assert text.startswith("# Session cli-1") and "ünïcode" in text
    # And archive runs embedded too
    assert sessionq("--storage-url", db2, "archive", "cli-1", **env).returncode == 0
    store = open_store(db2)
    assert store.load_session("cli-1").status == "archived"
    store.close()


def test_enqueue_save_rejects_a_bad_file_with_one_line(tmp_path: Path) -> None:
    # Given a payload with an unknown role
    bad = dict(SAVE, messages=[{"message_id": "a", "role": "robot", "content": "x"}])
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(bad), encoding="utf-8")
    # When it is enqueued
    done = sessionq("--storage-url", f"sqlite:///{tmp_path / 'a.db'}", "enqueue", "save", str(src),
                    SESSIONQ_OUTBOX_PATH=str(tmp_path / "o.db"))
    # Then the producer refuses it with one clear line, no traceback
    assert done.returncode == 1
    assert "role must be one of" in done.stderr and "Traceback" not in done.stderr
    missing = sessionq("--storage-url", f"sqlite:///{tmp_path / 'a.db'}", "export", "nope")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr


def test_up_demo_runs_with_no_services(tmp_path: Path) -> None:
    # Given a fresh directory and no broker: when `sessionq up --demo` runs
    done = sessionq("up", "--demo", timeout=60, HOME=str(tmp_path), TMPDIR=str(tmp_path))
    # Then it saves, sweeps and exports, says so, and exits 0
    assert done.returncode == 0, done.stderr
    assert "expired=1" in done.stdout and "demo-stale is now expired" in done.stdout
    assert "demo-weather.md" in done.stdout and "demo-code-review is now archived" in done.stdout
    assert "dead letters: 0" in done.stdout
    # And the exported transcript runs in order, its timestamps increasing, none in the future
    (export,) = tmp_path.glob("sessionq-demo-*/exports/demo-weather.json")
    data = json.loads(export.read_text(encoding="utf-8"))
    ids = [m["message_id"] for m in data["messages"]]
    times = [datetime.fromisoformat(m["created_at"]) for m in data["messages"]]
    assert ids == ["m0", "m1", "m2", "m3"]
    assert times == sorted(times) and len(set(times)) == len(times), times
    created, updated = datetime.fromisoformat(data["created_at"]), datetime.fromisoformat(data["updated_at"])
    assert created <= times[0] <= times[-1] <= updated
    assert datetime.fromisoformat(data["updated_at"]) <= datetime.now(UTC)


def test_worker_command_and_dlq(tmp_path: Path, redis_client: redis.Redis) -> None:
    store = make_store("postgresql", tmp_path)
    reset_store(store)
    # Given one good and two bad jobs on Redis, and `sessionq worker` running
    push_raw(redis_client, [("save_session", {"session_id": "w-1"}), ("save_session", {"session_id": "w 2"}),
                            ("append_messages", {"session_id": "w-1"})])
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "sessionq.cli", "--storage-url", POSTGRES_URL,
                             "--redis-url", REDIS_URL, "worker", "--processes", "1", "--threads", "2"],
                            cwd=ROOT, env=child_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_drained(redis_client)
    finally:
        # When it gets SIGTERM it shuts down gracefully
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        log.close()
    assert store.load_session("w-1").session_id == "w-1"
    # Then `dlq list` shows both dead letters with their reasons
    env = {"REDIS_URL": REDIS_URL}
    listed = sessionq("dlq", "list", "--json", **env)
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(letter["actor"] for letter in letters) == ["append_messages", "save_session"]
    assert any("visible ASCII" in letter["reason"] for letter in letters)
    assert any("missing required field(s): messages" in letter["reason"] for letter in letters)
    # And requeue puts one back on its queue, purge deletes the rest
    requeued = sessionq("dlq", "requeue", letters[0]["id"], **env)
    assert requeued.returncode == 0 and "requeued 1 job(s)" in requeued.stdout
    assert redis_client.llen("dramatiq:sessions") == 1
    queued = json.loads(redis_client.hvals("dramatiq:sessions.msgs")[0])
    assert "dead_letter_reason" not in queued["options"] and "retries" not in queued["options"]
    assert "purged 1" in sessionq("dlq", "purge", "--yes", **env).stdout
    assert dead_letters(redis_client) == []
    none = sessionq("dlq", "requeue", "--all", **env)
    assert "requeued 0 job(s)" in none.stdout
    reset_store(store)
    store.close()


def test_dlq_needs_redis_and_says_so(tmp_path: Path) -> None:
    done = sessionq("dlq", "list")
    assert done.returncode == 1 and "set REDIS_URL" in done.stderr
    dead = sessionq("dlq", "list", REDIS_URL="redis://:hunter2secret@127.0.0.1:1/0")
    assert dead.returncode == 1 and "Redis unavailable" in dead.stderr
    assert "hunter2secret" not in dead.stderr + dead.stdout
    no_broker = sessionq("worker")
    assert no_broker.returncode == 1 and "no broker configured" in no_broker.stderr
