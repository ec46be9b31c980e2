"""Idempotent ``tools/call`` across replicas: :class:`SessionqIdempotency`.

An opt-in ``mcp.server.extension.Extension`` (``io.sessionq/idempotency``): for the
tools it names (:class:`IdempotencyPolicy`), a call carrying
``_meta["io.sessionq/idempotencyKey"]`` — or any call of a tool marked
``repeat_safe``, keyed by a digest of (tool, canonical arguments) — runs once per
key and owner, on whichever replica claims the key first
(:meth:`Store.claim_idempotency`, an insert-if-absent). Duplicates, on any replica,
at the same time or later:

* get the first call's ``CallToolResult`` (tool errors included), or the **same task
  handle** when the tool became a task (list this extension *before*
  :class:`~sessionq.workers.mcp.tasks.SessionqTasks`, so it sees the handle and a
  retried call gets the same ``taskId``: issue 16's idempotent task creation);
* wait for a first call still running, polling the entry, up to
  ``SESSIONQ_IDEMPOTENCY_WAIT`` seconds (then ``-32001``: retry later);
* with other arguments (or for another tool) under the same key, get ``-32602``.

Only terminal outcomes are kept: a call that raised a protocol error, was cancelled
or asked for input (``InputRequiredResult``) releases its claim, so its retry runs.
Outcomes are replayed for ``SESSIONQ_IDEMPOTENCY_TTL`` seconds; a claimer that died
frees the key after ``SESSIONQ_IDEMPOTENCY_CLAIM_TTL``. The ``handles`` sweep deletes
expired entries::

    idempotency = SessionqIdempotency.from_settings(settings, tools={"pay": IdempotencyPolicy()})
    server = MCPServer("shop", extensions=[idempotency, tasks])
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, REQUEST_TIMEOUT, CallToolRequestParams, CallToolResult

from sessionq.models.errors import NotFound
from sessionq.models.idempotency import MAX_IDEMPOTENCY_KEY, IdempotencyEntry, entry_id_for
from sessionq.models.records import utcnow
from sessionq.models.store import Store

from .tasks import owner_of, task_json

if TYPE_CHECKING:
    from sessionq.models.settings import Settings

#: The extension's identifier (advertised in ``server/discover``).
IDEMPOTENCY_EXTENSION = "io.sessionq/idempotency"
#: The ``_meta`` key carrying a client's idempotency key.
IDEMPOTENCY_KEY_META = "io.sessionq/idempotencyKey"
# First and longest pause (seconds) between looks at an entry still pending.
POLL_FIRST = 0.02
POLL_MAX = 0.5


@dataclass(frozen=True)
class IdempotencyPolicy:
    """How one tool is made idempotent: by the client's key only, or also, without
    one, by its arguments (``repeat_safe``: two calls with equal arguments are the
    same call). ``ttl``: seconds its outcome is replayed (``None``: the settings')."""

    repeat_safe: bool = False
    ttl: int | None = None


def args_digest(tool: str, arguments: Mapping[str, Any] | None) -> str:
    """sha256 (hex) of the canonical JSON of (tool, arguments): sorted keys, compact."""
    canonical = json.dumps({"tool": tool, "arguments": dict(arguments or {})}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class SessionqIdempotency(Extension):
    """The idempotency extension on the sessionq store (see the module docs)."""

    identifier = IDEMPOTENCY_EXTENSION

    def __init__(
        self,
        store: Store,
        *,
        tools: Mapping[str, IdempotencyPolicy],
        ttl: int = 86400,
        claim_ttl: int = 600,
        wait: float = 30.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.policies = dict(tools)
        self.ttl = ttl
        self.claim_ttl = claim_ttl
        self.wait = wait
        self.clock = clock

    @classmethod
    def from_settings(
        cls, settings: Settings, *, tools: Mapping[str, IdempotencyPolicy], store: Store | None = None
    ) -> SessionqIdempotency:
        """The extension on the configured store with the configured TTLs and wait."""
        from sessionq.models import open_store

        return cls(store or open_store(settings), tools=tools, ttl=settings.idempotency_ttl,
                   claim_ttl=settings.idempotency_claim_ttl, wait=settings.idempotency_wait)

    def key_of(self, params: CallToolRequestParams) -> str | None:
        """The call's idempotency key: the client's, else the argument digest of a
        repeat-safe tool, else ``None`` (the call is not deduplicated)."""
        policy = self.policies.get(params.name)
        if policy is None:
            return None
        meta = params.meta or {}
        key = meta.get(IDEMPOTENCY_KEY_META) if isinstance(meta, Mapping) else None
        if key is not None:
            if not isinstance(key, str) or not key or len(key) > MAX_IDEMPOTENCY_KEY:
                raise MCPError(code=INVALID_PARAMS, message=f"_meta[{IDEMPOTENCY_KEY_META!r}] must be a string of "
                                                            f"1 to {MAX_IDEMPOTENCY_KEY} characters")
            return key
        return "args:" + args_digest(params.name, params.arguments) if policy.repeat_safe else None

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """Run the call once per key and owner; replay its outcome to duplicates."""
        key = self.key_of(params)
        if key is None:
            return await call_next(ctx)
        owner = owner_of(ctx)
        digest = args_digest(params.name, params.arguments)
        entry_id = entry_id_for(owner, key)
        deadline = time.monotonic() + self.wait
        pause = POLL_FIRST
        stored: IdempotencyEntry | None = None
        while True:
            now = self.clock()
            if stored is None or stored.expires_at <= now:  # free, released, or its claimer died: claim it
                entry = IdempotencyEntry(entry_id=entry_id, key=key, owner=owner, tool=params.name,
                                         args_digest=digest, created_at=now,
                                         expires_at=now + timedelta(seconds=self.claim_ttl))
                claimed, mine = await anyio.to_thread.run_sync(self.store.claim_idempotency, entry, now)
                if mine:
                    return await self._run(claimed, params, ctx, call_next)
                stored = claimed
            if stored.args_digest != digest:
                raise MCPError(code=INVALID_PARAMS, message="this idempotency key was already used for another "
                                                            "call (other tool or arguments)")
            if stored.done:
                replay = await anyio.to_thread.run_sync(self._replay, stored)
                if replay is not None:
                    return replay
                stored = None  # its task is gone and the entry released: claim again
                continue
            if time.monotonic() >= deadline:
                raise MCPError(code=REQUEST_TIMEOUT, message="a call with this idempotency key is still running; "
                                                             "retry later")
            await anyio.sleep(pause)
            pause = min(pause * 2, POLL_MAX)
            stored = await anyio.to_thread.run_sync(self._load, entry_id)  # poll the entry

    def _load(self, entry_id: str) -> IdempotencyEntry | None:
        try:
            return self.store.load_idempotency(entry_id)
        except NotFound:
            return None

    async def _run(
        self, claim: IdempotencyEntry, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
    ) -> HandlerResult:
        finished = False
        try:
            result = await call_next(ctx)
            outcome = _terminal(result)
            if outcome is not None:
                policy = self.policies[params.name]
                ttl = self.ttl if policy.ttl is None else policy.ttl
                expires = self.clock() + timedelta(seconds=ttl)
                await anyio.to_thread.run_sync(lambda: self.store.finish_idempotency(claim, expires, **outcome))
                finished = True
            return result
        finally:
            if not finished:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.store.release_idempotency, claim)

    def _replay(self, entry: IdempotencyEntry) -> HandlerResult | None:
        """The recorded outcome; ``None`` (after releasing the entry) when it names a
        task that no longer exists."""
        if entry.result is not None:
            return CallToolResult.model_validate(entry.result)
        assert entry.task_id is not None
        task = self.store.get_task(entry.task_id, entry.owner, self.clock())
        if task is None:
            self.store.release_idempotency(entry)
            return None
        return {"resultType": "task", **task_json(task)}


def _terminal(result: Any) -> dict[str, Any] | None:
    """The outcome to record for a handler result: ``{"result": ...}`` for a
    ``CallToolResult``, ``{"task_id": ...}`` for a task handle, ``None`` otherwise."""
    if isinstance(result, CallToolResult):
        return {"result": result.model_dump(by_alias=True, mode="json", exclude_none=True)}
    if isinstance(result, Mapping) and result.get("resultType") == "task" and isinstance(result.get("taskId"), str):
        return {"task_id": result["taskId"]}
    return None

