"""The data layer: records, the Store contract, one module per backend, settings.

Use :func:`open_store` to get a store for a URL or a :class:`Settings`.
"""

from __future__ import annotations

from .errors import (
    ConfigError,
    Conflict,
    NotFound,
    StoreError,
    StoreUnavailable,
    ValidationError,
)
from .records import (
    AgentState,
    ChatMessage,
    ChatSession,
    FileRecord,
    StreamEvent,
    TransportSession,
    utcnow,
)
from .settings import Settings, storage_backend
from .store import Page, Store, StoreStats, WriteResult

__all__ = [
    "AgentState",
    "ChatMessage",
    "ChatSession",
    "ConfigError",
    "Conflict",
    "FileRecord",
    "NotFound",
    "Page",
    "Settings",
    "Store",
    "StoreError",
    "StoreStats",
    "StoreUnavailable",
    "StreamEvent",
    "TransportSession",
    "ValidationError",
    "WriteResult",
    "open_store",
    "utcnow",
]


def open_store(target: str | Settings, *, max_pool_size: int | None = None, min_pool_size: int | None = None) -> Store:
    """Open the store a URL (or ``settings.storage_url``) names; the schema is not touched.

    A MongoDB URL (``mongodb://``, ``mongodb+srv://``) gets a :class:`~sessionq.models.mongo.MongoStore`,
    any other a :class:`~sessionq.models.sql.SqlStore` (the schemes: ``settings.STORAGE_SCHEMES``).
    """
    settings = target if isinstance(target, Settings) else None
    url = settings.storage_url if settings else str(target)
    max_pool = max_pool_size or (settings.max_pool_size if settings else 20)
    min_pool = min_pool_size or (settings.min_pool_size if settings else 1)
    if storage_backend(url) == "mongodb":
        from .mongo import MongoStore

        return MongoStore(url, max_pool_size=max_pool, min_pool_size=min_pool)
    from .sql import SqlStore

    return SqlStore(url, max_pool_size=max_pool)
