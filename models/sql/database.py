"""The SQL backend's connection to its database: opening one from a URL, driver errors
mapped to the store's errors (and which of them a retry fixes), and
:class:`SqlStoreBase`, the state and transaction helpers that every part of
:class:`~sessionq.models.sql.SqlStore` shares."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import peewee as pw
from playhouse.pool import PooledMySQLDatabase, PooledPostgresqlDatabase

from ..errors import Conflict, StoreError, StoreUnavailable, ValidationError
from ..store import first_line
from . import schema
from .schema import Models

logger = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# Connections kept by the PostgreSQL/MySQL pool when no size is configured.
DEFAULT_MAX_POOL_SIZE = 20
# Seconds an idle pooled connection is kept before it is recycled.
DEFAULT_STALE_TIMEOUT = 300
# Seconds to wait for a free pooled connection / for the server to answer a connect.
DEFAULT_CONNECT_TIMEOUT = 10
# Rows per multi-row INSERT / IN list.
DEFAULT_CHUNK = 500
# Attempts of one write transaction on deadlock or insert race before giving up.
DEFAULT_WRITE_ATTEMPTS = 5
# Driver codes of a deadlock victim, serialization failure or lock wait timeout (PostgreSQL, MySQL).
RETRYABLE_CODES = {"40001", "40P01", 1213, 1205}


def open_database(url: str, *, max_pool_size: int = DEFAULT_MAX_POOL_SIZE) -> tuple[pw.Database, str]:
    """Build a Peewee database for a ``sqlite://``, ``postgresql://`` or ``mysql://`` URL.

    Returns ``(database, dialect)``. PostgreSQL and MySQL get a connection pool of at
    most ``max_pool_size`` connections; SQLite runs in WAL mode with foreign keys on.
    """
    from ..settings import STORAGE_SCHEMES

    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    dialect = STORAGE_SCHEMES.get(scheme)
    query = dict(parse_qsl(parts.query))
    if dialect == "sqlite":
        path = unquote(parts.path.removeprefix("/")) or parts.netloc
        if not path:
            raise ValidationError(f"sqlite URL needs a file path: {url!r}")
        pragmas = {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 30_000, "synchronous": "full"}
        return pw.SqliteDatabase(path, pragmas=pragmas, field_types=schema.FIELD_TYPES["sqlite"]), "sqlite"
    database = unquote(parts.path.lstrip("/"))
    if not database:
        raise ValidationError(f"{scheme} URL needs a database name")
    common: dict[str, Any] = {
        "max_connections": max_pool_size,
        "stale_timeout": DEFAULT_STALE_TIMEOUT,
        "timeout": DEFAULT_CONNECT_TIMEOUT,
        "host": parts.hostname or "localhost",
        "user": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
    }
    if parts.port:
        common["port"] = parts.port
    common = {k: v for k, v in common.items() if v is not None}
    if dialect == "postgresql":
        return (
            PooledPostgresqlDatabase(
                database,
                field_types=schema.FIELD_TYPES["postgresql"],
                options="-c timezone=UTC",
                connect_timeout=int(query.pop("connect_timeout", DEFAULT_CONNECT_TIMEOUT)),
                **common,
                **query,
            ),
            "postgresql",
        )
    if dialect == "mysql":
        return (
            PooledMySQLDatabase(
                database,
                field_types=schema.FIELD_TYPES["mysql"],
                charset="utf8mb4",
                connect_timeout=int(query.pop("connect_timeout", DEFAULT_CONNECT_TIMEOUT)),
                **common,
                **query,
            ),
            "mysql",
        )
    raise ValidationError(f"unsupported SQL URL scheme {scheme!r}")


def translate_errors(method: F) -> F:
    """Map driver errors to the store's error hierarchy; drop broken connections.

    A pooled connection the call checked out is returned to the pool when the call
    ends (unless the caller holds it open, e.g. in its own transaction): Peewee binds
    connections to threads, so one left open by a short-lived thread would leak.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        checked_out = self._pooled and self._db.is_closed()
        try:
            return method(self, *args, **kwargs)
        except StoreError:
            raise
        except (pw.OperationalError, pw.InterfaceError) as exc:
            self._discard_connection()
            raise StoreUnavailable(f"{self.backend} unavailable: {first_line(exc)}") from exc
        except pw.IntegrityError as exc:
            raise Conflict(f"integrity error: {first_line(exc)}") from exc
        except pw.DataError as exc:
            raise ValidationError(f"value rejected by {self.backend}: {first_line(exc)}") from exc
        except (pw.ProgrammingError, pw.NotSupportedError) as exc:
            raise StoreError(f"{self.backend} rejected a statement: {first_line(exc)}") from exc
        except pw.DatabaseError as exc:
            self._discard_connection()
            raise StoreUnavailable(f"{self.backend} error: {first_line(exc)}") from exc
        finally:
            if checked_out and not self._db.is_closed() and not self._db.in_transaction():
                self._db.close()

    return cast(F, wrapper)


