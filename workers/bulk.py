"""Bulk jobs (queue ``bulk``): a migration, or a key rotation, fanned out in batches
over many workers.

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
from sessionq.models.rotation import plan_rotation
from sessionq.models.rotation import rotate_batch as rotate_batch_of
from sessionq.models.transfer import migrate_batch as _migrate_batch
from sessionq.models.transfer import open_url, plan_batches
from sessionq.models.transfer_kinds import migrate_kind_batch, plan_kind_batches

from .broker import get_settings, get_store
from .errors import InvalidPayload
from .jobs import job_actor
from .payloads import parse_migrate_batch, parse_rotate_batch, store_reference

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


def fan_out_rotation(settings: Settings, batch_size: int) -> int:
    """Plan the batches of a key rotation of the configured store
    (:func:`~sessionq.models.rotation.plan_rotation`), enqueue one ``rotate_batch`` job
    each on the broker of ``settings``, and return how many."""
    from .producer import Producer

    if not settings.sealer.enabled:
        raise ConfigError("SESSIONQ_ENCRYPTION_KEYS is not set: there is no key to rotate to")
    store = open_store(settings)
    try:
        producer = Producer(settings)
        jobs = 0
        try:
            for table, after, until in plan_rotation(store, batch_size):
                payload = {"table": table, "after": None if after is None else list(after), "until": list(until)}
                producer.send("rotate_batch", payload)
                jobs += 1
        finally:
            producer.close()
    finally:
        store.close()
    return jobs


@job_actor
def rotate_batch(payload: dict[str, Any]) -> None:
    """Re-seal one key range of a sealed table under the primary key (idempotent: a
    value already under it is left alone; a row saved meanwhile keeps the save)."""
    batch = parse_rotate_batch(payload)
    store = get_store()
    done = rotate_batch_of(store, batch.table, batch.after, batch.until)
    logger.info(
        "re-sealed %s after %r up to %r under key %s: %d rows read, %d values re-sealed, %d left to newer writes",
        batch.table, batch.after, batch.until, store.sealer.primary, done.rows, done.resealed, done.skipped,
    )
