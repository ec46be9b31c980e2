"""Issue 14, items 10 and 11: how sessionq starts on a fresh store and without its services.

* Item 10: on a store with no schema (or an old one) every entry point answers with one
  line naming the store (password masked) and ``sessionq db upgrade`` instead of
  "unavailable"; ``health`` reports it; the MCP app of the README logs it at ERROR and
  its manager's health reports it; the embedded default (a new SQLite file) gets its
  schema by itself.
* Item 11: ``worker``, ``scheduler`` and ``serve`` wait for the store and Redis alike,
  one line per attempt, for ``--wait`` seconds, then exit 1; a worker whose Redis comes
  up while it waits goes on to do its work.

Everything runs as real processes against the real services.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from sessionq.models import ChatSession, Settings, Store, open_store, utcnow
from sessionq.models.settings import redact_url
from sessionq.workers.startup import Service, wait_for
from tests.conftest import MONGO_URL, POSTGRES_URL, REDIS_URL, service_missing
from tests.support_faults import PLANTED_PASSWORD, SessionqWorker, wait_until, with_password
from tests.support_http import cli_command, dead_port, free_port, pg_store, subprocess_env  # noqa: F401
from tests.support_jobs import ROOT
from tests.support_services import PrivateRedis, wait_port

# Seconds a command that should give up quickly may run before the test calls it hung.
COMMAND_TIMEOUT = 120


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
def fresh_postgres() -> Iterator[str]:
    """A new, empty PostgreSQL database on the test server (URL with a planted password)."""
    import psycopg2

    name = f"{urlsplit(POSTGRES_URL).path.strip('/')}_fresh_{uuid.uuid4().hex[:8]}".lower()
    try:
        admin = psycopg2.connect(POSTGRES_URL)
    except psycopg2.Error as exc:
        service_missing("postgresql", exc)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_password(_with_database(POSTGRES_URL, name))
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def fresh_mongo() -> Iterator[str]:
    """A MongoDB database nothing has written to yet."""
    import pymongo

    name = f"{urlsplit(MONGO_URL).path.strip('/')}_fresh_{uuid.uuid4().hex[:8]}"
    url = _with_database(MONGO_URL, name)
    client: Any = pymongo.MongoClient(MONGO_URL, serverSelectionTimeoutMS=5000)
    try:
        client.admin.command("ping")
    except pymongo.errors.PyMongoError as exc:
        service_missing("mongodb", exc)
    try:
        yield url
    finally:
        client.drop_database(name)
        client.close()


@pytest.fixture(params=["postgresql", "mongodb", "sqlite-behind"])
def unready_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """A store whose schema is missing (server backends) or behind (SQLite), and what
    the one line must say about it."""
    if request.param == "sqlite-behind":
        url = f"sqlite:///{tmp_path / 'old.db'}"
        store = open_store(url)
        store.upgrade(2)  # a file an older sessionq left behind
        latest = store.latest_schema_version()
        store.close()
        return url, f"is at schema version 2 of {latest}"
    url = request.getfixturevalue("fresh_postgres" if request.param == "postgresql" else "fresh_mongo")
    return url, "has no sessionq schema"


def sessionq(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess (its own process group), with only the environment
    given; a command still running after COMMAND_TIMEOUT is killed, children included,
    and fails the test: it never gave up."""
    proc = subprocess.Popen([*cli_command(*args)], cwd=cwd, env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"`sessionq {' '.join(args)}` still running after {COMMAND_TIMEOUT}s:\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize(
    "args",
    [("stats",), ("export", "s1"), ("cleanup",), ("archive", "s1"), ("export-all", "-o", "all.jsonl"),
     ("worker", "--wait", "0"), ("serve", "--port", "0", "--wait", "0")],
    ids=lambda args: args[0],
)
def test_every_entry_point_names_the_store_and_the_upgrade(
    unready_store: tuple[str, str], args: tuple[str, ...], tmp_path: Path
) -> None:
    # Given a store whose schema is missing or behind, and a reachable Redis
    url, state = unready_store
    # When a command that uses it starts
    result = sessionq(*args, cwd=tmp_path, STORAGE_URL=url, REDIS_URL=REDIS_URL)
    # Then it stops at once with one line naming the store (password masked) and the fix
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: store {redact_url(url)} {state}: run `sessionq db upgrade`"
    ], result.stderr
    assert PLANTED_PASSWORD not in result.stdout + result.stderr
    assert not (tmp_path / "all.jsonl").exists()


def test_health_reports_the_schema(unready_store: tuple[str, str], tmp_path: Path) -> None:
    # Given a store whose schema is missing or behind
    url, state = unready_store
    # When `sessionq health` checks it
    result = sessionq("health", cwd=tmp_path, STORAGE_URL=url)
    # Then the database is "error" (it answers), with the one line as the problem
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["database"] == "error"
    assert report["problems"] == [
        f"database error: SchemaOutdated: store {redact_url(url)} {state}: run `sessionq db upgrade`"
    ]
    assert PLANTED_PASSWORD not in result.stdout + result.stderr


def test_the_embedded_default_gets_its_schema_by_itself(tmp_path: Path) -> None:
    # Given a directory with no store and nothing configured (the embedded default)
    # When the first commands run there
    stats = sessionq("stats", "--json", cwd=tmp_path)
    health = sessionq("health", cwd=tmp_path)
    # Then they work: the SQLite file sessionq created has the latest schema
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["total_sessions"] == 0
    assert health.returncode == 0, health.stdout + health.stderr
    store = open_store(f"sqlite:///{tmp_path / 'sessionq.db'}")
    try:
        assert store.schema_version() == store.latest_schema_version()
    finally:
        store.close()


