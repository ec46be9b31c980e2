"""Fault case R6 of issue #9: nobody is let in, no secret is logged.

* A missing, wrong or timing-probed token gets 401 from a real uvicorn server. The
  probe sends wrong tokens sharing 0..N-1 leading characters with the real one; the
  test asserts only on status codes and reports the median latency per shared-prefix
  length (evidence for the constant-time compare, never asserted: no timing assertions).
* Secrets planted in the configuration (a PostgreSQL URL with a password, the API
  token) appear in no log line: ``sessionq serve`` and ``sessionq health`` run as real
  processes at DEBUG level against a reachable and an unreachable database, and every
  ``*.log`` file the fault suite wrote so far in this pytest run is scanned as well.
"""

from __future__ import annotations

import logging
import random
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis

from sessionq.models import Settings, Store
from sessionq.workers.http import create_app
from sessionq.workers.logs import RedactingFilter
from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.support_faults import PLANTED_TOKEN, assert_no_secrets, figures_path, record_figures, with_password
from tests.support_http import ServerThread, cli_command, dead_port, free_port, subprocess_env, with_port
from tests.support_jobs import ROOT
from tests.support_services import wait_port

PROBES_PER_LENGTH = 40



def _probe(token: str, shared: int, rng: random.Random) -> str:
    """A wrong token of the same length sharing exactly ``shared`` leading characters."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    wrong = rng.choice([c for c in alphabet if c != token[shared]])
    return token[:shared] + wrong + "".join(rng.choice(alphabet) for _ in range(len(token) - shared - 1))


def test_r6_missing_wrong_and_timing_probed_tokens_get_401(
    pg_store: Store, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # The product's redaction (as `sessionq serve` installs it), told no secret by name:
    # its patterns alone must mask URL passwords and tokens (uvicorn's access log here
    # even shows query strings; `sessionq serve` turns that log off).
    caplog.handler.addFilter(RedactingFilter())
    client = redis.Redis.from_url(REDIS_URL)
    settings = Settings(storage_url=with_password(POSTGRES_URL), redis_url=REDIS_URL, api_token=PLANTED_TOKEN)
    rng = random.Random(9)
    lengths = [0, 1, 4, 8, 16, len(PLANTED_TOKEN) - 1]
    probes = [(n, _probe(PLANTED_TOKEN, n, rng)) for n in lengths for _ in range(PROBES_PER_LENGTH)]
    rng.shuffle(probes)
    latencies: dict[int, list[float]] = {n: [] for n in lengths}
    statuses: dict[str, set[int]] = {}
    with ServerThread(create_app(settings, store=pg_store, redis_client=client)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        # When requests come without a token, with the wrong scheme, or with a wrong token
        for path in ("/session-health", "/metrics"):
            statuses.setdefault("missing", set()).add(http.get(path).status_code)
            statuses.setdefault("wrong_scheme", set()).add(
                http.get(path, headers={"Authorization": f"Basic {PLANTED_TOKEN}"}).status_code)
            statuses.setdefault("token_in_query", set()).add(http.get(f"{path}?token={PLANTED_TOKEN}").status_code)
            statuses.setdefault("longer_token", set()).add(
                http.get(path, headers={"Authorization": f"Bearer {PLANTED_TOKEN}x"}).status_code)
        # And a timing probe walks prefixes of the real token (interleaved, same length)
        for shared, token in probes:
            started = time.perf_counter()
            status = http.get("/session-health", headers={"Authorization": f"Bearer {token}"}).status_code
            latencies[shared].append(time.perf_counter() - started)
            statuses.setdefault("timing_probe", set()).add(status)
        good = http.get("/session-health", headers={"Authorization": f"Bearer {PLANTED_TOKEN}"}).status_code
    client.close()
    medians = {n: round(statistics.median(v) * 1e6) for n, v in latencies.items()}
    record_figures(request, "R6-auth", requests=len(probes) + 9, statuses={k: sorted(v) for k, v in statuses.items()},
                   median_latency_us_by_shared_prefix=medians, good_token=good)
    # Then every one of them is refused with 401, and only the real token is let in
    assert statuses == {k: {401} for k in statuses}
    assert good == 200
    assert_no_secrets([("caplog", caplog.text)])


def _serve(storage_url: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = subprocess_env(STORAGE_URL=storage_url, REDIS_URL=REDIS_URL, SESSIONQ_API_TOKEN=PLANTED_TOKEN,
                         SESSIONQ_LOG_LEVEL="DEBUG")
    with log.open("wb") as out:
        proc = subprocess.Popen([*cli_command("serve", "--port", str(port))], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    wait_port(port, timeout=60)
    return proc, port


def test_r6_no_secret_in_any_log_line(pg_store: Store, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # Given sessionq serve on a reachable database and on an unreachable one, both
    # configured with a password in the URL and an API token, logging at DEBUG
    reachable = with_password(POSTGRES_URL)
    unreachable = with_port(reachable, dead_port())
    logs = {name: tmp_path / f"serve-{name}.log" for name in ("up", "down")}
    procs = []
    try:
        proc, port = _serve(reachable, logs["up"])
        procs.append(proc)
        # When clients send wrong tokens, tokens in the query string, and the real one
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {PLANTED_TOKEN}"}):
                http.get("/session-health", headers=headers)
                http.get(f"/metrics?token={PLANTED_TOKEN}", headers=headers)
        # And the one on the unreachable database waits for it, a line per attempt, then gives up
        with logs["down"].open("wb") as out:
            down = subprocess.run([*cli_command("serve", "--port", str(free_port()), "--wait", "2")], cwd=ROOT,
                                  env=subprocess_env(STORAGE_URL=unreachable, REDIS_URL=REDIS_URL,
                                                     SESSIONQ_API_TOKEN=PLANTED_TOKEN, SESSIONQ_LOG_LEVEL="DEBUG"),
                                  stdout=out, stderr=subprocess.STDOUT, timeout=60, check=False)
        assert down.returncode == 1 and "does not answer" in logs["down"].read_text(errors="replace")
        # And `sessionq health` reports the unreachable database
        health = subprocess.run([*cli_command("health", "--timeout", "2")], cwd=ROOT, capture_output=True, text=True,
                                env=subprocess_env(STORAGE_URL=unreachable, REDIS_URL=REDIS_URL,
                                                   SESSIONQ_API_TOKEN=PLANTED_TOKEN, SESSIONQ_LOG_LEVEL="DEBUG"),
                                timeout=60, check=False)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    assert health.returncode == 1 and "unreachable" in health.stdout
    # Then no line of theirs, nor of any log the fault suite wrote in this run, holds a secret
    base = figures_path(request.config).parent
    suite_logs = [p for p in base.rglob("*.log") if p.is_file()]
    texts = [(p.name, p.read_text(errors="replace")) for p in suite_logs]
    texts += [("health stdout", health.stdout), ("health stderr", health.stderr)]
    scanned = assert_no_secrets(texts)
    record_figures(request, "R6-logs", log_files=len(suite_logs), lines_scanned=scanned,
                   serve_down_lines=len(logs["down"].read_text(errors="replace").splitlines()))
