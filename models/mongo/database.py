"""The MongoDB backend's connection to its server: the client a URL opens, PyMongo
errors mapped to the store's errors, and :class:`MongoStoreBase`, the collections
that every part of :class:`~sessionq.models.mongo.MongoStore` shares."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from datetime import UTC
from typing import Any, TypeVar, cast

from bson.errors import BSONError
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    ExecutionTimeout,
    PyMongoError,
    WTimeoutError,
)

from ..errors import Conflict, StoreError, StoreUnavailable, ValidationError
from ..store import first_line

F = TypeVar("F", bound=Callable[..., Any])
Doc = dict[str, Any]

# Connections kept by the client's pool when no size is configured.
DEFAULT_MAX_POOL_SIZE = 20
# Connections the client's pool keeps open even when idle.
DEFAULT_MIN_POOL_SIZE = 1
# Milliseconds to find a server / open a connection before the store is "unavailable".
DEFAULT_SERVER_SELECTION_TIMEOUT_MS = 10_000
# Database used when the URL names none.
DEFAULT_DATABASE = "sessionq"
# Documents per insert_many / ids per $in list.
DEFAULT_CHUNK = 1000
# The server's error code for a unique-index violation.
DUPLICATE_KEY = 11000


def open_client(
    url: str, *, max_pool_size: int = DEFAULT_MAX_POOL_SIZE, min_pool_size: int = DEFAULT_MIN_POOL_SIZE
) -> MongoClient[Doc]:
    """A client for a ``mongodb://`` or ``mongodb+srv://`` URL that returns aware UTC
    datetimes and connects on first use."""
    return MongoClient(
        url,
        maxPoolSize=max_pool_size,
        minPoolSize=min_pool_size,
        tz_aware=True,
        tzinfo=UTC,
        serverSelectionTimeoutMS=DEFAULT_SERVER_SELECTION_TIMEOUT_MS,
        connect=False,
    )


# Where PyMongo's server-selection message stops saying what went wrong and starts
# describing its configuration and topology (one long line per server).
_SELECTION_DETAIL = re.compile(r" \(configured timeouts: [^)]*\)|, Timeout: .*$")


def connection_failure(exc: BaseException) -> str:
    """What a connection failure says, without PyMongo's timeouts and topology dump:
    ``host:port: [Errno 111] Connection refused``."""
    lines = str(exc).strip().splitlines()
    return _SELECTION_DETAIL.sub("", lines[0])[:300] if lines else type(exc).__name__


def translate_errors(method: F) -> F:
    """Map PyMongo errors to the store's error hierarchy (transient ones to StoreUnavailable)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except StoreError:
            raise
        except (ConnectionFailure, ExecutionTimeout, WTimeoutError) as exc:
            raise StoreUnavailable(f"mongodb unavailable: {connection_failure(exc)}") from exc
        except DuplicateKeyError as exc:
            raise Conflict(f"duplicate key: {first_line(exc)}") from exc
        except BSONError as exc:
            raise ValidationError(f"value rejected by mongodb: {first_line(exc)}") from exc
        except PyMongoError as exc:
            raise StoreError(f"mongodb rejected an operation: {first_line(exc)}") from exc

    return cast(F, wrapper)


def only_duplicates(exc: BulkWriteError) -> bool:
    """True when a bulk write failed only on unique-index violations."""
    errors = exc.details.get("writeErrors", [])
    return (
        bool(errors)
        and all(e.get("code") == DUPLICATE_KEY for e in errors)
        and not exc.details.get("writeConcernErrors")
    )


class MongoStoreBase:
    """The client and collections shared by the parts of
    :class:`~sessionq.models.mongo.MongoStore` (which sets them up)."""

    #: The URL scheme family.
    backend: str = "mongodb"
    _client: MongoClient[Doc]
    _db: Database[Doc]
    _sessions: Collection[Doc]
    _messages: Collection[Doc]
    _files: Collection[Doc]
    _transports: Collection[Doc]
    _agent: Collection[Doc]
    _events: Collection[Doc]
    _counters: Collection[Doc]

    @property
    def database(self) -> Database[Doc]:
        """The PyMongo database (for tests and tools)."""
        return self._db
