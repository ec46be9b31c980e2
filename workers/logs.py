"""Logging set-up: one line per event, text or JSON, with secrets redacted.

Only the CLI calls :func:`configure`; library modules just use
``logging.getLogger(__name__)`` with %-style arguments. The redaction filter masks
passwords in URLs and Bearer tokens wherever they appear in a record.

Job context (job id, actor, session id, queue, sweep) rides on a context variable:
the broker's logging middleware wraps each message in :func:`job_context`, and
every line logged inside carries those fields (JSON keys, or ``key=value`` after
the text message) without each call passing ``extra=``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import datetime, timezone
from typing import Any, Iterator

from sessionq.models.settings import Settings, redact_url

# Job context fields a line carries, from :func:`job_context` or a caller's ``extra=``.
CONTEXT_FIELDS = ("job_id", "actor", "session_id", "queue", "sweep")
_BEARER_RE = re.compile(r"(?i)((?:bearer|authorization[\"']?\s*[=:]\s*[\"']?basic)\s+)[A-Za-z0-9._~+/=-]+")
_TOKEN_RE = re.compile(r"(?i)((?:api_token|token|password|passwd|secret)[\"']?\s*[=:]\s*[\"']?)[^\s\"',}]+")

# Longest message a log line carries; the rest is cut (a hostile 4 MiB payload in a
# dramatiq "Failed to process message" line must not become a 4 MiB log line).
DEFAULT_MAX_MESSAGE_CHARS = 16_384

_context: ContextVar[dict[str, str] | None] = ContextVar("sessionq_log_context", default=None)


def current_context() -> dict[str, str]:
    """The job context fields set by the enclosing :func:`job_context` blocks."""
    return dict(_context.get() or {})


def bind_job_context(**fields: str | None) -> Token[dict[str, str] | None]:
    """Add fields to the job context until :func:`reset_job_context` (for hook pairs such
    as a middleware's before/after, where a ``with`` block cannot span both)."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise TypeError(f"unknown log context field(s): {', '.join(sorted(unknown))}")
    return _context.set(current_context() | {k: str(v) for k, v in fields.items() if v is not None})


def reset_job_context(token: Token[dict[str, str] | None]) -> None:
    """Undo the :func:`bind_job_context` that returned ``token``."""
    _context.reset(token)


@contextmanager
def job_context(
    *,
    job_id: str | None = None,
    actor: str | None = None,
    session_id: str | None = None,
    queue: str | None = None,
    sweep: str | None = None,
) -> Iterator[dict[str, str]]:
    """Tag every log line inside the block with these fields (``None`` ones are left out;
    nested blocks add to, and override, the outer ones)."""
    token = bind_job_context(job_id=job_id, actor=actor, session_id=session_id, queue=queue, sweep=sweep)
    try:
        yield current_context()
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copy the current job context onto each record (fields set via ``extra=`` win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_context.get() or {}).items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def redact(text: str) -> str:
    """Mask URL passwords, Bearer/Basic credentials and ``token=...``-style secrets in ``text``."""
    text = redact_url(text)
    text = _BEARER_RE.sub(r"\1***", text)
    return _TOKEN_RE.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    """Render each record's message once, redacted, so no handler sees a secret."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s and len(s) >= 4)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        total = len(message)
        # Redact a little past the cut, so a secret straddling it is still masked.
        message = redact(message[: DEFAULT_MAX_MESSAGE_CHARS + 1024])
        for secret in self.secrets:
            message = message.replace(secret, "***")
        if total > DEFAULT_MAX_MESSAGE_CHARS:
            message = f"{message[:DEFAULT_MAX_MESSAGE_CHARS]}... ({total - DEFAULT_MAX_MESSAGE_CHARS} more characters cut)"
        record.msg, record.args = message, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            for secret in self.secrets:
                record.exc_text = record.exc_text.replace(secret, "***")
            record.exc_info = None
        return True


def _context_fields(record: logging.LogRecord) -> dict[str, str]:
    fields: dict[str, str] = {}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            fields[name] = redact(str(value))
    return fields


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` with the job context at the end."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _context_fields(record)
        if not fields:
            return line
        head, sep, tail = line.partition("\n")
        return head + " " + " ".join(f"{k}={v}" for k, v in fields.items()) + sep + tail


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any context fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(_context_fields(record))
        if record.exc_text:
            data["exc"] = record.exc_text
        return json.dumps(data, ensure_ascii=False, default=str)


def _secrets(settings: Settings) -> tuple[str, ...]:
    values = [settings.api_token]
    for url in (settings.storage_url, settings.redis_url, settings.broker_url):
        if url and "://" in url:
            from urllib.parse import urlsplit

            password = urlsplit(url).password
            values.append(password)
    return tuple(v for v in values if v)


def configure(settings: Settings, *, stream: Any = None) -> logging.Handler:
    """Install one stderr handler on the root logger per the settings; return it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactingFilter(_secrets(settings)))
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_sessionq", False)]:
        root.removeHandler(old)
    handler._sessionq = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    return handler
