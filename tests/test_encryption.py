"""Encryption at rest (models/sealing.py): every backend, real services, a real worker for rotation."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from sessionq.errors import SealedValueError
from sessionq.models import AgentState, Store, open_store
from sessionq.models.keyring import KeyRing, generate_key
from sessionq.models.kinds import TASKS
from sessionq.models.rotation import key_counts, pending, plan_rotation, rotate_batch
from sessionq.models.sealing import PLAIN, PLAINTEXT, Sealer, identity, key_id
from sessionq.models.tasks import McpTask
from tests.conftest import POSTGRES_URL, REDIS_URL, T0, messages, reset_store, session
from tests.support_jobs import ROOT, WorkerProcess, child_env, dead_letters, wait_drained
from tests.support_mcp import anyio_backend  # noqa: F401  (fixture)

KEY_A, KEY_B = generate_key(), generate_key()
RING_A = Sealer(KeyRing.parse(KEY_A, setting="test"))
RING_B = Sealer(KeyRing.parse(KEY_B, setting="test"))
RING_BA = Sealer(KeyRing.parse([KEY_B, KEY_A], setting="test"))
KID_A, KID_B = RING_A.key_ids[0], RING_B.key_ids[0]
SECRET = "the patient's diagnosis"


@pytest.fixture
def sealed(store: Store) -> Iterator[Store]:
    """Every backend's store, sealing under ring A (the shared stores get their sealer back after)."""
    before = store.sealer
    store.sealer = RING_A
    yield store
    store.sealer = before


def raw_rows(store: Store) -> str:
    """Everything the session, message and agent-state tables hold, read past the store's codec."""
    if store.backend == "mongodb":
        db: Any = store._db  # type: ignore[attr-defined]
        names = ("sessionq_sessions", "sessionq_messages", "sessionq_agent_state", "sessionq_tasks")
        docs = [d for name in names for d in db[name].find({}, {"_id": 0})]
        return json.dumps(docs, default=str)
    out = []
    for table in ("sessionq_sessions", "sessionq_messages", "sessionq_agent_state", "sessionq_tasks"):
        out += [list(map(str, row)) for row in store.database.execute_sql(f"SELECT * FROM {table}").fetchall()]  # type: ignore[attr-defined]
    return json.dumps(out)


def fill(store: Store, prefix: str = "s", count: int = 3) -> None:
    for i in range(count):
        sid = f"{prefix}{i}"
        msgs = [m.replace(content=f"{SECRET} {sid}/{m.message_id}", metadata={"user": "alice@example.com"})
                for m in messages(sid, 4)]
        store.save_session(session(sid, metadata={"user": "alice@example.com"}), msgs)
    store.put_agent_state(AgentState("agent", f"{prefix}-memo", {"note": SECRET}, updated_at=T0))
    lease = T0 + timedelta(minutes=1)
    task = f"{prefix}-task"
    store.create_task(McpTask(task, "tool", arguments={"q": SECRET}, created_at=T0, lease_until=lease))
    store.claim_task(task, 0, "w1", T0, lease)
    store.finish_task(task, "w1", T0, result={"content": [{"type": "text", "text": SECRET}]})


# -- the codec (pure logic) -----------------------------------------------------


def test_codec_round_trip_binds_the_record_and_names_the_key() -> None:
    where = identity("message", "s1", "m1", "content")
    value = RING_A.seal(SECRET, where)
    assert value.startswith(f"sqe1:{KID_A}:") and SECRET not in value
    assert key_id(value) == KID_A and key_id(SECRET) == PLAINTEXT
    assert RING_A.open(value, where) == SECRET and RING_BA.open(value, where) == SECRET
    assert RING_A.open(SECRET, where) == SECRET  # plaintext rows read as they are
    with pytest.raises(SealedValueError, match="moved from another record"):
        RING_A.open(value, identity("message", "s1", "m2", "content"))
    with pytest.raises(SealedValueError, match=rf"not in SESSIONQ_ENCRYPTION_KEYS \(the ring holds {KID_B}"):
        RING_B.open(value, where)
    with pytest.raises(SealedValueError, match="SESSIONQ_ENCRYPTION_KEYS is not set"):
        PLAIN.open(value, where)
    assert KEY_A not in repr(RING_BA) and KID_A in repr(RING_BA)


# -- every backend ---------------------------------------------------------------


