"""MCP state-handle benchmark (B2), a ratio measured in one run.

* **B2** :meth:`HandleStore.require` — what a tool pays to turn a ``bsk_...`` argument
  into the caller's live handle: the owner digest of an authenticated principal, the
  primary-key read, the owner, kind and lifetime checks, and (rarely) the idle-deadline
  write — vs one raw primary-key ``SELECT`` of the same row through the same
  PostgreSQL connection, p50 of each, interleaved.

Each timed ``require()`` must return the handle it was asked for and each raw read
must find its row; afterwards the handle is read back to prove the touches landed
(its idle deadline is at least the last use plus its idle TTL less a tenth).
"""

from __future__ import annotations

import statistics
import time
from datetime import timedelta
from typing import Any

from .harness import DEFAULT_REPEATS, Result, ratio_result
from .store_bench import empty, open_bench_store

SQL = "SELECT * FROM sessionq_handles WHERE handle_id = %s"


def _b2(store: Any, count: int) -> tuple[float, float]:
    from mcp.server.auth.middleware.auth_context import auth_context_var
    from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
    from mcp.server.auth.provider import AccessToken

    from sessionq.models import utcnow
    from sessionq.workers.mcp.handles import HandleKind, HandleStore

    basket = HandleKind("basket", "bsk", create_tool="create_basket")
    handles = HandleStore(store, ttl=86400, idle_ttl=86400)
    user = AuthenticatedUser(AccessToken(token="t", client_id="bench", subject="alice", scopes=[]))
    reset = auth_context_var.set(user)
    ctx: Any = object()  # require() reads the principal from the request's auth context, as in a tool
    try:
        handle = handles.create(ctx, basket, {"items": ["tea", "jam"], "note": "x" * 200})
        db = store.database
        ours, raw = [], []
        for _ in range(count):
            t = time.perf_counter()
            got = handles.require(ctx, basket, handle.handle_id)
            ours.append(time.perf_counter() - t)
            assert got.handle_id == handle.handle_id
            t = time.perf_counter()
            row = db.execute_sql(SQL, (handle.handle_id,)).fetchone()
            raw.append(time.perf_counter() - t)
            assert row is not None
        stored = store.load_handle(handle.handle_id)
        assert stored.idle_until is not None and stored.idle_until >= utcnow() + timedelta(seconds=86400 * 0.9) \
            - timedelta(seconds=60), "the uses did not keep the handle alive"
    finally:
        auth_context_var.reset(reset)
    return statistics.median(ours), statistics.median(raw)


def bench_handles(*, quick: bool) -> list[Result]:
    """B2 (see the module docs)."""
    store = open_bench_store()
    store.database.execute_sql("TRUNCATE sessionq_handles")
    store.hold_connection()
    count = 500 if quick else 5000
    ours, raw = [], []
    try:
        _b2(store, 50)  # warm-up: connection, statement caches
        for _ in range(DEFAULT_REPEATS):
            b2, ceiling = _b2(store, count)
            ours.append(b2)
            raw.append(ceiling)
    finally:
        store.database.execute_sql("TRUNCATE sessionq_handles")
        empty(store)
        store.close()
    return [
        ratio_result("B2", "handle require() vs one raw primary-key SELECT (PostgreSQL), p50",
                     [s * 1e6 for s in ours], [s * 1e6 for s in raw], "µs", goal_op="<=", goal=2.0,
                     higher_is_better=False),
    ]
