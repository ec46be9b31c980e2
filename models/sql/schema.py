"""Peewee models and schema migrations for the SQL backends.

Models are built per database by :func:`build_models` (as huey's ``sql_huey`` does),
so two stores never share a global database object. Timestamps are stored in UTC
with microseconds on every dialect (``TIMESTAMPTZ``, ``DATETIME(6)``, ISO text on
SQLite); metadata is JSONB on PostgreSQL, JSON on MySQL and JSON text on SQLite.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import peewee as pw
from playhouse.migrate import SchemaMigrator, migrate

logger = logging.getLogger(__name__)

# Column type used by :class:`UTCDateTimeField`, mapped per dialect in ``FIELD_TYPES``.
UTC_DATETIME = "UTCDATETIME"
FIELD_TYPES: dict[str, dict[str, str]] = {
    "sqlite": {UTC_DATETIME: "TEXT"},
    "postgresql": {UTC_DATETIME: "TIMESTAMPTZ"},
    "mysql": {UTC_DATETIME: "DATETIME(6)", "TEXT": "LONGTEXT"},
}
_SQLITE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


# The messages table's columns in the order COPY and the one-statement save write them.
MESSAGE_COLUMNS = ("session_id", "message_id", "seq", "role", "content", "created_at", "metadata")


class UTCDateTimeField(pw.Field):
    """A timezone-aware UTC datetime with microseconds on every dialect.

    SQLite stores fixed-width ISO text (so string order is time order), MySQL a naive
    UTC ``DATETIME(6)``, PostgreSQL a ``TIMESTAMPTZ``; reads always return aware UTC.
    """

    field_type = UTC_DATETIME

    def __init__(self, dialect: str, **kwargs: Any) -> None:
        self.dialect = dialect
        super().__init__(**kwargs)

    def db_value(self, value: Any) -> Any:
        """Convert an aware datetime to the dialect's representation."""
        if value is None or not isinstance(value, datetime):
            return value
        value = value.astimezone(UTC)
        if self.dialect == "sqlite":
            return value.strftime(_SQLITE_FORMAT)
        if self.dialect == "mysql":
            return value.replace(tzinfo=None)
        return value

    def python_value(self, value: Any) -> Any:
        """Convert a stored value back to an aware UTC datetime."""
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class JSONTextField(pw.TextField):
    """JSON kept as text in a ``JSON`` column, for MariaDB (which has no ``CAST(... AS JSON)``)."""

    field_type = "JSON"

    def db_value(self, value: Any) -> Any:
        """Serialise to compact JSON text."""
        return None if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    def python_value(self, value: Any) -> Any:
        """Parse JSON text back (drivers may already hand back parsed values)."""
        return json.loads(value) if isinstance(value, str | bytes) else value


@dataclass(frozen=True)
class Models:
    """The model classes bound to one database (typed ``Any``: they are built at run time)."""

    SchemaVersion: Any
    Session: Any
    Message: Any
    File: Any
    Transport: Any
    AgentState: Any
    Event: Any

    def all(self) -> list[Any]:
        """Every model, parents before children."""
        return [self.SchemaVersion, self.Session, self.Message, self.File, self.Transport, self.AgentState, self.Event]


