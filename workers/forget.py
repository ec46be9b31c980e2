"""Erasure with a receipt: ``sessionq forget`` and the ``forget`` job (queue ``maintenance``).

A :class:`~sessionq.models.erasure.Selector` names what to erase: one session id, or
every session whose metadata holds ``KEY=VALUE`` (a user id). :func:`erase` (what the
job and ``sessionq forget`` run) then, in this order:

1. resolves the selector to session ids (a session selector counts even if nothing
   is stored yet: a save still queued must be refused too) and to the MCP transport
   sessions that reference them, and tombstones the session ids
   (:mod:`sessionq.models.erasure`), so that from now on a late save or append is
   dead-lettered ``forgotten`` instead of re-creating what is being erased;
2. removes the jobs that reference them from the Redis queues (ready and delayed:
   their ``.msgs`` hashes and lists), the dead letters (:mod:`sessionq.workers.dlq`)
   and this host's producer outbox (:mod:`sessionq.workers.outbox`); a save job found
   there for a metadata selector adds its session id (tombstoned as well);
3. deletes from the store: transport sessions, agent state and MCP tasks that
   reference them, the store's MCP event log, file records, and last the sessions
   with their messages; then the MCP event streams in Redis
   (:mod:`sessionq.workers.mcp.event_store`: ``<prefix>:events:<id>`` and
   ``<prefix>:open:<id>``) and the export files sessionq wrote under ``export_dir``;
4. stores and returns a :class:`~sessionq.models.erasure.ForgetReceipt`: per place,
   what was found and removed, as counts only.

"References" is decided from ids and metadata, never from content: a transport session
references a session when its ``mcp_session_id`` is the session id or its
``metadata["session_id"]`` is; agent state when its ``mcp_session_id`` is one of those
transports or sessions; a file record when its ``metadata["session_id"]`` is a session;
an MCP task when its ``owner`` is one of the sessions or transports, or its
``arguments["session_id"]`` is a session; a job when its argument's ``session_id`` or
``mcp_session_id`` is, or (a task leg) its ``task_id`` is one of those tasks. With a
metadata selector, files, transports and save jobs whose own metadata holds
``KEY=VALUE`` are included too. An export file is sessionq's when its head is the head
sessionq writes for that session (JSON, text or Markdown), wherever under
``export_dir`` it was written.

Every step is idempotent: forgetting the same thing again finds nothing and returns
a receipt of zeros. A redelivered ``forget`` job (same receipt id) adds its counts to
the stored receipt. Store reads stream page by page; the Redis scans use ``HSCAN``.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sessionq.models import Settings, Store, utcnow
from sessionq.models.erasure import PLACES, ForgetReceipt, Selector
from sessionq.models.errors import NotFound
from sessionq.models.kinds import AGENT_STATES, FILES, TASKS, TRANSPORTS
from sessionq.models.settings import is_redis_url
from sessionq.models.store import metadata_matches

from . import payloads
from .broker import DEFAULT_NAMESPACE, get_redis, get_settings, get_store
from .jobs import QUEUES, job_actor
from .mcp.event_store import DEFAULT_KEY_PREFIX

logger = logging.getLogger(__name__)

# Bytes of an export file's head read to recognise whose export it is.
_EXPORT_HEAD_BYTES = 4096
# Entries per HSCAN call over a queue's message hash.
_SCAN_COUNT = 500


def new_receipt_id() -> str:
    """A fresh receipt id (``fr-`` and a random UUID)."""
    return f"fr-{uuid.uuid4()}"


@dataclass
class _Scope:
    """What one erasure covers, growing as the places are read."""

    selector: Selector
    sessions: set[str] = field(default_factory=set)
    transports: set[str] = field(default_factory=set)
    tasks: set[str] = field(default_factory=set)

    def metadata_hit(self, metadata: Any) -> bool:
        if self.selector.key is None or not isinstance(metadata, dict):
            return False
        assert self.selector.value is not None
        return metadata_matches(metadata, self.selector.key, self.selector.value)

    def references_job(self, envelope: Any) -> bool:
        """True when a Dramatiq message (decoded) references the scope; a save job
        matched by metadata adds its session id to the scope."""
        if not isinstance(envelope, dict):
            return False
        args = envelope.get("args")
        arg = args[0] if isinstance(args, list) and args else None
        if not isinstance(arg, dict):
            return False
        sid, mcp, task = arg.get("session_id"), arg.get("mcp_session_id"), arg.get("task_id")
        meta = arg.get("metadata")
        if sid in self.sessions or mcp in self.transports or mcp in self.sessions or task in self.tasks:
            return True
        if isinstance(meta, dict) and meta.get("session_id") in self.sessions:
            return True
        if self.metadata_hit(meta):
            if isinstance(sid, str) and envelope.get("actor_name") == "save_session":
                self.sessions.add(sid)
            return True
        return False

    @property
    def owners(self) -> set[str]:
        return self.sessions | self.transports


class _Counts:
    """Per place: found and removed."""

    def __init__(self) -> None:
        self.places: dict[str, dict[str, int]] = {p: {"found": 0, "removed": 0} for p in PLACES}

    def add(self, place: str, found: int, removed: int | None = None) -> None:
        self.places[place]["found"] += found
        self.places[place]["removed"] += found if removed is None else removed


def erase(
    selector: Selector,
    *,
    store: Store,
    settings: Settings,
    redis: Any | None = None,
    receipt_id: str | None = None,
    now: datetime | None = None,
) -> ForgetReceipt:
    """Erase what ``selector`` names everywhere sessionq keeps it (see the module docs),
    store the receipt and return it. ``redis`` is a ``redis.Redis`` on the broker's
    database (``None``: embedded mode, no Redis places)."""
    now = now or utcnow()
    receipt_id = receipt_id or new_receipt_id()
    scope = _Scope(selector)
    counts = _Counts()
    until = now + timedelta(hours=settings.forget_window_hours)

    # 1. The sessions and transports, then tombstones before anything is deleted.
    if selector.session_id is not None:
        scope.sessions.add(selector.session_id)
    else:
        assert selector.key is not None and selector.value is not None
        scope.sessions.update(store.sessions_with_metadata(selector.key, selector.value))
    for transport in store.iter_kind(TRANSPORTS):
        if (transport.mcp_session_id in scope.sessions or transport.metadata.get("session_id") in scope.sessions
                or scope.metadata_hit(transport.metadata)):
            scope.transports.add(transport.mcp_session_id)
    for task in store.iter_kind(TASKS):
        if task.owner in scope.owners or task.arguments.get("session_id") in scope.sessions:
            scope.tasks.add(task.task_id)
    tombstoned = set(scope.sessions)
    store.put_tombstones(sorted(tombstoned), now, until)

    # 2. Jobs: queues, dead letters, this host's outbox.
    if redis is not None:
        queued, removed = _forget_queued(redis, scope)
        counts.add("queued_jobs", queued, removed)
        from .dlq import DeadLetters

        letters = DeadLetters(redis).remove(scope.references_job)
        counts.add("dead_letters", letters)
    counts.add("outbox", _forget_outbox(Path(settings.outbox_path), scope))
    if scope.sessions - tombstoned:  # save jobs matched by metadata named more sessions
        store.put_tombstones(sorted(scope.sessions - tombstoned), now, until)

    # 3. The store, referencing records first and the sessions last.
    counts.add("transports", store.delete_kind(TRANSPORTS, [(t,) for t in sorted(scope.transports)]))
    agent_keys = [AGENT_STATES.key(a) for a in store.iter_kind(AGENT_STATES)
                  if a.mcp_session_id is not None and a.mcp_session_id in scope.owners]
    counts.add("agent_states", store.delete_kind(AGENT_STATES, agent_keys))
    counts.add("tasks", store.delete_kind(TASKS, [(t,) for t in sorted(scope.tasks)]))
    counts.add("store_events", store.delete_events(sorted(scope.owners)))
    file_keys = [FILES.key(f) for f in store.iter_kind(FILES)
                 if f.metadata.get("session_id") in scope.sessions or scope.metadata_hit(f.metadata)]
    counts.add("files", store.delete_kind(FILES, file_keys))
    sessions = messages = 0
    for session_id in sorted(scope.sessions):
        try:
            message_count = store.load_session(session_id).message_count
        except NotFound:
            continue
        if store.delete_session(session_id):
            sessions += 1
            messages += message_count
    counts.add("sessions", sessions)
    counts.add("messages", messages)
    event_redis = _event_redis(settings, redis)
    if event_redis is not None:
        counts.add("redis_event_streams", _forget_event_streams(event_redis, scope.owners))
    counts.add("export_files", _forget_exports(Path(settings.export_dir), scope.sessions))

    receipt = ForgetReceipt(
        receipt_id=receipt_id, selector=selector.to_receipt(), places=counts.places,
        tombstones=len(scope.sessions), tombstone_until=until, created_at=now, finished_at=utcnow(),
    )
    try:
        receipt = store.load_receipt(receipt_id).merged(receipt)
    except NotFound:
        pass
    store.save_receipt(receipt)
    logger.info("forget %s: removed %d record(s) (%s)", receipt_id, receipt.removed,
                ", ".join(f"{p}={c['removed']}" for p, c in receipt.places.items() if c["removed"]) or "nothing")
    return receipt


def _forget_queued(client: Any, scope: _Scope) -> tuple[int, int]:
    """Remove the referencing jobs from every queue and delay queue; (found, removed)."""
    found = removed = 0
    for queue in [name for q in QUEUES for name in (q, f"{q}.DQ")]:
        base = f"{DEFAULT_NAMESPACE}:{queue}"
        hits = [rid for rid, data in _hscan(client, f"{base}.msgs") if scope.references_job(_decode(data))]
        if not hits:
            continue
        pipe = client.pipeline(transaction=True)
        for rid in hits:
            pipe.lrem(base, 0, rid)
            pipe.hdel(f"{base}.msgs", rid)
        replies = pipe.execute()
        found += len(hits)
        removed += sum(int(r) for r in replies[1::2])
    return found, removed


def _hscan(client: Any, key: str) -> Iterator[tuple[Any, Any]]:
    cursor = 0
    while True:
        cursor, chunk = client.hscan(key, cursor, count=_SCAN_COUNT)
        yield from chunk.items()
        if int(cursor) == 0:
            return


def _decode(data: Any) -> Any:
    try:
        return json.loads(data)
    except (ValueError, TypeError):
        return None


def _forget_outbox(path: Path, scope: _Scope) -> int:
    """Remove referencing jobs from the producer's outbox at ``path``, if there is one here."""
    if not path.is_file():
        return 0
    from .outbox import Outbox

    outbox = Outbox(path)
    try:
        return outbox.remove(lambda queue, data: scope.references_job(_decode(data)))
    finally:
        outbox.close()


