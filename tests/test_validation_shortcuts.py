"""The validators' shortcuts decide exactly as the full checks do (pure logic, no services).

``check_json_object`` passes plainly valid documents without walking them twice or
encoding them; ``check_id`` and ``check_text`` skip the regex and the UTF-8 encoding
for ASCII. Each must accept, normalise and refuse (with the same message) exactly
what the full check does.
"""

from __future__ import annotations

import json
import random
import re
from collections import OrderedDict
from enum import IntEnum
from types import MappingProxyType
from typing import Any

import pytest

from sessionq.models.errors import ValidationError
from sessionq.models.validation import (
    DEFAULT_MAX_JSON_DEPTH,
    _check_json_object_full,
    check_id,
    check_json_object,
    check_text,
)


class Level(IntEnum):
    LOW = 1


def _outcome(func: Any, *args: Any, **kwargs: Any) -> tuple[str, Any]:
    try:
        return "ok", func(*args, **kwargs)
    except ValidationError as exc:
        return "error", str(exc)


def _nested(depth: int, leaf: Any = 1) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": leaf}
    for _ in range(depth):
        value = {"k": value}
    return value


EDGE_DOCUMENTS: list[Any] = [
    None, {}, {"a": 1}, {"a": None, "b": True, "c": 1.5, "d": "x", "e": [1, "2", None], "f": (1, 2)},
    {"a": 2**63 - 1}, {"a": -(2**63) + 1}, {"a": 2**63}, {"a": -(2**63)}, {"a": float("nan")},
    {"a": float("inf")}, {"a": -1.7976931348623157e308}, {"a": 5e-324}, {"": 1}, {"$a": 1}, {"a.b": 1},
    {"a\x00": 1}, {"a": "x\x00"}, {"é": 1}, {"a": "é"}, {"a": "\ud800"}, {"\ud800": 1}, {1: "a"},
    {"a": {1, 2}}, {"a": b"x"}, {"a": Level.LOW}, {"a": MappingProxyType({"b": 1})}, {"a": OrderedDict(b=1)},
    OrderedDict(a=1), MappingProxyType({"a": 1}), [1], "x", 3, {"k" * 1024: 1}, {"k" * 1025: 1},
    {"a": "\n\"\\\x01" * 10}, _nested(DEFAULT_MAX_JSON_DEPTH - 1), _nested(DEFAULT_MAX_JSON_DEPTH),
    _nested(DEFAULT_MAX_JSON_DEPTH + 1), {"a": [[[[]]]]}, {"a": True, "b": False},
    _nested(DEFAULT_MAX_JSON_DEPTH - 1, "s"), _nested(DEFAULT_MAX_JSON_DEPTH, "s"),
    _nested(DEFAULT_MAX_JSON_DEPTH + 1, "s"),
    {"a": "x" * 5000}, {"a": "é" * 10},
]


@pytest.mark.parametrize("field_names", [True, False])
@pytest.mark.parametrize("value", EDGE_DOCUMENTS, ids=lambda v: repr(v)[:40])
def test_check_json_object_shortcut_matches_the_full_check(value: Any, field_names: bool) -> None:
    for max_bytes in (1024 * 1024, 64, 8):
        assert _outcome(check_json_object, "m", value, max_bytes=max_bytes, field_names=field_names) == _outcome(
            _check_json_object_full, "m", value, max_bytes, field_names)


def _random_value(rng: random.Random, depth: int) -> Any:
    pick = rng.randrange(12 if depth < 5 else 8)
    if pick == 0:
        return rng.choice([None, True, False])
    if pick == 1:
        return rng.choice([0, -1, 2**63 - 1, 2**63, -(2**63), rng.randrange(-10**6, 10**6)])
    if pick == 2:
        return rng.choice([0.5, -1e300, float("nan"), float("inf"), 1e-310, rng.random()])
    if pick in (3, 4, 5, 6, 7):
        alphabet = "ab $.\x00\n\"\\é\u2028\U0001F600"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
    if pick in (8, 9):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if pick == 10:
        return tuple(_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 3)))
    return {_random_key(rng): _random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def _random_key(rng: random.Random) -> Any:
    if rng.random() < 0.03:
        return rng.randrange(10)
    return "".join(rng.choice("abk$.\x00é") for _ in range(rng.randrange(0, 5)))


def test_check_json_object_shortcut_matches_the_full_check_on_random_documents() -> None:
    rng = random.Random(20261130)
    accepted = refused = 0
    for _ in range(5000):
        value = {_random_key(rng): _random_value(rng, 1) for _ in range(rng.randrange(1, 5))}
        max_bytes = rng.choice([1024 * 1024, 40, 200])
        for field_names in (True, False):
            fast = _outcome(check_json_object, "meta", value, max_bytes=max_bytes, field_names=field_names)
            assert fast == _outcome(_check_json_object_full, "meta", value, max_bytes, field_names), value
            accepted += fast[0] == "ok"
            refused += fast[0] == "error"
    assert accepted > 500 and refused > 500  # the corpus exercises both outcomes


def test_check_json_object_size_bound_holds_for_worst_case_strings() -> None:
    # A string of control characters is 6 bytes a character in JSON: the bound must cover it.
    value = {"a": "\x01" * 100}
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    assert _outcome(check_json_object, "m", value, max_bytes=size - 1)[0] == "error"
    assert _outcome(check_json_object, "m", value, max_bytes=size)[0] == "ok"


_ID_RE = re.compile(r"[\x21-\x7e]+")


def test_check_id_matches_the_visible_ascii_alphabet() -> None:
    for code in range(0x3000):
        value = f"a{chr(code)}b"
        if 0xD800 <= code <= 0xDFFF:
            continue
        ok = _outcome(check_id, "id", value)[0] == "ok"
        assert ok == bool(_ID_RE.fullmatch(value)), hex(code)
    assert _outcome(check_id, "id", "\U0001F600")[0] == "error"


@pytest.mark.parametrize("value", ["", "abc", "é" * 3, "a\x00", "\ud800", "x" * 10, "é" * 5, "\U0001F600" * 2])
def test_check_text_counts_utf8_bytes(value: str) -> None:
    for max_bytes in (0, 5, 9, 10, 100):
        size = len(value.encode("utf-8", "surrogatepass"))
        outcome = _outcome(check_text, "t", value, max_bytes=max_bytes)
        if "\ud800" in value:
            assert outcome == ("error", "t is not valid UTF-8 (it contains a lone surrogate)")
        elif size > max_bytes:
            assert outcome == ("error", f"t is {size} bytes; the limit is {max_bytes}")
        elif "\x00" in value:
            assert outcome == ("error", "t must not contain NUL characters")
        else:
            assert outcome == ("ok", value)