def driver_code(exc: BaseException) -> str | int | None:
    """The driver's error code behind a Peewee error: PostgreSQL's SQLSTATE (``pgcode``
    of the psycopg2 error Peewee wrapped) or MySQL's error number (``args[0]``)."""
    original = getattr(exc, "orig", None) or exc.__context__
    pgcode = getattr(original, "pgcode", None)
    if pgcode is not None:
        return str(pgcode)
    code = exc.args[0] if exc.args else None
    return code if isinstance(code, int) else None


def is_retryable(exc: BaseException) -> bool:
    """True for a transaction the database chose as a deadlock victim, a serialization
    failure, or a lock wait that timed out: running it again is the fix."""
    return driver_code(exc) in RETRYABLE_CODES


class SqlStoreBase:
    """The state and transaction helpers shared by the parts of
    :class:`~sessionq.models.sql.SqlStore` (which sets them up)."""

    #: ``"sqlite"``, ``"postgresql"`` or ``"mysql"``.
    backend: str = ""
    #: The Peewee model classes bound to this store's database.
    m: Models
    #: PostgreSQL only: load big import_records message batches with COPY.
    use_copy: bool
    _db: pw.Database
    _pooled: bool

    @property
    def database(self) -> pw.Database:
        """The Peewee database (for tests and tools that need raw SQL)."""
        return self._db

    def _discard_connection(self) -> None:
        try:
            if self._pooled:
                self._db.manual_close()  # type: ignore[attr-defined]
            else:
                self._db.close()
        except Exception:  # the connection is already unusable; forgetting it is the point
            logger.debug("discarding a broken %s connection failed", self.backend, exc_info=True)

    def hold_connection(self) -> None:
        """Keep the calling thread's connection open between calls (a long-lived writer
        such as the group-commit flusher): otherwise every call checks a pooled
        connection out, pings it and returns it. A connection dropped after an error
        is replaced on the next call; :meth:`release_connection` gives it back."""
        if self._db.is_closed():
            self._db.connect()

    def release_connection(self) -> None:
        """Return the connection :meth:`hold_connection` kept (to the pool, if pooled)."""
        try:
            if not self._db.is_closed():
                self._db.close()
        except pw.DatabaseError as exc:
            logger.debug("releasing a %s connection failed: %s", self.backend, exc)

    def _txn(self) -> AbstractContextManager[Any]:
        if self.backend == "sqlite":
            return cast(AbstractContextManager[Any], self._db.atomic("IMMEDIATE"))
        return cast(AbstractContextManager[Any], self._db.atomic())

    def _locked(self, query: Any) -> Any:
        return query if self.backend == "sqlite" else query.for_update()

    def _batched(
        self,
        model: type[pw.Model],
        build: Callable[[], pw.Query],
        where: pw.Expression,
        batch_size: int,
        dry_run: bool = False,
    ) -> int:
        """Run an UPDATE/DELETE over the rows matching ``where`` in batches of ``batch_size``,
        each batch in its own transaction, until a batch affects fewer rows.

        ``dry_run`` only counts the matching rows (in the database)."""
        if dry_run:
            return int(model.select().where(where).count())
        pk = model._meta.primary_key
        if isinstance(pk, pw.CompositeKey):
            key: Any = pw.Tuple(*[model._meta.fields[name] for name in pk.field_names])
            key_select = [model._meta.fields[name] for name in pk.field_names]
        else:
            key, key_select = pk, [pk]
        total = 0
        while True:
            query = build()
            if self.backend == "mysql":
                query = query.where(where).limit(batch_size)
            else:
                query = query.where(key.in_(model.select(*key_select).where(where).limit(batch_size)))
            with self._db.atomic():
                count = int(query.execute())
            total += count
            if count < batch_size:
                return total
