"""Hostile-input classes for fault case R4 of issue #9: hypothesis strategies per class.

Every payload class is a strategy of ``(actor, argument)`` pairs that a producer or a
foreign wire client could send, plus the pattern its clear error must match (or
``None`` for the classes that must be *accepted safely*: stored verbatim, once).
Most hostile payloads aim at :data:`BYSTANDER`, a session that must never change.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sessionq.models import Store

BYSTANDER = "bystander"
BYSTANDERS = (BYSTANDER, "bystander-2")
MIB = 1024 * 1024
NOW = datetime.now(UTC)
SESSION_FIELDS = {"session_id", "model", "created_at", "updated_at", "status", "metadata", "messages"}
SQL_ID = "x';DROP/**/TABLE/**/sessionq_sessions;--"
SQL_TEXT = "Robert'); DROP TABLE sessionq_messages; -- \" OR 1=1 /*"

Job = tuple[str, Any]


@dataclass(frozen=True)
class PayloadClass:
    """One class of hostile job payloads."""

    name: str
    strategy: st.SearchStrategy[Job]
    error: str | None  # regex the clear error / dead-letter reason matches; None = accepted safely


def _save(**fields: Any) -> Job:
    return ("save_session", {"session_id": BYSTANDER, **fields})


def _msg(**fields: Any) -> dict[str, Any]:
    return {"message_id": "hostile", "role": "user", "content": "x", **fields}


def _save_msgs(*messages: dict[str, Any]) -> Job:
    return _save(messages=list(messages))


def _nest(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"a": value}
    return value


_letters = st.text(alphabet=string.ascii_letters, min_size=1, max_size=12)
_naive = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2025, 1, 1)).map(lambda d: d.isoformat())
_future = st.datetimes(min_value=datetime(2100, 1, 1), max_value=datetime(2199, 1, 1),
                       timezones=st.just(UTC)).map(lambda d: d.isoformat())
_ancient = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(1969, 12, 1),
                        timezones=st.just(UTC)).map(lambda d: d.isoformat())
_bad_id = st.text(min_size=1, max_size=40).filter(lambda s: not re.fullmatch(r"[\x21-\x7e]+", s))


def _at_fields(value: st.SearchStrategy[str]) -> st.SearchStrategy[Job]:
    return st.one_of(
        value.map(lambda v: _save(created_at=v)),
        value.map(lambda v: ("heartbeat", {"mcp_session_id": "t-1", "at": v})),
        value.map(lambda v: ("archive_session", {"session_id": BYSTANDER, "at": v})),
        value.map(lambda v: _save_msgs(_msg(created_at=v))),
    )


PAYLOAD_CLASSES: list[PayloadClass] = [
    PayloadClass("wrong_type_payload", st.tuples(
        st.sampled_from(["save_session", "append_messages", "heartbeat", "archive_session"]),
        st.one_of(st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=3), st.none(), st.booleans()),
    ), r"must be a JSON object"),
    PayloadClass("missing_required_field", st.sampled_from([
        ("save_session", {"model": "m"}), ("append_messages", {"session_id": BYSTANDER}),
        ("heartbeat", {"mcp_session_id": "t-1"}), ("archive_session", {"at": NOW.isoformat()}),
        _save_msgs({"message_id": "m", "role": "user"}),
    ]), r"missing"),
    PayloadClass("unknown_extra_field", st.one_of(
        _letters.filter(lambda k: k not in SESSION_FIELDS).map(lambda k: _save(**{k: 1})),
        _letters.filter(lambda k: k not in {"message_id", "role", "content", "created_at", "metadata", "session_id"})
        .map(lambda k: _save_msgs(_msg(**{k: "v"}))),
    ), r"unknown field"),
    PayloadClass("wrong_field_type", st.sampled_from([
        _save(session_id=42), ("save_session", {"session_id": ["x"]}), _save(model=7), _save(messages={"a": 1}),
        _save(metadata=["list"]), _save(status=1), _save_msgs(_msg(role=3)), _save_msgs(_msg(content=["x"])),
        ("append_messages", {"session_id": BYSTANDER, "messages": "nope"}),
    ]), r"must be"),
    PayloadClass("huge_string", st.integers(1, 64).map(lambda n: _save_msgs(_msg(content="x" * (4 * MIB + n)))),
                 r"the limit is"),
    PayloadClass("huge_id", st.integers(256, 3000).map(lambda n: _save(session_id="s" * n)), r"the limit is 255"),
    PayloadClass("deep_nesting", st.integers(33, 300).map(lambda n: _save(metadata=_nest(n))), r"nested deeper"),
    PayloadClass("nul_bytes", st.sampled_from(["content", "model", "meta", "key", "id"]).flatmap(lambda where: st.text(
        max_size=8).map(lambda t: {
            "content": _save_msgs(_msg(content=t + "\x00" + t)), "model": _save(model=t + "\x00"),
            "meta": _save(metadata={"k": "\x00" + t}), "key": _save(metadata={"k" + t.replace(".", "") + "\x00": 1}),
            "id": _save(session_id="a\x00" + t)}[where])), r"NUL|visible ASCII"),
    PayloadClass("lone_surrogate_invalid_utf8", st.sampled_from(["\ud800", "\udfff", "a\udc80b"]).flatmap(
        lambda s: st.sampled_from([_save(model=s), _save_msgs(_msg(content=s)), _save(metadata={"k": s})])),
        r"not valid UTF-8"),
    PayloadClass("mongo_dollar_key", _letters.map(lambda k: _save(metadata={"$" + k: 1})), r"may not start with '\$'"),
    PayloadClass("mongo_dotted_key", st.tuples(_letters, _letters).map(
        lambda ab: _save(metadata={"outer": {f"{ab[0]}.{ab[1]}": 1}})), r"contain '\.'"),
    PayloadClass("path_traversal", st.one_of(
        st.integers(1, 6).map(lambda n: "../" * n + "etc/passwd"),
        st.sampled_from(["/etc/passwd", "a/../../x", "..", "./../x", "/tmp/x.json", "a\x00b"]),
    ).map(lambda p: ("export_session", {"session_id": BYSTANDER, "path": p})), r"outside the export directory|NUL"),
    PayloadClass("negative_size", st.integers(max_value=-1).map(lambda n: ("save_file", {
        "file_id": "f-1", "provider_name": "p", "uri": "file:///x", "mime_type": "text/plain", "size": n})),
        r"size must be between 0"),
    PayloadClass("naive_datetime", _at_fields(_naive), r"timezone-aware"),
    PayloadClass("far_future_date", _at_fields(_future), r"in the future"),
    PayloadClass("pre_epoch_date", _at_fields(_ancient), r"between 1970 and 2200"),
    PayloadClass("extreme_utc_offset", _at_fields(st.sampled_from(["9999-12-31T23:59:59-01:00",
                                                                   "9999-12-31T23:00:00-23:59",
                                                                   "0001-01-01T00:00:00+01:00"])),
                 r"between 1970 and 2200"),
    PayloadClass("malformed_datetime", _at_fields(_letters), r"not an ISO 8601"),
    PayloadClass("unknown_actor", _letters.filter(lambda a: a not in {"heartbeat"}).map(
        lambda a: (f"evil_{a}", {"session_id": BYSTANDER})), r"unknown job|ActorNotFound"),
    PayloadClass("unknown_actor_version", st.integers(2, 99).map(
        lambda v: (f"save_session_v{v}", {"session_id": BYSTANDER})), r"unknown job|ActorNotFound"),
    PayloadClass("invalid_enum_value", st.one_of(
        _letters.map(lambda r: _save_msgs(_msg(role=r.lower() + "x"))),
        _letters.map(lambda s: _save(status=s.lower() + "x")),
        _letters.map(lambda f: ("export_session", {"session_id": BYSTANDER, "format": f + "x"})),
    ), r"must be one of"),
    PayloadClass("unknown_sweep_kind", _letters.map(lambda k: ("run_sweep", k + "_all")), r"kind must be one of"),
    PayloadClass("non_finite_number", st.sampled_from([float("nan"), float("inf"), float("-inf")]).map(
        lambda x: _save(metadata={"x": x})), r"non-finite"),
    PayloadClass("integer_overflow", st.integers(min_value=2**63, max_value=2**80).map(
        lambda n: _save(metadata={"n": n})), r"64-bit range"),
    PayloadClass("too_many_messages", st.integers(10_001, 10_003).map(lambda n: (
        "append_messages", {"session_id": BYSTANDER, "messages": [_msg(message_id=f"m{i}") for i in range(n)]})),
        r"the limit is 10000"),
    PayloadClass("empty_string", st.sampled_from([
        _save(session_id=""), _save_msgs(_msg(message_id="")),
        ("heartbeat", {"mcp_session_id": "", "at": NOW.isoformat()}),
    ]), r"must not be empty"),
    PayloadClass("invisible_or_unicode_id", _bad_id.map(lambda i: _save(session_id=i)), r"visible ASCII"),
    PayloadClass("cross_session_message", st.just(("save_session", {
        "session_id": "attacker", "messages": [_msg(session_id=BYSTANDER)]})), r"belongs to session"),
    PayloadClass("updated_before_created", st.integers(1, 10_000).map(lambda s: _save(
        created_at=(NOW - timedelta(hours=3)).isoformat(),
        updated_at=(NOW - timedelta(hours=3, seconds=s)).isoformat())), r"must not be earlier"),
    PayloadClass("sql_metacharacters", st.sampled_from([
        ("save_session", {"session_id": SQL_ID, "model": SQL_TEXT, "metadata": {"q": SQL_TEXT},
                          "messages": [_msg(message_id=SQL_ID, content=SQL_TEXT)]}),
    ]), None),
    PayloadClass("duplicate_ids_in_one_job", st.just(("save_session", {
        "session_id": "dup-ids", "messages": [_msg(message_id="same", content="first"),
                                              _msg(message_id="same", content="second")]})), None),
]

#: Wire-only classes: raw envelopes no producer would build (name -> (builder, reason regex)).
WIRE_ONLY_CLASSES = ("invalid_json_envelope", "invalid_utf8_envelope", "envelope_missing_fields",
                     "wrong_arg_count", "unexpected_kwargs", "args_not_a_list")


def examples(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """Up to ``count`` distinct examples of ``strategy``, drawn by hypothesis."""
    found: list[Any] = []

    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        found.append(value)

    collect()
    return found[:count]


def checksum(store: Store, session_ids: Iterable[str] = BYSTANDERS) -> str:
    """A digest of the sessions and their messages (every field)."""
    digest = hashlib.sha256()
    for sid in session_ids:
        digest.update(json.dumps(store.load_session(sid).to_json(), sort_keys=True).encode())
        for message in store.load_messages(sid):
            digest.update(json.dumps(message.to_json(), sort_keys=True).encode())
    return digest.hexdigest()
