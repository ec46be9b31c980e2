"""One call adopts an ``MCPServer`` for both protocol generations, from ``Settings``.

::

    server = MCPServer("my-server")          # tools, resources, prompts as usual
    app = adopt(server, tasks={"render": TaskPolicy(mode="required")})
    # uvicorn.run(app, ...)                  # and run as many replicas as you like

:func:`adopt` wires, for clients of 2025-11-25 and older, the event store (Redis
Streams with ``REDIS_URL``, else the sessionq store), the session registry and the
recovering session manager (what :func:`recoverable_http_app` does); and for clients
of 2026-07-28 (no session: any replica serves any request):

* the :class:`~sessionq.workers.mcp.bus.RedisSubscriptionBus` (with ``REDIS_URL``),
  so ``subscriptions/listen`` streams on every replica see every replica's events;
* the request-state key ring ``SESSIONQ_REQUEST_STATE_KEYS`` (TTL, audience), so a
  multi-round-trip retry may land on any replica (unset: a per-process key, which
  health reports as soon as a second replica runs);
* :class:`SessionqTasks` for the tools given in ``tasks`` (its executor from the
  settings: the ``tasks`` queue with Redis, in-process without),
  :class:`~sessionq.workers.mcp.idempotency.SessionqIdempotency` for the tools given in
  ``idempotent`` (listed before the tasks, so a retried call gets the same task), and
  any further extensions;
* a :class:`~sessionq.workers.mcp.handles.HandleStore` on the same store
  (``Adoption.handles``) for tools that keep SEP-2567 state handles;
* a report of this replica's ring (audience, key fingerprints) to Redis every
  30 s, so ``/session-health`` names replicas that cannot open each other's state.

:func:`adopt_server` does the 2026-07-28 wiring alone (no HTTP app): what a
``sessionq worker --mcp-app`` process needs when its module does not call
:func:`adopt` at import. Both are idempotent per server.

MCPServer fixes its bus, request-state policy and extensions in its constructor;
mcp 2.3 has no public way to change them later, so this module sets four internals
(``_subscriptions``, the ``subscriptions/listen`` handler of ``_lowlevel_server``,
the ``RequestStateBoundary`` in ``server.middleware``, ``_apply_extension``): the
same ``mcp>=2.3,<2.4`` pin as recovery applies (``tests/test_mcp_adoption.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp.server.extension import Extension
from mcp.server.mcpserver import MCPServer
from mcp.server.request_state import RequestStateBoundary, RequestStateSecurity
from mcp.server.streamable_http import EventStore
from mcp.server.subscriptions import ListenHandler, SubscriptionBus
from mcp_types import SubscriptionsListenRequestParams

from sessionq.errors import ConfigError
from sessionq.models import Settings, Store, open_store
from sessionq.models.keyring import KeyRing
from sessionq.workers.replicas import DEFAULT_REPLICA_BEAT, ReplicaBook, ReplicaRing

from .bus import RedisSubscriptionBus
from .event_store import RedisEventStore
from .handles import HandleStore
from .idempotency import IDEMPOTENCY_EXTENSION, IdempotencyPolicy, SessionqIdempotency
from .recovery import RecoverableSessionManager, recoverable_http_app
from .registry import SessionRegistry
from .store_events import StoreEventStore
from .task_executors import worker_identity
from .tasks import TASKS_EXTENSION, SessionqTasks, TaskPolicy

logger = logging.getLogger(__name__)

#: Builds one more 2026-07-28 extension from the settings (``Extension.from_settings``).
ExtensionFactory = Callable[[Settings], Extension]
# Extensions every adopted server gets, each built from the settings.
SETTINGS_EXTENSIONS: tuple[ExtensionFactory, ...] = ()
# The name MCPServer gives a server constructed without one.
_UNNAMED = "mcp-server"
# Attribute of an adopted MCPServer holding its Adoption.
_ADOPTION_ATTR = "_sessionq_adoption"


@dataclass
class Adoption:
    """What :func:`adopt_server` wired into one server (``app.state.sessionq`` after :func:`adopt`)."""

    server: MCPServer = field(repr=False)
    settings: Settings = field(repr=False)
    #: The audience sealed into requestState and the bus channel's name.
    audience: str
    #: The key ring's fingerprints, primary first (one per-process key when ``ephemeral``).
    fingerprints: tuple[str, ...]
    ephemeral: bool
    bus: SubscriptionBus
    tasks: SessionqTasks | None
    store: Store | None
    #: State handles on the adopted store (``None`` when no store was opened).
    handles: HandleStore | None = None
    #: This replica's id in the replica book.
    replica: str = field(default_factory=worker_identity)
    #: The recovering session manager, once :func:`adopt` built the app.
    manager: RecoverableSessionManager | None = None
    _beat: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def ring(self) -> ReplicaRing:
        """This replica's entry in the replica book."""
        return ReplicaRing(self.replica, self.audience, self.fingerprints, self.ephemeral)

    def health(self) -> dict[str, Any]:
        """This replica's part of health: ring (fingerprints only), bus, sessions."""
        bus = self.bus.health() if isinstance(self.bus, RedisSubscriptionBus) else {"bus": "memory"}
        return {
            "replica": self.replica,
            "request_state": {"audience": self.audience, "fingerprints": list(self.fingerprints),
                              "ephemeral": self.ephemeral},
            "events": bus,
            "sessions": self.manager.health() if self.manager is not None else None,
        }

    async def start(self) -> None:
        """Subscribe the bus and start reporting this replica's ring (the app's lifespan calls it)."""
        if isinstance(self.bus, RedisSubscriptionBus) and not await self.bus.start():
            logger.warning("event bus: Redis does not answer yet; listen streams get other replicas' "
                           "events once it does")
        if self.settings.redis_url and self._beat is None:
            self._beat = asyncio.get_running_loop().create_task(self._report(), name="sessionq-replica-ring")

    async def stop(self) -> None:
        """Stop reporting (and forget this replica) and close the bus."""
        beat, self._beat = self._beat, None
        if beat is not None:
            beat.cancel()
            with contextlib.suppress(BaseException):
                await beat
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._forget)
        if isinstance(self.bus, RedisSubscriptionBus):
            await self.bus.aclose()

    def _book(self) -> ReplicaBook:
        import redis

        assert self.settings.redis_url
        return ReplicaBook(redis.Redis.from_url(self.settings.redis_url, socket_timeout=2, socket_connect_timeout=2))

    async def _report(self) -> None:
        book = self._book()
        try:
            while True:
                try:
                    await anyio.to_thread.run_sync(book.record, self.ring)
                except Exception as exc:  # Redis away: health cannot see this replica meanwhile
                    logger.warning("could not report this replica's request-state ring: %s", type(exc).__name__)
                await anyio.sleep(DEFAULT_REPLICA_BEAT)
        finally:
            book.client.close()

    def _forget(self) -> None:
        book = self._book()
        try:
            book.remove(self.replica)
        except Exception as exc:
            logger.info("could not remove this replica from the replica book (it expires): %s", type(exc).__name__)
        finally:
            book.client.close()


