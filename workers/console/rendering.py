"""The console's templates (shipped in ``templates/`` beside this module) and their filters."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from sessionq.models import utcnow

#: The console package's directory: ``templates/`` and ``static/`` live here.
HERE = Path(__file__).parent


def ago(when: datetime | float | None) -> str:
    """``when`` (a datetime or epoch seconds) relative to now: ``"5m ago"``, ``"in 2h"``, ``"—"`` for none."""
    if when is None:
        return "—"
    at = datetime.fromtimestamp(when, UTC) if isinstance(when, int | float) else when
    seconds = int((utcnow() - at).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    text = (f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200
            else f"{seconds // 3600}h" if seconds < 172800 else f"{seconds // 86400}d")
    return f"in {text}" if future else f"{text} ago"


def stamp(when: datetime | float | None) -> str:
    """``when`` (a datetime or epoch seconds) as ``YYYY-MM-DD HH:MM:SS UTC``, ``"—"`` for none."""
    if when is None:
        return "—"
    at = datetime.fromtimestamp(when, UTC) if isinstance(when, int | float) else when
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def environment() -> Environment:
    """The console's Jinja2 environment: its templates, autoescaped, with :func:`ago` and :func:`stamp`."""
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["ago"] = ago
    env.filters["stamp"] = stamp
    return env
