"""The MCP app of the task benchmarks (T1, T2): one no-op tool that becomes a task for
clients declaring the Tasks extension and runs inline for the others.

Served by ``python -m ops.bench.task_app --port N``; its worker runs with
``SESSIONQ_MCP_APP=ops.bench.task_app:server``. Settings come from the environment
(``STORAGE_URL``, ``REDIS_URL``).
"""

from __future__ import annotations

import argparse

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from sessionq.models import Settings
from sessionq.workers.mcp import SessionqTasks, TaskPolicy

tasks = SessionqTasks.from_settings(Settings.load(), tools={"noop": TaskPolicy(poll_interval_ms=1)})
server = tasks.bind(MCPServer("sessionq-bench-tasks", extensions=[tasks]))


@server.tool()
async def noop(n: int = 0) -> int:
    """Return ``n``."""
    return n


def main() -> None:
    """Serve the app (JSON responses, no DNS-rebinding check: loopback benchmark)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    app = server.streamable_http_app(json_response=True, transport_security=security)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
