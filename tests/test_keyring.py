"""The key ring every sealing feature shares: parsing, errors that never show a key, derivation."""

from __future__ import annotations

import pytest

from sessionq.errors import ConfigError
from sessionq.models.keyring import MIN_SECRET_BYTES, KeyRing, fingerprint, generate_key


def test_generated_keys_are_long_enough_distinct_and_comma_free():
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(k.encode()) >= MIN_SECRET_BYTES and "," not in k for k in keys)


def test_parse_keeps_order_and_ignores_blanks():
    a, b = generate_key(), generate_key()
    ring = KeyRing.parse(f" {a} ,, {b} ", setting="SESSIONQ_X_KEYS")
    assert ring.secrets == (a.encode(), b.encode())
    assert ring.primary == a.encode()
    assert ring.fingerprints() == [fingerprint(a.encode()), fingerprint(b.encode())]
    assert len(ring) == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "SESSIONQ_X_KEYS: no keys given"),
        ("short-secret-value", "SESSIONQ_X_KEYS: key 1 is 18 bytes, keys must be at least 32"),
    ],
)
def test_bad_rings_name_the_setting_and_position(value, expected):
    with pytest.raises(ConfigError, match=expected) as caught:
        KeyRing.parse(value, setting="SESSIONQ_X_KEYS")
    assert "short-secret-value" not in str(caught.value)


def test_a_repeated_key_is_refused_without_showing_it():
    key = generate_key()
    with pytest.raises(ConfigError, match="key 2 repeats an earlier key") as caught:
        KeyRing.parse([key, key], setting="SESSIONQ_X_KEYS")
    assert key not in str(caught.value)


def test_repr_shows_fingerprints_never_secrets():
    key = generate_key()
    ring = KeyRing.parse(key, setting="S")
    assert key not in repr(ring) and fingerprint(key.encode()) in repr(ring)


def test_derive_gives_distinct_keys_per_purpose_and_secret():
    ring = KeyRing.parse([generate_key(), generate_key()], setting="S")
    first = list(ring.derive(b"purpose-a"))
    second = list(ring.derive(b"purpose-b"))
    assert [kid for kid, _ in first] == ring.fingerprints()
    assert all(len(key) == 32 for _, key in first + second)
    assert len({key for _, key in first + second}) == 4
    assert list(ring.derive(b"purpose-a")) == first  # deterministic
