"""An MCP server whose sessions survive restarts, whose long tool runs as a durable
task, whose basket lives in a state handle and whose retried calls run once: the
sessionq integration end to end, for both protocol generations, adopted with one call
(:func:`sessionq.workers.mcp.adopt`).

    python ops/example_server.py --port 8765                       # SQLite, everything in-process
    REDIS_URL=redis://127.0.0.1:6379/0 python ops/example_server.py --port 8765
    REDIS_URL=... sessionq worker --queues tasks --mcp-app ops.example_server:server

Any number of replicas may serve it behind a round-robin balancer (``ops/compose.yaml``
runs two): give them one ``SESSIONQ_REQUEST_STATE_KEYS`` (``sessionq keys generate``)
and one Redis, and a 2026-07-28 client's listen streams and multi-round-trip retries
work whichever replica each request reaches.

Settings come from the environment like every sessionq component (``STORAGE_URL``,
``REDIS_URL``, ``SESSION_TTL``, ``MAX_EVENTS_PER_SESSION``, ``SESSION_COMPRESSION``,
``SESSIONQ_GRACE_MINUTES``, ``SESSIONQ_MAX_RECOVERY_ATTEMPTS``, ``SESSIONQ_TASK_*``...).
With ``REDIS_URL`` the event log is on Redis Streams and the ``render`` task runs on a
tasks worker (the third line), otherwise the log is in the store and ``render`` runs
in this process. Kill it, start it again on the same port: 2025-11-25 clients keep
their session id and carry on, 2026-07-28 clients keep polling their tasks and
adding to their baskets (``create_basket`` -> ``basket_id``, ``add_item``), on any
replica. ``render`` and ``add_item`` are idempotent: a call carrying
``_meta["io.sessionq/idempotencyKey"]`` runs once per key (a retried ``render`` gets
the same task).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, cast

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse

# Runnable as a plain script from a checkout (the package is not installed there).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sessionq.models import Conflict, Settings, Store, open_store
from sessionq.workers.mcp import (
    RecoverableSessionManager,
    RedisEventStore,
    SessionRegistry,
    StoreEventStore,
    TaskPolicy,
    adopt,
    adopt_server,
    current_task,
    request_session_id,
)
from sessionq.workers.mcp.handles import HandleKind, HandleStore
from sessionq.workers.mcp.idempotency import IdempotencyPolicy

logger = logging.getLogger("sessionq.example")

#: The tools that run as durable tasks for 2026-07-28 clients declaring the extension.
TASK_TOOLS = {"render": TaskPolicy(mode="optional", ttl_ms=3_600_000, poll_interval_ms=500, max_attempts=3)}
#: The tools a client's idempotency key deduplicates.
IDEMPOTENT_TOOLS = {"render": IdempotencyPolicy(), "add_item": IdempotencyPolicy()}
#: The basket: a state handle (SEP-2567) that expires after 24 h idle.
BASKET = HandleKind("basket", "bsk", create_tool="create_basket", idle_ttl=24 * 3600)


def build_server(
    settings: Settings, store: Store, *, via_queue: bool = False
) -> tuple[MCPServer, SessionRegistry, list[RecoverableSessionManager]]:
    """The MCPServer with its tools, its session registry, and the list its session
    manager is added to once the app is built."""
    registry = SessionRegistry.from_settings(store, settings, via_queue=via_queue)
    handles = HandleStore.from_settings(settings, store=store)
    server = MCPServer("sessionq-example")
    managers: list[RecoverableSessionManager] = []

    @server.tool()
    async def whoami(ctx: Context) -> dict[str, Any]:
        """This session's id, the serving process and whether this process recovered it."""
        session_id = request_session_id(ctx)
        recovered = managers[0].recovered_sessions.get(session_id or "") if managers else None
        return {
            "session_id": session_id,
            "pid": os.getpid(),
            "recovered": recovered is not None,
            "recovery_attempts": recovered.recovery_attempts if recovered else 0,
        }

    @server.tool()
    async def countdown(n: int, ctx: Context, drop_stream: bool = False, pause: float = 0.0) -> str:
        """Log ``tick 1..n``, ``pause`` seconds apart; with ``drop_stream`` close the SSE
        stream first (the client resumes with Last-Event-ID and gets every tick from the log)."""
        if drop_stream:
            await ctx.close_sse_stream()
        for i in range(1, n + 1):
            await ctx.info(f"tick {i}")
            await anyio.sleep(pause)
        return f"done {n}"

    @server.tool()
    async def remember(key: str, value: str, ctx: Context) -> str:
        """Keep a value in this session's agent state (survives restarts)."""
        await registry.put_agent_state(request_session_id(ctx) or "anonymous", key, value,
                                       mcp_session_id=request_session_id(ctx))
        return "ok"

    @server.tool()
    async def recall(key: str, ctx: Context) -> str:
        """A value :func:`remember` kept, or an empty string."""
        return str(await registry.get_agent_state(request_session_id(ctx) or "anonymous", key, ""))

    @server.tool()
    async def render(frames: int = 10, seconds_per_frame: float = 1.0) -> dict[str, Any]:
        """Render ``frames`` frames, slowly: a durable task for 2026-07-28 clients that
        declared the Tasks extension (poll it from any replica), inline for the others."""
        task = current_task()
        for frame in range(1, frames + 1):
            await anyio.sleep(seconds_per_frame)
            if task is not None:
                await task.set_status(f"frame {frame} of {frames}")
        return {"frames": frames, "attempt": task.attempt if task else 0, "pid": os.getpid()}

    @server.tool(description="Start an empty basket; it expires after 24 h idle. Returns its basket_id.")
    async def create_basket(ctx: Context) -> dict[str, str]:
        """A new basket of the caller (a state handle, served by any replica)."""
        return {"basket_id": (await handles.acreate(ctx, BASKET, {"items": []})).handle_id}

    @server.tool()
    async def add_item(basket_id: str, sku: str, ctx: Context) -> dict[str, Any]:
        """Add ``sku`` to the caller's basket; its items. An unknown, expired or revoked
        basket is a tool error naming ``create_basket``."""
        while True:
            basket = await handles.arequire(ctx, BASKET, basket_id)
            try:
                updated = await handles.aupdate(ctx, basket, {"items": [*basket.data["items"], sku]})
            except Conflict:  # another call changed it since it was read
                continue
            return {"basket_id": basket_id, "items": updated.data["items"]}

    return server, registry, managers


