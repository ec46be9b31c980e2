"""Stores in the layout of the system sessionq replaces (the "seed-era" storage), read
as sources of migrate, verify, export-all and backup.

:func:`open_source` is the one place that decides a source's layout: sessionq's
schema present → a sessionq store; otherwise the seed system's tables (SQLite,
PostgreSQL: ``chat_sessions``, ``chat_messages``, ``uploaded_files``) or session
collection (MongoDB: ``chat_sessions`` / ``sessions``) → a read-only
:class:`~.base.LegacyStore`; neither → one error naming both layouts.
``LegacyOptions.layout`` (``--from-layout``) skips the detection. The mapping of rows
to records is :mod:`.records`.
"""

from __future__ import annotations

from ..errors import SessionqError, ValidationError
from ..sealing import Sealer
from ..settings import redact_url, storage_backend
from ..store import Store
from .base import LegacyStore
from .records import LAYOUTS, MONGO_SESSION_COLLECTIONS, SQL_TABLES, LegacyOptions, Problems, derived_message_id, zone

__all__ = [
    "LAYOUTS",
    "LegacyOptions",
    "LegacyStore",
    "Problems",
    "derived_message_id",
    "detect_layout",
    "open_legacy",
    "open_source",
    "problems_of",
    "seed_era_tables",
    "zone",
]


def open_legacy(url: str, options: LegacyOptions | None = None, role: str = "source") -> LegacyStore:
    """Open and ping the seed-era store at ``url`` (an error names ``role`` and the URL)."""
    from .mongo import LegacyMongoStore
    from .sql import LegacySqlStore

    backend = storage_backend(url)
    if backend is None:
        raise ValidationError(f"{role} {redact_url(url)}: unsupported URL scheme")
    kind = LegacyMongoStore if backend == "mongodb" else LegacySqlStore
    store: LegacyStore = kind(url, options=options)
    try:
        store.ping()
    except SessionqError as exc:
        store.close()
        raise type(exc)(f"{role} {redact_url(url)}: {exc}") from None
    return store


def _neither(url: str, role: str) -> ValidationError:
    tables = ", ".join(SQL_TABLES)
    return ValidationError(
        f"{role} {redact_url(url)} has neither layout: no sessionq schema (`sessionq db upgrade` makes one) "
        f"and no seed-era store (tables {tables}, or a MongoDB collection chat_sessions/sessions; "
        f"--legacy-collection names another)"
    )


def detect_layout(url: str, options: LegacyOptions | None = None, role: str = "source") -> str | None:
    """``"sessionq"`` when the store at ``url`` has sessionq's schema, else ``"legacy"``
    when it has the seed system's, else ``None``."""
    from ..transfer import open_url

    with open_url(url, role) as store:
        if store.schema_version() > 0:
            return "sessionq"
    with open_legacy(url, options, role) as legacy:
        return "legacy" if legacy.has_layout() else None


def open_source(
    url: str, options: LegacyOptions | None = None, role: str = "source", *, sealer: Sealer | None = None
) -> Store:
    """Open the store at ``url`` to read from, in its layout (detected unless
    ``options.layout`` says), a sessionq store opening sealed values with ``sealer``
    (a seed-era store holds none); :class:`ValidationError` when it has neither or not
    the one asked for."""
    from ..transfer import open_url

    options = options or LegacyOptions()
    if options.layout not in (None, *LAYOUTS):
        raise ValidationError(f"layout must be one of {', '.join(LAYOUTS)}, got {options.layout!r:.40}")
    layout = options.layout or detect_layout(url, options, role)
    if layout is None:
        raise _neither(url, role)
    if layout == "sessionq":
        return open_url(url, role, sealer=sealer)
    legacy = open_legacy(url, options, role)
    if not legacy.has_layout():
        legacy.close()
        raise ValidationError(
            f"{role} {redact_url(url)}: no seed-era tables or collection found (--from-layout legacy)"
        )
    return legacy


def seed_era_tables(store: Store) -> list[str]:
    """The seed system's tables (MongoDB: session collections) a sessionq store's
    database holds."""
    from ..mongo import MongoStore
    from ..sql import SqlStore

    if isinstance(store, SqlStore):
        return [name for name in SQL_TABLES if store.database.table_exists(name)]
    if isinstance(store, MongoStore):
        present = set(store.database.list_collection_names())
        return [name for name in MONGO_SESSION_COLLECTIONS if name in present]
    return []


def problems_of(store: Store) -> Problems | None:
    """The problems a seed-era source found so far (``None`` for a sessionq store)."""
    return store.problems if isinstance(store, LegacyStore) else None
