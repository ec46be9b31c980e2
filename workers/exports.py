"""Export jobs (queue ``bulk``): a session as JSON, plain text or Markdown.

The JSON format is the save payload (session_id, model, created_at, updated_at,
status, metadata, messages[message_id, role, content, created_at]), so
``sessionq enqueue save`` takes an export back unchanged. Messages are streamed page
by page; files are written to a temporary name and renamed, so a reader never sees
half an export (:mod:`sessionq.models.atomic_write`: a planted symlink redirects nothing).
Jobs write only under ``settings.export_dir``; the default file name of a session is
:func:`sessionq.workers.payloads.export_filename` (README, "Producer API").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, TextIO

from sessionq.models import Store
from sessionq.models.atomic_write import atomic_text_file
from sessionq.models.errors import NotFound, ValidationError

from . import payloads
from .broker import get_settings, get_store
from .errors import InvalidPayload, SessionNotReady
from .jobs import job_actor

logger = logging.getLogger(__name__)


def write_export(store: Store, session_id: str, fmt: str, out: TextIO) -> int:
    """Write one session in ``fmt`` (json, text, markdown) to ``out``; return the message count.

    Raises :class:`~sessionq.models.errors.NotFound` for an unknown session.
    """
    session = store.load_session(session_id)
    count = 0
    if fmt == "json":
        head = payloads.save_payload(session)
        del head["messages"]
        body = json.dumps(head, indent=2, ensure_ascii=False)
        out.write(body[:-2] + ',\n  "messages": [')
        for message in store.iter_messages(session_id):
            out.write("," if count else "")
            out.write("\n    " + json.dumps(payloads.message_payload(message), ensure_ascii=False))
            count += 1
        out.write("\n  ]\n}\n" if count else "]\n}\n")
        return count
    if fmt == "text":
        out.write(f"Session: {session.session_id}\nModel: {session.model}\nStatus: {session.status}\n")
        out.write(f"Created: {session.created_at.isoformat()}\nUpdated: {session.last_activity.isoformat()}\n")
        if session.metadata:
            out.write(f"Metadata: {json.dumps(session.metadata, ensure_ascii=False)}\n")
        for message in store.iter_messages(session_id):
            out.write(f"\n[{message.created_at.isoformat()}] {message.role}:\n{message.content}\n")
            count += 1
        return count
    if fmt == "markdown":
        out.write(f"# Session {session.session_id}\n\n")
        out.write(f"- **Model:** {session.model}\n- **Status:** {session.status}\n")
        out.write(f"- **Created:** {session.created_at.isoformat()}\n"
                  f"- **Updated:** {session.last_activity.isoformat()}\n")
        if session.metadata:
            out.write(f"- **Metadata:** `{json.dumps(session.metadata, ensure_ascii=False)}`\n")
        for message in store.iter_messages(session_id):
            out.write(f"\n## {message.role} — {message.created_at.isoformat()}\n\n{message.content}\n")
            count += 1
        return count
    raise InvalidPayload(f"format must be one of {', '.join(payloads.EXPORT_FORMATS)}; got {fmt!r:.40}")


def export_to_file(store: Store, session_id: str, fmt: str, path: Path, *, root: Path | None = None) -> int:
    """Write an export atomically to ``path`` (temporary file + rename); return the message count.

    With ``root`` the file is written only if no directory between ``root`` and ``path``
    is a symlink when it is opened (else :class:`~sessionq.models.errors.ValidationError`).
    """
    with atomic_text_file(path, root=root) as out:
        return write_export(store, session_id, fmt, out)


@job_actor
def export_session(payload: dict[str, Any]) -> None:
    """Export a session to a file under the export dir (atomically replaced)."""
    export_dir = get_settings().export_dir
    request = payloads.parse_export(payload, export_dir)
    try:
        count = export_to_file(get_store(), request.session_id, request.format, request.path,
                               root=Path(export_dir).resolve())
    except NotFound:
        raise SessionNotReady(f"session {request.session_id!r} does not exist (yet)") from None
    except ValidationError as exc:  # a directory swapped for a symlink since the path was checked
        raise InvalidPayload(f"export path refused: {exc}") from None
    logger.info("exported session %s (%d messages) to %s", request.session_id, count, request.path)
