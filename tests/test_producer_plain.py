"""The producer's plain path returns exactly what the job's ``normalize`` returns, or
steps aside (pure logic, no services).

``sessionq.workers.producer`` canonicalises common, plainly valid save and append
payloads without building records; for anything else (a bad payload included) it
returns None and the producer calls ``normalize``, which raises the specific error.
"""

from __future__ import annotations

import copy
import json
import random
from collections import OrderedDict
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from sessionq.workers import payloads
from sessionq.workers.errors import InvalidPayload
from sessionq.workers.jobs import JOBS, normalize

NOW_KEYS = ("created_at", "updated_at", "at")


def _normalize(actor: str, payload: Any) -> tuple[str, Any]:
    try:
        return "ok", normalize(actor, [payload])
    except InvalidPayload as exc:
        return "error", str(exc)


def _mask_now(value: Any) -> Any:
    """Timestamps within a minute of now (defaults) replaced by "NOW"."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in NOW_KEYS and isinstance(item, str):
                at = datetime.fromisoformat(item)
                if abs(at - datetime.now(UTC)) < timedelta(minutes=1):
                    item = "NOW"
            out[key] = _mask_now(item)
        return out
    if isinstance(value, list):
        return [_mask_now(item) for item in value]
    return value


def _check(actor: str, payload: Any) -> bool:
    """Plain path and normalize agree; True when the plain path handled it."""
    before = copy.deepcopy(payload)
    plain_path = JOBS[actor].plain
    assert plain_path is not None
    plain = plain_path(payload)
    assert payload == before  # the caller's payload is not touched
    outcome, expected = _normalize(actor, payload)
    if plain is None:
        return False
    assert outcome == "ok", f"plain path accepted what normalize refuses: {expected}"
    assert _mask_now(plain) == _mask_now(expected)
    assert list(plain) == list(expected)  # same key order, so the same JSON bytes
    for got, want in zip(plain.get("messages", []), expected.get("messages", []), strict=False):
        assert list(got) == list(want)
    return True


def _message(i: int, **extra: Any) -> dict[str, Any]:
    return {"message_id": f"m{i}", "role": "user" if i % 2 else "assistant", "content": f"text {i}", **extra}


T = "2026-01-01T12:00:00+00:00"
VALID_SAVES: list[dict[str, Any]] = [
    {"session_id": "s"},
    {"session_id": "s", "model": "m", "metadata": {"client": "x", "i": 1}, "messages": [_message(1), _message(2)]},
    {"session_id": "s", "created_at": T, "updated_at": "2026-01-01T12:05:00Z", "status": "archived"},
    {"session_id": "s", "created_at": datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=2)))},
    {"session_id": "s", "updated_at": None, "metadata": None, "messages": []},
    {"session_id": "s", "messages": [_message(1, created_at=T, metadata={"tokens": 3}, session_id="s")]},
    {"session_id": "s", "messages": [_message(1, metadata={})]},
    {"session_id": "s", "model": "é", "messages": [_message(1, content="héllo")]},
]


UNICODE_SAVE: dict[str, Any] = {
    "session_id": "s", "model": "modèle-ü", "metadata": {"user": {"name": "João", "tags": ["é", "日本"]}, "n": 1},
    "messages": [_message(1, content="Olá, ¿qué tal? ✓ 😀", metadata={"tool": {"args": {"q": "café"}}}),
                 _message(2, content="ünïcödé\n", created_at=T)],
}
VALID_SAVES.append(UNICODE_SAVE)


@pytest.mark.parametrize("payload", VALID_SAVES, ids=range(len(VALID_SAVES)))
def test_plain_save_matches_normalize(payload: dict[str, Any]) -> None:
    _check("save_session", payload)


def test_the_plain_path_takes_the_common_shapes() -> None:
    assert _check("save_session", VALID_SAVES[1])
    assert _check("save_session", VALID_SAVES[2])
    assert _check("append_messages", {"session_id": "s", "messages": [_message(1), _message(2, created_at=T)]})
    # Non-ASCII text and nested metadata are common too (P1's "unicode" mix): not sent the slow way.
    assert _check("save_session", UNICODE_SAVE)
    assert _check("append_messages", {"session_id": "s", "messages": UNICODE_SAVE["messages"]})


def test_the_plain_path_steps_aside_for_text_that_is_not_utf8_or_too_long() -> None:
    from sessionq.models.validation import DEFAULT_MAX_CONTENT_BYTES

    for content in ("lone \ud800 surrogate", "é" * (DEFAULT_MAX_CONTENT_BYTES // 2 + 1), "nul \x00"):
        payload = {"session_id": "s", "messages": [_message(1, content=content)]}
        assert not _check("save_session", payload)
        assert _normalize("save_session", payload)[0] == "error"
    assert not _check("save_session", {"session_id": "s", "metadata": {"k": ["ok", "\udfff"]}})


def _mutations(rng: random.Random, base: Any) -> Any:
    """A copy of ``base`` with one random field set to an odd or bad value."""
    value = copy.deepcopy(base)
    odd: list[Any] = [None, "", " ", "a b", "x" * 256, "x\x00", "é", 3, 2.5, True, [], {}, ["x"], T,
                      "2999-01-01T00:00:00+00:00", "2026-01-01T00:00:00", "yesterday", "\ud800",
                      datetime(2026, 1, 1), datetime(2026, 1, 1, tzinfo=UTC), "robot", "user",
                      "active", {"a.b": 1}, {"$x": 1}, {"ok": [1, {"n": None}]}, "1969-12-31T23:59:59+00:00",
                      (datetime.now(UTC) + timedelta(days=2)).isoformat(),
                      datetime.now(UTC) + timedelta(hours=12), "2025-06-01T00:00:00-05:00"]
    targets: list[dict[str, Any]] = [value]
    for m in value.get("messages", []) if isinstance(value.get("messages"), list) else []:
        if isinstance(m, dict):
            targets.append(m)
    target = rng.choice(targets)
    keys = [*target, "created_at", "updated_at", "metadata", "status", "model", "session_id", "extra", "seq"]
    key = rng.choice(keys)
    if rng.random() < 0.1:
        target.pop(key, None)
    else:
        target[key] = rng.choice(odd)
    return value


@pytest.mark.parametrize("actor,base", [
    ("save_session", VALID_SAVES[1]),
    ("save_session", VALID_SAVES[5]),
    ("save_session", UNICODE_SAVE),
    ("append_messages", {"session_id": "s", "messages": [_message(1), _message(2, created_at=T)]}),
])
def test_plain_path_agrees_with_normalize_on_random_mutations(actor: str, base: Any) -> None:
    rng = random.Random(f"{actor}{len(str(base))}")
    handled = refused = 0
    for _ in range(3000):
        payload = _mutations(rng, base)
        handled += _check(actor, payload)
        refused += _normalize(actor, payload)[0] == "error"
    assert handled > 300 and refused > 300


class _Same:
    """Equal to a string without being one."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return other == self.text

    def __hash__(self) -> int:
        return hash(self.text)


