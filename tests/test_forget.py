"""Issue 20, item 2: erasure with a receipt (``sessionq forget``, the ``forget`` job).

Every backend with real Redis: forget removes the session everywhere sessionq keeps it
and nothing else, the receipt counts it and is shown later, a second forget finds
nothing; the tombstone refuses a save arriving later, in the group committer (one query
per batch) and through a real worker process (dead-lettered ``forgotten``).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sessionq.cli import main
from sessionq.errors import SessionForgotten
from sessionq.models import AgentState, FileRecord, Settings, Store, TransportSession, open_store, utcnow
from sessionq.models.erasure import PLACES, Selector, hash_selector_value
from sessionq.models.errors import NotFound
from sessionq.models.kinds import TASKS
from sessionq.models.tasks import McpTask
from sessionq.workers.exports import export_to_file
from sessionq.workers.forget import erase
from sessionq.workers.groupcommit import GroupCommitter
from sessionq.workers.outbox import Outbox
from sessionq.workers.payloads import export_filename
from tests.conftest import POSTGRES_URL, REDIS_URL, T0, messages, session
from tests.support_jobs import WorkerProcess, dead_letters, push_raw, wait_drained, wire_message

GONE, KEPT = "s-gone", "s-kept"


def _settings(tmp_path: Path, **fields: Any) -> Settings:
    return Settings(storage_url="sqlite:///unused.db", export_dir=str(tmp_path / "exports"),
                    outbox_path=str(tmp_path / "outbox.db"), **fields)


def _save_job(session_id: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"session_id": session_id, "metadata": metadata or {},
            "messages": [{"message_id": "late", "role": "user", "content": "written after the erasure"}]}


def _dead_letter(client: Any, queue: str, actor: str, arg: Any) -> None:
    rid, data = wire_message(actor, arg, queue)
    client.zadd(f"dramatiq:{queue}.XQ", {rid: time.time() * 1000})
    client.hset(f"dramatiq:{queue}.XQ.msgs", rid, data)


def _populate(store: Store, client: Any, settings: Settings) -> None:
    """One session to forget and one bystander, with records in every place."""
    store.save_session(session(GONE, metadata={"user": "u-1"}), messages(GONE, 3))
    store.save_session(session(KEPT, metadata={"user": "u-2"}), messages(KEPT, 2))
    store.register_transport(TransportSession("t-gone", created_at=T0, metadata={"session_id": GONE}))
    store.register_transport(TransportSession("t-kept", created_at=T0))
    store.put_agent_state(AgentState("agent", "k1", "v", mcp_session_id="t-gone", updated_at=T0))
    store.put_agent_state(AgentState("agent", "k2", "v", mcp_session_id=GONE, updated_at=T0))
    store.put_agent_state(AgentState("agent", "k3", "v", mcp_session_id="t-kept", updated_at=T0))
    store.create_task(McpTask("task-owned", "tool", owner="t-gone", created_at=T0))
    store.create_task(McpTask("task-args", "tool", arguments={"session_id": GONE}, created_at=T0))
    store.create_task(McpTask("task-kept", "tool", arguments={"session_id": KEPT}, created_at=T0))
    for mcp in ("t-gone", "t-gone", GONE, "t-kept"):
        store.append_event(mcp, "1", {"jsonrpc": "2.0", "id": 1, "result": {}}, T0)
    store.save_file(FileRecord("f-gone", "p", "file:///a", uploaded_at=T0, metadata={"session_id": GONE}))
    store.save_file(FileRecord("f-kept", "p", "file:///b", uploaded_at=T0))
    # MCP event streams in Redis (the event store's layout)
    client.xadd("sessionq:mcp:events:t-gone", {"s": "1"})
    client.sadd("sessionq:mcp:open:t-gone", "1")
    client.xadd("sessionq:mcp:events:t-kept", {"s": "1"})
    # Jobs: ready, delayed, on each queue; dead letters; the outbox
    push_raw(client, [("save_session", _save_job(GONE)), ("append_messages", _save_job(GONE) | {"metadata": None}),
                      ("register_transport", {"mcp_session_id": "t-gone"}), ("save_session", _save_job(KEPT))])
    push_raw(client, [("export_session", {"session_id": GONE, "format": "json"})], queue="bulk")
    push_raw(client, [("run_tool_task", {"task_id": "task-owned", "leg": 1})], queue="tasks")
    push_raw(client, [("archive_session", {"session_id": GONE, "at": T0.isoformat()})], queue="sessions.DQ")
    _dead_letter(client, "sessions", "save_session", _save_job(GONE))
    _dead_letter(client, "sessions", "save_session", _save_job(KEPT))
    outbox = Outbox(settings.outbox_path)
    outbox.put([("sessions", wire_message("save_session", _save_job(GONE))[1]),
                ("sessions", wire_message("save_session", _save_job(KEPT))[1])])
    outbox.close()
    # Export files: the default name, a custom path in a subdirectory, a bystander's
    exports = Path(settings.export_dir)
    export_to_file(store, GONE, "json", exports / export_filename(GONE, "json"))
    export_to_file(store, GONE, "markdown", exports / "custom" / "mine.md")
    export_to_file(store, KEPT, "text", exports / export_filename(KEPT, "text"))


def _found_removed(receipt: Any) -> dict[str, tuple[int, int]]:
    return {p: (c["found"], c["removed"]) for p, c in receipt.places.items() if c["found"] or c["removed"]}


def test_forget_removes_the_session_everywhere_and_nothing_else(
    store: Store, redis_client: Any, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, redis_url=REDIS_URL)
    _populate(store, redis_client, settings)
    # When the session is forgotten
    receipt = erase(Selector(session_id=GONE), store=store, settings=settings, redis=redis_client)
    # Then the receipt counts every place, and holds no content
    assert _found_removed(receipt) == {
        "sessions": (1, 1), "messages": (3, 3), "files": (1, 1), "transports": (1, 1), "agent_states": (2, 2),
        "tasks": (2, 2), "store_events": (3, 3), "redis_event_streams": (1, 1), "queued_jobs": (6, 6),
        "dead_letters": (1, 1), "outbox": (1, 1), "export_files": (2, 2),
    }
    assert list(receipt.places) == list(PLACES)
    assert receipt.selector == {"session_id": GONE} and receipt.tombstones == 1
    assert "message 0" not in json.dumps(receipt.to_json())
    # ... the receipt is stored and shown later
    assert store.load_receipt(receipt.receipt_id) == receipt
    # ... nothing of the session is left
    with pytest.raises(NotFound):
        store.load_session(GONE)
    assert store.load_messages(GONE) == []
    assert [t.mcp_session_id for t in store.iter_transports()] == ["t-kept"]
    assert [a.key for a in store.iter_agent_states()] == ["k3"]
    assert [t.task_id for t in store.iter_kind(TASKS)] == ["task-kept"]
    assert [f.file_id for f in store.iter_files()] == ["f-kept"]
    assert store.stats().stream_events == 1
    assert not redis_client.exists("sessionq:mcp:events:t-gone", "sessionq:mcp:open:t-gone")
    remaining = [json.loads(v) for q in ("sessions", "sessions.DQ", "bulk", "tasks")
                 for v in redis_client.hvals(f"dramatiq:{q}.msgs")]
    assert [m["args"][0]["session_id"] for m in remaining] == [KEPT]
    assert redis_client.lrange("dramatiq:sessions", 0, -1) == [remaining[0]["options"]["redis_message_id"].encode()]
    assert [d["args"][0]["session_id"] for d in dead_letters(redis_client)] == [KEPT]
    assert redis_client.zcard("dramatiq:sessions.XQ") == 1
    outbox = Outbox(settings.outbox_path)
    assert outbox.count() == 1
    outbox.close()
    files = sorted(p.name for p in Path(settings.export_dir).rglob("*") if p.is_file())
    assert files == [export_filename(KEPT, "text")]
    # ... while the bystander is whole
    assert store.load_session(KEPT).message_count == 2
    assert redis_client.exists("sessionq:mcp:events:t-kept")
    # And a late save is refused for the window
    assert store.forgotten_among([GONE, KEPT], utcnow()) == {GONE}


def test_a_second_forget_is_a_receipt_of_zeros(store: Store, redis_client: Any, tmp_path: Path) -> None:
    settings = _settings(tmp_path, redis_url=REDIS_URL)
    _populate(store, redis_client, settings)
    first = erase(Selector(session_id=GONE), store=store, settings=settings, redis=redis_client)
    # When the same session is forgotten again
    second = erase(Selector(session_id=GONE), store=store, settings=settings, redis=redis_client)
    # Then nothing is found, with no error, under a new receipt; the first receipt is unchanged
    assert second.receipt_id != first.receipt_id
    assert all(c == {"found": 0, "removed": 0} for c in second.places.values())
    assert store.load_receipt(first.receipt_id) == first
    # ... and a redelivered forget job (same receipt id) adds its zeros to the first receipt
    again = erase(Selector(session_id=GONE), store=store, settings=settings, redis=redis_client,
                  receipt_id=first.receipt_id)
    assert _found_removed(again) == _found_removed(first)


def test_forget_by_metadata_keeps_only_a_hash_of_the_value(store: Store, tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    store.save_session(session("a", metadata={"user": "alice@example.com"}), messages("a", 2))
    store.save_session(session("b", metadata={"user": "alice@example.com"}), messages("b", 1))
    store.save_session(session("c", metadata={"user": "bob@example.com"}), messages("c", 1))
    store.save_file(FileRecord("f1", "p", "file:///x", uploaded_at=T0, metadata={"user": "alice@example.com"}))
    # When every session of a user is forgotten (embedded: no Redis)
    receipt = erase(Selector.parse_metadata("user=alice@example.com"), store=store, settings=settings)
    # Then both of hers are gone, his stays
    assert _found_removed(receipt) == {"sessions": (2, 2), "messages": (3, 3), "files": (1, 1)}
    assert [s.session_id for s in store.iter_sessions()] == ["c"]
    # ... and the receipt names the key and a SHA-256 of key=value, never the value
    assert receipt.selector == {"metadata_key": "user",
                                "metadata_value_sha256": hash_selector_value("user", "alice@example.com")}
    assert "alice" not in json.dumps(store.load_receipt(receipt.receipt_id).to_json())
    assert store.forgotten_among(["a", "b", "c"], utcnow()) == {"a", "b"}


def test_the_group_committer_refuses_forgotten_saves_at_most_one_query_per_batch(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a forgotten session and a committer whose tombstone lookups are counted
    store.put_tombstones([GONE], T0, utcnow().replace(year=2100))
    calls: list[int] = []
    real = store.forgotten_among
    def counted(ids: list[str], now: datetime) -> set[str]:
        calls.append(len(ids))
        return real(ids, now)

    monkeypatch.setattr(store, "forgotten_among", counted)
    committer = GroupCommitter(store, gather_delay=0.05)
    outcomes: dict[str, BaseException | None] = {}

    def save(session_id: str) -> None:
        try:
            committer.save(session(session_id), messages(session_id, 1))
            outcomes[session_id] = None
        except BaseException as exc:
            outcomes[session_id] = exc

    # When twenty saves arrive together, one of them for the forgotten session
    ids = [GONE] + [f"s{i}" for i in range(19)]
    threads = [threading.Thread(target=save, args=(sid,)) for sid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    committer.close()
    # Then that save fails with SessionForgotten, the others are stored
    assert isinstance(outcomes[GONE], SessionForgotten)
    assert all(outcomes[sid] is None for sid in ids[1:])
    assert store.stats().total_sessions == 19
    with pytest.raises(NotFound):
        store.load_session(GONE)
    # ... and every write was checked once: in the save's own statement on PostgreSQL,
    # else with one lookup per batch (``batches`` counts the committed ones: a batch
    # holding only the refused save commits nothing)
    if store.backend == "postgresql":
        assert calls == []
    else:
        assert sum(calls) == 20 and committer.batches <= len(calls) <= committer.batches + 1


def test_cli_forget_prints_a_receipt_that_is_shown_later(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store = open_store(url)
    store.upgrade()
    store.save_session(session("s-1"), messages("s-1", 2))
    store.close()
    runner = CliRunner()
    env = {"SESSIONQ_EXPORT_DIR": str(tmp_path / "exports"), "SESSIONQ_OUTBOX_PATH": str(tmp_path / "o.db")}
    # When a session is forgotten from the command line
    result = runner.invoke(main, ["--storage-url", url, "forget", "--session", "s-1", "--json"], env=env)
    assert result.exit_code == 0, result.output
    receipt = json.loads(result.output)
    assert receipt["places"]["messages"] == {"found": 2, "removed": 2}
    # Then the receipt is shown later, as a table
    shown = runner.invoke(main, ["--storage-url", url, "forget", "--receipt", receipt["receipt_id"]], env=env)
    assert shown.exit_code == 0, shown.output
    assert f"forget receipt {receipt['receipt_id']}" in shown.output
    assert any(line.split() == ["messages", "2", "2"] for line in shown.output.splitlines())
    # ... a second forget prints zeros; user mistakes are one line
    again = runner.invoke(main, ["--storage-url", url, "forget", "--session", "s-1", "--json"], env=env)
    assert json.loads(again.output)["places"]["sessions"] == {"found": 0, "removed": 0}
    for args, message in ((["forget"], "exactly one of"), (["forget", "--metadata", "novalue"], "KEY=VALUE"),
                          (["forget", "--receipt", "fr-nope"], "no forget receipt")):
        bad = runner.invoke(main, ["--storage-url", url, *args], env=env)
        assert bad.exit_code != 0 and message in bad.output and "Traceback" not in bad.output


def test_a_worker_refuses_saves_redelivered_after_forget(pg_store: Store, redis_client: Any, tmp_path: Path) -> None:
    worker = WorkerProcess(POSTGRES_URL, log=tmp_path / "worker.log",
                           SESSIONQ_EXPORT_DIR=str(tmp_path / "exports"),
                           SESSIONQ_OUTBOX_PATH=str(tmp_path / "outbox.db"))
    try:
        # Given a session saved through a real worker process
        push_raw(redis_client, [("save_session", _save_job(GONE)), ("save_session", _save_job(KEPT))])
        wait_drained(redis_client, worker)
        assert pg_store.load_session(GONE).message_count == 1
        # ... and a save of it held by a worker that died (its redelivery is on the way)
        rid, data = wire_message("save_session", _save_job(GONE) | {"model": "held"})
        redis_client.hset("dramatiq:sessions.msgs", rid, data)
        redis_client.sadd("dramatiq:__acks__.dead-worker.sessions", rid)
        # When a forget job runs on the worker
        push_raw(redis_client, [("forget", {"receipt_id": "fr-worker", "session_id": GONE})], queue="maintenance")
        wait_drained(redis_client, worker)
        receipt = pg_store.load_receipt("fr-worker")
        assert receipt.places["sessions"] == {"found": 1, "removed": 1}
        # ... and then the held save is redelivered, with an append and a producer's retry
        redis_client.hset("dramatiq:sessions.msgs", rid, data)
        redis_client.rpush("dramatiq:sessions", rid)
        push_raw(redis_client, [("append_messages", {"session_id": GONE, "messages": _save_job(GONE)["messages"]}),
                                ("save_session", _save_job(GONE)), ("save_session", _save_job("s-new"))])
        wait_drained(redis_client, worker)
        # Then each write for the forgotten session is dead-lettered "forgotten" and nothing is re-created
        reasons = [d["options"]["dead_letter_reason"] for d in dead_letters(redis_client)]
        assert len(reasons) == 3 and all(r.startswith("forgotten: ") for r in reasons), reasons
        with pytest.raises(NotFound):
            pg_store.load_session(GONE)
        assert pg_store.load_session("s-new").message_count == 1
        assert pg_store.load_session(KEPT).message_count == 1
    finally:
        assert worker.stop() == 0, worker.output()[-2000:]
