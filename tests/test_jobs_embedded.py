"""Unit tests on the in-process (stub) broker and SQLite: actors, group commit,
retries, dead letters, exports, and the embedded runtime's no-drop shutdown."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sessionq.models import ChatSession, Settings, Store, StoreUnavailable, WriteResult, open_store, utcnow
from sessionq.models.store import SessionWrite
from sessionq.workers import broker as broker_module
from sessionq.workers import middleware as middleware_module
from sessionq.workers.embedded import EmbeddedRuntime
from sessionq.workers.groupcommit import GroupCommitter
from sessionq.workers.outbox import Outbox
from sessionq.workers.producer import Producer
from tests.conftest import T0, messages, session


def _settings(tmp_path: Path) -> Settings:
    return Settings(storage_url=f"sqlite:///{tmp_path / 'e.db'}", export_dir=str(tmp_path / "exports"),
                    outbox_path=str(tmp_path / "outbox.db"))


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[EmbeddedRuntime, Producer]]:
    """An embedded runtime on SQLite and a producer bound to it."""
    runtime = EmbeddedRuntime(_settings(tmp_path), threads=4).start()
    producer = Producer(runtime.settings)
    yield runtime, producer
    producer.close()
    runtime.stop()


def test_saves_appends_duplicates_and_late_saves(embedded: tuple[EmbeddedRuntime, Producer]) -> None:
    runtime, producer = embedded
    # Given an append sent before its session's save, a save sent twice, and an older save arriving last
    producer.append_messages("s1", messages("s1", 2, start=2))
    new = session("s1", at=T0 + timedelta(minutes=5), model="new")
    producer.save_session(new, messages("s1", 2))
    producer.save_session(new, messages("s1", 2))
    producer.save_session(session("s1", at=T0, model="old"), messages("s1", 1))
    # When the runtime drains
    runtime.join(60)
    # Then nothing is duplicated and the newest save wins
    store = broker_module.get_store()
    stored = store.load_session("s1")
    assert (stored.model, stored.message_count) == ("new", 4)
    assert sorted(m.message_id for m in store.load_messages("s1")) == ["m0", "m1", "m2", "m3"]
    assert runtime.dead_letters() == []


def test_transport_file_and_agent_state_jobs(embedded: tuple[EmbeddedRuntime, Producer]) -> None:
    runtime, producer = embedded
    now = utcnow()
    # Given a registered transport, a heartbeat, a disconnect, a file and an agent state
    producer.register_transport({"mcp_session_id": "t1", "created_at": (now - timedelta(minutes=1)).isoformat()})
    runtime.join(30)
    producer.heartbeat("t1", now - timedelta(seconds=30))
    runtime.join(30)
    producer.mark_disconnected("t1", now)
    producer.save_file({"file_id": "f1", "provider_name": "p", "uri": "file:///x",
                        "expires_at": (now - timedelta(seconds=1)).isoformat()})
    producer.put_agent_state({"agent_id": "a", "key": "k", "value": {"n": 1}})
    runtime.join(30)
    store = broker_module.get_store()
    # Then each landed, and the files sweep removes the expired file
    assert store.load_transport("t1").status == "disconnected"
    assert store.load_file("f1").uri == "file:///x"
    assert store.get_agent_state("a", "k", utcnow()).value == {"n": 1}  # type: ignore[union-attr]
    producer.run_sweep("files")
    runtime.join(30)
    assert store.stats().total_files == 0


def test_invalid_jobs_are_dead_lettered_and_the_worker_goes_on(embedded: tuple[EmbeddedRuntime, Producer]) -> None:
    runtime, producer = embedded
    import dramatiq

    # Given jobs that skip the producer's checks: a path escaping the export dir,
    # an unknown sweep, an archive of a session that never comes (retried, then dead)
    for actor, arg, queue in [
        ("export_session", {"session_id": "s", "path": "../escape.json"}, "bulk"),
        ("run_sweep", "nope", "maintenance"),
    ]:
        runtime.broker.enqueue(dramatiq.Message(queue_name=queue, actor_name=actor, args=(arg,), kwargs={}, options={}))
    producer.save_session(session("ok"))
    runtime.join(60)
    reasons = sorted(d.reason for d in runtime.dead_letters())
    # Then each has its reason, and the good job still ran
    assert len(reasons) == 2
    assert "outside the export directory" in reasons[0] and "kind must be one of" in reasons[1]
    assert broker_module.get_store().load_session("ok").session_id == "ok"
    assert not (Path(runtime.settings.export_dir).parent / "escape.json").exists()


def test_export_job_writes_every_format_under_the_export_dir(embedded: tuple[EmbeddedRuntime, Producer]) -> None:
    runtime, producer = embedded
    producer.save_session(session("../x/y", metadata={"a": 1}), [])
    producer.save_session(session("s2"), messages("s2", 3))
    runtime.join(30)
    for fmt in ("json", "text", "markdown"):
        producer.export("s2", fmt)
    producer.export("../x/y", "json")
    runtime.join(30)
    root = Path(runtime.settings.export_dir)
    assert sorted(p.name for p in root.iterdir()) == ["%2E%2E%2Fx%2Fy.json", "s2.json", "s2.md", "s2.txt"]
    data = json.loads((root / "s2.json").read_text(encoding="utf-8"))
    assert [m["message_id"] for m in data["messages"]] == ["m0", "m1", "m2"]
    assert "## assistant" in (root / "s2.md").read_text(encoding="utf-8")


class _FlakyStore:
    """Wraps a store: fails any batch holding a poisoned session, counts calls."""

    def __init__(self, store: Store, poisoned: str) -> None:
        self.store, self.poisoned, self.calls, self.held = store, poisoned, 0, 0
        self.gate = threading.Event()

    def save_sessions(self, writes: Sequence[SessionWrite]) -> WriteResult:
        self.held = len(writes)
        assert self.gate.wait(60), "the test never opened the gate"
        self.held = 0
        self.calls += 1
        if any(s.session_id == self.poisoned for s, _ in writes):
            raise StoreUnavailable("poisoned write")
        return self.store.save_sessions(writes)

    def save_sessions_unless_forgotten(
        self, writes: Sequence[SessionWrite], now: datetime
    ) -> tuple[WriteResult, set[str]]:
        return self.save_sessions(writes), set()


def _concurrent_saves(committer: GroupCommitter, flaky: _FlakyStore, ids: list[str]) -> dict[str, BaseException]:
    """Save ``ids[0]`` and hold its commit open, queue the rest behind it, then open the store.

    The first save starts alone so that its batch cannot gather the others (the
    committer's gather delay would otherwise let one batch take all of them).
    """
    errors: dict[str, BaseException] = {}

    def save(sid: str) -> None:
        try:
            committer.save(ChatSession(session_id=sid, created_at=T0), [])
        except BaseException as exc:
            errors[sid] = exc

    flaky.gate.clear()
    threads = [threading.Thread(target=save, args=(sid,)) for sid in ids]
    threads[0].start()
    while flaky.held < 1:  # the first save alone is being committed, held at the gate
        threading.Event().wait(0.01)
    for t in threads[1:]:
        t.start()
    while committer._queue.qsize() + flaky.held < len(ids):  # all the others queued behind it
        threading.Event().wait(0.01)
    flaky.gate.set()
    for t in threads:
        t.join(30)
    return errors


def test_group_commit_batches_concurrent_saves(tmp_path: Path) -> None:
    real = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    real.upgrade()
    flaky = _FlakyStore(real, poisoned="bad")
    committer = GroupCommitter(flaky)  # type: ignore[arg-type]
    # Given 20 threads saving while a commit is in progress
    errors = _concurrent_saves(committer, flaky, [f"s{i}" for i in range(20)])
    # Then all 20 are stored with two transactions: the one held open and one for the rest
    assert errors == {}
    assert flaky.calls == 2 and committer.batches == 2
    assert real.stats().total_sessions == 20
    # And when one write of a batch is bad, only its own save fails
    errors = _concurrent_saves(committer, flaky, ["first"] + [f"t{i}" for i in range(9)] + ["bad"])
    assert list(errors) == ["bad"] and isinstance(errors["bad"], StoreUnavailable)
    assert real.stats().total_sessions == 30
    committer.close()
    real.close()


def test_group_commit_does_not_wait_once_every_recent_saver_handed_in(tmp_path: Path) -> None:
    real = open_store(f"sqlite:///{tmp_path / 'w.db'}")
    real.upgrade()
    # Given a committer that would wait a minute for more writes once its queue is empty
    committer = GroupCommitter(real, gather_delay=60)
    # When one thread saves three times in a row (it is the only recent saver)
    for i in range(3):
        committer.save(ChatSession(session_id=f"w{i}", created_at=T0), [], timeout=30)
    # Then each save was committed at once, in its own batch (no wait for the delay)
    assert committer.batches == 3
    assert real.stats().total_sessions == 3
    committer.close()
    real.close()


def test_a_save_after_close_is_refused_not_left_waiting(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    store.upgrade()
    committer = GroupCommitter(store)
    committer.save(ChatSession(session_id="a", created_at=T0))  # the flusher has run
    committer.close()
    with pytest.raises(RuntimeError, match="closed"):
        committer.save(ChatSession(session_id="b", created_at=T0), timeout=30)
    store.close()


class _DownStore:
    """A store whose batches fail, then which is unreachable for single saves."""

    def __init__(self) -> None:
        self.calls = 0

    def save_sessions(self, writes: Sequence[SessionWrite]) -> WriteResult:
        self.calls += 1
        if len(writes) > 1:
            raise ValueError("a bad write somewhere in the batch")
        raise StoreUnavailable("postgresql unavailable: connection refused")

    def save_sessions_unless_forgotten(
        self, writes: Sequence[SessionWrite], now: datetime
    ) -> tuple[WriteResult, set[str]]:
        return self.save_sessions(writes), set()


def test_a_store_outage_fails_the_rest_of_a_split_batch_at_once() -> None:
    down = _DownStore()
    committer = GroupCommitter(down)  # type: ignore[arg-type]
    flaky = _FlakyStore(down, poisoned="nobody")  # type: ignore[arg-type]
    committer.store = flaky  # type: ignore[assignment]
    # Given a batch of 10 saves that fails, then a store that is down for single saves
    errors = _concurrent_saves(committer, flaky, [f"o{i}" for i in range(10)])
    # Then every save fails with the outage, after one single-save attempt, not ten
    assert len(errors) == 10
    assert all(isinstance(e, StoreUnavailable) for e in errors.values())
    assert down.calls == 1 + 1 + 1  # the first save alone, the batch of nine, one single save
    committer.close()


def test_stop_spools_what_it_could_not_finish_and_start_replays_it(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    # Given jobs accepted while no worker thread runs (the runtime was never started)
    broker_module.configure(settings)
    runtime = EmbeddedRuntime(settings)
    runtime.broker.enqueue(__import__("dramatiq").Message(
        queue_name="sessions", actor_name="save_session", args=({"session_id": "late"},), kwargs={}, options={}))
    # When the runtime shuts down before running them, they are spooled, not dropped
    runtime.worker = _NoWorker()  # type: ignore[assignment]
    assert runtime.stop(timeout=0.2) == 1
    assert Outbox(settings.outbox_path).count() == 1
    # And the next start runs them
    with EmbeddedRuntime(settings) as again:
        again.join(30)
        assert broker_module.get_store().load_session("late").session_id == "late"
    assert Outbox(settings.outbox_path).count() == 0


class _NoWorker:
    def stop(self, *args: Any) -> None:
        pass


def test_transient_store_errors_retry_with_backoff_then_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSIONQ_JOB_MIN_BACKOFF", "50")
    monkeypatch.setenv("SESSIONQ_JOB_MAX_BACKOFF", "200")
    outcomes: list[tuple[str, str]] = []
    monkeypatch.setattr(
        middleware_module, "observe_job", lambda actor, outcome, seconds=None: outcomes.append((actor, outcome))
    )
    with EmbeddedRuntime(_settings(tmp_path), threads=2) as runtime:
        # Given a store that is unavailable for the first two attempts
        committer = broker_module.get_committer()
        real = committer.store
        flaky = _FlakyStore(real, poisoned="s1")
        flaky.gate.set()
        committer.store = flaky

        def heal() -> None:
            if flaky.calls >= 2:
                flaky.poisoned = "nobody"

        original = flaky.save_sessions

        def save_sessions(writes: Sequence[SessionWrite]) -> WriteResult:
            heal()
            return original(writes)

        flaky.save_sessions = save_sessions  # type: ignore[method-assign]
        # When a save is sent
        Producer(runtime.settings).save_session(session("s1"), messages("s1", 2))
        runtime.join(30)
        # Then it was retried (not dead-lettered) and finally stored once
        assert runtime.dead_letters() == []
        assert real.load_session("s1").message_count == 2
    assert outcomes.count(("save_session", "retry")) == 2
    assert outcomes.count(("save_session", "ok")) == 1


def test_importing_the_job_system_starts_no_thread() -> None:
    import subprocess
    import sys

    from tests.support_jobs import ROOT, child_env

    # Given a fresh interpreter, when every job module is imported (as `dramatiq sessionq.workers.actors` does)
    code = ("import threading, sessionq.workers.actors, sessionq.workers.producer, sessionq.workers.embedded, "
            "sessionq.workers.dlq; print(threading.active_count())")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    # Then only the main thread runs
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
