"""The transport-session registry: what an MCP server records about its sessions.

Writes on the request path (register, heartbeat, disconnect) are *jobs*: the registry
hands ``(job name, JSON payload)`` to an injectable ``send`` callable and returns. The
default sender, :class:`StoreSender`, applies the job to the store in a worker thread
(embedded mode); a deployment with a queue passes a sender that enqueues instead, and
its worker runs :func:`apply_transport_job` (the same code). Reads that must answer
now (``can_recover``, ``recover``, agent state) go to the store directly, in a thread.

The jobs are sessionq's own ``register_transport`` (``TransportSession.to_json()``),
``heartbeat`` (``{"mcp_session_id", "at"}``) and ``mark_disconnected``
(``{"mcp_session_id", "at", "grace_seconds"}``), payloads as docs/wire-contract.md
describes them, checked by the same parsers as the actors'
(:mod:`sessionq.workers.payloads`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import anyio

from sessionq.models.errors import Conflict, NotFound, SchemaOutdated, StoreError, ValidationError
from sessionq.models.records import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_RECOVERY_ATTEMPTS,
    AgentState,
    TransportSession,
    utcnow,
)
from sessionq.models.store import Store
from sessionq.workers import payloads
from sessionq.workers.errors import InvalidPayload

logger = logging.getLogger(__name__)

# Seconds between heartbeats of a live session.
DEFAULT_HEARTBEAT_INTERVAL = 30.0
# Seconds a disconnect may take when the server shuts down before it is given up.
DEFAULT_SEND_TIMEOUT = 5.0

JOB_REGISTER = "register_transport"
JOB_HEARTBEAT = "heartbeat"
JOB_DISCONNECT = "mark_disconnected"
TRANSPORT_JOBS = frozenset({JOB_REGISTER, JOB_HEARTBEAT, JOB_DISCONNECT})

#: ``send(job_name, payload)``; sync or async. It should return quickly (enqueue).
Sender = Callable[[str, dict[str, Any]], "Awaitable[None] | None"]


def _unknown_job(name: str) -> InvalidPayload:
    return InvalidPayload(f"unknown transport job {name!r:.80}; known: {', '.join(sorted(TRANSPORT_JOBS))}")


def apply_transport_job(store: Store, name: str, payload: Mapping[str, Any]) -> bool:
    """Run one registry job against ``store`` (idempotent), as the actor of the same
    name does, with the same payload check.

    Returns what the store answered (``False``: unknown, expired or stale).
    Raises :class:`~sessionq.workers.errors.InvalidPayload` on a bad payload or an
    unknown job (never retry it).
    """
    if name == JOB_REGISTER:
        store.register_transport(payloads.parse_register_transport(payload))
        return True
    if name == JOB_HEARTBEAT:
        return store.heartbeat(*payloads.parse_heartbeat(payload))
    if name == JOB_DISCONNECT:
        session_id, at, grace = payloads.parse_disconnect(payload)
        window = DEFAULT_GRACE_PERIOD if grace is None else timedelta(seconds=grace)
        return store.mark_disconnected(session_id, at, window)
    raise _unknown_job(name)


class StoreSender:
    """The default sender: apply each job to the store in a worker thread."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def __call__(self, name: str, payload: dict[str, Any]) -> None:
        """Apply the job (see :func:`apply_transport_job`)."""
        await anyio.to_thread.run_sync(apply_transport_job, self.store, name, payload)


class ProducerSender:
    """A sender that enqueues heartbeats and disconnects through a
    :class:`~sessionq.workers.producer.Producer` (the actors of the same names run them).

    Registration is the exception: it is written to the store before the client sees
    its session id (in a thread), because recovery after a crash depends on it. A
    heartbeat takes the buffered path (microseconds on the request path; a background
    flusher pipelines it to Redis); a disconnect is sent at once, as it usually
    happens at shutdown.
    """

    def __init__(self, producer: Any, store: Store) -> None:
        self.producer = producer
        self.store = store

    async def __call__(self, name: str, payload: dict[str, Any]) -> None:
        """Apply a registration now; enqueue the other jobs."""
        if name == JOB_REGISTER:
            await anyio.to_thread.run_sync(apply_transport_job, self.store, name, payload)
        elif name == JOB_HEARTBEAT:
            self.producer.send_nowait(name, payload)
        elif name == JOB_DISCONNECT:
            self.producer.send(name, payload)
        else:
            raise _unknown_job(name)


