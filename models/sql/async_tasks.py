"""A new task's ``INSERT`` from asyncio code without a thread hop (PostgreSQL, asyncpg).

``tools/call`` -> task handle is one committed insert and one enqueue. Through the
store's Peewee connection that insert has to run in a worker thread, and handing it
there and back costs two thread wake-ups, as much as the insert's own round trip on a
busy host (ops/bench T1). :class:`AsyncTaskInsert` sends the same statement with the
same column values (the store's own, sealed at rest when it seals) through asyncpg on the caller's event
loop (asyncpg prepares it once per connection): one autocommitted statement, committed when the call returns, exactly as
:meth:`~sessionq.models.tasks.TaskStore.create_task` is.

It is used only where it connects exactly as the store does: a
``PooledPostgresqlDatabase`` whose connect parameters it understands (host, port,
user, password, connect timeout, ``-c`` server settings, ``sslmode``) and asyncpg
installed (the ``mcp`` extra); elsewhere :func:`async_task_insert` answers ``None``
and callers use the store from a thread.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

import peewee as pw

from ..errors import Conflict, StoreError, StoreUnavailable, ValidationError
from ..loop_connections import LoopConnections
from ..store import first_line
from ..tasks import McpTask

# psycopg2 connect parameters with an asyncpg equivalent (others: no async insert).
_KNOWN_PARAMS = frozenset({"host", "port", "user", "password", "connect_timeout", "options", "sslmode"})


def asyncpg_connect_args(db: pw.Database) -> dict[str, Any] | None:
    """asyncpg ``create_pool`` arguments that reach the database ``db`` reaches, as
    ``db`` does; ``None`` when some connect parameter has no sure equivalent."""
    params = dict(getattr(db, "connect_params", {}))
    if not isinstance(db, pw.PostgresqlDatabase) or set(params) - _KNOWN_PARAMS:
        return None
    args: dict[str, Any] = {"database": db.database}
    for name in ("host", "port", "user", "password"):
        if params.get(name) is not None:
            args[name] = params[name]
    if params.get("connect_timeout") is not None:
        args["timeout"] = float(params["connect_timeout"])
    if params.get("sslmode") is not None:
        args["ssl"] = params["sslmode"]
    settings: dict[str, str] = {}
    words = iter(shlex.split(params.get("options") or ""))
    for word in words:  # only "-c name=value" (or "-cname=value") settings
        setting = next(words, "") if word == "-c" else word.removeprefix("-c") if word.startswith("-c") else ""
        name, sep, value = setting.partition("=")
        if not (sep and name):
            return None
        settings[name] = value
    if settings:
        args["server_settings"] = settings
    return args


class AsyncTaskInsert:
    """``await insert(task)``: store a new task (one committed ``INSERT``) on the running
    event loop, over connections kept per loop (:class:`LoopConnections`). Errors map
    to the store's (a taken id is a :class:`Conflict`, an unreachable database
    :class:`StoreUnavailable`)."""

    def __init__(self, sql: str, values: Callable[[McpTask], list[Any]], connect: dict[str, Any]) -> None:
        self.sql = sql
        #: The statement's parameters for a task (the store's own, sealing included).
        self.values = values
        self.connect = connect
        self._conns: LoopConnections[Any] = LoopConnections(self._open, _terminate)

    async def __call__(self, task: McpTask) -> McpTask:
        """Insert ``task`` (version 0); return it once committed."""
        import asyncpg

        if task.version != 0:
            raise ValidationError("a new task starts at version 0")
        values = self.values(task)
        try:
            async with self._conns.lent() as conn:
                await conn.execute(self.sql, *values)
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise Conflict(f"integrity error: {first_line(exc)}") from exc
        except asyncpg.DataError as exc:
            raise ValidationError(f"value rejected by postgresql: {first_line(exc)}") from exc
        except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"postgresql unavailable: {first_line(exc)}") from exc
        except asyncpg.PostgresError as exc:
            raise StoreError(f"postgresql rejected a statement: {first_line(exc)}") from exc
        return task

    async def _open(self) -> Any:
        import asyncpg

        return await asyncpg.connect(**self.connect)

    def close(self) -> None:
        """Close the idle connections (each on its own loop)."""
        self._conns.close()


def _terminate(conn: Any) -> None:
    conn.terminate()


def async_task_insert(
    db: pw.Database, sql: str, values: Callable[[McpTask], list[Any]]
) -> AsyncTaskInsert | None:
    """The :class:`AsyncTaskInsert` of ``sql`` (an ``INSERT`` with ``$1``... taking
    ``values(task)``) on ``db``, or ``None`` where there is none (see the module docs)."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return None
    connect = asyncpg_connect_args(db)
    return None if connect is None else AsyncTaskInsert(sql, values, connect)
