"""The wire contract, proven: a Node.js producer (the ``redis`` npm package) enqueues a
save that a real Python worker process persists.

Needs ``node`` and ``npm install`` in tests/node (``.ci/run`` does it); a missing
toolchain skips locally and fails in CI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import redis

from tests.conftest import POSTGRES_URL, REDIS_URL, make_store, reset_store, service_missing
from tests.support_jobs import ROOT, WorkerProcess, child_env, wait_drained

NODE_DIR = ROOT / "tests" / "node"


def test_node_producer_save_is_persisted_by_python_worker(tmp_path: Path, redis_client: redis.Redis) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "redis").is_dir():
        service_missing("node + tests/node/node_modules (npm install)", FileNotFoundError("node toolchain"))
    assert node is not None
    store = make_store("postgresql", tmp_path)
    reset_store(store)
    # Given a save enqueued by Node.js, byte for byte as docs/wire-contract.md says
    done = subprocess.run([node, str(NODE_DIR / "enqueue_save.mjs"), "node-session-1"], cwd=NODE_DIR,
                          env=child_env(REDIS_URL=REDIS_URL), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ids = json.loads(done.stdout)
    assert redis_client.hexists("dramatiq:sessions.msgs", ids["redis_message_id"])
    # When a Python worker process runs
    worker = WorkerProcess(POSTGRES_URL, log=tmp_path / "worker.log")
    try:
        wait_drained(redis_client, worker)
    finally:
        worker.stop()
    # Then the session and its messages are stored as sent
    session = store.load_session("node-session-1")
    assert (session.model, session.metadata["producer"], session.message_count) == ("node-model", "node", 2)
    messages = store.load_messages("node-session-1")
    assert [(m.message_id, m.role, m.content) for m in messages] == [
        ("m1", "user", "Hello from Node.js ✓"),
        ("m2", "assistant", "Persisted by a Python worker."),
    ]
    assert redis_client.zcard("dramatiq:sessions.XQ") == 0
    reset_store(store)
    store.close()
