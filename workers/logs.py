"""Logging set-up: one line per event, text or JSON, with secrets redacted.

Only the CLI calls :func:`configure`; library modules just use
``logging.getLogger(__name__)`` with %-style arguments. The redaction filter masks
passwords in URLs, Bearer tokens and API keys wherever they appear in a record. Control
characters are escaped in both formats, so a payload value that reaches a log line
(a dead-letter reason) cannot end it and forge another.

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
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any

from sessionq.models.redact import redact_secrets
from sessionq.models.settings import Settings

# Job context fields a line carries, from :func:`job_context` or a caller's ``extra=``.
CONTEXT_FIELDS = ("job_id", "actor", "session_id", "queue", "sweep")
# Characters that end or rewrite a line for some reader: C0 and C1 controls, DEL, and the
# Unicode line and paragraph separators.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# The ones json.dumps(ensure_ascii=False) leaves as they are.
_JSON_UNESCAPED_RE = re.compile("[\x7f-\x9f\u2028\u2029]")

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
    """Mask URL passwords, Bearer/Basic credentials, ``token=...``-style secrets and
    API-key shapes in ``text`` with ``***`` (the shapes live in :mod:`sessionq.models.redact`).

    Only the secret values go: the words around them stay, and a plain word after
    ``token:`` or ``Bearer`` is prose, not a credential (``without an API token: set ...``).
    """
    return redact_secrets(text)


def _escape_control(match: re.Match[str]) -> str:
    char = match[0]
    return _CONTROL_ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """``text`` with control characters and line separators escaped (``\\n``, ``\\x1b``, ``\\u2028``),
    so a value that reaches a log line cannot end it or forge the next one."""
    return text if text.isprintable() else _CONTROL_RE.sub(_escape_control, text)


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
            message = (
                f"{message[:DEFAULT_MAX_MESSAGE_CHARS]}... "
                f"({total - DEFAULT_MAX_MESSAGE_CHARS} more characters cut)"
            )
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
    """``time level logger: message key=value ...`` with the job context at the end.

    Each event is one line, control characters escaped; a traceback follows on lines
    indented by two spaces, so a line that starts in column 0 always starts an event.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        line = escape_controls(self.formatMessage(record))
        fields = _context_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={escape_controls(v)}" for k, v in fields.items())
        detail = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else "")
        if record.stack_info:
            stack = self.formatStack(record.stack_info)
            detail = f"{detail}\n{stack}" if detail else stack
        if detail:
            line += "".join(f"\n  {escape_controls(part)}" for part in detail.splitlines())
        return line


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match[0]):04x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any context fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(_context_fields(record))
        if record.exc_text:
            data["exc"] = record.exc_text
        # json.dumps escapes C0 controls; DEL, C1 and U+2028/9 (line breaks to some readers) too
        return _JSON_UNESCAPED_RE.sub(_json_escape, json.dumps(data, ensure_ascii=False, default=str))


def _secrets(settings: Settings) -> tuple[str, ...]:
    values = [settings.api_token]
    for url in (settings.storage_url, settings.redis_url, settings.broker_url):
        if url and "://" in url:
            from urllib.parse import urlsplit

            password = urlsplit(url).password
            values.append(password)
    return tuple(v for v in values if v)


def configure(settings: Settings, *, stream: Any = None, default_level: str = "INFO") -> logging.Handler:
    """Install one stderr handler on the root logger per the settings; return it.

    ``default_level`` applies when ``settings.log_level`` is unset: the CLI passes
    ``WARNING`` for its one-shot commands, whose results are their output.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactingFilter(_secrets(settings)))
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_sessionq", False)]:
        root.removeHandler(old)
    handler._sessionq = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    level = logging.getLevelName((settings.log_level or default_level).upper())
    root.setLevel(level)
    # APScheduler logs each job it adds and runs at INFO ("Adding job tentatively ...");
    # the scheduler logs what each tick enqueued itself.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, level))
    return handler
