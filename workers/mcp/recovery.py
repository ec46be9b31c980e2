"""Sessions that survive restarts: a recovering Streamable HTTP session manager.

The SDK keeps sessions in a per-process dict and answers an unknown ``Mcp-Session-Id``
with 404. :class:`RecoverableSessionManager` asks the :class:`SessionRegistry` first:
if the id is recoverable (known, within grace, attempts left, same credential), the
session is re-created *with the same id, already initialized* (the saved
``initialize`` params and protocol version), and the request is served as if nothing
had happened; otherwise the SDK's normal 404 follows and the client re-initializes.

It also gives every session its own view of a scoped event store
(``event_store.for_session(id)``), registers sessions once ``initialize`` succeeded,
heartbeats live ones and opens the grace window when a transport goes away.

Built on the SDK's ``StreamableHTTPSessionManager`` internals of the 2.x line
(``_admit_session``, ``_serve_opening_request``, ``_discard_session``); see
``docs/mcp.md`` for the versions this was tested with.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskStatus
from mcp.server.auth.middleware.bearer_auth import (
    AuthenticatedUser,
    AuthorizationContext,
    authorization_context,
)
from mcp.server.streamable_http import (
    MCP_SESSION_ID_HEADER,
    SESSION_ID_PATTERN,
    EventStore,
    StreamableHTTPServerTransport,
)
from mcp.server.streamable_http_manager import (
    StreamableHTTPSessionManager,
    _send_and_report_status,
)
from mcp.types import InitializeRequestParams
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from sessionq.models.records import TransportSession

from .registry import SessionRegistry, send_quietly

try:  # mcp 2.x drives a session through a Connection we can pre-initialize
    from mcp.server.connection import Connection
    from mcp.server.runner import serve_connection
    from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher

    SDK_V2 = True
except ImportError:  # mcp 1.x: Server.run(); a recovered session runs born-initialized (stateless=True)
    SDK_V2 = False

try:
    from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
except ImportError:  # mcp 1.x keeps it with FastMCP
    from mcp.server.fastmcp.server import StreamableHTTPASGIApp  # type: ignore[no-redef]

MCP_PROTOCOL_VERSION_HEADER = "mcp-protocol-version"

logger = logging.getLogger(__name__)

#: ``connection.state`` key holding the recovered :class:`TransportSession` (absent on new sessions).
RECOVERED_STATE_KEY = "sessionq.recovered"
# Longest session id we look up (the SDK's are 32 hex characters).
MAX_SESSION_ID_LENGTH = 255
# Bytes of an opening request kept to read its initialize params (1.x).
MAX_TEED_BODY = 1_000_000


def _requestor(scope: Scope) -> AuthorizationContext | None:
    user = scope.get("user")
    return authorization_context(user) if isinstance(user, AuthenticatedUser) else None


def request_session_id(ctx: Any) -> str | None:
    """The ``Mcp-Session-Id`` of the request a tool is serving (``ctx`` is the tool's
    ``Context`` or a ``ServerRequestContext``); ``None`` when sessionless."""
    request_context = getattr(ctx, "request_context", ctx)
    request = getattr(request_context, "request", None)
    headers = getattr(request, "headers", None)
    return headers.get(MCP_SESSION_ID_HEADER) if headers is not None else None


def snapshot(connection: Connection, owner: AuthorizationContext | None) -> dict[str, Any]:
    """The transport state saved at initialize: what re-creating the session needs."""
    params = connection.client_params
    return {
        "protocol_version": connection.protocol_version,
        "client_params": None if params is None else params.model_dump(mode="json", by_alias=True, exclude_none=True),
        "owner": dict(owner) if owner is not None else None,
    }


def snapshot_request(body: bytes, owner: AuthorizationContext | None) -> dict[str, Any]:
    """The transport state from the raw ``initialize`` request (the 1.x line, where the
    session's handshake state is not reachable)."""
    try:
        message = json.loads(body)
    except ValueError:
        message = None
    params = message.get("params") if isinstance(message, dict) and message.get("method") == "initialize" else None
    params = params if isinstance(params, dict) else None
    return {
        "protocol_version": params.get("protocolVersion") if params else None,
        "client_params": params,
        "owner": dict(owner) if owner is not None else None,
    }


def restore(connection: Connection, state: dict[str, Any] | None, fallback_version: str | None) -> None:
    """Make a fresh connection look initialized with the saved ``state``."""
    state = state or {}
    version = state.get("protocol_version") or fallback_version
    if isinstance(version, str):
        connection.protocol_version = version
    params = state.get("client_params")
    if isinstance(params, dict):
        try:
            connection.client_params = InitializeRequestParams.model_validate(params)
        except ValueError:
            logger.warning("saved initialize params of a recovered session are unreadable; continuing without")
    connection.initialized.set()


class RecoverableSessionManager(StreamableHTTPSessionManager):
    """A ``StreamableHTTPSessionManager`` that recovers sessions it does not hold.

    Takes the SDK manager's arguments plus ``registry`` (``None``: no recovery, no
    registration; the event store is still scoped per session), ``heartbeat`` (run the
    registry's heartbeat loop while :meth:`run` is active) and ``fail_lost_requests``
    (on recovery, end the requests the dead process left unanswered with an error, so
    resuming clients do not wait forever; turn it off if instances may recover sessions
    whose first process is still alive).
    """

    def __init__(
        self,
        app: Any,
        event_store: EventStore | None = None,
        *,
        registry: SessionRegistry | None = None,
        heartbeat: bool = True,
        fail_lost_requests: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, event_store=event_store, **kwargs)
        self.registry = registry
        self.heartbeat = heartbeat
        self.fail_lost_requests = fail_lost_requests
        self._connections: dict[str, Connection] = {}
        self._event_stores: dict[str, EventStore | None] = {}
        self._registered: set[str] = set()
        #: Sessions this process re-created (a counter for health and tests).
        self.recovered_count = 0
        #: The recovered record (saved state) of each live session this process re-created.
        self.recovered_sessions: dict[str, TransportSession] = {}
        #: Why sessions cannot be recorded (the store's schema), found once at start; reported by :meth:`health`.
        self.store_problem: str | None = None

    @classmethod
    def replacing(
        cls,
        manager: StreamableHTTPSessionManager,
        *,
        registry: SessionRegistry | None,
        event_store: EventStore | None = None,
        heartbeat: bool = True,
    ) -> RecoverableSessionManager:
        """A recovering manager configured like ``manager`` (which must not have run)."""
        return cls(
            manager.app,
            event_store=event_store if event_store is not None else manager.event_store,
            registry=registry,
            heartbeat=heartbeat,
            json_response=manager.json_response,
            stateless=manager.stateless,
            security_settings=manager.security_settings,
            retry_interval=manager.retry_interval,
            session_idle_timeout=manager.session_idle_timeout,
            max_request_body_size=manager.max_request_body_size,
            max_sessions=manager.max_sessions,
        )

    def session_event_store(self, session_id: str) -> EventStore | None:
        """The event store a session's transport uses: its own view when the store is scoped."""
        store = self.event_store
        for_session = getattr(store, "for_session", None)
        return for_session(session_id) if callable(for_session) else store

    def live_sessions(self) -> list[str]:
        """Ids of the sessions this process serves."""
        return list(self._server_instances)

    def health(self) -> dict[str, Any]:
        """What ``/session-health`` can report about MCP sessions in this process."""
        return {
            "event_store": getattr(self.event_store, "mode", "none" if self.event_store is None else "custom"),
            "live_sessions": len(self._server_instances),
            "recovered_sessions": self.recovered_count,
            "store": "none" if self.registry is None else "error" if self.store_problem else "ok",
            "problems": [self.store_problem] if self.store_problem else [],
        }

    @contextlib.asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """Run the SDK manager and, with a registry, the heartbeat loop."""
        if self.registry is not None:
            self.store_problem = await anyio.to_thread.run_sync(self.registry.check_store)
        async with super().run(), anyio.create_task_group() as tg:
            if self.registry is not None and self.heartbeat:
                tg.start_soon(self._heartbeats)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                # A clean shutdown starts the grace window of every live session (a
                # crash cannot: recovery then relies on the stored record alone).
                if self.registry is not None:
                    with anyio.CancelScope(shield=True):
                        for session_id in [s for s in self._registered if s in self._server_instances]:
                            await send_quietly(self.registry.disconnect(session_id), "session disconnect")

    async def _heartbeats(self) -> None:
        assert self.registry is not None
        while True:
            await anyio.sleep(self.registry.heartbeat_interval)
            await self.registry.heartbeat_all(s for s in self._registered if s in self._server_instances)

    def _new_transport(self, session_id: str, event_store: EventStore | None = None) -> StreamableHTTPServerTransport:
        store = event_store or self.session_event_store(session_id)
        self._event_stores[session_id] = store
        return StreamableHTTPServerTransport(
            mcp_session_id=session_id,
            is_json_response_enabled=self.json_response,
            event_store=store,
            security_settings=self.security_settings,
            retry_interval=self.retry_interval,
            idle_timeout=self.session_idle_timeout,
        )

    def _admit_session(self, requestor: AuthorizationContext | None) -> StreamableHTTPServerTransport | None:
        transport = super()._admit_session(requestor)
        if transport is not None:
            # Same transport, but with the session's own event-store view.
            session_id = transport.mcp_session_id
            assert session_id is not None
            scoped = self._new_transport(session_id)
            self._server_instances[session_id] = scoped
            return scoped
        return None

    async def _handle_stateful_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        session_id = Headers(scope=scope).get(MCP_SESSION_ID_HEADER)
        if session_id is not None and self.registry is not None and session_id not in self._server_instances:
            await self._recover(session_id, scope)
        await super()._handle_stateful_request(scope, receive, send)

    async def _recover(self, session_id: str, scope: Scope) -> None:
        """Re-create ``session_id`` if the registry allows it; otherwise leave it unknown (404)."""
        assert self.registry is not None
        if len(session_id) > MAX_SESSION_ID_LENGTH or not SESSION_ID_PATTERN.fullmatch(session_id):
            return
        requestor = _requestor(scope)
        async with self._session_creation_lock:
            if session_id in self._server_instances:
                return
            if self.max_sessions is not None and len(self._server_instances) >= self.max_sessions:
                return
            try:
                saved = await self.registry.load(session_id)
                owner = ((saved.transport_state or {}).get("owner") if saved else None) or None
                if saved is None or owner != (dict(requestor) if requestor else None):
                    return
                recovered = await self.registry.recover(session_id)
            except Exception:
                logger.exception("session recovery lookup failed; answering as an unknown session")
                return
            if recovered is None:
                logger.info("session %s is not recoverable (past grace or out of attempts)", session_id[:64])
                return
            event_store = self.session_event_store(session_id)
            fail_open = getattr(event_store, "fail_open_requests", None)
            if self.fail_lost_requests and callable(fail_open):
                await send_quietly(fail_open(), "ending requests lost in a restart")
            transport = self._new_transport(session_id, event_store)
            if requestor is not None:
                self._session_owners[session_id] = requestor
            self._server_instances[session_id] = transport
            self._registered.add(session_id)
            version = Headers(scope=scope).get(MCP_PROTOCOL_VERSION_HEADER)
            try:
                assert self._task_group is not None
                await self._task_group.start(partial(self._run_session, transport, recovered, version))
            except BaseException:
                await self._discard_session(session_id, transport)
                raise
            self.recovered_count += 1
            self.recovered_sessions[session_id] = recovered
            logger.info("recovered MCP session %s (attempt %d)", session_id[:64], recovered.recovery_attempts)

    async def _run_session(
        self,
        transport: StreamableHTTPServerTransport,
        recovered: TransportSession | None,
        fallback_version: str | None,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """The session's server task: the SDK's ``serve_loop`` with a connection we keep
        (to snapshot it after initialize, or to restore it on recovery)."""
        session_id = transport.mcp_session_id
        assert session_id is not None
        async with transport.connect() as (read_stream, write_stream):
            task_status.started()
            try:
                idle_scope = transport.idle_scope or anyio.CancelScope()
                with idle_scope:
                    if SDK_V2:
                        dispatcher = JSONRPCDispatcher(
                            read_stream, write_stream, inline_methods=frozenset({"initialize"})
                        )
                        connection = Connection.for_loop(dispatcher, session_id=session_id)
                        if recovered is not None:
                            restore(connection, recovered.transport_state, fallback_version)
                            connection.state[RECOVERED_STATE_KEY] = recovered
                        self._connections[session_id] = connection
                        await serve_connection(
                            self.app, dispatcher, connection=connection, lifespan_state=self._lifespan_state
                        )
                    else:
                        # 1.x keeps the handshake inside ServerSession: a recovered session
                        # runs born-initialized, without the client's initialize params.
                        run_v1: Any = self.app.run
                        await run_v1(read_stream, write_stream, self.app.create_initialization_options(),
                                     stateless=recovered is not None)
                if idle_scope.cancelled_caught:
                    logger.info("session %s idle timeout", session_id[:64])
            except Exception:
                logger.exception("session %s crashed", session_id[:64])
            finally:
                await self._discard_session(session_id, transport)

    async def _serve_opening_request(
        self, http_transport: StreamableHTTPServerTransport, scope: Scope, receive: Receive, send: Send
    ) -> None:
        session_id = http_transport.mcp_session_id
        assert session_id is not None
        owner = _requestor(scope)
        if self.registry is not None:
            # Known before the client sees its id, so that another instance can take
            # the very next request; the full handshake is saved once it succeeded.
            early = {"owner": dict(owner) if owner is not None else None}
            await send_quietly(self.registry.register(session_id, transport_state=early), "session registration")
        body: list[bytes] = []

        async def tee_receive() -> Any:
            message = await receive()
            if message.get("type") == "http.request" and sum(map(len, body)) < MAX_TEED_BODY:
                body.append(message.get("body", b""))
            return message

        established = False
        try:
            assert self._task_group is not None
            await self._task_group.start(partial(self._run_session, http_transport, None, None))
            status = await _send_and_report_status(http_transport.handle_request, scope, tee_receive, send)
            established = status is not None and status < 400
        finally:
            if not established:
                await self._discard_session(session_id, http_transport)
                if self.registry is not None:
                    with anyio.CancelScope(shield=True):
                        await send_quietly(self.registry.disconnect(session_id, grace=timedelta(0)), "session close")
        if self.registry is None or session_id not in self._server_instances:
            return
        connection = self._connections.get(session_id)
        state = snapshot(connection, owner) if connection is not None else snapshot_request(b"".join(body), owner)
        self._registered.add(session_id)
        await send_quietly(self.registry.register(session_id, transport_state=state), "session registration")

    async def _discard_session(self, session_id: str, transport: StreamableHTTPServerTransport) -> None:
        held = self._server_instances.get(session_id) is transport
        ended_by_client = transport.is_terminated
        await super()._discard_session(session_id, transport)
        if not held:
            return
        self._connections.pop(session_id, None)
        self.recovered_sessions.pop(session_id, None)
        event_store = self._event_stores.pop(session_id, None)
        with anyio.CancelScope(shield=True):
            if self.registry is not None and session_id in self._registered:
                self._registered.discard(session_id)
                # A DELETE ends the session for good; anything else opens the grace window.
                grace = timedelta(0) if ended_by_client else None
                await send_quietly(self.registry.disconnect(session_id, grace=grace), "session disconnect")
            forget = getattr(event_store, "forget", None)
            if ended_by_client and callable(forget):
                await send_quietly(forget(), "deleting the event log of an ended session")


def install(
    app: Any,
    server: Any,
    *,
    registry: SessionRegistry | None,
    event_store: EventStore | None = None,
    heartbeat: bool = True,
) -> RecoverableSessionManager:
    """Swap the session manager of a Starlette app built by ``server.streamable_http_app()``
    for a :class:`RecoverableSessionManager` configured the same way (auth, routes and
    middleware stay); call before the app starts. Returns the new manager."""
    holder = getattr(server, "_lowlevel_server", server)  # 2.x MCPServer keeps it on the low-level server
    old = server.session_manager
    manager = RecoverableSessionManager.replacing(old, registry=registry, event_store=event_store, heartbeat=heartbeat)
    swapped = 0
    for route in getattr(app, "routes", []):
        endpoint = getattr(route, "endpoint", None)
        for candidate in (endpoint, getattr(endpoint, "app", None)):
            if isinstance(candidate, StreamableHTTPASGIApp) and candidate.session_manager is old:
                candidate.session_manager = manager
                swapped += 1
    if not swapped:
        raise RuntimeError("no Streamable HTTP route found: build the app with server.streamable_http_app()")
    app.router.lifespan_context = lambda _app: manager.run()
    holder._session_manager = manager
    return manager


def recoverable_http_app(
    server: Any,
    *,
    registry: SessionRegistry | None,
    event_store: EventStore | None = None,
    heartbeat: bool = True,
    **http_app_options: Any,
) -> Any:
    """``server.streamable_http_app(**http_app_options)`` with sessions that survive
    restarts and hop instances (see :func:`install`). Works for ``MCPServer`` and the
    low-level ``Server``."""
    accepted = inspect.signature(server.streamable_http_app).parameters
    options = {k: v for k, v in {"event_store": event_store, **http_app_options}.items() if k in accepted}
    if set(http_app_options) - set(options):
        # 1.x FastMCP takes these in its constructor; say so rather than drop them silently.
        raise TypeError(f"streamable_http_app() does not take {sorted(set(http_app_options) - set(options))}")
    app = server.streamable_http_app(**options)
    install(app, server, registry=registry, event_store=event_store, heartbeat=heartbeat)
    return app