def request_state_security(settings: Settings, server_name: str) -> tuple[RequestStateSecurity, str, KeyRing, bool]:
    """The SDK policy for ``settings``: ``(security, audience, ring, ephemeral)``.

    The ring is ``SESSIONQ_REQUEST_STATE_KEYS`` (first seals, all open), or one key
    made now for this process when unset (``ephemeral``); TTL
    ``SESSIONQ_REQUEST_STATE_TTL``; audience ``SESSIONQ_REQUEST_STATE_AUDIENCE`` or
    the server name. A shared ring on an unnamed server is a :class:`ConfigError`
    (every unnamed service would accept every other's state).
    """
    ring = settings.request_state_ring
    ephemeral = ring is None
    if ring is None:
        ring = KeyRing((os.urandom(32),))
    elif not settings.request_state_audience and server_name == _UNNAMED:
        raise ConfigError("request_state_keys: a shared key ring needs a server name (MCPServer(\"my-service\")) "
                          "or request_state_audience (SESSIONQ_REQUEST_STATE_AUDIENCE)")
    audience = settings.request_state_audience or server_name
    security = RequestStateSecurity(keys=list(ring.secrets), ttl=settings.request_state_ttl, audience=audience)
    return security, audience, ring, ephemeral


def adopt_server(
    server: MCPServer,
    settings: Settings | None = None,
    *,
    tasks: Mapping[str, TaskPolicy] | None = None,
    idempotent: Mapping[str, IdempotencyPolicy] | None = None,
    store: Store | None = None,
    extensions: Sequence[Extension] = (),
    bus: SubscriptionBus | None = None,
) -> Adoption:
    """Wire the 2026-07-28 pieces into ``server`` (see the module docs) and return them.

    ``settings`` defaults to :meth:`Settings.load`; ``store`` to one opened from them
    (when tasks or idempotent tools need it); ``bus`` to a :class:`RedisSubscriptionBus` with Redis, else
    the server's own. A second call on the same server returns the first adoption.
    """
    done = getattr(server, _ADOPTION_ATTR, None)
    if isinstance(done, Adoption):
        return done
    settings = settings or Settings.load()
    security, audience, ring, ephemeral = request_state_security(settings, server.name)
    _set_request_state_security(server, security)
    if bus is None and settings.redis_url:
        bus = RedisSubscriptionBus(settings.redis_url, audience=audience)
    if bus is not None:
        _set_bus(server, bus)
    existing = {getattr(e, "identifier", None): e for e in server._extensions}
    task_ext = existing.get(TASKS_EXTENSION)
    if tasks is not None:
        if task_ext is not None:
            raise ValueError("the server already has a SessionqTasks extension: give its tools there, not to adopt()")
        store = store or open_store(settings)
        task_ext = SessionqTasks.from_settings(settings, tools=tasks, store=store)
    idempotency: Extension | None = existing.get(IDEMPOTENCY_EXTENSION)
    if idempotent is not None:
        if idempotency is not None or existing.get(TASKS_EXTENSION) is not None:
            raise ValueError("the server already has its Sessionq extensions: give idempotent tools to adopt() "
                             "and not to MCPServer(extensions=...), so they are listed before the tasks")
        store = store or open_store(settings)
        idempotency = SessionqIdempotency.from_settings(settings, tools=idempotent, store=store)
    # Idempotency first: it sees (and keeps) the task handle SessionqTasks answers with.
    added = [e for e in [idempotency, task_ext, *extensions, *(make(settings) for make in SETTINGS_EXTENSIONS)]
             if e is not None and e.identifier not in existing]
    for extension in added:
        server._apply_extension(extension)
    if added:
        server._install_extension_interceptor()
    if isinstance(task_ext, SessionqTasks) and task_ext.server is not server:
        task_ext.bind(server)
    adoption = Adoption(server, settings, audience, tuple(ring.fingerprints()), ephemeral, server._subscriptions,
                        task_ext if isinstance(task_ext, SessionqTasks) else None, store,
                        handles=HandleStore.from_settings(settings, store=store) if store is not None else None)
    setattr(server, _ADOPTION_ATTR, adoption)
    return adoption