def test_round_trip_and_no_plaintext_at_rest(sealed: Store) -> None:
    fill(sealed)
    assert sealed.load_session("s1").metadata == {"user": "alice@example.com"}
    loaded = sealed.load_messages("s1")
    assert [m.content for m in loaded] == [f"{SECRET} s1/{m.message_id}" for m in loaded]
    assert [m.metadata for m in sealed.iter_messages_of(["s0", "s2"])] == [{"user": "alice@example.com"}] * 8
    state = sealed.get_agent_state("agent", "s-memo", T0)
    assert state is not None and state.value == {"note": SECRET}
    assert [a.value for a in sealed.iter_agent_states()] == [{"note": SECRET}]
    task = sealed.load_task("s-task")
    assert task.arguments == {"q": SECRET} and task.result == {"content": [{"type": "text", "text": SECRET}]}
    assert [t.arguments for t in sealed.iter_kind(TASKS)] == [{"q": SECRET}]
    raw = raw_rows(sealed)
    assert SECRET not in raw and "alice" not in raw and KID_A in raw
    # ids, sizes and counters stay clear: stats and paging unchanged
    assert sealed.stats().total_messages == 12 and sealed.load_session("s2").message_count == 4
    # an unchanged save writes nothing (the stored metadata is compared in clear)
    assert sealed.save_session(session("s1", metadata={"user": "alice@example.com"})).sessions_written in (0, 1)


def test_a_sealed_value_moved_or_altered_is_refused(sealed: Store) -> None:
    fill(sealed)
    page = dict(sealed.sealed_page("messages", limit=4))
    first, second = ("s0", "m0"), ("s0", "m1")
    assert first in page and second in page, list(page)
    moved = sealed.reseal_rows("messages", [(second, {"content": page[second]["content"]},
                                             {"content": page[first]["content"]})])
    assert moved == 1
    with pytest.raises(SealedValueError) as caught:
        sealed.load_messages("s0")
    assert "\n" not in str(caught.value) and KID_A in str(caught.value)
    value = page[first]["content"]
    tampered = value[:-6] + ("A" if value[-6] != "A" else "B") + value[-5:]
    sealed.reseal_rows("messages", [(first, {"content": value}, {"content": tampered})])
    with pytest.raises(SealedValueError, match=r"does not open \(altered, or moved"):
        sealed.iter_messages_of(["s0"]).__next__()


def test_a_key_not_in_the_ring_is_named(sealed: Store) -> None:
    fill(sealed)
    sealed.sealer = RING_B
    with pytest.raises(SealedValueError, match=f"sealed under key {KID_A}, which is not in"):
        sealed.load_messages("s1")
    with pytest.raises(SealedValueError, match=KID_A):
        sealed.load_session("s1")


def test_mixed_plaintext_rows_then_rotation(sealed: Store) -> None:
    # Given rows written in clear (before encryption), rows under key A, and the ring B,A
    sealed.sealer = PLAIN
    fill(sealed, "p")
    sealed.sealer = RING_A
    fill(sealed, "a")
    sealed.sealer = RING_BA
    fill(sealed, "b", 1)
    counts = key_counts(sealed, page_size=5).total()
    # per fill: sessions' metadata, messages' content and metadata, one agent state,
    # one task's arguments and result (its input fields are empty: None, not counted)
    assert counts[PLAINTEXT] == 3 + 24 + 1 + 2 and counts[KID_A] == 3 + 24 + 1 + 2
    assert counts[KID_B] == 1 + 8 + 1 + 2
    assert sealed.load_messages("p1")[0].content.startswith(SECRET)  # mixed rows read
    # When every planned batch is rotated (one of them twice: a redelivery)
    batches = list(plan_rotation(sealed, 4))
    for table, after, until in [*batches, batches[0]]:
        rotate_batch(sealed, table, after, until, page_size=3)
    # Then everything is under key B, readable, and key A may leave the ring
    assert pending(key_counts(sealed), KID_B) == 0
    sealed.sealer = RING_B
    for prefix, count in (("p", 3), ("a", 3), ("b", 1)):
        for i in range(count):
            assert len(sealed.load_messages(f"{prefix}{i}")) == 4
            assert sealed.load_session(f"{prefix}{i}").metadata == {"user": "alice@example.com"}
    assert all(a.value == {"note": SECRET} for a in sealed.iter_agent_states())
    assert all(t.arguments == {"q": SECRET} and t.result is not None for t in sealed.iter_kind(TASKS))


# -- a real worker rotating while saves run; the CLI -------------------------------


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sessionq.cli", "--redis-url", REDIS_URL, "--storage-url", POSTGRES_URL, *args],
        cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=180,
    )


