"""Structured logging: job context on every line, secrets redacted in text and JSON."""

from __future__ import annotations

import io
import json
import logging
import threading
from typing import Iterator

import pytest

from sessionq.models import Settings
from sessionq.workers.logs import configure, current_context, job_context

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
def test_urls_and_bearer_tokens_are_redacted(capture: tuple[io.StringIO, list[logging.Handler]], log_format: str) -> None:
    # Given logging configured with a token that never appears with "Bearer" in front of it
    stream, _ = capture
    configure(Settings(log_format=log_format, api_token="tok-9f8e7d6c"), stream=stream)
    log = logging.getLogger("sessionq.test")
    # When lines carry a connection string, an Authorization header, the bare token and a traceback
    log.warning("connecting to %s with header Authorization: %s", SECRET_URL, BEARER)
    log.info("token is tok-9f8e7d6c; redis at redis://:r3dis-pw@cache:6379/0; Authorization: Basic dXNlcjpiYXNpYy1wdw==")
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
        assert records[0]["job_id"] == "j-1" and records[0]["actor"] == "save_session" and records[0]["session_id"] == "s-42"
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
