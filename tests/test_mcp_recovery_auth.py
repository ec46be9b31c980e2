"""Recovery keeps a session with the credential that opened it (in-process ASGI, JSON responses)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import Receive, Scope, Send

from sessionq.models import Store
from sessionq.workers.mcp import (
    RecoverableSessionManager,
    SessionRegistry,
    StoreEventStore,
    recoverable_http_app,
)
from tests.conftest import make_store
from tests.support_mcp import anyio_backend  # noqa: F401  (fixture)

pytestmark = pytest.mark.anyio

HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}


class AsUser:
    """Authenticates each request as the client id in its ``x-user`` header (test stand-in
    for the SDK's bearer-token middleware, which sets the same ``scope["user"]``)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            user = dict(scope["headers"]).get(b"x-user")
            if user:
                scope["user"] = AuthenticatedUser(AccessToken(token="t", client_id=user.decode(), scopes=[]))
        await self.app(scope, receive, send)


def instance(store: Store) -> tuple[Any, RecoverableSessionManager]:
    """One server instance (its own manager) on the shared store."""
    server = MCPServer("auth-test")

    @server.tool()
    def ping() -> str:
        """Answer pong."""
        return "pong"

    app = recoverable_http_app(
        server, registry=SessionRegistry(store), event_store=StoreEventStore(store), json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    return AsUser(app), server.session_manager  # type: ignore[return-value]


async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client calling the ASGI app in-process."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
        yield http


async def call_ping(http: httpx.AsyncClient, session_id: str, user: str) -> httpx.Response:
    """``tools/call ping`` in a session, as ``user``."""
    return await http.post("/mcp", headers={**HEADERS, "mcp-session-id": session_id, "x-user": user,
                                            "mcp-protocol-version": "2025-11-25"},
                           json={"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                 "params": {"name": "ping", "arguments": {}}})


async def test_recovery_requires_the_credential_that_opened_the_session(tmp_path: Path) -> None:
    # Given a session alice opened on instance A
    store = make_store("sqlite", tmp_path)
    app_a, manager_a = instance(store)
    app_b, manager_b = instance(store)
    async with manager_a.run(), manager_b.run():
        async for http in client(app_a):
            opened = await http.post("/mcp", headers={**HEADERS, "x-user": "alice"}, json=INITIALIZE)
            assert opened.status_code == 200
            session_id = opened.headers["mcp-session-id"]
            record = store.load_transport(session_id)
            assert (record.transport_state or {})["owner"]["client_id"] == "alice"

        async for http in client(app_b):
            # When bob presents alice's session id to instance B, then alice does
            as_bob = await call_ping(http, session_id, "bob")
            as_alice = await call_ping(http, session_id, "alice")

    # Then bob gets the SDK's 404 without using up a recovery; alice carries on
    assert as_bob.status_code == 404
    assert as_alice.status_code == 200 and as_alice.json()["result"]["content"][0]["text"] == "pong"
    assert store.load_transport(session_id).recovery_attempts == 1
    assert manager_b.recovered_count == 1
    store.close()