def build_models(db: pw.Database, dialect: str) -> Models:
    """Create the model classes bound to ``db``."""

    def dt(**kwargs: Any) -> UTCDateTimeField:
        return UTCDateTimeField(dialect, **kwargs)

    # MySQL's default collations fold case, so ids "A" and "a" would collide there.
    collation = "utf8mb4_bin" if dialect == "mysql" else None

    def ident(**kwargs: Any) -> pw.CharField:
        return pw.CharField(max_length=255, collation=collation, **kwargs)

    def js(**kwargs: Any) -> pw.Field:
        return JSONTextField(**kwargs) if dialect == "mysql" else pw.JSONField(**kwargs)

    class Base(pw.Model):
        class Meta:
            database = db
            legacy_table_names = False

    class SchemaVersion(Base):
        version = pw.IntegerField(primary_key=True)
        description = pw.CharField(max_length=255)
        applied_at = dt()

        class Meta:
            table_name = "sessionq_schema"

    class Session(Base):
        session_id = ident(primary_key=True)
        model = pw.CharField(max_length=255, default="")
        status = pw.CharField(max_length=16, default="active")
        created_at = dt()
        updated_at = dt()
        metadata = js(default=dict)
        message_count = pw.IntegerField(default=0)

        class Meta:
            table_name = "sessionq_sessions"
            indexes = ((("status", "updated_at"), False),)

    class Message(Base):
        session = pw.ForeignKeyField(
            Session, column_name="session_id", on_delete="CASCADE", field="session_id", collation=collation
        )
        message_id = ident()
        seq = pw.IntegerField()
        role = pw.CharField(max_length=16)
        content = pw.TextField()
        created_at = dt()
        metadata = js(default=dict)

        class Meta:
            table_name = "sessionq_messages"
            primary_key = pw.CompositeKey("session", "message_id")
            indexes = ((("session", "seq"), True),)

    class File(Base):
        file_id = ident(primary_key=True)
        provider_name = pw.CharField(max_length=255)
        uri = pw.TextField()
        display_name = pw.TextField(default="")
        size = pw.BigIntegerField(default=0)
        mime_type = pw.CharField(max_length=255)
        uploaded_at = dt()
        expires_at = dt(null=True, index=True)
        metadata = js(default=dict)

        class Meta:
            table_name = "sessionq_files"

    class Transport(Base):
        mcp_session_id = ident(primary_key=True)
        status = pw.CharField(max_length=16, default="active")
        created_at = dt()
        last_heartbeat = dt()
        disconnected_at = dt(null=True)
        grace_expires_at = dt(null=True)
        recovery_attempts = pw.IntegerField(default=0)
        working_directory = pw.TextField(default="")
        transport_state = js(null=True)
        agent_context = js(null=True)
        conversation_state = js(null=True)
        metadata = js(default=dict)

        class Meta:
            table_name = "sessionq_transports"
            indexes = (
                (("status", "grace_expires_at"), False),
                (("status", "last_heartbeat"), False),
            )

    class AgentState(Base):
        agent_id = ident()
        key = ident()
        value = js(null=True)
        mcp_session_id = ident(null=True)
        updated_at = dt()
        expires_at = dt(null=True, index=True)

        class Meta:
            table_name = "sessionq_agent_state"
            primary_key = pw.CompositeKey("agent_id", "key")

    class Event(Base):
        id = pw.BigAutoField()
        mcp_session_id = ident()
        stream_id = ident()
        message = pw.TextField(null=True)
        created_at = dt(index=True)

        class Meta:
            table_name = "sessionq_events"
            indexes = ((("mcp_session_id", "stream_id", "id"), False),)

    return Models(SchemaVersion, Session, Message, File, Transport, AgentState, Event)


@dataclass(frozen=True)
class Migration:
    """One schema step: applied once, in version order, each in its own transaction
    where the dialect allows (MySQL commits DDL implicitly, so steps are idempotent)."""

    version: int
    description: str
    apply: Callable[[pw.Database, Models], None]


def _v1_core_tables(db: pw.Database, m: Models) -> None:
    db.create_tables([m.Session, m.Message, m.File, m.Transport, m.AgentState], safe=True)


def _v2_event_log(db: pw.Database, m: Models) -> None:
    db.create_tables([m.Event], safe=True)


def _v3_message_time_index(db: pw.Database, m: Models) -> None:
    migrator = SchemaMigrator.from_database(db)
    existing = {index.name for index in db.get_indexes(m.Message._meta.table_name)}
    if "sessionq_messages_created_at" not in existing:
        migrate(migrator.add_index(m.Message._meta.table_name, ("created_at",), False))