class SessionRegistry:
    """Register, heartbeat, disconnect and recover MCP transport sessions."""

    def __init__(
        self,
        store: Store,
        *,
        send: Sender | None = None,
        grace: timedelta = DEFAULT_GRACE_PERIOD,
        max_attempts: int = DEFAULT_MAX_RECOVERY_ATTEMPTS,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.send: Sender = send or StoreSender(store)
        self.grace = grace
        self.max_attempts = max_attempts
        self.heartbeat_interval = heartbeat_interval
        self.clock = clock

    @classmethod
    def from_settings(
        cls, store: Store, settings: Any, *, send: Sender | None = None, via_queue: bool = False
    ) -> SessionRegistry:
        """A registry with the grace, attempt cap and heartbeat interval of ``settings``.

        ``via_queue=True`` sends heartbeats and disconnects as jobs through the
        configured broker (:class:`ProducerSender`; run ``sessionq worker``s); the
        default applies them to the store in a thread (:class:`StoreSender`).
        """
        if send is None and via_queue:
            if not getattr(settings, "queue_url", None):
                raise ValidationError("via_queue needs a broker: set REDIS_URL")
            from sessionq.workers.producer import Producer

            send = ProducerSender(Producer(settings), store)
        return cls(
            store,
            send=send,
            grace=timedelta(minutes=settings.grace_minutes),
            max_attempts=settings.max_recovery_attempts,
            heartbeat_interval=float(settings.heartbeat_seconds),
        )

    def check_store(self) -> str | None:
        """Check the store's schema once (blocking; the manager runs it in a thread at
        start): ``None`` if it is current, else the problem, also logged at ERROR, since
        every session would go unrecorded and answer 404 after a restart."""
        try:
            self.store.check_schema(create=True)
        except SchemaOutdated as exc:
            logger.error("MCP sessions will not be recorded: %s", exc)
            return str(exc)
        except StoreError as exc:
            logger.warning("cannot check the store's schema: %s", exc)
            return None
        return None

    async def _send(self, name: str, payload: dict[str, Any]) -> None:
        result = self.send(name, payload)
        if inspect.isawaitable(result):
            await result

    async def register(
        self,
        mcp_session_id: str,
        *,
        transport_state: dict[str, Any] | None = None,
        working_directory: str = "",
        agent_context: dict[str, Any] | None = None,
        conversation_state: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Record a new session (on initialize) with what recovery needs later."""
        now = self.clock()
        record = TransportSession(
            mcp_session_id=mcp_session_id,
            created_at=now,
            last_heartbeat=now,
            working_directory=working_directory,
            transport_state=transport_state,
            agent_context=agent_context,
            conversation_state=conversation_state,
            metadata=metadata or {},
        )
        await self._send(JOB_REGISTER, record.to_json())

    async def heartbeat(self, mcp_session_id: str) -> None:
        """Say the session is alive (a job)."""
        await self._send(JOB_HEARTBEAT, {"mcp_session_id": mcp_session_id, "at": self.clock().isoformat()})

    async def heartbeat_all(self, mcp_session_ids: Iterable[str]) -> int:
        """Heartbeat each session; a failing send is logged, not raised. Returns how many were sent."""
        sent = 0
        for session_id in list(mcp_session_ids):
            try:
                await self.heartbeat(session_id)
                sent += 1
            except Exception as exc:  # one failed heartbeat must not stop the others
                logger.warning("heartbeat of an MCP session not sent: %s", exc)
        return sent

    async def disconnect(self, mcp_session_id: str, *, grace: timedelta | None = None) -> None:
        """Open the grace window of a session whose transport went away (a job).

        ``grace=timedelta(0)`` closes it at once (the client ended the session).
        """
        window = self.grace if grace is None else grace
        await self._send(
            JOB_DISCONNECT,
            {"mcp_session_id": mcp_session_id, "at": self.clock().isoformat(), "grace_seconds": window.total_seconds()},
        )

    async def load(self, mcp_session_id: str) -> TransportSession | None:
        """The stored session, or ``None``."""
        try:
            return await anyio.to_thread.run_sync(self.store.load_transport, mcp_session_id)
        except NotFound:
            return None

    async def can_recover(self, mcp_session_id: str) -> bool:
        """True if the session exists, is within its grace window and has attempts left."""
        return await anyio.to_thread.run_sync(
            lambda: self.store.can_recover(mcp_session_id, self.clock(), max_attempts=self.max_attempts)
        )

    async def recover(self, mcp_session_id: str) -> TransportSession | None:
        """Count one recovery and return the session with its saved transport state,
        agent context, conversation state and working directory; ``None`` if it may
        not be recovered (unknown, past grace, out of attempts)."""
        try:
            return await anyio.to_thread.run_sync(
                lambda: self.store.recover(mcp_session_id, self.clock(), max_attempts=self.max_attempts)
            )
        except (NotFound, Conflict):
            return None

    async def save_state(
        self,
        mcp_session_id: str,
        *,
        working_directory: str | None = None,
        agent_context: dict[str, Any] | None = None,
        conversation_state: dict[str, Any] | None = None,
    ) -> bool:
        """Update what a later recovery returns (the fields given); False if the session is unknown."""

        def update() -> bool:
            try:
                current = self.store.load_transport(mcp_session_id)
            except NotFound:
                return False
            changes: dict[str, Any] = {}
            if working_directory is not None:
                changes["working_directory"] = working_directory
            if agent_context is not None:
                changes["agent_context"] = agent_context
            if conversation_state is not None:
                changes["conversation_state"] = conversation_state
            self.store.register_transport(current.replace(**changes))
            return True

        return await anyio.to_thread.run_sync(update)

    async def put_agent_state(
        self,
        agent_id: str,
        key: str,
        value: Any,
        *,
        mcp_session_id: str | None = None,
        ttl: timedelta | None = None,
    ) -> bool:
        """Store one key of an agent's state, expiring after ``ttl`` if given."""
        now = self.clock()
        state = AgentState(
            agent_id=agent_id,
            key=key,
            value=value,
            mcp_session_id=mcp_session_id,
            updated_at=now,
            expires_at=now + ttl if ttl is not None else None,
        )
        return await anyio.to_thread.run_sync(self.store.put_agent_state, state)

    async def get_agent_state(self, agent_id: str, key: str, default: Any = None) -> Any:
        """The value of one key of an agent's state, or ``default`` if missing or expired."""
        state = await anyio.to_thread.run_sync(self.store.get_agent_state, agent_id, key, self.clock())
        return default if state is None else state.value


async def send_quietly(coro: Awaitable[None], what: str, timeout: float = DEFAULT_SEND_TIMEOUT) -> None:
    """Await a registry call, logging (not raising) a failure or a timeout."""
    try:
        with anyio.fail_after(timeout):
            await coro
    except (StoreError, InvalidPayload, OSError, TimeoutError) as exc:
        logger.warning("%s not recorded: %s", what, exc)
    except Exception:
        logger.exception("%s not recorded", what)
