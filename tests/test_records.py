"""Records: validation with one error type and clear messages, JSON round trips."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessionq.models import (
    AgentState,
    ChatMessage,
    ChatSession,
    FileRecord,
    StreamEvent,
    TransportSession,
    ValidationError,
)
from tests.conftest import T0

RECORDS = [
    ChatSession("s1", model="m", created_at=T0, updated_at=T0 + timedelta(seconds=1), metadata={"a": [1, {"b": None}]}),
    ChatMessage("m1", "s1", "assistant", "hello", created_at=T0, metadata={"tokens": 3}, seq=4),
    FileRecord("f1", "gemini", "files/abc", "a.txt", 12, "text/plain", T0, T0 + timedelta(days=2), {"k": "v"}),
    TransportSession("mcp-1", created_at=T0, working_directory="/w", transport_state={"x": 1}, agent_context={}),
    AgentState("agent", "key", {"deep": [1, 2.5, "x"]}, "mcp-1", T0, None),
    StreamEvent("7", "mcp-1", "stream", {"jsonrpc": "2.0", "result": {"$schema": "x"}}, T0),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_json_round_trip(record: object) -> None:
    # Given a record, When it goes through real JSON text, Then it comes back equal
    data = json.loads(json.dumps(record.to_json()))  # type: ignore[attr-defined]
    assert type(record).from_json(data) == record  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ChatSession(""), "session_id must not be empty"),
        (lambda: ChatSession(123), "session_id must be a string"),  # type: ignore[arg-type]
        (lambda: ChatSession("a b"), "visible ASCII"),
        (lambda: ChatSession("x" * 256), "limit is 255"),
        (lambda: ChatSession("s", status="paused"), "status must be one of"),
        (lambda: ChatSession("s", created_at=datetime(2026, 1, 1)), "timezone-aware"),
        (lambda: ChatSession("s", created_at="yesterday"), "ISO 8601"),  # type: ignore[arg-type]
        (lambda: ChatSession("s", created_at=datetime(9000, 1, 1, tzinfo=UTC)), "between 1970 and 2200"),
        (lambda: ChatSession("s", created_at=T0, updated_at=T0 - timedelta(1)), "earlier than created_at"),
        (lambda: ChatSession("s", metadata={"$where": 1}), "may not start with '$'"),
        (lambda: ChatSession("s", metadata={"a.b": 1}), "contain '.'"),
        (lambda: ChatSession("s", metadata={"a": float("nan")}), "non-finite"),
        (lambda: ChatSession("s", metadata={"a": b"bytes"}), "not a JSON type"),
        (lambda: ChatSession("s", metadata=[1]), "must be a JSON object"),  # type: ignore[arg-type]
        (lambda: ChatSession("s", message_count=-1), "between 0 and"),
        (lambda: ChatSession("s", message_count=True), "must be an integer"),
        (lambda: ChatMessage("m", "s", "robot", "x"), "role must be one of"),
        (lambda: ChatMessage("m", "s", "user", "nul\x00byte"), "NUL"),
        (lambda: ChatMessage("m", "s", "user", "\ud800"), "not valid UTF-8"),
        (lambda: ChatMessage("m", "s", "user", "x" * (4 * 1024 * 1024 + 1)), "limit is 4194304"),
        (lambda: ChatMessage("m", "s", "user", None), "content must be a string"),  # type: ignore[arg-type]
        (lambda: FileRecord("f", "p", "u", size=-5), "size must be between 0"),
        (lambda: FileRecord("f", "p", ""), "uri must not be empty"),
        (lambda: TransportSession("t", status="zombie"), "status must be one of"),
        (lambda: AgentState("a", "k", object()), "not a JSON type"),
    ],
)
def test_invalid_values_raise_one_error_type_naming_the_field(build: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("$", r"\$").replace(".", r"\.").replace("'", "'")):
        build()  # type: ignore[operator]


def test_deep_nesting_is_rejected() -> None:
    doc: dict[str, object] = {}
    node = doc
    for _ in range(40):
        node["n"] = {}
        node = node["n"]  # type: ignore[assignment]
    with pytest.raises(ValidationError, match="nested deeper than 32"):
        ChatSession("s", metadata=doc)


def test_from_json_rejects_unknown_and_missing_fields() -> None:
    with pytest.raises(ValidationError, match="unknown field"):
        ChatSession.from_json({"session_id": "s", "colour": "red"})
    with pytest.raises(ValidationError, match="ChatMessage"):
        ChatMessage.from_json({"message_id": "m"})
    with pytest.raises(ValidationError, match="must be a JSON object"):
        ChatSession.from_json(["s"])  # type: ignore[arg-type]


def test_datetimes_are_normalised_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    s = ChatSession("s", created_at=datetime(2026, 1, 1, 14, 0, tzinfo=plus_two))
    assert s.created_at == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert s.created_at.tzinfo is UTC
    assert ChatSession("s", created_at="2026-01-01T12:00:00Z").created_at == s.created_at  # type: ignore[arg-type]


def test_transport_recoverability_rules() -> None:
    live = TransportSession("t", created_at=T0)
    assert live.recoverable_at(T0 + timedelta(days=1))
    gone = live.replace(status="disconnected", disconnected_at=T0, grace_expires_at=T0 + timedelta(minutes=10))
    assert gone.recoverable_at(T0 + timedelta(minutes=9))
    assert not gone.recoverable_at(T0 + timedelta(minutes=10))
    assert not live.replace(recovery_attempts=3).recoverable_at(T0)
    assert not live.replace(status="expired").recoverable_at(T0)


@given(st.text(max_size=200))
def test_any_text_content_is_stored_or_clearly_rejected(text: str) -> None:
    try:
        message = ChatMessage("m", "s", "user", text)
    except ValidationError as exc:
        assert "content" in str(exc)
        assert "\x00" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    else:
        assert message.content == text


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda c: st.lists(c) | st.dictionaries(st.text(), c)))
def test_any_json_metadata_is_accepted_or_clearly_rejected(value: object) -> None:
    try:
        s = ChatSession("s", created_at=T0, metadata={"v": value})
    except ValidationError as exc:
        assert str(exc).startswith("metadata")
    else:
        assert s.metadata == {"v": value}
