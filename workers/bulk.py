"""Bulk jobs (queue ``bulk``): a migration fanned out in batches over many workers.

``sessionq migrate --fan-out`` plans the batches (``sessionq.models.transfer.plan_batches``:
session-id ranges, and ``sessionq.models.transfer_kinds.plan_kind_batches``: key ranges of
files, transport sessions and agent state, read from the source a page at a time)
and enqueues one ``migrate_batch`` job per range; any worker runs any batch, each
idempotent, so a redelivered or re-run batch changes nothing and no checkpoint is
needed.

Stores are named, not spelled out: a job carries ``"@NAME"`` and the worker reads the
URL from its environment variable ``SESSIONQ_STORE_NAME``, so passwords never travel
through Redis. A URL without a password may be passed as is.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sessionq.models import Store, open_store
from sessionq.models.kinds import kind_named
from sessionq.models.transfer import migrate_batch as _migrate_batch
from sessionq.models.transfer_kinds import migrate_kind_batch

from .jobs import job_actor
from .payloads import parse_migrate_batch, resolve_store_url

logger = logging.getLogger(__name__)

_stores: dict[str, Store] = {}
_lock = threading.Lock()


def _open(reference: str) -> Store:
    url = resolve_store_url(reference)
    with _lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = open_store(url)
        return store


@job_actor
def migrate_batch(payload: dict[str, Any]) -> None:
    """Copy one planned range of sessions (with their messages), or of another
    record kind, between two stores."""
    batch = parse_migrate_batch(payload)
    src, dst = _open(batch.source), _open(batch.destination)
    if batch.kind != "sessions":
        done = migrate_kind_batch(src, dst, kind_named(batch.kind), batch.after, batch.limit, until=batch.until)
        logger.info(
            "migrated %s after %r up to %r: %d read, %d written",
            batch.kind, batch.after, batch.until, done.records, done.written,
        )
        return
    result = _migrate_batch(src, dst, batch.after, batch.limit, until=batch.until)
    logger.info(
        "migrated sessions after %r up to %r: %d sessions, %d messages",
        batch.after, batch.until, result.sessions, result.messages,
    )