def build_app(
    settings: Settings, *, retry_ms: int | None = None, event_log: str = "auto", via_queue: bool = False
) -> Any:
    """The Starlette app: the MCPServer adopted for both protocol generations (recoverable
    sessions, resumable streams; durable tasks, the event bus, the request-state ring)."""
    store = open_store(settings)
    store.upgrade()
    server, registry, managers = build_server(settings, store, via_queue=via_queue)
    use_redis = event_log == "redis" or (event_log == "auto" and settings.redis_url)
    event_store = RedisEventStore.from_settings(settings) if use_redis else StoreEventStore(store)

    @server.custom_route("/healthz", methods=["GET"])
    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"event_store": event_store.mode, "pid": os.getpid(),
                             **request.app.state.sessionq.health()})

    app = adopt(server, settings, tasks=TASK_TOOLS, idempotent=IDEMPOTENT_TOOLS, store=store, registry=registry,
                event_store=event_store, retry_interval=retry_ms)
    managers.append(cast(RecoverableSessionManager, server.session_manager))
    return app


_worker_server: MCPServer | None = None


def __getattr__(name: str) -> Any:
    """``server``: the MCPServer built from the environment's settings, for
    ``sessionq worker --queues tasks --mcp-app ops.example_server:server`` (built on
    first access, so importing this module opens nothing)."""
    global _worker_server
    if name != "server":
        raise AttributeError(name)
    if _worker_server is None:
        settings = Settings.load()
        store = open_store(settings)
        _worker_server = build_server(settings, store)[0]
        # Its bus too: a tool running as a task publishes events.
        adopt_server(_worker_server, settings, tasks=TASK_TOOLS, idempotent=IDEMPOTENT_TOOLS, store=store)
    return _worker_server


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, build the app and serve it with uvicorn."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--storage-url", default=None, help="overrides STORAGE_URL")
    parser.add_argument("--redis-url", default=None, help="overrides REDIS_URL")
    parser.add_argument("--retry-ms", type=int, default=None, help="SSE retry hint sent to clients")
    parser.add_argument("--event-log", choices=("auto", "redis", "store"), default="auto")
    parser.add_argument("--via-queue", action="store_true",
                        help="send heartbeats/disconnects as jobs (needs REDIS_URL and `sessionq worker`)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("SESSIONQ_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.load(storage_url=args.storage_url, redis_url=args.redis_url)
    app = build_app(settings, retry_ms=args.retry_ms, event_log=args.event_log, via_queue=args.via_queue)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
