"""Issue 14, item 14: the CLI's edges, each driven as a user would, in a real process.

Unknown sessions in Redis mode, ids that are not dead letters, a reader that goes away
(``| head``), declining a purge, Ctrl-C in a migration, a long ``verify``, errors about
the user's file (not a temporary name), YAML and unknown-setting errors, a MongoDB
connection error, quiet one-shot commands, and APScheduler's start-up chatter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import redis

from sessionq.models import ChatMessage, ChatSession, open_store, utcnow
from sessionq.workers.dlq import DeadLetters
from tests.conftest import REDIS_URL
from tests.support_faults import wait_until
from tests.support_http import cli_command, dead_port, subprocess_env
from tests.support_jobs import pending_jobs, wire_message

# Seconds one command may run before the test calls it hung.
COMMAND_TIMEOUT = 120


def sessionq(*args: str, cwd: Path, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, with only the environment given."""
    return subprocess.run([*cli_command(*args)], cwd=cwd, env=subprocess_env(**env), input=stdin,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)


def sqlite_store(path: Path, sessions: int = 0, messages: int = 0) -> str:
    """A migrated SQLite store with ``sessions`` sessions of ``messages`` messages each."""
    url = f"sqlite:///{path}"
    store = open_store(url)
    store.upgrade()
    now = utcnow()
    for i in range(sessions):
        sid = f"s{i:04d}"
        msgs = [ChatMessage(session_id=sid, message_id=f"m{j}", role="user", content="x" * 200, created_at=now)
                for j in range(messages)]
        store.save_session(ChatSession(session_id=sid, created_at=now, updated_at=now), msgs)
    store.close()
    return url


def test_archive_of_an_unknown_session_in_redis_mode_fails_now(tmp_path: Path, redis_client: redis.Redis) -> None:
    # Given Redis mode and a store without session "nope"
    env = {"STORAGE_URL": sqlite_store(tmp_path / "a.db"), "REDIS_URL": REDIS_URL}
    # When it is archived or exported
    archived = sessionq("archive", "nope", cwd=tmp_path, **env)
    exported = sessionq("export", "nope", cwd=tmp_path, **env)
    # Then both say so at once, exit 1, and nothing is enqueued to dead-letter later
    for result in (archived, exported):
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stderr.strip() == "Error: session 'nope' does not exist"
        assert "enqueued" not in result.stdout
    assert pending_jobs(redis_client) == 0
    # And --force enqueues anyway (a save may still be on its way)
    forced = sessionq("archive", "nope", "--force", cwd=tmp_path, **env)
    assert forced.returncode == 0 and forced.stdout.startswith("enqueued archive of nope"), forced.stderr
    assert pending_jobs(redis_client) == 1


def _plant_dead_letter(client: redis.Redis) -> str:
    rid, data = wire_message("save_session", {"session_id": "x"})
    client.zadd("dramatiq:sessions.XQ", {rid: int(time.time() * 1000)})
    client.hset("dramatiq:sessions.XQ.msgs", rid, data)
    return rid


def test_requeueing_an_id_that_is_not_a_dead_letter_exits_1(tmp_path: Path, redis_client: redis.Redis) -> None:
    # Given one dead letter
    rid = _plant_dead_letter(redis_client)
    # When a nonsense id is requeued, alone and next to the real one
    nonsense = sessionq("dlq", "requeue", "nonsense-id", cwd=tmp_path, REDIS_URL=REDIS_URL)
    mixed = sessionq("dlq", "requeue", rid, "nonsense-id", cwd=tmp_path, REDIS_URL=REDIS_URL)
    # Then both exit 1, saying how many ids were not dead letters; the real one is requeued
    assert nonsense.returncode == 1 and nonsense.stdout.strip() == "requeued 0 job(s)"
    assert nonsense.stderr.strip() == "Error: 1 of 1 id(s) are not dead letters (see `sessionq dlq list`)"
    assert mixed.returncode == 1 and mixed.stdout.strip() == "requeued 1 job(s)"
    assert mixed.stderr.strip() == "Error: 1 of 2 id(s) are not dead letters (see `sessionq dlq list`)"


