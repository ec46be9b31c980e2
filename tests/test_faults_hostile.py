"""Fault case R4 of issue #9: hostile input, property-based (hypothesis).

Every class below is exercised on the surfaces named. Expected outcome: the producer
raises ``InvalidPayload`` naming the field (nothing is enqueued or spooled); on the
wire (raw Dramatiq messages pushed with HSET + RPUSH the way a foreign producer
does, docs/wire-contract.md) the job is dead-lettered with its reason, the worker
process stays alive and stores a good job afterwards, and the bystander sessions
keep the same checksum. "accepted" classes must be stored verbatim, exactly once.
HTTP, config and import classes live in tests/test_faults_hostile_surfaces.py.

| #  | class                        | surfaces                   | outcome                                   |
|----|------------------------------|----------------------------|-------------------------------------------|
| 1  | wrong_type_payload           | producer, wire             | "must be a JSON object"                   |
| 2  | missing_required_field       | producer, wire             | "missing ..."                             |
| 3  | unknown_extra_field          | producer, wire             | "unknown field(s)"                        |
| 4  | wrong_field_type             | producer, wire             | "... must be a string/array/object"       |
| 5  | huge_string                  | producer, wire             | content over 4 MiB: "the limit is"        |
| 6  | huge_id                      | producer, wire             | id over 255 chars: "the limit is 255"     |
| 7  | deep_nesting                 | producer, wire             | metadata deeper than 32: "nested deeper"  |
| 8  | nul_bytes                    | producer, wire             | "NUL" / "visible ASCII"                   |
| 9  | lone_surrogate_invalid_utf8  | producer, wire             | "not valid UTF-8"                         |
| 10 | mongo_dollar_key             | producer, wire             | "may not start with '$'"                  |
| 11 | mongo_dotted_key             | producer, wire             | "contain '.'"                             |
| 12 | path_traversal               | producer, wire (export)    | "outside the export directory"            |
| 13 | negative_size                | producer, wire (save_file) | "size must be between 0 ..."              |
| 14 | naive_datetime               | producer, wire             | "timezone-aware"                          |
| 15 | far_future_date              | producer, wire             | "in the future"                           |
| 16 | pre_epoch_date               | producer, wire             | "between 1970 and 2200"                   |
| 17 | extreme_utc_offset           | producer, wire             | year 9999 -01:00 / 0001 +01:00: "between" |
| 18 | malformed_datetime           | producer, wire             | "not an ISO 8601 datetime"                |
| 19 | unknown_actor                | producer, wire             | "unknown job" / dead letter ActorNotFound |
| 20 | unknown_actor_version        | producer, wire             | "unknown job" / dead letter ActorNotFound |
| 21 | invalid_enum_value           | producer, wire             | "must be one of" (role, status, format)   |
| 22 | unknown_sweep_kind           | producer, wire             | "kind must be one of"                     |
| 23 | non_finite_number            | producer, wire             | "non-finite"                              |
| 24 | integer_overflow             | producer, wire             | "64-bit range"                            |
| 25 | too_many_messages            | producer, wire             | over 10,000 per job: "the limit is 10000" |
| 26 | empty_string                 | producer, wire             | "must not be empty"                       |
| 27 | invisible_or_unicode_id      | producer, wire             | "visible ASCII"                           |
| 28 | cross_session_message        | producer, wire             | "belongs to session"                      |
| 29 | updated_before_created       | producer, wire             | "must not be earlier"                     |
| 30 | sql_metacharacters           | producer, wire             | accepted: stored verbatim, tables intact  |
| 31 | duplicate_ids_in_one_job     | producer, wire             | accepted: stored once, first one wins     |
| 32 | invalid_json_envelope        | wire                       | dead letter "DecodeError"                 |
| 33 | invalid_utf8_envelope        | wire                       | dead letter "DecodeError"                 |
| 34 | envelope_missing_fields      | wire                       | dead letter "DecodeError"                 |
| 35 | wrong_arg_count              | wire                       | dead letter "TypeError"                   |
| 36 | unexpected_kwargs            | wire                       | dead letter "TypeError"                   |
| 37 | args_not_a_list              | wire                       | dead letter "TypeError"                   |
| 38 | http_missing_token           | HTTP /session-health       | 401                                       |
| 39 | http_wrong_token             | HTTP                       | 401                                       |
| 40 | http_wrong_scheme            | HTTP                       | 401                                       |
| 41 | http_oversized_header        | HTTP                       | 401 / 431 / 400, never 200                |
| 42 | http_raw_bytes_header        | HTTP (raw socket)          | 400 / 401, never 200                      |
| 43 | http_path_traversal          | HTTP                       | 401 / 404, never 200                      |
| 44 | http_sql_query_string        | HTTP                       | 401                                       |
| 45 | config_invalid_syntax        | config file (YAML, TOML)   | ConfigError "cannot parse"                |
| 46 | config_wrong_type            | config file                | ConfigError naming the setting            |
| 47 | config_negative_size         | config file                | ConfigError "must be positive"            |
| 48 | config_unknown_key           | config file                | ConfigError "unknown setting(s)"          |
| 49 | config_nul_or_invalid_utf8   | config file                | ConfigError "NUL" / "not valid UTF-8"     |
| 50 | config_not_a_mapping         | config file                | ConfigError "must hold a mapping"         |
| 51 | config_bad_url_scheme        | config file                | ConfigError "unsupported scheme"          |
| 52 | import_invalid_utf8          | import file                | record rejected with its line             |
| 53 | import_truncated_json        | import file                | record rejected "not JSON" / malformed    |
| 54 | import_unknown_version       | import file                | ValidationError "unsupported ... version" |
| 55 | import_duplicate_ids         | import file                | accepted: stored once                     |
| 56 | import_hostile_records       | import file                | each record rejected with its line        |
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionq.models import Settings, Store
from sessionq.workers.errors import InvalidPayload
from sessionq.workers.jobs import JOBS
from sessionq.workers.producer import Producer
from tests.conftest import POSTGRES_URL, REDIS_URL, messages, session
from tests.support_faults import SessionqWorker, assert_no_secrets, record_figures, wait_until, with_password
from tests.support_hostile import (
    BYSTANDER,
    BYSTANDERS,
    PAYLOAD_CLASSES,
    SQL_ID,
    SQL_TEXT,
    WIRE_ONLY_CLASSES,
    PayloadClass,
    checksum,
    examples,
)
from tests.support_jobs import pending_jobs

ERROR_CLASSES = [c for c in PAYLOAD_CLASSES if c.error is not None]
ACCEPTED_CLASSES = [c for c in PAYLOAD_CLASSES if c.error is None]


def table_classes() -> list[str]:
    """The class names of the table in this module's docstring, in order."""
    return re.findall(r"^\| \d+\s+\| (\w+)", __doc__ or "", re.M)


