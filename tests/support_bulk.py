"""Fixtures for the MongoDB-backend and bulk-operation tests (imported explicitly)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from sessionq.models import AgentState, ChatMessage, ChatSession, FileRecord, Store, TransportSession
from sessionq.models.handles import StateHandle
from sessionq.models.idempotency import IdempotencyEntry, entry_id_for
from sessionq.models.tasks import McpTask
from tests.conftest import T0, make_store, reset_store

#: The repository root, the working directory of CLI subprocesses.
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def mongo_store(tmp_path: Path) -> Iterator[Store]:
    """A clean MongoDB store (skips locally / fails in CI when the server is missing)."""
    store = make_store("mongodb", tmp_path)
    reset_store(store)
    yield store
    reset_store(store)
    store.close()


def fill(store: Store, sessions: int, per_session: int, *, prefix: str = "s") -> None:
    """Save ``sessions`` sessions with ``per_session`` messages each, varied fields."""
    writes = []
    for i in range(sessions):
        sid = f"{prefix}{i:04d}"
        session = ChatSession(
            session_id=sid,
            model=f"model-{i % 3}",
            status="active",
            created_at=T0,
            updated_at=T0 + timedelta(minutes=i),
            metadata={"n": i, "tags": ["x", f"t{i % 4}"], "user": "zoë"},
        )
        msgs = [
            ChatMessage(
                message_id=f"m{j}",
                session_id=sid,
                role="user" if j % 2 == 0 else "assistant",
                content=f"message {j} of {sid} 🎉",
                created_at=T0 + timedelta(seconds=j),
                metadata={"j": j},
            )
            for j in range(per_session)
        ]
        writes.append((session, msgs))
    for start in range(0, len(writes), 50):
        store.save_sessions(writes[start : start + 50])
    for i in range(0, sessions, 7):
        store.archive_session(f"{prefix}{i:04d}", T0 + timedelta(days=1))


#: Agent-state values of every JSON shape, used in turn by :func:`fill_kinds`.
AGENT_VALUES: list[object] = [{"plan": [1, 2], "done": False}, "text ✓", 42, None, [1, "x", {"y": 1.5}], 2.5, True]


def fill_kinds(store: Store, count: int, *, prefix: str = "") -> None:
    """``count`` file records, transport sessions, agent-state entries and MCP tasks,
    written through the store's ordinary write paths, with varied fields, every
    transport status (live, disconnected, recovered, expired) and every task status."""
    for i in range(count):
        store.save_file(
            FileRecord(
                f"{prefix}f{i:04d}", "gemini", f"files/{i}", display_name=f"doc {i} 🎉", size=i * 100,
                mime_type="text/plain", uploaded_at=T0 + timedelta(seconds=i),
                expires_at=T0 + timedelta(days=30) if i % 3 == 0 else None,
                metadata={"n": i, "tags": ["a", f"t{i % 2}"]},
            )
        )
        tid = f"{prefix}t{i:04d}"
        store.register_transport(
            TransportSession(
                tid, created_at=T0, working_directory=f"/srv/{i}", transport_state={"i": i} if i % 2 else None,
                agent_context={"who": "zoë"}, conversation_state={"turns": [i, i + 1]},
                metadata={"client": f"c{i % 3}"},
            )
        )
        store.heartbeat(tid, T0 + timedelta(seconds=i))
        if i % 4 == 1:
            store.mark_disconnected(tid, T0 + timedelta(days=1))
        elif i % 4 == 2:
            store.recover(tid, T0 + timedelta(minutes=1))
        elif i % 4 == 3:
            store.mark_disconnected(tid, T0 + timedelta(minutes=1))
        store.put_agent_state(
            AgentState(
                f"{prefix}a{i % 5}", f"k{i:04d}", AGENT_VALUES[i % len(AGENT_VALUES)],
                mcp_session_id=tid if i % 2 else None, updated_at=T0 + timedelta(seconds=i),
                expires_at=T0 + timedelta(days=7) if i % 4 == 0 else None,
            )
        )
        fill_task(store, f"{prefix}task{i:04d}", i)
        fill_handle_and_entry(store, prefix, i)
    store.expire_transports(T0 + timedelta(hours=1))


def fill_task(store: Store, task_id: str, i: int) -> None:
    """One MCP task, left in the ``i % 6``-th state: queued, running, input_required,
    completed, failed, cancelled."""
    lease = T0 + timedelta(minutes=1)
    store.create_task(McpTask(task_id, "slow", owner=f"o{i % 2}" if i % 3 else None, arguments={"n": i, "$k.x": "ü"},
                              created_at=T0, expires_at=T0 + timedelta(days=1) if i % 2 else None, lease_until=lease))
    if i % 6 == 0:
        return
    store.claim_task(task_id, 0, "w1", T0, lease)
    if i % 6 == 2:
        store.park_task(task_id, "w1", T0, input_requests={"q.1": {"method": "elicitation/create"}},
                        input_keys={"q.1": "q"}, request_state=f"state {i}")
    elif i % 6 == 3:
        store.finish_task(task_id, "w1", T0, result={"content": [{"type": "text", "text": f"done {i}"}]})
    elif i % 6 == 4:
        store.finish_task(task_id, "w1", T0, error={"code": -32603, "message": "boom"})
    elif i % 6 == 5:
        store.request_cancel(task_id, store.load_task(task_id).owner, T0)


def fill_handle_and_entry(store: Store, prefix: str, i: int) -> None:
    """One state handle (live, updated, touched or revoked by ``i % 4``) and one
    idempotency entry (pending, done with a result, done with a task id by ``i % 3``)."""
    owner = f"o{i % 2}" if i % 3 else None
    handle = store.create_handle(StateHandle(f"{prefix}bsk_{i:04d}", "basket", owner=owner, data={"n": i, "$k.x": "ü"},
                                             created_at=T0, expires_at=T0 + timedelta(days=1) if i % 2 else None,
                                             idle_ttl=3600 if i % 2 == 0 else None))
    if i % 4 == 1:
        store.update_handle(handle.handle_id, owner, {"n": -i}, 0, T0 + timedelta(seconds=i))
    elif i % 4 == 2:
        store.touch_handle(handle, T0 + timedelta(minutes=30))
    elif i % 4 == 3:
        store.revoke_handle(handle.handle_id, owner, T0)
    key = f"{prefix}key{i:04d}"
    entry, _ = store.claim_idempotency(IdempotencyEntry(entry_id_for(owner, key), key, "pay", f"d{i}",
                                                        T0 + timedelta(minutes=10), owner=owner, created_at=T0), T0)
    if i % 3 == 1:
        store.finish_idempotency(entry, T0 + timedelta(days=1), result={"content": [], "isError": bool(i % 2)})
    elif i % 3 == 2:
        store.finish_idempotency(entry, T0 + timedelta(days=1), task_id=f"{prefix}task{i:04d}")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a ``python -m cli`` subprocess run from the repository root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    """``python -m cli ARGS`` with this interpreter."""
    return [sys.executable, "-m", "sessionq.cli", *args]