def _readme_mcp_snippet() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    (snippet,) = [block for block in blocks if "adopt(server" in block]
    return snippet


def test_the_readme_mcp_app_logs_and_reports_a_missing_schema(fresh_postgres: str, tmp_path: Path) -> None:
    # Given the README's MCP snippet, served by uvicorn, on a database with no schema
    port = free_port()
    script = tmp_path / "server.py"
    script.write_text(
        _readme_mcp_snippet()
        + "import uvicorn\nfrom starlette.responses import JSONResponse\n"
        + "app.add_route('/manager-health', lambda request: JSONResponse(server.session_manager.health()))\n"
        + f"uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning')\n",
        encoding="utf-8",
    )
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env=subprocess_env(STORAGE_URL=fresh_postgres, REDIS_URL=REDIS_URL))
    try:
        # When it has started
        wait_port(port, timeout=60, proc=proc)
        health = httpx.get(f"http://127.0.0.1:{port}/manager-health", timeout=30).json()
    finally:
        proc.terminate()
        proc.wait(30)
    # Then it said so at start, naming the store and the fix, and its health reports it
    text = log.read_text(errors="replace")
    expected = f"store {redact_url(fresh_postgres)} has no sessionq schema: run `sessionq db upgrade`"
    assert f"MCP sessions will not be recorded: {expected}" in text, text
    assert health["store"] == "error" and health["problems"] == [expected], health
    assert PLANTED_PASSWORD not in text


@pytest.mark.parametrize("command", ["worker", "scheduler", "serve"])
def test_worker_scheduler_and_serve_wait_for_redis_alike(command: str, tmp_path: Path) -> None:
    # Given a store that answers and a Redis that does not (its URL carries a password)
    redis_url = f"redis://:{PLANTED_PASSWORD}@127.0.0.1:{dead_port()}/0"
    shown = redact_url(redis_url)
    args = [command, "--wait", "3"] + (["--port", str(free_port())] if command == "serve" else [])
    # When the command starts
    result = sessionq(*args, cwd=tmp_path, STORAGE_URL=with_password(POSTGRES_URL), REDIS_URL=redis_url)
    # Then it tries again, one line per attempt, and gives up with one line: exit 1
    lines = result.stderr.strip().splitlines()
    attempts = [line for line in lines if f"{shown} does not answer (attempt" in line]
    assert result.returncode == 1, result.stderr
    assert attempts and "next attempt in" in attempts[0], result.stderr
    assert lines[-1].startswith(f"Error: Redis {shown} did not answer within 3s: "), result.stderr
    assert "Traceback" not in result.stderr and PLANTED_PASSWORD not in result.stderr


def test_a_worker_does_not_start_on_a_store_that_does_not_exist(tmp_path: Path) -> None:
    # Given a PostgreSQL URL naming a database that does not exist
    url = with_password(_with_database(POSTGRES_URL, f"missing_{uuid.uuid4().hex[:8]}"))
    # When a worker starts on it (the wait from the environment)
    result = sessionq("worker", cwd=tmp_path, STORAGE_URL=url, REDIS_URL=REDIS_URL, SESSIONQ_STARTUP_WAIT="2")
    # Then it is not "ready for action": it waits for the store, then exits 1 naming it
    assert result.returncode == 1, result.stderr
    assert f"store {redact_url(url)} does not answer (attempt 1)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: store {redact_url(url)} did not answer within 2s")
    assert "does not exist" in result.stderr and PLANTED_PASSWORD not in result.stderr


def test_a_worker_whose_redis_comes_up_while_it_waits_does_its_work(pg_store: Store, tmp_path: Path) -> None:
    # Given a worker started before its Redis (the wait from the environment this time)
    redis_server = PrivateRedis()
    storage_url = with_password(POSTGRES_URL)
    worker = SessionqWorker(storage_url, redis_server.url, log=tmp_path / "worker.log", threads=2,
                            env={"SESSIONQ_STARTUP_WAIT": "300"})
    try:
        wait_until(lambda: "does not answer (attempt 1)" in worker.output(), timeout=60, what="a first attempt")
        assert worker.alive()
        # When Redis comes up
        redis_server.start()
        wait_until(lambda: "answers (attempt" in worker.output(), timeout=60, what="Redis answering")
        # Then the worker runs the jobs sent to it
        from sessionq.workers.producer import Producer

        producer = Producer(Settings(storage_url=storage_url, redis_url=redis_server.url,
                                     outbox_path=str(tmp_path / "outbox.db")))
        now = utcnow()
        producer.save_session(ChatSession(session_id="after-wait", created_at=now, updated_at=now))
        producer.close()
        wait_until(lambda: pg_store.stats().total_sessions == 1, timeout=120, what="the session saved")
        assert worker.alive()
    finally:
        worker.stop()
        redis_server.stop()
    assert PLANTED_PASSWORD not in worker.output()


def test_the_backoff_doubles_up_to_its_cap_and_stops_at_the_deadline() -> None:
    # Given a service that never answers, a clock and a sleep of our own (pure logic)
    now = [0.0]
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds

    def probe() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    # When it is waited for 60 s
    with pytest.raises(Exception, match=r"^thing did not answer within 60s: \[Errno 111\] Connection refused$"):
        wait_for([Service("thing", probe)], wait=60, sleep=sleep, clock=lambda: now[0])
    # Then the pauses double from 1 s up to 10 s and the last one ends at the deadline
    assert pauses == [1, 2, 4, 8, 10, 10, 10, 10, 5]
    # And with no wait at all there is one attempt and no pause
    pauses.clear()
    with pytest.raises(Exception, match="within 0s"):
        wait_for([Service("thing", probe)], wait=0, sleep=sleep, clock=lambda: now[0])
    assert pauses == []