def test_r4_at_least_30_classes_all_exercised() -> None:
    from tests.test_faults_hostile_surfaces import CONFIG_CLASSES, HTTP_CLASSES, IMPORT_CLASSES

    # Given the table of hostile classes and the classes the tests iterate over
    listed = table_classes()
    exercised = [c.name for c in PAYLOAD_CLASSES] + list(WIRE_ONLY_CLASSES) + list(HTTP_CLASSES) \
        + list(CONFIG_CLASSES) + list(IMPORT_CLASSES)
    # Then they are the same classes, none twice, and there are at least 30
    assert listed == exercised
    assert len(set(listed)) == len(listed) >= 30
    print(f"\nFIGURES R4-classes: {len(listed)} hostile classes")


@pytest.fixture(scope="module")
def dead_producer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Producer, Path]]:
    """A producer whose Redis is a dead port: whatever it accepts lands in its outbox."""
    from tests.support_services import free_port

    base = tmp_path_factory.mktemp("hostile-producer")
    outbox = base / "outbox.db"
    settings_ = Settings(storage_url=f"sqlite:///{base / 'unused.db'}", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                         outbox_path=str(outbox), export_dir=str(base / "exports"))
    producer = Producer(settings_)
    yield producer, outbox
    producer.close(timeout=1)