def test_rotate_while_saves_run(tmp_path: Path, redis_client: redis.Redis) -> None:
    # Given 30 sessions sealed under key A in PostgreSQL
    store = open_store(POSTGRES_URL, sealer=RING_A)
    store.upgrade()
    reset_store(store)
    fill(store, "old", 30)
    store.sealer = RING_BA
    ring = f"{KEY_B},{KEY_A}"
    worker = WorkerProcess(POSTGRES_URL, threads=4, log=tmp_path / "worker.log", SESSIONQ_ENCRYPTION_KEYS=ring)
    from sessionq.models import Settings
    from sessionq.workers.producer import Producer

    producer = Producer(Settings(redis_url=REDIS_URL, storage_url=POSTGRES_URL))
    stop = threading.Event()
    sent: list[str] = []
    latest: dict[str, int] = {}  # old session -> the last metadata version saved
    extra: dict[str, int] = {}  # old session -> messages added by those saves

    def save_forever() -> None:  # new sessions, and new saves of the sessions being rotated
        i = 0
        while not stop.is_set():
            sid = f"new{i:04d}"
            producer.save_session(session(sid, metadata={"n": i}), messages(sid, 2))
            sent.append(sid)
            old = f"old{i % 30}"
            at = T0 + timedelta(seconds=i + 1)  # later than the last save (and its message) of the session
            producer.save_session(session(old, metadata={"v": i}, at=at),
                                  messages(old, 1, start=100 + i, at=at - timedelta(seconds=100 + i)))
            latest[old] = i
            extra[old] = extra.get(old, 0) + 1
            i += 1
            time.sleep(0.005)

    saver = threading.Thread(target=save_forever)
    try:
        saver.start()
        # When the rotation runs on the worker while it drains those saves
        rotated = cli("keys", "rotate", "--batch-size", "5", "--interval", "0.2", SESSIONQ_ENCRYPTION_KEYS=ring)
        stop.set()
        saver.join()
        producer.flush(30)
        wait_drained(redis_client, worker, timeout=120)
    finally:
        stop.set()
        producer.close()
        assert worker.stop() == 0, worker.output()[-2000:]
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert f"every stored value is under key {KID_B}" in rotated.stdout
    # Then nothing is lost, every row opens, all under key B; the log names fingerprints, never keys
    store.sealer = RING_B
    assert pending(key_counts(store), KID_B) == 0
    assert len(sent) > 10, "the saves did not overlap the rotation"
    for sid in sent:
        assert len(store.load_messages(sid)) == 2, sid
    for sid in [f"old{i}" for i in range(30)]:  # a rotation never undid a save made meanwhile
        assert len(store.load_messages(sid)) == 4 + extra.get(sid, 0), sid
        # (the saves at T0+1s and T0+2s are older than the fill's last message, T0+3s: they lose)
        expected = {"v": latest[sid]} if latest.get(sid, 0) >= 2 else {"user": "alice@example.com"}
        assert store.load_session(sid).metadata == expected, sid
    log = worker.output()
    assert f"under key {KID_B}" in log and f"sealing under key {KID_B}, opening keys {KID_B}, {KID_A}" in log
    assert KEY_A not in log and KEY_B not in log
    status = cli("keys", "status", "--json", SESSIONQ_ENCRYPTION_KEYS=ring)
    assert json.loads(status.stdout)["pending"] == 0
    store.close()


def test_a_save_meeting_a_missing_key_dead_letters_naming_it(tmp_path: Path, redis_client: redis.Redis) -> None:
    from sessionq.models import Settings
    from sessionq.workers.producer import Producer

    # Given a session sealed under key A, and a worker whose ring holds only key B
    store = open_store(POSTGRES_URL, sealer=RING_A)
    store.upgrade()
    reset_store(store)
    fill(store, "old", 1)
    worker = WorkerProcess(POSTGRES_URL, threads=2, log=tmp_path / "worker.log", SESSIONQ_ENCRYPTION_KEYS=KEY_B)
    producer = Producer(Settings(redis_url=REDIS_URL, storage_url=POSTGRES_URL))
    try:
        # When it receives a save of that session and a save of a new one
        producer.save_session(session("old0", metadata={"n": 1}, at=T0 + timedelta(seconds=5)), messages("old0", 5))
        producer.save_session(session("new0"), messages("new0", 2))
        producer.flush(30)
        wait_drained(redis_client, worker, timeout=60)
        # Then the first is dead-lettered with one line naming key A, the second is stored, the worker lives
        dead = dead_letters(redis_client)
        assert worker.alive()
    finally:
        producer.close()
        assert worker.stop() == 0, worker.output()[-2000:]
    assert len(dead) == 1, dead
    reason = dead[0]["options"]["dead_letter_reason"]
    assert f"sealed under key {KID_A}, which is not in SESSIONQ_ENCRYPTION_KEYS" in reason and "\n" not in reason
    store.sealer = RING_B
    assert len(store.load_messages("new0")) == 2 and KEY_B not in worker.output()
    store.close()


