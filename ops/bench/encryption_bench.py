"""E1/E2: encryption at rest (``SESSIONQ_ENCRYPTION_KEYS``) against the same run without it.

E1 drains the P2 save jobs (``queue_bench.drain``) with one worker pool in clear and
one sealing; E2 runs the P4 migration (``transfer_bench._migrate``: SQLite source in
clear → PostgreSQL) with the destination in clear and sealing. Both reuse P2's and
P4's own functions, alternate the two variants per repeat, and prove the sealed run
sealed: every stored message's content starts with the sealed-value prefix.
Goal (issue 20): each >= 0.8x the run without encryption.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from sessionq.models.keyring import generate_key
from sessionq.models.sealing import PREFIX

from .harness import DEFAULT_REPEATS, Result, ratio_result
from .queue_bench import WorkerPool, _warm_up, drain
from .store_bench import empty, open_bench_store
from .transfer_bench import _migrate, build_source

ENV = "SESSIONQ_ENCRYPTION_KEYS"


@contextmanager
def _keys(value: str | None) -> Iterator[None]:
    """``SESSIONQ_ENCRYPTION_KEYS`` set (or unset) for the child processes started inside."""
    before = os.environ.pop(ENV, None)
    if value is not None:
        os.environ[ENV] = value
    try:
        yield
    finally:
        os.environ.pop(ENV, None)
        if before is not None:
            os.environ[ENV] = before


def _sealed_share(store: object) -> float:
    """The share of stored messages whose content is sealed (the proof a variant sealed)."""
    db = store.database  # type: ignore[attr-defined]
    total, sealed = db.execute_sql(
        "SELECT count(*), count(*) FILTER (WHERE content LIKE %s) FROM sessionq_messages", (PREFIX + "%",)
    ).fetchone()
    return sealed / total if total else 0.0


def bench_encryption_drain(*, quick: bool) -> Result:
    """E1: P2's save drain (2 worker processes, 2-message saves) sealing vs in clear."""
    store = open_bench_store()
    jobs = 400 if quick else 4_000
    clear: list[float] = []
    sealed: list[float] = []
    key = generate_key()
    try:
        for _ in range(1 if quick else DEFAULT_REPEATS):  # quick: one pool start per variant
            for keys, rates in ((None, clear), (key, sealed)):
                with _keys(keys), WorkerPool(2) as pool:
                    _warm_up(pool, store)
                    rates.append(drain(pool, store, "save_session", jobs))  # the ascii mix: 2-message saves
                    share = _sealed_share(store)
                    if share != (1.0 if keys else 0.0):
                        raise RuntimeError(f"{share:.0%} of messages sealed with {ENV}={'set' if keys else 'unset'}")
        return ratio_result("E1", f"P2 save drain ({jobs:,} jobs, 2 processes) sealing vs in clear",
                            sealed, clear, "jobs/s", goal_op=">=", goal=0.8, higher_is_better=True)
    finally:
        empty(store)
        store.close()


def bench_encryption_migrate(*, quick: bool) -> list[Result]:
    """E2: P4's migration SQLite → PostgreSQL with the destination sealing vs in clear."""
    messages = 4_000 if quick else 100_000
    source = build_source(messages)
    store = open_bench_store()
    clear: list[float] = []
    sealed: list[float] = []
    cpu: dict[str | None, list[float]] = {None: [], "sealed": []}
    key = generate_key()
    try:
        for _ in range(1 if quick else DEFAULT_REPEATS):
            for keys, rates in ((None, clear), (key, sealed)):
                empty(store)
                with _keys(keys):
                    outcome = _migrate(source)
                rates.append(outcome["rows"] / outcome["seconds"])
                cpu["sealed" if keys else None].append(outcome["rows"] / outcome["cpu_seconds"])
                share = _sealed_share(store)
                if share != (1.0 if keys else 0.0):
                    raise RuntimeError(f"{share:.0%} of messages sealed with {ENV}={'set' if keys else 'unset'}")
        return [
            ratio_result("E2", f"P4 migration ({messages:,} messages) sealing the destination vs in clear",
                         sealed, clear, "rows/s", goal_op=">=", goal=0.8, higher_is_better=True),
            # The migrating process's own CPU per row: the sealing cost without the noise of a shared machine.
            ratio_result("E2-cpu", "the same migrations: rows per CPU second of the migrating process",
                         cpu["sealed"], cpu[None], "rows/cpu-s", goal_op="info", goal=0, higher_is_better=True),
        ]
    finally:
        empty(store)
        store.close()