def redis_for(settings: Settings) -> Any | None:
    """A Redis client on the broker's database (``None`` without a Redis broker), for a
    :func:`erase` run outside a worker (``sessionq forget``)."""
    if not is_redis_url(settings.queue_url):
        return None
    import redis

    return redis.Redis.from_url(settings.queue_url, socket_connect_timeout=2)


def _event_redis(settings: Settings, broker_client: Any | None) -> Any | None:
    """A Redis client where the MCP event store keeps its streams (``redis_url``), if any."""
    if not is_redis_url(settings.redis_url):
        return None
    if broker_client is not None and settings.redis_url == settings.queue_url:
        return broker_client
    import redis

    return redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)


def _forget_event_streams(client: Any, mcp_session_ids: set[str]) -> int:
    """Delete the MCP event streams (and open-request sets) of these sessions; how many streams."""
    if not mcp_session_ids:
        return 0
    pipe = client.pipeline(transaction=False)
    for mcp_id in sorted(mcp_session_ids):
        pipe.delete(f"{DEFAULT_KEY_PREFIX}:events:{mcp_id}")
        pipe.delete(f"{DEFAULT_KEY_PREFIX}:open:{mcp_id}")
    replies = pipe.execute()
    return sum(int(r) for r in replies[0::2])


def export_heads(session_id: str) -> tuple[bytes, ...]:
    """How an export of ``session_id`` begins in each format (:mod:`sessionq.workers.exports`)."""
    quoted = json.dumps(session_id, ensure_ascii=False)
    return (
        ('{\n  "session_id": ' + quoted + ",").encode(),
        f"Session: {session_id}\n".encode(),
        f"# Session {session_id}\n".encode(),
    )


