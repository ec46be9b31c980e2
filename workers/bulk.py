"""Bulk jobs (queue ``bulk``): a migration fanned out in batches over many workers.

``sessionq migrate --fan-out`` plans the batches (``sessionq.models.transfer.plan_batches``:
session-id ranges, and ``sessionq.models.transfer_kinds.plan_kind_batches``: key ranges of
files, transport sessions and agent state, read from the source a page at a time)
and enqueues one ``migrate_batch`` job per range; any worker runs any batch, each
idempotent, so a redelivered or re-run batch changes nothing and no checkpoint is
needed.

Stores are named, not spelled out: a job carries ``"@NAME"`` and the worker resolves
it with its settings (``Settings.resolve_store``: ``SESSIONQ_STORE_NAME`` in its
environment), so passwords never travel through Redis. A URL without a password may
be passed as is.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sessionq.errors import ConfigError
from sessionq.models import Settings, Store, open_store
from sessionq.models.kinds import KINDS, kind_named
from sessionq.models.transfer import migrate_batch as _migrate_batch
from sessionq.models.transfer import open_url, plan_batches
from sessionq.models.transfer_kinds import migrate_kind_batch, plan_kind_batches

from .broker import get_settings
from .errors import InvalidPayload
from .jobs import job_actor
from .payloads import parse_migrate_batch, store_reference

logger = logging.getLogger(__name__)

_stores: dict[str, Store] = {}
_lock = threading.Lock()


def fan_out_migration(settings: Settings, source: str, destination: str, batch_size: int) -> int:
    """Plan the batches of a migration (sessions, then every other kind), enqueue one
    ``migrate_batch`` job each on the broker of ``settings``, and return how many.

    ``source`` and ``destination`` are ``@NAME`` references or URLs without a password
    (:class:`InvalidPayload` otherwise); the destination's schema is brought up to date first.
    """
    from .producer import Producer

    refs = (store_reference(source), store_reference(destination))
    src = open_url(settings.resolve_store(refs[0]), "source")
    try:
        dst = open_url(settings.resolve_store(refs[1]), "destination")
        try:
            dst.upgrade()
        finally:
            dst.close()
        producer = Producer(settings)
        jobs = 0
        try:
            for after, until in plan_batches(src, batch_size):
                payload = {"source": refs[0], "destination": refs[1], "after": after, "until": until,
                           "limit": batch_size}
                producer.send("migrate_batch", payload)
                jobs += 1
            for kind in KINDS:
                for after, until in plan_kind_batches(src, kind, batch_size):
                    payload = {"source": refs[0], "destination": refs[1], "kind": kind.plural, "after": after,
                               "until": until, "limit": batch_size}
                    producer.send("migrate_batch", payload)
                    jobs += 1
        finally:
            producer.close()
    finally:
        src.close()
    return jobs


def _open(reference: str) -> Store:
    try:
        url = get_settings().resolve_store(reference)
    except ConfigError as exc:  # this worker does not know the store: the job can never run here
        raise InvalidPayload(str(exc)) from None
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