def test_declining_a_purge_says_one_thing_and_purges_nothing(tmp_path: Path, redis_client: redis.Redis) -> None:
    # Given one dead letter
    _plant_dead_letter(redis_client)
    # When the user answers "n" to the purge question
    result = sessionq("dlq", "purge", cwd=tmp_path, stdin="n\n", REDIS_URL=REDIS_URL)
    # Then the question is followed by one word, not an error, and the letter is still there
    assert result.returncode == 1
    assert result.stdout.strip() == "delete 1 dead letter(s)? [y/N]:"
    assert result.stderr.strip() == "Aborted!"
    assert DeadLetters(redis_client).count() == 1


def test_export_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    # Given a session whose export is far longer than a pipe holds
    url = sqlite_store(tmp_path / "a.db", sessions=1, messages=3000)
    # When `sessionq export s0000 --format text | head -1` reads one line and goes away
    proc = subprocess.Popen([*cli_command("export", "s0000", "--format", "text")], cwd=tmp_path,
                            env=subprocess_env(STORAGE_URL=url), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.wait(COMMAND_TIMEOUT)
    # Then it stops without a word: no "Broken pipe", no traceback
    assert first == b"Session: s0000\n"
    assert stderr == "", stderr


def test_ctrl_c_in_a_migration_says_how_to_resume(tmp_path: Path) -> None:
    # Given a migration that takes a while (one session per batch, a pause between them)
    source = sqlite_store(tmp_path / "src.db", sessions=40, messages=2)
    destination = f"sqlite:///{tmp_path / 'dst.db'}"
    checkpoint = tmp_path / "cp.json"
    args = ["migrate", "--from", source, "--to", destination, "--batch-size", "1", "--pause", "0.2",
            "--checkpoint", str(checkpoint)]
    proc = subprocess.Popen([*cli_command(*args)], cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(checkpoint.exists, timeout=60, what="a first finished batch")
        # When the user presses Ctrl-C
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Then it says how to go on, without a traceback (130: ended by SIGINT)
    assert proc.returncode == 130, stderr
    assert "run the same command with --resume" in stderr and str(checkpoint) in stderr
    assert "Traceback" not in stderr
    # And doing so finishes the migration
    resumed = sessionq(*args, "--resume", "--verify", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after" in resumed.stdout and "EQUAL" in resumed.stdout


def test_verify_lists_the_first_20_differences_unless_all(tmp_path: Path) -> None:
    # Given a source of 30 sessions and an empty destination (31 differences)
    source = sqlite_store(tmp_path / "src.db", sessions=30)
    destination = sqlite_store(tmp_path / "dst.db")
    # When they are verified, with and without --all
    short = sessionq("verify", "--from", source, "--to", destination, cwd=tmp_path)
    full = sessionq("verify", "--from", source, "--to", destination, "--all", cwd=tmp_path)
    # Then the summary comes first, then 20 differences and how many more; --all lists all
    lines = short.stdout.splitlines()
    assert short.returncode == 1 and lines[0].startswith("31 DIFFERENCE(S)")
    assert len(lines) == 22 and lines[-1] == "  ... and 11 more (--all lists them)", lines
    assert full.returncode == 1 and len(full.stdout.splitlines()) == 32


def test_file_errors_name_the_users_file(tmp_path: Path) -> None:
    url = sqlite_store(tmp_path / "a.db")
    # Given a destination where no file can be created (even by root), and a named pipe
    unwritable = Path("/proc") / f"sessionq-{os.getpid()}.jsonl"
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    # When export-all writes there
    blocked = sessionq("export-all", "-o", str(unwritable), cwd=tmp_path, STORAGE_URL=url)
    special = sessionq("export-all", "-o", str(fifo), cwd=tmp_path, STORAGE_URL=url)
    # Then the error names the file the user gave, never the temporary one
    assert blocked.returncode == 1
    assert blocked.stderr.strip().startswith(f"Error: {unwritable}: "), blocked.stderr
    assert ".tmp" not in blocked.stderr
    # And a pipe (or a device) is refused rather than replaced by a regular file
    assert special.returncode == 1
    assert special.stderr.strip() == f"Error: {fifo} is not a regular file: write to a file instead"
    assert fifo.is_fifo()


def test_config_errors_say_where_and_what_was_meant(tmp_path: Path) -> None:
    # Given a YAML file with a syntax error on its second line, and one with a typo
    broken = tmp_path / "broken.yaml"
    broken.write_text("storage_url: [a\n  b: c\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("storge_url: sqlite:///x.db\nexpiry_hours: 3\n")
    toml = tmp_path / "broken.toml"
    toml.write_text("a = = 1\n")
    # When sessionq reads them
    results = [sessionq("--config", str(path), "stats", cwd=tmp_path) for path in (broken, typo, toml)]
    # Then each error is one line with the file, the line and column, or the closest setting
    assert [r.stderr.strip() for r in results] == [
        f"Error: config file {broken}: cannot parse: line 2, column 4: expected ',' or ']', but got ':'",
        f"Error: config file {typo}: unknown setting(s): storge_url (did you mean storage_url?)",
        f"Error: config file {toml}: cannot parse: line 1, column 5: Invalid value",
    ]
    assert all(r.returncode == 1 for r in results)


def test_a_mongodb_connection_error_is_one_short_line(tmp_path: Path) -> None:
    # Given a MongoDB URL where nothing listens
    url = f"mongodb://127.0.0.1:{dead_port()}/x?serverSelectionTimeoutMS=500"
    # When a command needs it
    result = sessionq("--storage-url", url, "stats", cwd=tmp_path)
    # Then the error is one line saying why, without PyMongo's topology description
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: mongodb unavailable: 127.0.0.1:") and "Connection refused" in line, line
    assert "Topology" not in line and "configured timeouts" not in line


def test_one_shot_commands_print_their_result_once_and_log_no_info(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    # When the schema is created and the sweeps run, with no log level configured
    upgraded = sessionq("db", "upgrade", cwd=tmp_path, STORAGE_URL=url)
    cleaned = sessionq("cleanup", cwd=tmp_path, STORAGE_URL=url)
    # Then stderr stays quiet and each sweep's result appears once
    assert upgraded.returncode == 0 and upgraded.stderr == "", upgraded.stderr
    assert cleaned.returncode == 0 and cleaned.stderr == "", cleaned.stderr
    assert (cleaned.stdout + cleaned.stderr).count("expire_sessions") == 1, cleaned.stdout
    # And an explicit level still applies; a level that does not exist is one line
    loud = sessionq("db", "upgrade", cwd=tmp_path, STORAGE_URL=f"sqlite:///{tmp_path / 'b.db'}",
                    SESSIONQ_LOG_LEVEL="info")
    assert "applying schema migration 1" in loud.stderr
    bad = sessionq("stats", cwd=tmp_path, STORAGE_URL=url, SESSIONQ_LOG_LEVEL="LOUD")
    assert bad.returncode == 1
    assert bad.stderr.strip() == "Error: log_level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"


def test_the_scheduler_starts_without_apscheduler_chatter(tmp_path: Path) -> None:
    # Given `sessionq up` (worker and scheduler in one process) on the embedded default
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*cli_command("up", "--no-http")], cwd=tmp_path, env=subprocess_env(),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        # When it has started
        wait_until(lambda: "worker and scheduler running" in log.read_text(errors="replace"), timeout=60,
                   what="sessionq up running")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(COMMAND_TIMEOUT)
    # Then the scheduler said what it does, and APScheduler said nothing at INFO
    text = log.read_text(errors="replace")
    assert "scheduler" in text and "starting" in text
    assert "Adding job tentatively" not in text and "apscheduler" not in text, text

