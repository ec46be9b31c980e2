"""MCP tasks on MongoDB (a mixin of :class:`~sessionq.models.mongo.MongoStore`).

One document per task in ``sessionq_tasks`` (``_id`` = ``task_id``), written with
``w=majority`` and read from the primary, so a handle is durable before it is
returned and every replica's ``tasks/get`` sees it. Times are integer microseconds
(like every sessionq document); MCP payloads are JSON text, so their keys are never
field names. A state change is one ``update_one({_id, version}, {$set: ...})``
(:meth:`TaskStore._update_task`).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, WriteConcern
from pymongo.collection import Collection
from pymongo.database import Database

from ..errors import NotFound, ValidationError
from ..kinds import RecordKind
from ..store import DEFAULT_PAGE_SIZE, DEFAULT_SWEEP_BATCH_SIZE, Page
from ..tasks import McpTask, TaskStats
from . import schema as ms
from .database import Doc, MongoStoreBase, translate_errors
from .kinds import _Layout
from .schema import from_us, opt_us, to_us

COLLECTION = ms.TASKS
_JSON_FIELDS = ("arguments", "result", "error", "input_requests", "input_keys", "input_responses")
_TIME_FIELDS = ("lease_until", "cancel_requested_at", "created_at", "updated_at", "expires_at")


def _encode(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _JSON_FIELDS:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if name in _TIME_FIELDS:
        return opt_us(value)
    return value


def task_doc(task: McpTask) -> Doc:
    """A task as its document (``_id`` = ``task_id``)."""
    doc = {f.name: _encode(f.name, getattr(task, f.name)) for f in dataclasses.fields(task)}
    doc["_id"] = doc.pop("task_id")
    return doc


def doc_to_task(doc: Doc) -> McpTask:
    """The inverse of :func:`task_doc`."""
    fields: dict[str, Any] = {k: v for k, v in doc.items() if k != "_id"}
    for name in _JSON_FIELDS:
        if fields.get(name) is not None:
            fields[name] = json.loads(fields[name])
    for name in _TIME_FIELDS:
        fields[name] = from_us(fields.get(name))
    return McpTask(task_id=doc["_id"], **fields)


def create_task_indexes(db: Database[Any]) -> None:
    """Schema step: the indexes of the tasks collection (idempotent)."""
    db[COLLECTION].create_index([("status", ASCENDING), ("lease_until", ASCENDING)], name="status_lease")
    db[COLLECTION].create_index([("status", ASCENDING), ("created_at", ASCENDING)], name="status_created")
    db[COLLECTION].create_index([("expires_at", ASCENDING)], name="expires_at")


_LAYOUT = _Layout(COLLECTION, ("_id",), ("version",), task_doc, doc_to_task)


class MongoTasks(MongoStoreBase):
    """The task primitives of :class:`~sessionq.models.tasks.TaskStore` on MongoDB, a part
    of :class:`~sessionq.models.mongo.MongoStore`."""

    @property
    def _tasks(self) -> Collection[Doc]:
        return self._db.get_collection(COLLECTION, write_concern=WriteConcern("majority"))

    @translate_errors
    def _insert_task(self, task: McpTask) -> None:
        """See :meth:`TaskStore._insert_task` (a taken id is a Conflict)."""
        self._tasks.insert_one(task_doc(task))

    @translate_errors
    def load_task(self, task_id: str) -> McpTask:
        """See :meth:`TaskStore.load_task`."""
        doc = self._tasks.find_one({"_id": task_id})
        if doc is None:
            raise NotFound(f"task {task_id!r} does not exist")
        return doc_to_task(doc)

    @translate_errors
    def _update_task(self, task_id: str, expected_version: int, changes: dict[str, Any]) -> bool:
        """See :meth:`TaskStore._update_task`."""
        update = {name: _encode(name, value) for name, value in changes.items()}
        result = self._tasks.update_one({"_id": task_id, "version": expected_version}, {"$set": update})
        return result.matched_count == 1

    @translate_errors
    def list_tasks(
        self, *, status: str | None = None, limit: int = DEFAULT_PAGE_SIZE, cursor: str | None = None
    ) -> Page[McpTask]:
        """See :meth:`TaskStore.list_tasks`."""
        if limit < 1:
            raise ValidationError("limit must be at least 1")
        query: Doc = {}
        if status is not None:
            query["status"] = status
        if cursor is not None:
            query["_id"] = {"$gt": cursor}
        docs = list(self._tasks.find(query).sort("_id", ASCENDING).limit(limit + 1))
        items = [doc_to_task(doc) for doc in docs[:limit]]
        return Page(items, items[-1].task_id if len(docs) > limit else None)

    @translate_errors
    def stale_tasks(self, now: datetime, *, limit: int = 1000) -> list[McpTask]:
        """See :meth:`TaskStore.stale_tasks`."""
        query = {"status": "working", "lease_until": {"$ne": None, "$lte": to_us(now)}}
        return [doc_to_task(doc) for doc in self._tasks.find(query).sort("lease_until", ASCENDING).limit(limit)]

    @translate_errors
    def delete_expired_tasks(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`TaskStore.delete_expired_tasks`."""
        query = {"expires_at": {"$ne": None, "$lte": to_us(now)}}
        return int(self._delete_batched(self._tasks, query, batch_size, dry_run))  # type: ignore[attr-defined]

    @translate_errors
    def task_stats(self, now: datetime) -> TaskStats:
        """See :meth:`TaskStore.task_stats`."""
        groups = self._tasks.aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}])
        by_status = {g["_id"]: int(g["n"]) for g in groups}
        oldest = self._tasks.find_one(
            {"status": "working"}, sort=[("created_at", ASCENDING)], projection={"created_at": 1}
        )
        stale = self._tasks.count_documents({"status": "working", "lease_until": {"$ne": None, "$lte": to_us(now)}})
        age = 0.0
        if oldest is not None:
            created = from_us(oldest["created_at"])
            assert created is not None
            age = max(0.0, (now - created).total_seconds())
        return TaskStats(by_status, age, int(stale))

    # -- the tasks kind in bulk operations --------------

    def _layout(self, kind: RecordKind[Any]) -> tuple[_Layout, Collection[Doc]]:
        if kind.plural == "tasks":
            return _LAYOUT, self._tasks
        return super()._layout(kind)  # type: ignore[misc]
