"""The MongoDB backend, on standard PyMongo calls only (a real ``mongod`` or SecantusDB).

:class:`MongoStore` is composed of :class:`~.records.MongoRecords` (sessions and
messages) and :class:`~.kinds.MongoKinds` (files, transport sessions, agent state),
both on :class:`~.database.MongoStoreBase`; this module adds the constructor, the
schema lifecycle, the MCP event log, the sweeps and statistics. Sweeps find a bounded
batch of ``_id`` values and update or delete exactly those, so each statement is
bounded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from pymongo import ASCENDING, DESCENDING, MongoClient, ReturnDocument
from pymongo.collection import Collection

from ..kinds import DEFAULT_IMPORT_CHUNK
from ..records import DEFAULT_GRACE_PERIOD, StreamEvent
from ..sealing import identity
from ..settings import redact_url
from ..store import DEFAULT_SWEEP_BATCH_SIZE, Store, StoreStats, chunked
from . import schema as ms
from .database import (
    DEFAULT_DATABASE,
    DEFAULT_MAX_POOL_SIZE,
    DEFAULT_MIN_POOL_SIZE,
    Doc,
    open_client,
    translate_errors,
)
from .erasure import MongoErasure
from .handles import MongoHandles
from .kinds import MongoKinds
from .records import MongoRecords
from .schema import from_us, to_us
from .tasks import MongoTasks

logger = logging.getLogger(__name__)

# The counter document that hands out event ids.
EVENT_COUNTER = "event_id"


class MongoStore(MongoErasure, MongoHandles, MongoTasks, MongoRecords, MongoKinds, Store):
    """A :class:`~sessionq.models.store.Store` on MongoDB.

    Pass a URL (``mongodb://host/db?retryWrites=false``) or a ready ``client`` (and
    optionally the ``database`` name; the default is the URL's, else ``sessionq``).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: MongoClient[Doc] | None = None,
        database: str | None = None,
        max_pool_size: int = DEFAULT_MAX_POOL_SIZE,
        min_pool_size: int = DEFAULT_MIN_POOL_SIZE,
    ) -> None:
        self._owns_client = client is None
        if client is None:
            if url is None:
                raise ValueError("MongoStore needs a url or a client")
            client = open_client(url, max_pool_size=max_pool_size, min_pool_size=min_pool_size)
        self._client = client
        self._db = client[database] if database else client.get_default_database(default=DEFAULT_DATABASE)
        self.location = redact_url(url) if url else f"mongodb database {self._db.name!r}"
        self._sessions = self._db[ms.SESSIONS]
        self._messages = self._db[ms.MESSAGES]
        self._files = self._db[ms.FILES]
        self._transports = self._db[ms.TRANSPORTS]
        self._agent = self._db[ms.AGENT_STATE]
        self._events = self._db[ms.EVENTS]
        self._counters = self._db[ms.COUNTERS]

    # -- lifecycle -------------------------------------------------------------

    @translate_errors
    def upgrade(self, target: int | None = None) -> list[int]:
        """See :meth:`Store.upgrade`."""
        return ms.upgrade(self._db, target)

    @translate_errors
    def schema_version(self) -> int:
        """See :meth:`Store.schema_version`."""
        return ms.current_version(self._db)

    def latest_schema_version(self) -> int:
        """See :meth:`Store.latest_schema_version`."""
        return ms.LATEST_VERSION

    @translate_errors
    def ping(self) -> None:
        """See :meth:`Store.ping`."""
        self._client.admin.command("ping")

    def close(self) -> None:
        """See :meth:`Store.close` (a client passed in is left open)."""
        if self._owns_client:
            self._client.close()

    @translate_errors
    def clear(self) -> None:
        """See :meth:`Store.clear` (every data collection is emptied; indexes stay)."""
        for name in ms.DATA_COLLECTIONS:
            self._db[name].delete_many({})

    # -- MCP event log ---------------------------------------------------------------

    @translate_errors
    def append_event(
        self, mcp_session_id: str, stream_id: str, message: dict[str, Any] | None, created_at: datetime
    ) -> StreamEvent:
        """See :meth:`Store.append_event` (ids come from one counter document)."""
        probe = StreamEvent("0", mcp_session_id, stream_id, message, created_at)
        counter = self._counters.find_one_and_update(
            {"_id": EVENT_COUNTER}, {"$inc": {"n": 1}}, upsert=True, return_document=ReturnDocument.AFTER
        )
        assert counter is not None  # upsert=True with ReturnDocument.AFTER always returns the document
        event_id = int(counter["n"])
        # Stored as JSON text: MCP messages may hold keys such as "$schema".
        where = identity("event", mcp_session_id, stream_id)
        text = None if message is None else json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        body = None if text is None else self.sealer.seal(text, where)
        self._events.insert_one(
            {
                "_id": event_id,
                "mcp_session_id": mcp_session_id,
                "stream_id": stream_id,
                "message": body,
                "created_at": to_us(probe.created_at),
            }
        )
        return probe.replace(event_id=str(event_id))

    @translate_errors
    def events_after(
        self, mcp_session_id: str, event_id: str, *, limit: int = 10_000
    ) -> tuple[str, list[StreamEvent]] | None:
        """See :meth:`Store.events_after`."""
        if not event_id.isdigit():
            return None
        anchor = self._events.find_one({"_id": int(event_id), "mcp_session_id": mcp_session_id}, {"stream_id": 1})
        if anchor is None:
            return None
        stream_id = anchor["stream_id"]
        query = {"mcp_session_id": mcp_session_id, "stream_id": stream_id, "_id": {"$gt": int(event_id)}}
        events = [
            StreamEvent(
                event_id=str(doc["_id"]),
                mcp_session_id=doc["mcp_session_id"],
                stream_id=doc["stream_id"],
                message=None if doc.get("message") is None else json.loads(
                    self.sealer.open(doc["message"], identity("event", mcp_session_id, stream_id))),
                created_at=cast(datetime, from_us(doc["created_at"])),
            )
            for doc in self._events.find(query).sort("_id", ASCENDING).limit(limit)
        ]
        return stream_id, events

    @translate_errors
    def delete_events(self, mcp_session_ids: Sequence[str]) -> int:
        """See :meth:`Store.delete_events`."""
        deleted = 0
        for chunk in chunked(list(dict.fromkeys(mcp_session_ids)), DEFAULT_IMPORT_CHUNK):
            deleted += self._events.delete_many({"mcp_session_id": {"$in": list(chunk)}}).deleted_count
        return deleted

    # -- sweeps ------------------------------------------------------------------------

    @staticmethod
    def _batched(
        collection: Collection[Doc],
        query: Doc,
        action: Callable[[Doc, list[Any]], int],
        batch_size: int,
        dry_run: bool = False,
    ) -> int:
        """Apply ``action(filter, ids)`` to the documents matching ``query``, at most
        ``batch_size`` ``_id`` values at a time, until a batch comes back short.
        With ``dry_run`` only count the matching documents (in the database)."""
        if dry_run:
            return int(collection.count_documents(query))
        total = 0
        while True:
            ids = [doc["_id"] for doc in collection.find(query, {"_id": 1}).limit(batch_size)]
            if not ids:
                return total
            total += action({**query, "_id": {"$in": ids}}, ids)
            if len(ids) < batch_size:
                return total

    def _update_batched(
        self, collection: Collection[Doc], query: Doc, changes: Doc, batch_size: int, dry_run: bool = False
    ) -> int:
        return self._batched(
            collection,
            query,
            lambda f, _: collection.update_many(f, {"$set": changes}).modified_count,
            batch_size,
            dry_run,
        )

    def _delete_batched(self, collection: Collection[Doc], query: Doc, batch_size: int, dry_run: bool = False) -> int:
        return self._batched(
            collection, query, lambda f, _: collection.delete_many(f).deleted_count, batch_size, dry_run
        )

    @translate_errors
    def expire_idle_sessions(
        self, idle_before: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.expire_idle_sessions`."""
        query = {"status": "active", "updated_at": {"$lt": to_us(idle_before)}}
        return self._update_batched(self._sessions, query, {"status": "expired"}, batch_size, dry_run)

    @translate_errors
    def purge_expired_sessions(
        self, expired_before: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.purge_expired_sessions` (messages of the deleted sessions too)."""

        def purge(query: Doc, ids: list[Any]) -> int:
            deleted = self._sessions.delete_many(query).deleted_count
            # A session revived between the find and the delete keeps its messages.
            kept = {doc["_id"] for doc in self._sessions.find({"_id": {"$in": ids}}, {"_id": 1})}
            gone = [sid for sid in ids if sid not in kept]
            if gone:
                self._messages.delete_many({"session_id": {"$in": gone}})
            return int(deleted)

        query = {"status": "expired", "updated_at": {"$lt": to_us(expired_before)}}
        return self._batched(self._sessions, query, purge, batch_size, dry_run)

    @translate_errors
    def expire_transports(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.expire_transports`."""
        query = {"status": "disconnected", "grace_expires_at": {"$ne": None, "$lte": to_us(now)}}
        return self._update_batched(self._transports, query, {"status": "expired"}, batch_size, dry_run)

    @translate_errors
    def disconnect_stale_transports(
        self,
        heartbeat_before: datetime,
        now: datetime,
        grace: timedelta = DEFAULT_GRACE_PERIOD,
        *,
        batch_size: int = DEFAULT_SWEEP_BATCH_SIZE,
        dry_run: bool = False,
    ) -> int:
        """See :meth:`Store.disconnect_stale_transports`."""
        query = {"status": {"$in": ["active", "recovered"]}, "last_heartbeat": {"$lt": to_us(heartbeat_before)}}
        changes = {"status": "disconnected", "disconnected_at": to_us(now), "grace_expires_at": to_us(now + grace)}
        return self._update_batched(self._transports, query, changes, batch_size, dry_run)

    @translate_errors
    def delete_expired_files(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.delete_expired_files`."""
        return self._delete_batched(self._files, {"expires_at": {"$ne": None, "$lte": to_us(now)}}, batch_size, dry_run)

    @translate_errors
    def delete_expired_agent_state(
        self, now: datetime, *, batch_size: int = DEFAULT_SWEEP_BATCH_SIZE, dry_run: bool = False
    ) -> int:
        """See :meth:`Store.delete_expired_agent_state`."""
        return self._delete_batched(self._agent, {"expires_at": {"$ne": None, "$lte": to_us(now)}}, batch_size, dry_run)

    @translate_errors
    def trim_events(
        self,
        *,
        max_per_session: int,
        created_before: datetime,
        batch_size: int = DEFAULT_SWEEP_BATCH_SIZE,
        dry_run: bool = False,
    ) -> int:
        """See :meth:`Store.trim_events`."""
        cutoff = to_us(created_before)
        total = self._delete_batched(self._events, {"created_at": {"$lt": cutoff}}, batch_size, dry_run)
        # In a dry run the old events were only counted, so the cap applies to the rest.
        recent = [{"$match": {"created_at": {"$gte": cutoff}}}] if dry_run else []
        over = list(
            self._events.aggregate(
                [
                    *recent,
                    {"$group": {"_id": "$mcp_session_id", "n": {"$sum": 1}}},
                    {"$match": {"n": {"$gt": max_per_session}}},
                ]
            )
        )
        if dry_run:
            return total + sum(int(group["n"]) - max_per_session for group in over)
        for group in over:
            newest_dropped = list(
                self._events.find({"mcp_session_id": group["_id"]}, {"_id": 1})
                .sort("_id", DESCENDING)
                .skip(max_per_session)
                .limit(1)
            )
            if newest_dropped:
                query = {"mcp_session_id": group["_id"], "_id": {"$lte": newest_dropped[0]["_id"]}}
                total += self._delete_batched(self._events, query, batch_size)
        return total

    # -- statistics ------------------------------------------------------------------------

    @translate_errors
    def stats(self) -> StoreStats:
        """See :meth:`Store.stats`."""
        by_status: dict[str, int] = {}
        messages = 0
        for group in self._sessions.aggregate(
            [{"$group": {"_id": "$status", "n": {"$sum": 1}, "m": {"$sum": "$message_count"}}}]
        ):
            by_status[group["_id"]] = int(group["n"])
            messages += int(group["m"])
        transports = {
            g["_id"]: int(g["n"])
            for g in self._transports.aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}])
        }
        return StoreStats(
            sessions_by_status=by_status,
            total_messages=messages,
            total_files=self._files.count_documents({}),
            transports_by_status=transports,
            agent_states=self._agent.count_documents({}),
            stream_events=self._events.count_documents({}),
            tasks=self._tasks.count_documents({}),
            handles=self._handles.count_documents({}),
            idempotency_entries=self._idempotency.count_documents({}),
        )