# Id columns per table, with whether they are nullable (MySQL needs the full definition).
_ID_COLUMNS = {
    "sessionq_sessions": [("session_id", False)],
    "sessionq_messages": [("session_id", False), ("message_id", False)],
    "sessionq_files": [("file_id", False)],
    "sessionq_transports": [("mcp_session_id", False)],
    "sessionq_agent_state": [("agent_id", False), ("key", False), ("mcp_session_id", True)],
    "sessionq_events": [("mcp_session_id", False), ("stream_id", False)],
}


def _v4_case_sensitive_ids(db: pw.Database, m: Models) -> None:
    if not isinstance(db, pw.MySQLDatabase):
        return
    # A column in a foreign key cannot change collation: drop the key, alter, re-add it.
    messages = m.Message._meta.table_name
    rows = db.execute_sql(
        "SELECT CONSTRAINT_NAME FROM information_schema.REFERENTIAL_CONSTRAINTS "
        "WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = %s",
        (messages,),
    ).fetchall()
    for (name,) in rows:
        db.execute_sql(f"ALTER TABLE `{messages}` DROP FOREIGN KEY `{name}`")
    for table, columns in _ID_COLUMNS.items():
        changes = ", ".join(
            f"MODIFY `{name}` VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin {'NULL' if null else 'NOT NULL'}"
            for name, null in columns
        )
        db.execute_sql(f"ALTER TABLE `{table}` {changes}")
    db.execute_sql(
        f"ALTER TABLE `{messages}` ADD CONSTRAINT `{messages}_session_fk` FOREIGN KEY (`session_id`) "
        f"REFERENCES `{m.Session._meta.table_name}` (`session_id`) ON DELETE CASCADE"
    )


def _v5_mcp_tasks(db: pw.Database, m: Models) -> None:
    from .tasks import create_task_table  # the tasks model lives beside the store part using it

    create_task_table(db)


def _v6_handles_idempotency(db: pw.Database, m: Models) -> None:
    from .handles import create_handle_tables  # the models live beside the store part using them

    create_handle_tables(db)


def _v7_erasure(db: pw.Database, m: Models) -> None:
    from .erasure import create_erasure_tables  # the models live beside the store part using them

    create_erasure_tables(db)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "sessions, messages, files, transport sessions, agent state", _v1_core_tables),
    Migration(2, "MCP event log", _v2_event_log),
    Migration(3, "index messages by created_at for export windows", _v3_message_time_index),
    Migration(4, "case-sensitive ids on MySQL/MariaDB (binary collation)", _v4_case_sensitive_ids),
    Migration(5, "MCP tasks (SEP-2663)", _v5_mcp_tasks),
    Migration(6, "MCP state handles (SEP-2567) and idempotency entries", _v6_handles_idempotency),
    Migration(7, "erasure tombstones and forget receipts", _v7_erasure),
)
LATEST_VERSION = MIGRATIONS[-1].version


def current_version(db: pw.Database, m: Models) -> int:
    """The highest applied version, 0 for a database without the version table."""
    if not db.table_exists(m.SchemaVersion._meta.table_name):
        return 0
    value = m.SchemaVersion.select(pw.fn.MAX(m.SchemaVersion.version)).scalar()
    return int(value or 0)


def upgrade(db: pw.Database, m: Models, target: int | None = None) -> list[int]:
    """Apply the pending migrations up to ``target``; return the versions applied."""
    target = LATEST_VERSION if target is None else target
    db.create_tables([m.SchemaVersion], safe=True)
    applied: list[int] = []
    for step in MIGRATIONS:
        if step.version > target:
            break
        with db.atomic():
            if m.SchemaVersion.get_or_none(m.SchemaVersion.version == step.version) is not None:
                continue
            logger.info("applying schema migration %d: %s", step.version, step.description)
            step.apply(db, m)
            m.SchemaVersion.insert(
                version=step.version, description=step.description, applied_at=datetime.now(UTC)
            ).on_conflict_ignore().execute()
            applied.append(step.version)
    return applied