def test_fingerprints_never_keys_in_config_show_and_cli_errors(tmp_path: Path) -> None:
    ring = f"{KEY_B},{KEY_A}"
    shown = cli("config", "show", SESSIONQ_ENCRYPTION_KEYS=ring)
    assert f"keys {KID_B}, {KID_A}" in shown.stdout
    assert KEY_A not in shown.stdout + shown.stderr and KEY_B not in shown.stdout
    health = cli("health", SESSIONQ_ENCRYPTION_KEYS=ring)
    encryption = json.loads(health.stdout)["encryption"]
    assert encryption == {"primary": KID_B, "keys": [KID_B, KID_A]}, health.stdout + health.stderr
    assert KEY_A not in health.stdout + health.stderr and KEY_B not in health.stdout + health.stderr
    # a store sealed under A read with only B: one line naming A's key id, exit 1
    url = f"sqlite:///{tmp_path / 'sealed.db'}"
    store = open_store(url, sealer=RING_A)
    store.upgrade()
    fill(store)
    store.close()
    read = subprocess.run(
        [sys.executable, "-m", "sessionq.cli", "--storage-url", url, "export", "s1", "--format", "json"],
        cwd=ROOT, env=child_env(SESSIONQ_ENCRYPTION_KEYS=KEY_B), capture_output=True, text=True, timeout=60,
    )
    assert read.returncode == 1 and "Traceback" not in read.stderr
    assert read.stderr.strip().count("\n") == 0 and KID_A in read.stderr, read.stderr
    assert KEY_B not in read.stderr


# -- MCP event payloads: Redis streams and the store's event log ---------------------


class _Replayed:
    """A replay ``send_callback`` keeping the notifications' data."""

    def __init__(self) -> None:
        self.data: list[Any] = []

    async def __call__(self, event: Any) -> None:
        params = getattr(event.message, "params", None)
        self.data.append(params["data"] if params else None)


