"""One error root: every error sessionq raises on purpose is a ``SessionqError``."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from sessionq import errors
from sessionq.models import errors as model_errors
from sessionq.workers import errors as job_errors
from sessionq.workers.broker import TransientTracebacks
from tests.support_jobs import ROOT, child_env

CLASSES = [getattr(errors, name) for name in errors.__all__]


def test_every_error_is_a_sessionq_error() -> None:
    assert {cls.__name__ for cls in CLASSES} == {
        "SessionqError", "StoreError", "ValidationError", "NotFound", "Conflict", "StoreUnavailable", "SchemaOutdated",
        "ConfigError", "JobError", "InvalidPayload", "TransientJobError", "SessionNotReady", "ProducerError",
    }
    for cls in CLASSES:
        assert issubclass(cls, errors.SessionqError), cls


def test_the_hierarchy() -> None:
    assert not issubclass(errors.ConfigError, errors.StoreError)
    assert issubclass(errors.ConfigError, ValueError)
    for cls in (errors.ValidationError, errors.NotFound, errors.Conflict, errors.StoreUnavailable,
                errors.SchemaOutdated):
        assert issubclass(cls, errors.StoreError)
    assert not issubclass(errors.SchemaOutdated, errors.StoreUnavailable)  # waiting does not help
    for job_cls in (errors.InvalidPayload, errors.TransientJobError, errors.SessionNotReady, errors.ProducerError):
        assert issubclass(job_cls, errors.JobError) and not issubclass(job_cls, errors.StoreError)
    assert issubclass(errors.SessionNotReady, errors.TransientJobError)


def test_each_class_is_stated_once_and_re_exported() -> None:
    for module in (model_errors, job_errors):
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type):
                assert getattr(errors, name) is value, f"{module.__name__}.{name}"


def test_the_error_module_imports_nothing() -> None:
    code = "import sys; before = set(sys.modules); import sessionq.errors; print(sorted(set(sys.modules) - before))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['sessionq', 'sessionq.errors']"


def test_transient_errors_retry_and_a_session_not_ready_logs_no_failure() -> None:
    # Given the worker's log filter and a failure record as Dramatiq's worker writes it
    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord("dramatiq.worker.WorkerThread", logging.ERROR, __file__, 1,
                                 "Failed to process message %s with unhandled exception.", ("m",),
                                 (type(exc), exc, None))

    keep = TransientTracebacks()
    not_ready_exc = errors.SessionNotReady("session 's' does not exist (yet)")
    not_ready = record(not_ready_exc)
    outage = record(errors.StoreUnavailable("postgresql unavailable"))
    bug = record(RuntimeError("boom"))
    # Then a session not saved yet is retried without a log line (as a Dramatiq Retry was)
    assert job_errors.is_transient(not_ready_exc)
    assert keep.filter(not_ready) is False
    # ... an outage is one warning line without traceback, and a bug keeps its traceback
    assert keep.filter(outage) is True and outage.exc_info is None and outage.levelno == logging.WARNING
    assert keep.filter(bug) is True and bug.exc_info is not None and bug.levelno == logging.ERROR


def _sessionq(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sessionq.cli", *args], cwd=cwd, env=child_env(**env),
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        # a ConfigError raised while serving (it used to be caught only as a StoreError)
        (("serve", "--host", "0.0.0.0"), "Error: refusing to serve on 0.0.0.0 without an API token"),
        # a ConfigError of the dead-letter commands, which catch Redis errors too
        (("dlq", "list"), "Error: dead letters live in Redis: set REDIS_URL (embedded mode logs them instead)"),
        # an unknown store name of a fanned-out migration
        (("--redis-url", "redis://127.0.0.1:9/0", "migrate", "--from", "@nowhere", "--to", "sqlite:///b.db",
          "--fan-out"), "Error: store @nowhere is not configured here: set SESSIONQ_STORE_NOWHERE"),
    ],
)
def test_the_cli_turns_any_sessionq_error_into_one_line(tmp_path: Path, args: tuple[str, ...], line: str) -> None:
    result = _sessionq("--storage-url", f"sqlite:///{tmp_path / 'a.db'}", *args, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(line)


def test_an_unsupported_broker_scheme_is_one_line(tmp_path: Path) -> None:
    result = _sessionq("--storage-url", f"sqlite:///{tmp_path / 'a.db'}", "worker", cwd=tmp_path,
                       SESSIONQ_BROKER_URL="kafka://broker:9092")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "Error: queue URL 'kafka://broker:9092': unsupported scheme (use redis:// or amqp://)"
