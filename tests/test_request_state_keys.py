"""The MCP request-state key ring from settings: ``sessionq keys generate``, ``config
show`` redaction, one-line errors, and what health shows (fingerprints, audience, and
replicas that cannot open each other's state)."""

from __future__ import annotations

import itertools
import json
import subprocess
from typing import Any

import httpx
import pytest

from sessionq.models import Settings, Store
from sessionq.models.keyring import KeyRing, fingerprint, generate_key
from sessionq.workers.health import HealthChecker
from sessionq.workers.http import create_app
from sessionq.workers.replicas import ReplicaBook, ReplicaRing, ring_problems
from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.support_http import ServerThread, cli_command, pg_store, subprocess_env

__all__ = ["pg_store"]


def ring(replica: str, *keys: str, audience: str = "svc", ephemeral: bool = False) -> ReplicaRing:
    return ReplicaRing(replica, audience, tuple(fingerprint(k.encode()) for k in keys), ephemeral)


def test_keys_generate_prints_keys_that_make_a_ring() -> None:
    # When two keys are generated
    done = subprocess.run(cli_command("keys", "generate", "--count", "2"), env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    # Then they are two distinct lines that parse as a ring of two
    assert done.returncode == 0, done.stderr
    keys = done.stdout.split()
    assert len(keys) == 2 and len(set(keys)) == 2
    assert len(KeyRing.parse(",".join(keys), setting="test")) == 2


def test_config_show_redacts_the_keys_and_a_bad_key_is_one_line_naming_the_setting() -> None:
    keys = f"{generate_key()},{generate_key()}"
    env = subprocess_env(SESSIONQ_REQUEST_STATE_KEYS=keys, SESSIONQ_REQUEST_STATE_TTL="120",
                         SESSIONQ_REQUEST_STATE_AUDIENCE="billing")
    shown = subprocess.run(cli_command("config", "show", "--json"), env=env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    values = json.loads(shown.stdout)
    assert values["request_state_keys"] == "***"
    assert values["request_state_ttl"] == 120 and values["request_state_audience"] == "billing"
    assert all(key not in shown.stdout + shown.stderr for key in keys.split(","))
    # A key too short: one line, the setting and the position, never the value
    short = "x" * 20
    bad = subprocess.run(cli_command("config", "show"),
                         env=subprocess_env(SESSIONQ_REQUEST_STATE_KEYS=f"{keys},{short}"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "Error: request_state_keys: key 3 is 20 bytes, keys must be at least 32 (generate one with: sessionq keys "
        "generate)"]
    assert short not in bad.stderr


def test_rotation_phases_are_compatible_and_skipping_one_is_reported() -> None:
    old, new = generate_key(), generate_key()
    phases = [(old,), (old, new), (new, old), (new,)]
    # Each phase next to the one before it: every replica opens what the other seals
    for before, after in itertools.pairwise(phases):
        assert ring_problems([ring("a", *before), ring("b", *after)]) == []
    # Skipping a phase: each seals with a key the other lacks
    assert len(ring_problems([ring("a", old), ring("b", new, old)])) == 1
    assert len(ring_problems([ring("a", old), ring("b", new)])) == 2
    # Per-process keys on two replicas of one service: named as such
    problems = " | ".join(ring_problems([ring("a", generate_key(), ephemeral=True), ring("b", old), ring("c", old)]))
    assert "1 seal requestState with a per-process key (set SESSIONQ_REQUEST_STATE_KEYS)" in problems
    assert f"2 seal requestState with key {fingerprint(old.encode())}" in problems
    # Different names over the same keys: reported; another service with its own keys: not compared
    [renamed] = ring_problems([ring("a", old), ring("b", old, audience="svc-2")])
    assert "different audiences 'svc' and 'svc-2'" in renamed
    assert ring_problems([ring("a", old), ring("b", new, audience="other-service")]) == []


def test_health_shows_fingerprints_audience_and_disagreeing_replicas(pg_store: Store, redis_client: Any) -> None:
    keys = [generate_key(), generate_key()]
    settings = Settings(storage_url=POSTGRES_URL, redis_url=REDIS_URL, request_state_keys=",".join(keys),
                        request_state_audience="billing")
    book = ReplicaBook(redis_client)
    # Given two live replicas in compatible rotation phases
    book.record(ring("r1", keys[0], keys[1], audience="billing"))
    book.record(ring("r2", keys[1], keys[0], audience="billing"))
    with HealthChecker(settings, store=pg_store, redis_client=redis_client) as checker:
        report = checker.check()
        # Then health shows the configured ring by fingerprints, both replicas, no problem
        assert report.healthy, report.problems
        body = report.to_json()
        assert body["request_state"] == {"audience": "billing", "fingerprints": [fingerprint(k.encode()) for k in keys],
                                         "ttl_seconds": 600.0}
        assert [r["replica"] for r in body["mcp_replicas"]] == ["r1", "r2"]
        assert not any(key in json.dumps(body) for key in keys)
        # When a third replica comes up with a key of its own
        book.record(ring("r3", generate_key(), audience="billing"))
        report = checker.check()
    # Then health is unhealthy and says which replicas cannot serve each other's retries
    assert not report.healthy
    assert any("seal requestState with key" in p and "-32602" in p for p in report.problems)
    # And the HTTP endpoint says the same
    app = create_app(settings, store=pg_store, redis_client=redis_client)
    with ServerThread(app) as server:
        response = httpx.get(server.url + "/session-health", timeout=30)
    assert response.status_code == 503
    assert len(response.json()["mcp_replicas"]) == 3
    # And a replica that stops cleanly leaves the book; a silent one expires
    book.remove("r3")
    assert [r.replica for r in book.live()] == ["r1", "r2"]
    short = ReplicaBook(redis_client, ttl=1)
    short.record(ring("r4", keys[0], audience="billing"))
    assert "r4" in [r.replica for r in book.live()]
    redis_client.zadd("sessionq:mcp:replicas", {"r4": 1})  # as if its last report were long ago
    assert "r4" not in [r.replica for r in book.live()]


def test_settings_reject_a_repeated_key() -> None:
    key = generate_key()
    with pytest.raises(Exception, match="request_state_keys: key 2 repeats an earlier key"):
        Settings(request_state_keys=f"{key},{key}")
    assert Settings().request_state_ring is None


def test_cli_health_prints_fingerprints_and_the_audience_never_a_key() -> None:
    keys = f"{generate_key()},{generate_key()}"
    env = subprocess_env(STORAGE_URL=POSTGRES_URL, REDIS_URL=REDIS_URL, SESSIONQ_REQUEST_STATE_KEYS=keys,
                         SESSIONQ_REQUEST_STATE_AUDIENCE="billing")
    done = subprocess.run(cli_command("health"), env=env, capture_output=True, text=True, timeout=60)
    body = json.loads(done.stdout)
    assert body["request_state"]["audience"] == "billing"
    assert body["request_state"]["fingerprints"] == [fingerprint(k.encode()) for k in keys.split(",")]
    assert isinstance(body["mcp_replicas"], list)
    assert all(key not in done.stdout + done.stderr for key in keys.split(","))


def test_settings_repr_shows_no_key() -> None:
    key = generate_key()
    settings = Settings(request_state_keys=key, api_token="s3cret-token", redis_url="redis://:hunter2@127.0.0.1/0")
    shown = repr(settings)
    assert key not in shown and "s3cret-token" not in shown and "hunter2" not in shown
    assert "request_state_keys='***'" in shown and "request_state_ttl=600.0" in shown