def _note(text: str) -> Any:
    from sessionq.workers.mcp.event_log import MESSAGE_ADAPTER

    return MESSAGE_ADAPTER.validate_python(
        {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": text}})


@pytest.mark.anyio
async def test_redis_event_payloads_are_sealed_and_mixed_logs_replay(redis_client: redis.Redis) -> None:
    from sessionq.workers.mcp import RedisEventStore
    from sessionq.workers.mcp.event_log import decode_message, event_identity

    # Given a session log written first in clear, then sealed (compressed and not)
    plain = RedisEventStore(url=REDIS_URL).for_session("sess-enc")
    sealed = RedisEventStore(url=REDIS_URL, sealer=RING_A).for_session("sess-enc")
    packed = RedisEventStore(url=REDIS_URL, compress=True, sealer=RING_A).for_session("sess-enc")
    priming = await plain.store_event("1", None)
    await plain.store_event("1", _note("clear"))
    await sealed.store_event("1", _note(SECRET))
    await packed.store_event("1", _note(SECRET + " packed"))
    # When the raw entries are read and the log is replayed
    raw: Any = redis_client.xrange(sealed.key())
    got = _Replayed()
    await packed.replay_events_after(priming, got)
    # Then Redis holds no plaintext of the sealed events, and all three replay in order
    assert all(SECRET.encode() not in fields.get(b"m", b"") for _, fields in raw)
    assert raw[2][1][b"m"].startswith(f"sqe1:{KID_A}:".encode())
    assert got.data == ["clear", SECRET, SECRET + " packed"]
    # A sealed event moved to another session or stream does not open; a missing key is named
    with pytest.raises(SealedValueError, match="moved from another record"):
        decode_message(raw[2][1][b"m"], compressed=False, sealer=RING_A, where=event_identity("other", "1"))
    with pytest.raises(SealedValueError, match=KID_A):
        decode_message(raw[2][1][b"m"], compressed=False, sealer=RING_B, where=event_identity("sess-enc", "1"))
    for store in (plain, sealed, packed):
        await store.aclose()


def test_store_event_payloads_are_sealed(sealed: Store) -> None:
    message = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": SECRET}}
    first = sealed.append_event("mcp-1", "7", None, T0)
    sealed.append_event("mcp-1", "7", message, T0)
    found = sealed.events_after("mcp-1", first.event_id)
    assert found is not None and [e.message for e in found[1]] == [message]
    if sealed.backend == "mongodb":
        raw = json.dumps(list(sealed._db["sessionq_events"].find({}, {"_id": 0})))  # type: ignore[attr-defined]
    else:
        raw = json.dumps(sealed.database.execute_sql("SELECT message FROM sessionq_events").fetchall())  # type: ignore[attr-defined]
    assert SECRET not in raw and KID_A in raw
    sealed.sealer = RING_B
    with pytest.raises(SealedValueError, match=KID_A):
        sealed.events_after("mcp-1", first.event_id)


# -- backups stay sealed; verify reports what it cannot open ---------------------------


def _sqlite(tmp_path: Path, name: str, sealer: Sealer) -> Store:
    store = open_store(f"sqlite:///{tmp_path / name}", sealer=sealer)
    store.upgrade()
    return store


def test_backups_stay_sealed_unless_decrypted_and_restore_where_the_key_is(tmp_path: Path) -> None:
    import gzip

    from sessionq.models.archive_io import backup, restore

    source = _sqlite(tmp_path, "src.db", RING_A)
    fill(source)
    sealed = backup(source, tmp_path / "sealed")
    clear = backup(source, tmp_path / "clear", decrypt=True)
    sealed_text = gzip.decompress(sealed.path.read_bytes()).decode()
    assert SECRET not in sealed_text and "alice" not in sealed_text and f'"sealed_under":"{KID_A}"' in sealed_text
    assert SECRET in gzip.decompress(clear.path.read_bytes()).decode()
    # restored where the ring holds key A (here under B,A): equal, and sealed under B
    target = _sqlite(tmp_path, "dst.db", RING_BA)
    report = restore(target, sealed.path)
    assert report.error_count == 0 and report.messages_inserted == 12
    assert target.load_messages("s1")[3].content == f"{SECRET} s1/m3"
    assert target.load_task("s-task").arguments == {"q": SECRET}
    assert KID_A not in raw_rows(target) and KID_B in raw_rows(target)
    # restored where it is not: every sealed record reported by line, naming key A, nothing garbled
    stranger = _sqlite(tmp_path, "other.db", RING_B)
    refused = restore(stranger, sealed.path)
    assert refused.messages_inserted == 0 and refused.error_count > 0
    assert all(KID_A in line for line in refused.errors), refused.errors[:3]
    for store in (source, target, stranger):
        store.close()


def test_verify_reports_values_under_a_key_not_in_the_ring(tmp_path: Path) -> None:
    from sessionq.models.transfer import migrate, verify

    source = _sqlite(tmp_path, "src.db", RING_A)
    fill(source)
    target = _sqlite(tmp_path, "dst.db", RING_A)
    migrate(source, target, show_progress=False)
    assert verify(source, target).equal  # compared in clear
    target.sealer = RING_B  # key A removed from the ring
    source.sealer = RING_B
    report = verify(source, target)
    assert not report.equal
    assert any(f"sealed under key {KID_A}, which is not in SESSIONQ_ENCRYPTION_KEYS" in d for d in report.differences)
    assert any(d.startswith("source: 30 value(s) sealed under key") for d in report.differences), report.differences
    for store in (source, target):
        store.close()


def test_the_event_loop_task_create_seals_like_the_threaded_one(pg_store: Store) -> None:
    # Given PostgreSQL sealing under ring A, and its event-loop insert (no thread hop)
    before, pg_store.sealer = pg_store.sealer, RING_A
    try:
        create = pg_store.async_create
        assert create is not None
        task = McpTask("async-sealed-task", "tool", arguments={"q": SECRET}, created_at=T0)
        # When a task is created from a coroutine
        async def scenario() -> McpTask:
            return await create(task)

        asyncio.run(scenario())
        # Then its arguments are sealed at rest and open through the store
        raw = pg_store.database.execute_sql(  # type: ignore[attr-defined]
            "SELECT arguments FROM sessionq_tasks WHERE task_id = %s", (task.task_id,)).fetchone()[0]
        assert SECRET not in str(raw) and KID_A in str(raw)
        assert pg_store.load_task(task.task_id).arguments == {"q": SECRET}
    finally:
        pg_store.sealer = before
