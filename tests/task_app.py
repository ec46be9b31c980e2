"""The MCP app of the task tests: an ``MCPServer`` with task tools, bearer tokens
``alice`` / ``bob`` (two principals) and :class:`SessionqTasks` from the environment
(``STORAGE_URL``, ``REDIS_URL``; without Redis the tasks run in-process).

Replicas serve it with ``python -m tests.task_app --port N``; workers run its tools
with ``sessionq worker --queues tasks --mcp-app tests.task_app:server``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import anyio
import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError
from mcp_types import ElicitRequest, ElicitRequestFormParams, ElicitResult, InputRequiredResult
from pydantic import AnyHttpUrl
from starlette.requests import Request
from starlette.responses import JSONResponse

from sessionq.models import Settings
from sessionq.workers.mcp.task_runner import current_task
from sessionq.workers.mcp.tasks import SessionqTasks, TaskPolicy

TOKENS = {"alice": "alice", "bob": "bob"}
FAST = 50  # pollIntervalMs of the test tools

POLICIES = {
    "echo": TaskPolicy(poll_interval_ms=FAST),
    "hold": TaskPolicy(mode="required", poll_interval_ms=FAST, max_attempts=2),
    "fragile": TaskPolicy(mode="required", poll_interval_ms=FAST, max_attempts=1),
    "brief": TaskPolicy(mode="required", poll_interval_ms=FAST, ttl_ms=1500),
    "broken": TaskPolicy(poll_interval_ms=FAST),
    "refuse": TaskPolicy(poll_interval_ms=FAST),
    "ask": TaskPolicy(poll_interval_ms=FAST),
    "noop": TaskPolicy(poll_interval_ms=1),
}


class Tokens:
    """Bearer tokens ``alice`` and ``bob``, each its own principal."""

    async def verify_token(self, token: str) -> AccessToken | None:
        """The principal of a known token."""
        user = TOKENS.get(token)
        return None if user is None else AccessToken(token=token, client_id="tests", subject=user, scopes=[])


settings = Settings.load()
tasks = SessionqTasks.from_settings(settings, tools=POLICIES)
server = tasks.bind(MCPServer(
    "sessionq-task-tests", extensions=[tasks], token_verifier=Tokens(),
    auth=AuthSettings(issuer_url=AnyHttpUrl("http://127.0.0.1/"), resource_server_url=None),
))


async def _wait_for(path: Path) -> None:
    while not path.exists():
        await anyio.sleep(0.02)


@server.tool()
async def echo(text: str) -> str:
    """Answer ``text`` (a task for clients that declared the extension)."""
    return text


@server.tool()
def noop() -> str:
    """Do nothing (the benchmark's task)."""
    return "ok"


@server.tool()
async def hold(marker: str) -> str:
    """Touch ``<marker>.started.<attempt>``, then wait for ``<marker>.release``."""
    task = current_task()
    attempt = task.attempt if task else 0
    Path(f"{marker}.started.{attempt}").write_text(str(os.getpid()))
    if task is not None:
        await task.set_status(f"attempt {attempt} running")
    await _wait_for(Path(f"{marker}.release"))
    return f"released on attempt {attempt}"


@server.tool()
async def fragile(marker: str) -> str:
    """Like :func:`hold`, for a policy of one attempt."""
    return await hold(marker)


@server.tool()
async def brief(marker: str) -> str:
    """Like :func:`hold`, with a short TTL."""
    return await hold(marker)


@server.tool()
async def broken() -> str:
    """Fail as a tool (``isError``)."""
    raise ToolError("the tool failed on purpose")


@server.tool()
async def refuse() -> str:
    """Fail as a protocol error."""
    raise MCPError(code=-32099, message="refused on purpose", data={"why": "test"})


def _question(text: str) -> ElicitRequest:
    schema = {"type": "object", "properties": {"v": {"type": "string"}}, "required": ["v"]}
    return ElicitRequest(params=ElicitRequestFormParams(message=text, requested_schema=schema))


def _answer(ctx: Context, key: str) -> str:
    response = (ctx.input_responses or {})[key]
    assert isinstance(response, ElicitResult) and response.content is not None
    return str(response.content["v"])


@server.tool()
async def ask(ctx: Context) -> str | InputRequiredResult:
    """Ask for a name and a colour (two requests), then a mood in a second round."""
    if ctx.request_state is None:
        return InputRequiredResult(input_requests={"name": _question("name?"), "colour": _question("colour?")},
                                   request_state="round-1")
    if ctx.request_state == "round-1":
        state = f"{_answer(ctx, 'name')}|{_answer(ctx, 'colour')}"
        return InputRequiredResult(input_requests={"mood": _question("mood?")}, request_state=state)
    return f"{ctx.request_state}|{_answer(ctx, 'mood')}"


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
