"""The MCP app of the multi-replica tests: an ``MCPServer`` adopted with
:func:`sessionq.workers.mcp.adopt` from the environment's settings.

Served by ``python -m tests.replica_app --port N``; its tasks worker runs with
``sessionq worker --queues tasks --mcp-app tests.replica_app:server``. The server
name (the request-state audience and the bus channel) is
``SESSIONQ_TEST_SERVER_NAME``, so a test can run replicas under different names.
"""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import ElicitRequest, ElicitRequestFormParams, ElicitResult, InputRequiredResult
from starlette.requests import Request
from starlette.responses import JSONResponse

from sessionq.models import Settings
from sessionq.workers.mcp import TaskPolicy, adopt, request_session_id

server = MCPServer(os.environ.get("SESSIONQ_TEST_SERVER_NAME", "sessionq-replica-tests"))


@server.tool()
async def touch(uri: str, ctx: Context) -> int:
    """Publish ``ResourceUpdated(uri)``; answer this process's id."""
    await ctx.notify_resource_updated(uri)
    return os.getpid()


@server.tool()
async def touch_later(uri: str, ctx: Context) -> int:
    """:func:`touch` as a durable task: runs (and publishes) on a tasks worker."""
    await ctx.notify_resource_updated(uri)
    return os.getpid()


@server.tool()
async def whoami(ctx: Context) -> dict[str, object]:
    """This process and the request's session id (none at 2026-07-28)."""
    return {"pid": os.getpid(), "session_id": request_session_id(ctx)}


@server.tool()
async def ask(ctx: Context) -> str | InputRequiredResult:
    """Two rounds: ask a name (state sealed by the serving replica), then greet."""
    if ctx.request_state is None:
        schema = {"type": "object", "properties": {"v": {"type": "string"}}, "required": ["v"]}
        question = ElicitRequest(params=ElicitRequestFormParams(message="name?", requested_schema=schema))
        return InputRequiredResult(input_requests={"name": question}, request_state=f"asked-by-{os.getpid()}")
    answer = (ctx.input_responses or {})["name"]
    assert isinstance(answer, ElicitResult) and answer.content is not None
    return f"hello {answer.content['v']} ({ctx.request_state}, answered by {os.getpid()})"


@server.custom_route("/healthz", methods=["GET"])
async def healthz(request: Request) -> JSONResponse:
    """This replica's adoption health (ring fingerprints, bus) and pid."""
    return JSONResponse({"pid": os.getpid(), **request.app.state.sessionq.health()})


app = adopt(server, Settings.load(), tasks={"touch_later": TaskPolicy(mode="required", poll_interval_ms=50)},
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))


def main() -> None:
    """Serve the adopted app (SSE responses: listen streams need them)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("SESSIONQ_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