def _spooled(outbox: Path) -> int:
    import sqlite3

    if not outbox.exists():
        return 0
    with sqlite3.connect(outbox) as db:
        return int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])


@pytest.mark.parametrize("hostile", ERROR_CLASSES, ids=[c.name for c in ERROR_CLASSES])
def test_r4_producer_refuses_hostile_payloads(hostile: PayloadClass, dead_producer: tuple[Producer, Path]) -> None:
    producer, outbox = dead_producer
    before = _spooled(outbox)

    @settings(max_examples=15, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(job=hostile.strategy, buffered=st.booleans())
    def check(job: tuple[str, Any], buffered: bool) -> None:
        actor, arg = job
        # When a hostile payload is sent, directly or buffered
        with pytest.raises(InvalidPayload) as info:
            producer.send_nowait(actor, arg) if buffered else producer.send(actor, arg)
        # Then the caller gets a clear, bounded error naming the problem
        assert re.search(hostile.error or "", str(info.value)), str(info.value)[:300]
        assert 0 < len(str(info.value)) < 1000

    check()
    # And nothing was spooled (nor sent: Redis is a dead port)
    assert _spooled(outbox) == before


@pytest.mark.parametrize("hostile", ACCEPTED_CLASSES, ids=[c.name for c in ACCEPTED_CLASSES])
def test_r4_producer_accepts_safe_oddities(hostile: PayloadClass, dead_producer: tuple[Producer, Path]) -> None:
    producer, outbox = dead_producer
    before = _spooled(outbox)
    for actor, arg in examples(hostile.strategy, 3):
        producer.send(actor, arg)
    assert _spooled(outbox) > before


def _raw_envelope(rid: str, kind: str) -> bytes:
    good = {"queue_name": "sessions", "actor_name": "save_session", "args": [{"session_id": BYSTANDER}], "kwargs": {},
            "options": {"redis_message_id": rid}, "message_id": str(uuid.uuid4()),
            "message_timestamp": int(time.time() * 1000)}
    if kind == "invalid_json_envelope":
        return b'{"queue_name": "sessions", "actor_name": "save_session", "args": [{'
    if kind == "invalid_utf8_envelope":
        return json.dumps(good).replace(BYSTANDER, "bystander\udcff").encode("utf-8", "surrogateescape")
    if kind == "envelope_missing_fields":
        del good["message_timestamp"], good["actor_name"]
    elif kind == "wrong_arg_count":
        good["args"] = [{"session_id": BYSTANDER}, {"session_id": BYSTANDER}]
    elif kind == "unexpected_kwargs":
        good["kwargs"] = {"evil": True}
    elif kind == "args_not_a_list":
        good["args"] = "abc"
    return json.dumps(good).encode()


WIRE_REASONS = {"invalid_json_envelope": "DecodeError", "invalid_utf8_envelope": "DecodeError",
                "envelope_missing_fields": "DecodeError", "wrong_arg_count": "TypeError",
                "unexpected_kwargs": "TypeError", "args_not_a_list": "TypeError"}


@pytest.fixture
def pg_store(pg_store: Store) -> Store:
    """conftest's PostgreSQL store, holding the bystander sessions no hostile case may touch."""
    for sid in BYSTANDERS:
        pg_store.save_session(session(sid, metadata={"keep": sid}), messages(sid, 3))
    return pg_store


@pytest.mark.slow
def test_r4_hostile_wire_messages_are_dead_lettered_and_change_nothing(
    pg_store: Store, redis_client: redis.Redis, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Given bystander sessions (checksummed) and, on the wire, hypothesis-drawn hostile
    # messages of every class, followed by one good save
    before = checksum(pg_store)
    expected: dict[str, tuple[str, str]] = {}  # redis id -> (class, reason pattern)
    pipe = redis_client.pipeline(transaction=False)
    pushed = 0
    for hostile in PAYLOAD_CLASSES:
        for actor, arg in examples(hostile.strategy, 3):
            queue = JOBS[actor].queue if actor in JOBS else "sessions"
            rid = str(uuid.uuid4())
            message = {"queue_name": queue, "actor_name": actor, "args": [arg], "kwargs": {},
                       "options": {"redis_message_id": rid}, "message_id": str(uuid.uuid4()),
                       "message_timestamp": int(time.time() * 1000)}
            pipe.hset(f"dramatiq:{queue}.msgs", rid, json.dumps(message))
            pipe.rpush(f"dramatiq:{queue}", rid)
            pushed += 1
            if hostile.error is not None:
                expected[rid] = (hostile.name, hostile.error)
    for kind in WIRE_ONLY_CLASSES:
        rid = str(uuid.uuid4())
        pipe.hset("dramatiq:sessions.msgs", rid, _raw_envelope(rid, kind))
        pipe.rpush("dramatiq:sessions", rid)
        expected[rid] = (kind, WIRE_REASONS[kind])
        pushed += 1
    pipe.execute()
    good = {"session_id": "good-after", "model": "m",
            "messages": [{"message_id": "g", "role": "user", "content": "ok"}]}
    rid = str(uuid.uuid4())
    redis_client.hset("dramatiq:sessions.msgs", rid, json.dumps({
        "queue_name": "sessions", "actor_name": "save_session", "args": [good], "kwargs": {},
        "options": {"redis_message_id": rid}, "message_id": str(uuid.uuid4()),
        "message_timestamp": int(time.time() * 1000)}))
    redis_client.rpush("dramatiq:sessions", rid)
    # When a real worker drains the queues
    worker = SessionqWorker(with_password(POSTGRES_URL), REDIS_URL, log=tmp_path / "worker.log",
                            env={"SESSIONQ_EXPORT_DIR": str(tmp_path / "exports")})
    try:
        wait_until(lambda: pending_jobs(redis_client) == 0 or not worker.alive(), timeout=180, what="queues drained")
        # Then the worker is still alive ...
        assert worker.alive(), worker.output()[-3000:]
    finally:
        worker.stop()
    # ... every hostile message is a dead letter with the reason of its class ...
    letters: dict[str, str] = {}
    for queue in ("sessions", "maintenance", "bulk"):
        for raw_id, raw in redis_client.hgetall(f"dramatiq:{queue}.XQ.msgs").items():
            key = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            letters[key] = json.loads(raw)["options"].get("dead_letter_reason", "")
    wrong = {rid: (name, letters.get(rid)) for rid, (name, pattern) in expected.items()
             if not re.search(pattern, letters.get(rid) or "<not dead-lettered>")}
    assert wrong == {}
    assert set(letters) == set(expected), "only hostile messages may be dead-lettered"
    # ... the accepted oddities are stored verbatim and once, the good job landed,
    # and no bystander changed
    odd = pg_store.load_session(SQL_ID)
    assert (odd.model, odd.metadata) == (SQL_TEXT, {"q": SQL_TEXT})
    assert [(m.message_id, m.content) for m in pg_store.load_messages(SQL_ID)] == [(SQL_ID, SQL_TEXT)]
    assert [(m.message_id, m.content) for m in pg_store.load_messages("dup-ids")] == [("same", "first")]
    assert pg_store.load_session("good-after").message_count == 1
    after = checksum(pg_store)
    scanned = assert_no_secrets([("worker.log", worker.output())])
    record_figures(request, "R4-wire", classes=len(PAYLOAD_CLASSES) + len(WIRE_ONLY_CLASSES), messages_pushed=pushed,
                   dead_lettered=len(letters), expected_dead=len(expected), wrong_or_missing_reason=len(wrong),
                   worker_alive_after=True, bystander_checksum_unchanged=before == after, log_lines_scanned=scanned)
    assert after == before
