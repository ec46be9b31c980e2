"""MCP tasks on the SQL backends (a mixin of :class:`~sessionq.models.sql.SqlStore`).

One table, ``sessionq_tasks``, keyed by ``task_id``. MCP payloads (arguments, the
tool result, input requests and responses) are opaque JSON kept as text on every
dialect: they are never queried, and text keeps them byte for byte. A state change
is one ``UPDATE ... WHERE task_id = ? AND version = ?`` of the changed columns
(:meth:`TaskStore._update_task`); the sweeps are set-based like the others.

The three statements on the request path — the insert, the primary-key read and the
compare-and-set update — are written as SQL text once per store (values still go
through each field's ``db_value`` / ``python_value``): Peewee's query compilation cost
about 350 µs per statement, more than the statement itself on PostgreSQL (a 250 µs
round trip), which put ``tools/call`` -> handle at 2.4x the inline call and
``tasks/get`` at 5x a raw SELECT (ops/bench T1, T3).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import peewee as pw

from ..errors import NotFound, ValidationError
from ..kinds import RecordKind
from ..sealing import is_sealed, open_task_values, seal_task_values
from ..store import DEFAULT_PAGE_SIZE, DEFAULT_SWEEP_BATCH_SIZE, Page
from ..tasks import McpTask, TaskStats
from .async_tasks import AsyncTaskInsert, async_task_insert
from .database import SqlStoreBase, translate_errors
from .schema import UTCDateTimeField

TABLE = "sessionq_tasks"
_JSON_FIELDS = ("arguments", "result", "error", "input_requests", "input_keys", "input_responses")


class JsonTextField(pw.TextField):
    """Opaque JSON as compact text (``LONGTEXT`` on MySQL)."""

    def db_value(self, value: Any) -> Any:
        """Serialise to compact JSON text (a value sealed at rest is that text already)."""
        if value is None or is_sealed(value):
            return value
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    def python_value(self, value: Any) -> Any:
        """Parse the JSON text back (a value sealed at rest stays as it is, for the store to open)."""
        if value is None or is_sealed(value):
            return value
        return json.loads(value)


def dialect_of(db: pw.Database) -> str:
    """``sqlite``, ``postgresql`` or ``mysql`` for a Peewee database."""
    if isinstance(db, pw.PostgresqlDatabase):
        return "postgresql"
    if isinstance(db, pw.MySQLDatabase):
        return "mysql"
    return "sqlite"


def build_task_model(db: pw.Database, dialect: str) -> Any:
    """The ``sessionq_tasks`` model bound to ``db`` (built per store, like :func:`build_models`)."""
    collation = "utf8mb4_bin" if dialect == "mysql" else None

    def dt(**kwargs: Any) -> UTCDateTimeField:
        return UTCDateTimeField(dialect, **kwargs)

    def ident(**kwargs: Any) -> pw.CharField:
        return pw.CharField(max_length=255, collation=collation, **kwargs)

    class Task(pw.Model):
        task_id = ident(primary_key=True)
        tool = pw.CharField(max_length=255)
        owner = ident(null=True)
        arguments = JsonTextField()
        status = pw.CharField(max_length=16)
        status_message = pw.TextField(null=True)
        result = JsonTextField(null=True)
        error = JsonTextField(null=True)
        input_requests = JsonTextField(null=True)
        input_keys = JsonTextField(null=True)
        input_responses = JsonTextField(null=True)
        request_state = pw.TextField(null=True)
        leg = pw.IntegerField()
        attempt = pw.IntegerField()
        max_attempts = pw.IntegerField()
        time_limit_ms = pw.BigIntegerField(null=True)
        poll_interval_ms = pw.BigIntegerField(null=True)
        worker_id = ident(null=True)
        lease_until = dt(null=True)
        cancel_requested_at = dt(null=True)
        created_at = dt()
        updated_at = dt()
        expires_at = dt(null=True, index=True)
        version = pw.BigIntegerField()

        class Meta:
            database = db
            table_name = TABLE
            indexes = ((("status", "lease_until"), False), (("status", "created_at"), False))

    return Task


def create_task_table(db: pw.Database) -> None:
    """Schema step: the tasks table and its indexes (idempotent)."""
    db.create_tables([build_task_model(db, dialect_of(db))], safe=True)


class SqlTasks(SqlStoreBase):
    """The task primitives of :class:`~sessionq.models.tasks.TaskStore` on SQL, a part
    of :class:`~sessionq.models.sql.SqlStore` (which calls :meth:`_init_tasks`)."""

    _async_insert: AsyncTaskInsert | None
    async_create: Callable[[McpTask], Awaitable[McpTask]] | None

    def _init_tasks(self) -> None:
        """Bind the tasks model and prepare the hot statements (text, not built per call)."""
        self.mt = build_task_model(self._db, self.backend)
        fields = self.mt._meta.sorted_fields
        quote = '"' if self.backend != "mysql" else "`"
        mark = self._db.param
        self._task_fields: list[pw.Field] = list(fields)
        self._task_quoted = {f.name: f"{quote}{f.column_name}{quote}" for f in fields}
        columns = ", ".join(self._task_quoted[f.name] for f in fields)
        table = f"{quote}{TABLE}{quote}"
        insert = f"INSERT INTO {table} ({columns}) VALUES "
        self._task_sql = {
            "insert": f"{insert}({', '.join([mark] * len(fields))})",
            "select": f"SELECT {columns} FROM {table} WHERE {self._task_quoted['task_id']} = {mark}",
            "update": f"UPDATE {table} SET {{}} WHERE {self._task_quoted['task_id']} = {mark} "
                      f"AND {self._task_quoted['version']} = {mark}",
        }
        numbered = f"{insert}({', '.join(f'${i}' for i in range(1, len(fields) + 1))})"
        self._async_insert = self.async_create = async_task_insert(self._db, numbered, self._task_values)

    def _to_task(self, row: dict[str, Any]) -> McpTask:
        return McpTask(**open_task_values(self.sealer, row["task_id"], row))

    @translate_errors
    def _insert_task(self, task: McpTask) -> None:
        """See :meth:`TaskStore._insert_task` (a taken id is a Conflict)."""
        self._db.execute_sql(self._task_sql["insert"], self._task_values(task))

    def _task_values(self, task: McpTask) -> list[Any]:
        """The insert's parameters for ``task``, in column order, sealed at rest as configured."""
        sealed = seal_task_values(self.sealer, task.task_id, {f.name: getattr(task, f.name) for f in self._task_fields})
        return [f.db_value(sealed[f.name]) for f in self._task_fields]

    @translate_errors
    def load_task(self, task_id: str) -> McpTask:
        """See :meth:`TaskStore.load_task`."""
        row = self._db.execute_sql(self._task_sql["select"], (task_id,)).fetchone()
        if row is None:
            raise NotFound(f"task {task_id!r} does not exist")
        return self._to_task({f.name: f.python_value(v) for f, v in zip(self._task_fields, row, strict=True)})

    @translate_errors
    def _update_task(self, task_id: str, expected_version: int, changes: dict[str, Any]) -> bool:
        """See :meth:`TaskStore._update_task`."""
        fields = self.mt._meta.fields
        changes = seal_task_values(self.sealer, task_id, changes)
        assignments = ", ".join(f"{self._task_quoted[name]} = {self._db.param}" for name in changes)
        values = [fields[name].db_value(value) for name, value in changes.items()]
        sql = self._task_sql["update"].format(assignments)
        cursor = self._db.execute_sql(sql, [*values, task_id, expected_version])
        return int(cursor.rowcount) == 1

    @translate_errors
    def list_tasks(
        self, *, status: str | None = None, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None
    ) -> Page[McpTask]:
        """See :meth:`TaskStore.list_tasks`."""
        if limit < 1:
            raise ValidationError("limit must be at least 1")
        T = self.mt
        query = T.select()
        if status is not None:
            query = query.where(T.status == status)
        if cursor is not None:
            query = query.where(T.task_id > cursor)
        rows = list(query.order_by(T.task_id).limit(limit + 1).dicts())
        items = [self._to_task(row) for row in rows[:limit]]
        return Page(items, items[-1].task_id if len(rows) > limit else None)

    @translate_errors
    def stale_tasks(self, now: datetime, *, limit: int = 1000) -> list[McpTask]:
        """See :meth:`TaskStore.stale_tasks`."""
        T = self.mt
        query = T.select().where((T.status == "working") & (T.lease_until <= now)).order_by(T.lease_until).limit(limit)
        return [self._to_task(row) for row in query.dicts()]

    @translate_errors
    def delete_expired_tasks(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`TaskStore.delete_expired_tasks`."""
        T = self.mt
        return self._batched(T, T.delete, T.expires_at <= now, batch_size, dry_run)

    @translate_errors
    def task_stats(self, now: datetime) -> TaskStats:
        """See :meth:`TaskStore.task_stats`."""
        T = self.mt
        by_status = {k: int(v) for k, v in T.select(T.status, pw.fn.COUNT(T.task_id)).group_by(T.status).tuples()}
        oldest = T.select(pw.fn.MIN(T.created_at)).where(T.status == "working").scalar()
        if isinstance(oldest, str | datetime):
            oldest = T.created_at.python_value(oldest)
        stale = T.select().where((T.status == "working") & (T.lease_until <= now)).count()
        age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        return TaskStats(by_status, age, int(stale))

    # -- the tasks kind in bulk operations --------------

    def _kind_model(self, kind: RecordKind[Any]) -> Any:
        if kind.plural == "tasks":
            return self.mt
        return super()._kind_model(kind)  # type: ignore[misc]
