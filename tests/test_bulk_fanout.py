"""A migration fanned out as `migrate_batch` jobs on the bulk queue, run by a real worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis

from sessionq.models import open_store
from sessionq.models.kinds import KINDS
from sessionq.workers.errors import InvalidPayload
from sessionq.workers.jobs import normalize
from tests.conftest import POSTGRES_URL, REDIS_URL, messages, reset_store, session
from tests.support_bulk import fill_kinds
from tests.support_jobs import ROOT, WorkerProcess, child_env, wait_drained


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sessionq.cli", "--redis-url", REDIS_URL, *args],
        cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=120,
    )


def test_fanned_out_migration_is_complete_and_verified(tmp_path: Path, redis_client: redis.Redis) -> None:
    # Given a SQLite source of 25 sessions and 9 records of every other kind, and an empty
    # PostgreSQL destination named @dest
    source = f"sqlite:///{tmp_path / 'src.db'}"
    src = open_store(source)
    src.upgrade()
    for i in range(25):
        src.save_session(session(f"fan-{i:02d}"), messages(f"fan-{i:02d}", 3))
    fill_kinds(src, 9)
    src.close()
    dst = open_store(POSTGRES_URL)
    dst.upgrade()
    reset_store(dst)
    # When the migration is fanned out in batches of 7 (4 of sessions, 2 of each of the 4 other kinds)
    planned = cli("migrate", "--from", source, "--to", "@dest", "--batch-size", "7", "--fan-out",
                  SESSIONQ_STORE_DEST=POSTGRES_URL)
    assert planned.returncode == 0, planned.stderr
    assert "enqueued 12 migrate_batch job(s)" in planned.stdout
    # ... and a worker that knows @dest runs the batches (one of them twice: redelivery is harmless)
    worker = WorkerProcess(source, threads=2, log=tmp_path / "worker.log", SESSIONQ_STORE_DEST=POSTGRES_URL)
    try:
        wait_drained(redis_client, worker, timeout=120)
        again = cli("migrate", "--from", source, "--to", "@dest", "--batch-size", "25", "--fan-out",
                    SESSIONQ_STORE_DEST=POSTGRES_URL)
        assert "enqueued 5 migrate_batch job(s)" in again.stdout
        wait_drained(redis_client, worker, timeout=120)
    finally:
        assert worker.stop() == 0, worker.output()[-2000:]
    # Then the destination equals the source, without duplicates
    checked = cli("verify", "--from", source, "--to", POSTGRES_URL)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    stats = dst.stats()
    assert (stats.total_sessions, stats.total_messages, stats.total_files, stats.agent_states, stats.tasks) == (
        25, 75, 9, 9, 9)
    assert sum(stats.transports_by_status.values()) == 9
    reset_store(dst)
    dst.close()


def test_migrate_batch_payloads_name_their_kind_and_cursors() -> None:
    base = {"source": "sqlite:///a.db", "destination": "sqlite:///b.db", "after": None, "until": "x", "limit": 7}
    # A session batch keeps the payload that workers without the kind field read
    assert normalize("migrate_batch", [base]) == base
    for kind in KINDS:
        cursor = '["a", "k"]' if len(kind.key_fields) > 1 else "x"
        assert normalize("migrate_batch", [base | {"kind": kind.plural, "until": cursor}])["kind"] == kind.plural
    assert normalize("migrate_batch", [base | {"kind": "agent_states", "until": '["a", "k"]'}])["until"] == '["a", "k"]'
    with pytest.raises(InvalidPayload, match="kind must be one of sessions, files, transports, agent_states"):
        normalize("migrate_batch", [base | {"kind": "events"}])
    with pytest.raises(InvalidPayload, match="until: agent_state cursor"):
        normalize("migrate_batch", [base | {"kind": "agent_states"}])


def test_fan_out_refuses_a_password_on_the_queue(tmp_path: Path) -> None:
    source = f"sqlite:///{tmp_path / 'src.db'}"
    result = cli("migrate", "--from", source, "--to", "postgresql://app:s3cret-pw@127.0.0.1/x", "--fan-out")
    assert result.returncode == 1
    assert "includes a password; refer to the store by name instead (@NAME" in result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout
    unknown = cli("migrate", "--from", source, "--to", "@nowhere", "--fan-out")
    assert "set SESSIONQ_STORE_NOWHERE" in unknown.stderr
