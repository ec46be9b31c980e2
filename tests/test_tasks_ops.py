"""Operating MCP tasks: ``sessionq tasks``, health, metrics, the tasks sweep and the
worker's ``--mcp-app`` checks."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sessionq.cli import main
from sessionq.models import Settings, Store, open_store, utcnow
from sessionq.models.tasks import McpTask, new_task_id
from sessionq.scheduler.sweeps import run_sweep
from sessionq.workers.health import HealthChecker
from sessionq.workers.mcp.task_executors import CANCEL_CHANNEL
from sessionq.workers.metrics import state_metrics
from tests.conftest import REDIS_URL

LEASE = timedelta(seconds=30)


@pytest.fixture
def sqlite(tmp_path: Path) -> tuple[str, Store]:
    """A migrated SQLite store and its URL."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    store = open_store(url)
    store.upgrade()
    return url, store


def fill(store: Store) -> dict[str, McpTask]:
    """A queued, a running (lease long gone), a waiting and a completed task, made an hour ago."""
    then = utcnow() - timedelta(hours=1)
    made = {}
    for name in ("queued", "running", "waiting", "done"):
        made[name] = store.create_task(McpTask(new_task_id(), f"tool_{name}", owner="o", created_at=then,
                                               lease_until=then + LEASE, expires_at=then + timedelta(days=1)))
    for name in ("running", "waiting", "done"):
        store.claim_task(made[name].task_id, 0, "w1", then, then + LEASE)
    store.park_task(made["waiting"].task_id, "w1", then, input_requests={"q.x": {}}, input_keys={"q.x": "q"},
                    request_state=None)
    store.finish_task(made["done"].task_id, "w1", then, result={"content": []})
    return made


def cli(url: str, *args: str, **env: str) -> Any:
    """Run ``sessionq --storage-url URL ARGS`` in-process."""
    return CliRunner().invoke(main, ["--storage-url", url, *args], env=env or None)


def test_tasks_list_show_and_cancel(sqlite: tuple[str, Store], redis_client: Any) -> None:
    url, store = sqlite
    made = fill(store)
    # list: every task, or one status, as text or JSON
    listed = cli(url, "tasks", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert {row["task_id"] for row in json.loads(listed.stdout)} == {t.task_id for t in made.values()}
    waiting = json.loads(cli(url, "tasks", "list", "--status", "input_required", "--json").stdout)
    assert [(row["task_id"], row["attempt"]) for row in waiting] == [(made["waiting"].task_id, "1/3")]
    assert made["done"].task_id in cli(url, "tasks", "list").stdout
    # show: every field
    shown = json.loads(cli(url, "tasks", "show", made["done"].task_id).stdout)
    assert (shown["status"], shown["result"], shown["worker_id"]) == ("completed", {"content": []}, None)
    # cancel: a queued task ends cancelled, a completed one stays, a running one is marked and its worker told
    assert "cancelled" in cli(url, "tasks", "cancel", made["queued"].task_id).stdout
    assert "completed" in cli(url, "tasks", "cancel", made["done"].task_id).stdout
    store.renew_task(made["running"].task_id, "w1", utcnow(), utcnow() + LEASE)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CANCEL_CHANNEL)
    marked = cli(url, "--redis-url", REDIS_URL, "tasks", "cancel", made["running"].task_id)
    assert "cancellation requested (running)" in marked.stdout, marked.output
    messages = [pubsub.get_message(timeout=1) for _ in range(5)]  # the first read may be the subscribe reply
    assert [m["data"] for m in messages if m] == [made["running"].task_id.encode()]
    assert store.load_task(made["running"].task_id).cancel_requested_at is not None
    # an unknown id is one line, exit 1
    missing = cli(url, "tasks", "show", "nope")
    assert missing.exit_code == 1 and missing.output.strip().splitlines() == ["Error: task 'nope' does not exist"]


def test_health_and_metrics_report_task_counts_ages_and_lost_leases(sqlite: tuple[str, Store]) -> None:
    url, store = sqlite
    made = fill(store)
    with HealthChecker(Settings(storage_url=url), store=store) as checker:
        report = checker.check()
    data = report.to_json()["tasks"]
    assert data["by_status"] == {"cancelled": 0, "completed": 1, "failed": 0, "input_required": 1, "working": 2}
    assert data["expired_leases"] == 2 and data["oldest_working_seconds"] >= 3600
    samples = {(m.name, tuple(s.labels.values())): s.value for m in state_metrics(report) for s in m.samples}
    assert samples[("sessionq_mcp_tasks", ("working",))] == 2
    assert samples[("sessionq_mcp_task_expired_leases", ())] == 2
    assert samples[("sessionq_mcp_task_oldest_working_seconds", ())] >= 3600
    health = cli(url, "health")
    assert json.loads(health.stdout)["tasks"]["by_status"]["completed"] == 1
    # And the tasks sweep without a queue only deletes expired tasks; a dry run counts what it would do
    queued = Settings(storage_url=url, redis_url=REDIS_URL)
    assert run_sweep("tasks", store, queued, dry_run=True) == {"deleted": 0, "dispatched": 2}
    assert run_sweep("tasks", store, Settings(storage_url=url), now=utcnow() + timedelta(days=2)) == {
        "deleted": 4, "dispatched": 0}
    assert made and store.list_tasks().items == []


def test_the_worker_runs_the_tasks_queue_only_with_an_mcp_app() -> None:
    no_app = CliRunner().invoke(main, ["--redis-url", REDIS_URL, "worker", "--queues", "tasks"],
                                env={"SESSIONQ_MCP_APP": ""})
    assert no_app.exit_code == 1
    assert "the tasks queue runs MCP tools: give the server with --mcp-app" in no_app.output
    bad = CliRunner().invoke(main, ["--redis-url", REDIS_URL, "worker", "--mcp-app", "tests.no_such_module:server"])
    assert bad.exit_code == 1 and "cannot import tests.no_such_module" in bad.output
    spec = "sessionq.workers.mcp.tasks:TASKS_EXTENSION"
    not_a_server = CliRunner().invoke(main, ["--redis-url", REDIS_URL, "worker", "--mcp-app", spec])
    assert not_a_server.exit_code == 1 and "TASKS_EXTENSION is not an MCPServer" in not_a_server.output
