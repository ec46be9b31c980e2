"""State handles for MCP tools (SEP-2567) on the sessionq store.

A tool that starts state returns a handle; later calls, on any replica, pass it
back and :meth:`HandleStore.require` turns it into the live handle of the caller —
or a tool error that tells the model what to do instead::

    handles = HandleStore.from_settings(settings)
    BASKET = HandleKind("basket", "bsk", create_tool="create_basket")

    @server.tool(description="Start a basket (expires after 24 h idle).")
    async def create_basket(ctx: Context) -> dict[str, str]:
        return {"basket_id": (await handles.acreate(ctx, BASKET, {"items": []})).handle_id}

    @server.tool()
    async def add_item(basket_id: str, sku: str, ctx: Context) -> int:
        basket = await handles.arequire(ctx, BASKET, basket_id)
        ...

The owner of a handle is the caller's principal, derived exactly as for tasks
(:func:`sessionq.workers.mcp.tasks.owner_of`); another principal's handle is
"unknown", never "not yours". Expired and revoked handles are deleted by the
``handles`` sweep once ``SESSIONQ_HANDLE_RETENTION`` has passed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import anyio
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver.exceptions import ToolError

from sessionq.models.handles import OK, HandleLookup, StateHandle, new_handle_id
from sessionq.models.records import utcnow
from sessionq.models.store import Page, Store

from .tasks import owner_of

if TYPE_CHECKING:
    from sessionq.models.settings import Settings

#: A request context: the ``Context`` a tool receives, or the SDK's request context.
AnyContext = Any


@dataclass(frozen=True)
class HandleKind:
    """One kind of handle: its name (``basket``), id prefix (``bsk``), the tool that
    makes a new one (named in errors), and lifetimes in seconds (``None``: the
    settings' defaults, ``0``: none)."""

    name: str
    prefix: str
    create_tool: str
    ttl: int | None = None
    idle_ttl: int | None = None

    def __post_init__(self) -> None:
        if not self.prefix.isalnum() or not self.prefix.isascii():
            raise ValueError(f"HandleKind.prefix must be ASCII letters and digits, not {self.prefix!r}")


def owner_from(ctx: AnyContext) -> str | None:
    """The owner key of the caller of ``ctx`` (a tool's ``Context`` or a request context)."""
    if isinstance(ctx, _Owner):
        return ctx.owner
    return owner_of(cast(ServerRequestContext[Any, Any], getattr(ctx, "request_context", ctx)))


class HandleStore:
    """Create, read, update (compare-and-set), revoke and list the handles of the
    current principal; :meth:`require` for tools. Every method has an ``a``-prefixed
    async twin that runs the store call in a worker thread."""

    def __init__(self, store: Store, *, ttl: int = 0, idle_ttl: int = 0, clock: Callable[[], datetime] = utcnow):
        self.store = store
        self.ttl = ttl
        self.idle_ttl = idle_ttl
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, *, store: Store | None = None) -> HandleStore:
        """Handles on the configured store with the configured default lifetimes
        (``SESSIONQ_HANDLE_TTL``, ``SESSIONQ_HANDLE_IDLE_TTL``)."""
        from sessionq.models import open_store

        return cls(store or open_store(settings), ttl=settings.handle_ttl, idle_ttl=settings.handle_idle_ttl)

    def create(self, ctx: AnyContext, kind: HandleKind, data: dict[str, Any] | None = None) -> StateHandle:
        """A new handle of ``kind`` owned by the caller, holding ``data``."""
        now = self.clock()
        ttl = self.ttl if kind.ttl is None else kind.ttl
        idle = self.idle_ttl if kind.idle_ttl is None else kind.idle_ttl
        handle = StateHandle(handle_id=new_handle_id(kind.prefix), kind=kind.name, owner=owner_from(ctx),
                             data=data or {}, created_at=now, expires_at=now + timedelta(seconds=ttl) if ttl else None,
                             idle_ttl=idle or None)
        return self.store.create_handle(handle)

    def get(self, ctx: AnyContext, handle_id: str) -> HandleLookup:
        """``ok`` (with the handle), ``expired``, ``revoked`` or ``unknown`` (also
        for another principal's handle)."""
        return self.store.get_handle(handle_id, owner_from(ctx), self.clock())

    def require(self, ctx: AnyContext, kind: HandleKind, handle_id: str) -> StateHandle:
        """The caller's live handle of ``kind``, its idle deadline pushed out; else a
        ``ToolError`` naming what to call instead (``basket bsk_... has expired; call
        create_basket``)."""
        now = self.clock()
        lookup = self.store.get_handle(handle_id, owner_from(ctx), now)
        handle = lookup.handle
        if lookup.status != OK or handle is None or handle.kind != kind.name:
            status = "unknown" if lookup.status == OK else lookup.status
            what = {"unknown": "is unknown", "expired": "has expired", "revoked": "was revoked"}[status]
            raise ToolError(f"{kind.name} {_shown(handle_id)} {what}; call {kind.create_tool}")
        return self.store.touch_handle(handle, now)

    def update(self, ctx: AnyContext, handle: StateHandle, data: dict[str, Any]) -> StateHandle:
        """Replace the data of ``handle`` as read; ``Conflict`` when it changed since
        (read it again and retry), ``NotFound`` when it is no longer live."""
        return self.store.update_handle(handle.handle_id, owner_from(ctx), data, handle.version, self.clock())

    def revoke(self, ctx: AnyContext, handle_id: str) -> bool:
        """Revoke the caller's handle; False when it is unknown or already revoked."""
        return self.store.revoke_handle(handle_id, owner_from(ctx), self.clock())

    def list(self, ctx: AnyContext, kind: HandleKind | None = None, *, cursor: str | None = None,
             limit: int = 100) -> Page[StateHandle]:
        """A keyset page of the caller's live handles (of ``kind``, or all)."""
        return self.store.list_handles(owner_from(ctx), None if kind is None else kind.name, self.clock(),
                                       limit=limit, cursor=cursor)

    # -- async twins: the principal is read here, the store call runs in a thread -----

    async def acreate(self, ctx: AnyContext, kind: HandleKind, data: dict[str, Any] | None = None) -> StateHandle:
        """:meth:`create` off the event loop."""
        return await anyio.to_thread.run_sync(self.create, _Owner(ctx), kind, data)

    async def arequire(self, ctx: AnyContext, kind: HandleKind, handle_id: str) -> StateHandle:
        """:meth:`require` off the event loop."""
        return await anyio.to_thread.run_sync(self.require, _Owner(ctx), kind, handle_id)

    async def aupdate(self, ctx: AnyContext, handle: StateHandle, data: dict[str, Any]) -> StateHandle:
        """:meth:`update` off the event loop."""
        return await anyio.to_thread.run_sync(self.update, _Owner(ctx), handle, data)

    async def arevoke(self, ctx: AnyContext, handle_id: str) -> bool:
        """:meth:`revoke` off the event loop."""
        return await anyio.to_thread.run_sync(self.revoke, _Owner(ctx), handle_id)

    async def alist(self, ctx: AnyContext, kind: HandleKind | None = None, *, cursor: str | None = None,
                    limit: int = 100) -> Page[StateHandle]:
        """:meth:`list` off the event loop."""
        return await anyio.to_thread.run_sync(lambda: self.list(_Owner(ctx), kind, cursor=cursor, limit=limit))


class _Owner:
    """A context whose owner was read on the request's own task (the access token
    lives in a context variable that a worker thread may not see)."""

    def __init__(self, ctx: AnyContext) -> None:
        self.owner = owner_from(ctx)


def _shown(handle_id: str) -> str:
    """A handle id as an error quotes it (bounded: it is the caller's input)."""
    return handle_id if len(handle_id) <= 64 else handle_id[:61] + "..."