def adopt(
    server: MCPServer,
    settings: Settings | None = None,
    *,
    tasks: Mapping[str, TaskPolicy] | None = None,
    idempotent: Mapping[str, IdempotencyPolicy] | None = None,
    store: Store | None = None,
    extensions: Sequence[Extension] = (),
    registry: SessionRegistry | None = None,
    event_store: EventStore | None = None,
    heartbeat: bool = True,
    **http_app_options: Any,
) -> Any:
    """The Starlette app serving ``server`` to both protocol generations (see the module docs).

    ``registry`` and ``event_store`` default to the settings' (a registry on the
    store; Redis Streams with ``REDIS_URL``, else the store); ``heartbeat`` runs the
    registry's session heartbeats (see :func:`recoverable_http_app`); ``http_app_options``
    go to ``server.streamable_http_app()`` (``retry_interval``, ``transport_security``,
    ...). The app's lifespan runs the session manager, subscribes the bus and reports
    this replica's ring; ``app.state.sessionq`` is the :class:`Adoption`.
    """
    settings = settings or Settings.load()
    store = store or open_store(settings)
    adoption = adopt_server(server, settings, tasks=tasks, idempotent=idempotent, store=store,
                            extensions=extensions)
    if registry is None:
        registry = SessionRegistry.from_settings(store, settings)
    if event_store is None:
        event_store = RedisEventStore.from_settings(settings) if settings.redis_url else StoreEventStore(store)
    app = recoverable_http_app(server, registry=registry, event_store=event_store, heartbeat=heartbeat,
                               **http_app_options)
    manager = server.session_manager
    assert isinstance(manager, RecoverableSessionManager)
    adoption.manager = manager

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        async with manager.run():
            await adoption.start()
            try:
                yield
            finally:
                await adoption.stop()

    app.router.lifespan_context = lifespan
    app.state.sessionq = adoption
    return app


def _set_request_state_security(server: MCPServer, security: RequestStateSecurity) -> None:
    chain = server.middleware
    for position, middleware in enumerate(chain):
        if isinstance(middleware, RequestStateBoundary):
            chain[position] = RequestStateBoundary(security, default_audience=server.name)
            return
    raise RuntimeError("this mcp version has no RequestStateBoundary in MCPServer.middleware (pin mcp>=2.3,<2.4)")


def _set_bus(server: MCPServer, bus: SubscriptionBus) -> None:
    lowlevel = server._lowlevel_server
    server._subscriptions = bus
    if lowlevel.get_request_handler("subscriptions/listen") is not None:  # not built with subscriptions=False
        lowlevel.add_request_handler("subscriptions/listen", SubscriptionsListenRequestParams, ListenHandler(bus))
