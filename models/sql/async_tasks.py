"""A new task's ``INSERT`` from asyncio code without a thread hop (PostgreSQL, asyncpg).

``tools/call`` -> task handle is one committed insert and one enqueue. Through the
store's Peewee connection that insert has to run in a worker thread, and handing it
there and back costs two thread wake-ups, as much as the insert's own round trip on a
busy host (ops/bench T1). :class:`AsyncTaskInsert` sends the same statement with the
same column values (each field's ``db_value``) through asyncpg on the caller's event
loop: one autocommitted statement, committed when the call returns, exactly as
:meth:`~sessionq.models.tasks.TaskStore.create_task` is.

It is used only where it connects exactly as the store does: a
``PooledPostgresqlDatabase`` whose connect parameters it understands (host, port,
user, password, connect timeout, ``-c`` server settings, ``sslmode``) and asyncpg
installed (the ``mcp`` extra); elsewhere :func:`async_task_insert` answers ``None``
and callers use the store from a thread.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import weakref
from typing import Any

import peewee as pw

from ..errors import Conflict, StoreError, StoreUnavailable, ValidationError
from ..store import first_line
from ..tasks import McpTask

logger = logging.getLogger(__name__)

# Connections of one event loop's asyncpg pool (they are opened on demand).
DEFAULT_ASYNC_POOL_SIZE = 8
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
    event loop. One asyncpg pool per event loop, made on first use; errors map to the
    store's (a taken id is a :class:`Conflict`, an unreachable database
    :class:`StoreUnavailable`)."""

    def __init__(self, sql: str, fields: list[pw.Field], connect: dict[str, Any], *,
                 pool_size: int = DEFAULT_ASYNC_POOL_SIZE) -> None:
        self.sql = sql
        self.fields = fields
        self.connect = connect
        self.pool_size = pool_size
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[Any]] = (
            weakref.WeakKeyDictionary())

    async def __call__(self, task: McpTask) -> McpTask:
        """Insert ``task`` (version 0); return it once committed."""
        import asyncpg

        if task.version != 0:
            raise ValidationError("a new task starts at version 0")
        values = [f.db_value(getattr(task, f.name)) for f in self.fields]
        try:
            pool = await self._pool()
            await pool.execute(self.sql, *values)
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise Conflict(f"integrity error: {first_line(exc)}") from exc
        except asyncpg.DataError as exc:
            raise ValidationError(f"value rejected by postgresql: {first_line(exc)}") from exc
        except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"postgresql unavailable: {first_line(exc)}") from exc
        except asyncpg.PostgresError as exc:
            raise StoreError(f"postgresql rejected a statement: {first_line(exc)}") from exc
        return task

    async def _pool(self) -> Any:
        import asyncpg

        loop = asyncio.get_running_loop()
        made = self._pools.get(loop)
        if made is None:  # min_size=0: making the pool opens no connection, so it cannot fail
            made = self._pools[loop] = asyncio.ensure_future(
                asyncpg.create_pool(min_size=0, max_size=self.pool_size, **self.connect))
        return await asyncio.shield(made)

    def close(self) -> None:
        """Close every loop's pool (on its own loop when that runs in another thread)."""
        for loop, made in list(self._pools.items()):
            if loop.is_closed() or not made.done() or made.cancelled() or made.exception() is not None:
                continue
            pool = made.result()
            try:
                if loop.is_running() and _loop_of_this_thread() is not loop:
                    loop.call_soon_threadsafe(pool.terminate)
                else:
                    pool.terminate()
            except RuntimeError as exc:  # the loop stopped meanwhile: its connections went with it
                logger.debug("closing an asyncpg pool failed: %s", exc)
        self._pools.clear()


def _loop_of_this_thread() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def async_task_insert(db: pw.Database, sql: str, fields: list[pw.Field]) -> AsyncTaskInsert | None:
    """The :class:`AsyncTaskInsert` of ``sql`` (an ``INSERT`` with ``$1``... for
    ``fields``) on ``db``, or ``None`` where there is none (see the module docs)."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return None
    connect = asyncpg_connect_args(db)
    return None if connect is None else AsyncTaskInsert(sql, fields, connect)