@pytest.mark.parametrize("payload", [
    "not a dict", ["x"], {"session_id": "s", "messages": ({"message_id": "m", "role": "user", "content": "x"},)},
    {"session_id": "s", "messages": [{"message_id": "m", "role": "user", "content": "x", "session_id": "other"}]},
    {"session_id": "s", "created_at": T, "updated_at": "2025-01-01T00:00:00+00:00"},
    {"session_id": "s", "messages": [{"message_id": "m", "role": "user", "content": "x", "session_id": _Same("s")}]},
    {"session_id": "s", "messages": [_message(i) for i in range(payloads.DEFAULT_MAX_MESSAGES_PER_JOB + 1)]},
])
def test_plain_save_steps_aside_for_anything_unusual(payload: Any) -> None:
    assert JOBS["save_session"].plain is not None and JOBS["save_session"].plain(payload) is None


def test_message_encoding_is_json_dumps_compact() -> None:
    from sessionq.workers.wire_codec import encode

    values: list[dict[str, Any]] = [{"a": [1, 2.5, float("nan"), None, True, "é\n\"\\\u2028"], "b": {}, "c": ()},
                                    {"queue_name": "q", "args": [{"x": -(2**63) + 1, "y": 1e-310}], "options": {}}]
    for value in values:
        assert encode(value) == json.dumps(value, separators=(",", ":"))


def test_ids_are_uuid4_and_a_forked_child_draws_its_own() -> None:
    import os
    import uuid

    from sessionq.workers.wire_codec import make_ids_ahead, uuid4

    make_ids_ahead()  # ids made ahead by a flusher are the parent's only
    ids = [uuid4() for _ in range(1000)]
    make_ids_ahead()
    assert len(set(ids)) == 1000
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 4 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the next ids it draws, while the parent draws its own
        os.write(write, ",".join(uuid4() for _ in range(50)).encode())
        os._exit(0)
    os.close(write)
    mine = {uuid4() for _ in range(50)}
    with os.fdopen(read) as pipe:
        theirs = set(pipe.read().split(","))
    os.waitpid(pid, 0)
    assert len(theirs) == 50 and not mine & theirs


@pytest.mark.parametrize("actor", sorted(JOBS))
def test_encoded_message_is_the_encoded_message_dict(actor: str) -> None:
    from sessionq.workers.wire_codec import encode, encoded_message

    for arg in ({"session_id": "s", "messages": [{"content": "é\n"}]}, "expire_sessions", {}):
        message_id, text = encoded_message(actor, arg)
        decoded = json.loads(text)
        expected = {"queue_name": JOBS[actor].queue, "actor_name": actor, "args": [arg], "kwargs": {},
                    "message_id": message_id, "message_timestamp": decoded["message_timestamp"], "options": {}}
        assert text == encode(expected)
        assert text.endswith('"options":{}}')


