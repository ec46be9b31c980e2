"""Structured logging: job context on every line, secrets redacted in text and JSON."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Iterator

import pytest

from sessionq.models import Settings
from sessionq.workers.logs import configure, current_context, job_context, redact

SECRET_URL = "postgresql://sessionq:pg-Pa55word@db.internal:5432/sessionq"
BEARER = "Bearer eyJhbGciOi.secretpayload.sig"


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, list[logging.Handler]]]:
    """Restore the root logger's handlers and level after a test that configures logging."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    yield stream, handlers
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_urls_and_bearer_tokens_are_redacted(
    capture: tuple[io.StringIO, list[logging.Handler]], log_format: str
) -> None:
    # Given logging configured with a token that never appears with "Bearer" in front of it
    stream, _ = capture
    configure(Settings(log_format=log_format, api_token="tok-9f8e7d6c"), stream=stream)
    log = logging.getLogger("sessionq.test")
    # When lines carry a connection string, an Authorization header, the bare token and a traceback
    log.warning("connecting to %s with header Authorization: %s", SECRET_URL, BEARER)
    log.info("token is tok-9f8e7d6c; redis at redis://:r3dis-pw@cache:6379/0; "
             "Authorization: Basic dXNlcjpiYXNpYy1wdw==")
    try:
        raise RuntimeError(f"cannot reach {SECRET_URL}")
    except RuntimeError:
        log.exception("failed")
    # Then no secret survives, and the rest of each line does
    out = stream.getvalue()
    for secret in ("pg-Pa55word", "secretpayload", "tok-9f8e7d6c", "r3dis-pw", "dXNlcjpiYXNpYy1wdw"):
        assert secret not in out
    assert "db.internal:5432/sessionq" in out and "Bearer ***" in out
    if log_format == "json":
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line["level"] for line in lines] == ["WARNING", "INFO", "ERROR"]
        assert "RuntimeError" in lines[2]["exc"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_job_context_tags_every_line(capture: tuple[io.StringIO, list[logging.Handler]], log_format: str) -> None:
    # Given logging configured
    stream, _ = capture
    configure(Settings(log_format=log_format), stream=stream)
    log = logging.getLogger("sessionq.test")
    # When lines are logged inside nested job contexts and after them
    with job_context(job_id="j-1", actor="save_session", queue="sessions"):
        with job_context(session_id="s-42"):
            log.info("saved")
        log.info("done")
    log.info("idle")
    # Then each line carries exactly the context around it
    lines = stream.getvalue().splitlines()
    if log_format == "json":
        records = [json.loads(line) for line in lines]
        assert (records[0]["job_id"], records[0]["actor"], records[0]["session_id"]) == ("j-1", "save_session", "s-42")
        assert "session_id" not in records[1] and records[1]["queue"] == "sessions"
        assert "job_id" not in records[2]
    else:
        assert lines[0].endswith("saved job_id=j-1 actor=save_session session_id=s-42 queue=sessions")
        assert lines[1].endswith("done job_id=j-1 actor=save_session queue=sessions")
        assert lines[2].endswith("idle")
    assert current_context() == {}


def test_job_context_is_per_thread() -> None:
    # Given a context set in this thread
    seen: list[dict[str, str]] = []
    with job_context(job_id="outer"):
        # When another thread looks
        thread = threading.Thread(target=lambda: seen.append(current_context()))
        thread.start()
        thread.join()
        # Then it does not see this thread's job
        assert current_context() == {"job_id": "outer"}
    assert seen == [{}]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_control_characters_cannot_forge_log_lines(
    capture: tuple[io.StringIO, list[logging.Handler]], log_format: str
) -> None:
    # Given logging configured
    stream, _ = capture
    configure(Settings(log_format=log_format), stream=stream)
    log = logging.getLogger("sessionq.test")
    forged = "2030-01-01 00:00:00,000 CRITICAL sessionq.auth: admin login"
    # When a message, a context field and an exception carry newlines, CRs and a terminal escape
    with job_context(session_id=f"s1\n{forged}"):
        log.error("dead-lettered: unknown field(s): x\n%s\r\x1b[2K\x00\x7f\x85 end", forged)
        try:
            raise ValueError(f"bad field x\n{forged}")
        except ValueError:
            log.exception("failed\r\n%s", forged)
    out = stream.getvalue()
    # Then no line begins with the forged text and no raw control character is left but
    # the line ends; in text each event is one line, its traceback lines indented
    lines = out.splitlines()
    assert not any(line.startswith(forged[:20]) for line in lines), out
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", out), out
    if log_format == "json":
        assert len(lines) == 2 and "ValueError" in json.loads(lines[1])["exc"]
    else:
        heads = [line for line in lines if not line.startswith(" ")]
        assert len(heads) == 2, out
        assert heads[0].endswith(f"\\x1b[2K\\x00\\x7f\\x85 end session_id=s1\\n{forged}")
        assert "x\\n2030-01-01" in heads[0] and "\\r" in heads[0]
        assert lines[2] == "  Traceback (most recent call last):"
        assert lines[-2:] == ["  ValueError: bad field x", f"  {forged}"]


REDACTED = [
    # the secret goes, every word around it stays
    ("refusing to serve on 0.0.0.0 without an API token: set SESSIONQ_API_TOKEN",
     "refusing to serve on 0.0.0.0 without an API token: set SESSIONQ_API_TOKEN"),
    ("(1045, \"Access denied for user 'root'@'10.0.0.5' (using password: YES)\")",
     "(1045, \"Access denied for user 'root'@'10.0.0.5' (using password: YES)\")"),
    # A plain word that is not on the prose list is a secret, however ordinary it looks.
    ("login with password: hunter now", "login with password: *** now"),
    ("Authorization: Bearer abcdef", "Authorization: Bearer ***"),
    ("(1045, \"Access denied for user 'app'@'localhost' (using password: NO)\")",
     "(1045, \"Access denied for user 'app'@'localhost' (using password: NO)\")"),
    ("the MCP client must send a Bearer token", "the MCP client must send a Bearer token"),
    ("token: missing; password: required", "token: missing; password: required"),
    ("max_tokens=4096 tokens: 12", "max_tokens=4096 tokens: 12"),
    # secrets in every shape
    ("connect postgresql://app:s3cr3t@db:5432/x failed", "connect postgresql://app:***@db:5432/x failed"),
    ("redis://:r3dis-pw@cache:6379/0 is down", "redis://:***@cache:6379/0 is down"),
    ("Authorization: Bearer eyJhbGciOi.secretpayload.sig sent", "Authorization: Bearer *** sent"),
    ("header Authorization: Basic dXNlcjpiYXNpYy1wdw== refused", "header Authorization: Basic *** refused"),
    ("GET /x?token=abc123&page=2 HTTP/1.1", "GET /x?token=***&page=2 HTTP/1.1"),
    ("dsn 'host=db user=app password=hunter2 dbname=x' refused",
     "dsn 'host=db user=app password=*** dbname=x' refused"),
    ("dsn host=db password='two words' port=5432", "dsn host=db password='***' port=5432"),
    ("Server=db;Password=pa$$;Database=x", "Server=db;Password=***;Database=x"),
    ("(password=hunter2)", "(password=***)"),
    ('{"api_token": "tok-1234", "password": "letmein", "secret": "x"}',
     '{"api_token": "***", "password": "***", "secret": "***"}'),
    ("config password: hunter2 loaded", "config password: *** loaded"),
    ("password: ThisIsALongPassphraseWithNoDigits", "password: ***"),
    ("client_secret=abc-123 api_key=k3y", "client_secret=*** api_key=***"),
]


@pytest.mark.parametrize(("text", "expected"), REDACTED, ids=[t[:40] for t, _ in REDACTED])
def test_redact_masks_secret_values_not_the_words_around_them(text: str, expected: str) -> None:
    assert redact(text) == expected