def _forget_exports(export_dir: Path, session_ids: set[str]) -> int:
    """Delete the export files of these sessions under ``export_dir`` (symlinks are not
    followed, only regular files are read); how many."""
    if not session_ids or not export_dir.is_dir():
        return 0
    heads = {head: sid for sid in session_ids for head in export_heads(sid)}
    deleted = 0
    for root, _dirs, files in os.walk(export_dir):
        for name in files:
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            try:
                with open(path, "rb") as fp:
                    head = fp.read(_EXPORT_HEAD_BYTES)
            except OSError:
                continue
            if any(head.startswith(prefix) for prefix in heads):
                path.unlink(missing_ok=True)
                deleted += 1
    return deleted


def format_receipt(receipt: ForgetReceipt) -> str:
    """A receipt as ``sessionq forget`` prints it: a table of every place, counts only."""
    selector = receipt.selector
    what = (f"session {selector['session_id']}" if "session_id" in selector
            else f"metadata {selector['metadata_key']}=<sha256 {selector['metadata_value_sha256']}>")
    lines = [f"forget receipt {receipt.receipt_id}", f"  selector: {what}",
             f"  at:       {receipt.created_at.isoformat()}"]
    if receipt.finished_at is not None:
        lines.append(f"  finished: {receipt.finished_at.isoformat()}")
    lines.append(f"  {'place':<22}{'found':>8}{'removed':>9}")
    for place in PLACES:
        counts = receipt.places.get(place, {"found": 0, "removed": 0})
        lines.append(f"  {place:<22}{counts['found']:>8}{counts['removed']:>9}")
    until = receipt.tombstone_until.isoformat() if receipt.tombstone_until else "-"
    lines.append(f"  tombstones: {receipt.tombstones} session id(s); late saves refused until {until}")
    return "\n".join(lines)


@job_actor
def forget(payload: dict[str, Any]) -> None:
    """Erase what the payload's selector names and store the receipt under its id."""
    receipt_id, selector = payloads.parse_forget(payload)
    erase(selector, store=get_store(), settings=get_settings(), redis=get_redis(), receipt_id=receipt_id)
