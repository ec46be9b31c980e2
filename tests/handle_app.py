"""The MCP app of the handle and idempotency tests: baskets (state handles) and
idempotent tools, with the bearer tokens of :mod:`tests.task_app` and
``SessionqIdempotency`` listed before ``SessionqTasks`` (so a retried task tool gets
the same task).

Replicas serve it with ``python -m tests.handle_app --port N``; workers run its task
tool with ``sessionq worker --queues tasks --mcp-app tests.handle_app:server``.
Executions are counted as lines appended to files the tests name (``marker``).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from pydantic import AnyHttpUrl
from starlette.requests import Request
from starlette.responses import JSONResponse

from sessionq.models import Conflict, Settings
from sessionq.workers.mcp.handles import HandleKind, HandleStore
from sessionq.workers.mcp.idempotency import IdempotencyPolicy, SessionqIdempotency
from sessionq.workers.mcp.tasks import SessionqTasks, TaskPolicy
from tests.task_app import Tokens

BASKET = HandleKind("basket", "bsk", create_tool="create_basket")
#: A kind that expires after one idle second (the expiry tests).
TICKET = HandleKind("ticket", "tkt", create_tool="create_ticket", idle_ttl=1)

settings = Settings.load()
tasks = SessionqTasks.from_settings(settings, tools={"render": TaskPolicy(mode="required", poll_interval_ms=50)})
idempotency = SessionqIdempotency.from_settings(
    settings, tools={"charge": IdempotencyPolicy(), "render": IdempotencyPolicy(), "lookup": IdempotencyPolicy(
        repeat_safe=True)}, store=tasks.store)
handles = HandleStore.from_settings(settings, store=tasks.store)
server = tasks.bind(MCPServer(
    "sessionq-handle-tests", extensions=[idempotency, tasks], token_verifier=Tokens(),
    auth=AuthSettings(issuer_url=AnyHttpUrl("http://127.0.0.1/"), resource_server_url=None),
))


def _count(marker: str) -> int:
    """Append one line to ``marker`` and return how many it holds (one per execution)."""
    with open(marker, "a") as out:
        out.write(f"{os.getpid()}\n")
    return len(Path(marker).read_text().splitlines())


@server.tool(description="Start an empty basket; it expires after 24 h idle. Returns its basket_id.")
async def create_basket(ctx: Context) -> dict[str, str]:
    """A new basket of the caller."""
    return {"basket_id": (await handles.acreate(ctx, BASKET, {"items": []})).handle_id}


@server.tool()
async def add_item(basket_id: str, sku: str, ctx: Context) -> int:
    """Add ``sku`` to the caller's basket; the number of items in it."""
    while True:
        basket = await handles.arequire(ctx, BASKET, basket_id)
        try:
            updated = await handles.aupdate(ctx, basket, {"items": [*basket.data["items"], sku]})
        except Conflict:
            continue  # another add came first: read again
        return len(updated.data["items"])


@server.tool()
async def drop_basket(basket_id: str, ctx: Context) -> bool:
    """Revoke the caller's basket."""
    return await handles.arevoke(ctx, basket_id)


@server.tool()
async def list_baskets(ctx: Context, cursor: str | None = None) -> dict[str, Any]:
    """A page of two of the caller's live baskets."""
    page = await handles.alist(ctx, BASKET, cursor=cursor, limit=2)
    return {"baskets": [h.handle_id for h in page.items], "next_cursor": page.next_cursor}


@server.tool()
async def create_ticket(ctx: Context) -> str:
    """A ticket that expires after one idle second."""
    return (await handles.acreate(ctx, TICKET)).handle_id


@server.tool()
async def use_ticket(ticket_id: str, ctx: Context) -> str:
    """Use a ticket (it must be live)."""
    return (await handles.arequire(ctx, TICKET, ticket_id)).handle_id


@server.tool()
async def charge(amount: int, marker: str) -> int:
    """Count one execution in ``marker`` (slowly, so duplicates overlap)."""
    count = _count(marker)
    await anyio.sleep(0.5)
    return count * 1000 + amount


@server.tool()
async def lookup(term: str, marker: str) -> str:
    """A repeat-safe tool: equal arguments are one call."""
    return f"{term}:{_count(marker)}"


@server.tool()
async def render(marker: str) -> str:
    """A task tool counting its executions."""
    return f"rendered {_count(marker)}"


@server.custom_route("/healthz", methods=["GET"])
async def healthz(request: Request) -> JSONResponse:
    """Liveness for the test harness."""
    return JSONResponse({"pid": os.getpid()})


def main() -> None:
    """Serve the app over streamable HTTP (JSON responses)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("SESSIONQ_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    uvicorn.run(server.streamable_http_app(json_response=True), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