def test_a_buffered_job_encoded_later_is_the_same_message_and_a_snapshot(tmp_path: Any) -> None:
    from sessionq.workers.producer import Producer

    producer = Producer(url="redis://127.0.0.1:9/0", outbox_path=tmp_path / "outbox.db")  # never connects
    try:
        meta = {"client": "x", "n": 1, "f": 0.5, "ok": True, "none": None}
        payload = {"session_id": "s", "model": "m", "created_at": T, "metadata": meta,
                   "messages": [_message(1, created_at=T, metadata=dict(meta)), _message(2, created_at=T)]}
        now = producer._build("save_session", [payload])
        later = producer._build("save_session", [payload], buffered=True)
        assert now.body and later.body == b"" and later.source is not None
        expected = json.loads(now.encoded())
        # The caller changes its payload after the call: the buffered job does not see it.
        meta["client"] = "changed"
        payload["messages"][0]["content"] = "changed"  # type: ignore[index]
        payload["messages"].append(_message(3))  # type: ignore[attr-defined]
        got = json.loads(later.encoded())
        for message in (expected, got):
            message.pop("message_id"), message.pop("message_timestamp")
        assert got == expected
        text = later.encoded().decode()
        assert text == json.dumps(json.loads(text), separators=(",", ":"))  # key order kept, compact
        # Nested metadata (and non-ASCII text) is deferred too, as a deep snapshot: the
        # caller's later changes to its nested containers are not seen.
        tags = ["a", {"deep": ["é"]}]
        nested_payload = {"session_id": "s", "model": "modèle", "created_at": T, "metadata": {"tags": tags},
                          "messages": [_message(1, created_at=T, content="olá ✓", metadata={"tool": {"q": tags}})]}
        nested_now = producer._build("save_session", [nested_payload])
        nested = producer._build("save_session", [nested_payload], buffered=True)
        assert nested.body == b"" and nested.source is not None
        tags.append("changed")
        tags[1]["deep"].append("changed")  # type: ignore[index]
        got, want = json.loads(nested.encoded()), json.loads(nested_now.encoded())
        for message in (got, want):
            message.pop("message_id"), message.pop("message_timestamp")
        assert got == want and "changed" not in json.dumps(got)
        # A container of another type (the caller's own Mapping) cannot be snapshotted: encoded at once.
        odd = producer._build("save_session", [{"session_id": "s", "metadata": {"o": OrderedDict(a=1)}}],
                              buffered=True)
        assert odd.body
        # So is anything off the plain path, and a job near the size limit.
        assert producer._build("run_sweep", ["expire_sessions"], buffered=True).body
        big = {"session_id": "s", "messages": [_message(1, content="x" * (2 * 1024 * 1024))]}
        assert producer._build("save_session", [big], buffered=True).body
    finally:
        producer.close()


def test_a_job_for_another_broker_is_the_message_its_encoding_decodes_to(tmp_path: Any) -> None:
    from dramatiq import Message

    from sessionq.workers.producer import Producer

    producer = Producer(url="redis://127.0.0.1:9/0", outbox_path=tmp_path / "outbox.db")  # never connects
    try:
        payload = {"session_id": "s", "model": "é", "created_at": T, "metadata": {"tags": ["a"]},
                   "messages": [_message(1, created_at=T)]}
        # A job pushed at once, buffered snapshots, a buffered job keeping only its encoding
        jobs = [producer._build("save_session", [payload]),
                producer._build("heartbeat", [{"mcp_session_id": "t", "at": T}], buffered=True),
                producer._build("save_session", [payload], buffered=True)]
        jobs.append(producer._build("save_session", [dict(payload, metadata={"o": OrderedDict(a=1)})],
                                    buffered=True))
        assert [job.source is not None for job in jobs] == [True, True, True, False]
        for job in jobs:
            # the Dramatiq message built from the job is the one its wire encoding describes
            assert job.message().encode() == Message(**json.loads(job.encoded())).encode()
    finally:
        producer.close()


def test_now_iso_is_utcnow_isoformat(monkeypatch: pytest.MonkeyPatch) -> None:
    import time as time_module

    from sessionq.workers import producer_plain

    for ns in (0, 1_767_268_800_000_000_000, 1_767_268_800_123_456_789, 1_767_268_799_999_999_999,
               1_767_268_800_000_000_999, 1_767_268_800_000_001_000, 4_102_444_799_999_999_000):
        monkeypatch.setattr(time_module, "time_ns", lambda ns=ns: ns)
        expected = datetime.fromtimestamp(ns // 10**9, UTC).replace(microsecond=ns // 1000 % 10**6)
        assert producer_plain.utc_now_iso() == expected.isoformat()
    monkeypatch.undo()
    before = datetime.now(UTC)
    assert before <= datetime.fromisoformat(producer_plain.utc_now_iso()) <= datetime.now(UTC)
