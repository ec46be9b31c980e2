"""Fault case R4 of issue #9, continued: hostile input on the HTTP endpoint, in config
files and in import files (the class table is in tests/test_faults_hostile.py).

HTTP requests go over a raw socket to a real uvicorn server, so header bytes no HTTP
client would send (NUL, invalid UTF-8) reach it; every hostile request is refused
(never 200, never 500) and the server still answers a good request afterwards.
Config files must fail with one ``ConfigError`` naming the setting; import files
with a per-record (line) error or one clear ``ValidationError``; imports never
change a bystander session.
"""

from __future__ import annotations

import json
import re
import socket
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st

from sessionq.models import Settings, Store
from sessionq.models.archive_io import import_file
from sessionq.models.errors import ConfigError, ValidationError
from tests.conftest import POSTGRES_URL, REDIS_URL, messages, session
from tests.support_faults import PLANTED_TOKEN, assert_no_secrets, record_figures, with_password
from tests.support_hostile import BYSTANDERS, checksum, examples
from tests.support_http import ServerThread
from tests.support_jobs import ROOT, child_env

_printable = st.text(alphabet=string.ascii_letters + string.digits + "-._~+/=", max_size=64)
Request = tuple[str, dict[str, bytes]]  # path, headers

HTTP_CLASSES: dict[str, st.SearchStrategy[Request]] = {
    "http_missing_token": st.sampled_from(["/session-health", "/metrics"]).map(lambda p: (p, {})),
    "http_wrong_token": _printable.filter(lambda t: t != PLANTED_TOKEN).map(
        lambda t: ("/session-health", {"Authorization": f"Bearer {t}".encode()})),
    "http_wrong_scheme": st.sampled_from(["Basic", "Token", "Digest", "Bearer:", "BearerX"]).map(
        lambda s: ("/session-health", {"Authorization": f"{s} {PLANTED_TOKEN}".encode()})),
    "http_oversized_header": st.integers(8_000, 70_000).map(
        lambda n: ("/session-health", {"Authorization": b"Bearer " + b"A" * n})),
    "http_raw_bytes_header": st.binary(min_size=1, max_size=32).filter(lambda b: b"\r" not in b and b"\n" not in b).map(
        lambda b: ("/session-health", {"Authorization": b"Bearer " + PLANTED_TOKEN.encode()[:5] + b + b"\x00\xff"})),
    "http_path_traversal": st.sampled_from([
        "/session-health/../metrics", "/../session-health", "/%2e%2e/session-health", "/session-health%00",
        "//session-health", "/session-health/..%2f..%2fetc%2fpasswd", "/static/../../etc/passwd",
    ]).map(lambda p: (p, {})),
    "http_sql_query_string": st.sampled_from(["'%20OR%201=1--", "1;DROP%20TABLE%20sessionq_sessions", "%27%22%3B"]).map(
        lambda q: (f"/session-health?session_id={q}", {})),
}


def _raw_get(port: int, path: str, headers: dict[str, bytes]) -> int:
    """Send one GET over a raw socket and return the response status (0 if cut off)."""
    lines = [f"GET {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name.encode() + b": " + value for name, value in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(match.group(1)) if match else 0


@pytest.fixture
def pg_store(pg_store: Store) -> Store:
    """conftest's PostgreSQL store, holding the bystander sessions no hostile case may touch."""
    for sid in BYSTANDERS:
        pg_store.save_session(session(sid, metadata={"keep": sid}), messages(sid, 3))
    return pg_store


def test_r4_hostile_http_requests_are_refused(
    pg_store: Store, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import redis

    from sessionq.workers.http import create_app

    caplog.set_level(logging.DEBUG)
    client = redis.Redis.from_url(REDIS_URL)
    settings = Settings(storage_url=with_password(POSTGRES_URL), redis_url=REDIS_URL, api_token=PLANTED_TOKEN)
    app = create_app(settings, store=pg_store, redis_client=client)
    statuses: dict[str, list[int]] = {}
    with ServerThread(app) as server:
        # When hypothesis-drawn hostile requests of every class hit the endpoints
        for name, strategy in HTTP_CLASSES.items():
            for path, headers in examples(strategy, 12):
                statuses.setdefault(name, []).append(_raw_get(server.port, path, headers))
        # Then a good request still gets its health report
        good = _raw_get(server.port, "/session-health", {"Authorization": f"Bearer {PLANTED_TOKEN}".encode()})
    client.close()
    record_figures(request, "R4-http", requests=sum(map(len, statuses.values())),
                   statuses={k: sorted(set(v)) for k, v in statuses.items()}, good_request=good)
    # And no hostile request was let in or broke the server
    for name, codes in statuses.items():
        assert codes and all(code in (400, 401, 404, 431) for code in codes), (name, codes)
    assert set(statuses["http_wrong_token"]) == {401} and set(statuses["http_missing_token"]) == {401}
    assert good == 200
    assert_no_secrets([("caplog", caplog.text)])


def _config(name: str, text: str | bytes) -> Callable[[Path], Path]:
    def write(directory: Path) -> Path:
        path = directory / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    return write


_ints = ("max_pool_size", "sweep_batch_size", "worker_threads", "session_ttl")
CONFIG_CLASSES: dict[str, tuple[st.SearchStrategy[Callable[[Path], Path]], str]] = {
    "config_invalid_syntax": (st.sampled_from([
        _config("c.yaml", "a: [[[["), _config("c.yaml", "key: value\n  bad indent: : :"), _config("c.toml", "a = = 1"),
        _config("c.toml", "[section\nx=1")]), r"cannot parse"),
    "config_wrong_type": (
        st.tuples(st.sampled_from(_ints), st.sampled_from(["[1, 2]", "{a: 1}", "'many'", "true"])).map(
            lambda kv: _config("c.yaml", f"{kv[0]}: {kv[1]}")),
        r"(max_pool_size|sweep_batch_size|worker_threads|session_ttl)"),
    "config_negative_size": (st.tuples(st.sampled_from(_ints), st.integers(max_value=0)).map(
        lambda kv: _config("c.yaml", f"{kv[0]}: {kv[1]}")), r"must be positive"),
    "config_unknown_key": (st.text(alphabet=string.ascii_lowercase, min_size=3, max_size=12).filter(
        lambda k: k not in Settings.__dataclass_fields__).map(lambda k: _config("c.yaml", f"{k}_x: 1")),
        r"unknown setting"),
    "config_nul_or_invalid_utf8": (st.sampled_from([
        _config("c.yaml", b"storage_url: \"sqlite:///x\xff\"\n"), _config("c.yaml", 'export_dir: "a\\0b"\n'),
        _config("c.toml", b"storage_url = \"sqlite:///\xfe\"")]), r"NUL|not valid UTF-8"),
    "config_not_a_mapping": (st.sampled_from([_config("c.yaml", "- a\n- b\n"), _config("c.yaml", "42")]),
                             r"must hold a mapping"),
    "config_bad_url_scheme": (st.sampled_from(["ftp", "file", "javascript", "http"]).map(
        lambda s: _config("c.yaml", f"storage_url: '{s}://host/../../etc/passwd'")), r"unsupported scheme"),
}


@pytest.mark.parametrize("name", list(CONFIG_CLASSES))
def test_r4_hostile_config_files_raise_one_clear_error(name: str, tmp_path: Path) -> None:
    strategy, pattern = CONFIG_CLASSES[name]
    for n, write in enumerate(examples(strategy, 8)):
        directory = tmp_path / str(n)
        directory.mkdir()
        path = write(directory)
        # When the hostile file is loaded, then one ConfigError names the problem
        with pytest.raises(ConfigError) as info:
            Settings.load(path, environ={})
        assert re.search(pattern, str(info.value)), str(info.value)
        assert "\n" not in str(info.value) and len(str(info.value)) < 500


def test_r4_hostile_config_file_through_the_cli_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"max_pool_size: [1]\napi_token: " + PLANTED_TOKEN.encode() + b"\n")
    # When the CLI is started with it, then it exits 1 with one "Error:" line, no traceback, no secret
    done = subprocess.run([sys.executable, "-m", "sessionq.cli", "--config", str(path), "config", "show"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("Error: max_pool_size") and "Traceback" not in done.stderr
    assert_no_secrets([("stderr", done.stderr), ("stdout", done.stdout)])


HEADER = '{"format":"sessionq-jsonl","version":1}\n'


def _session_line(sid: str, **extra: Any) -> str:
    return json.dumps({"type": "session", "session_id": sid, "created_at": "2026-01-01T00:00:00+00:00", **extra}) + "\n"


def _message_line(sid: str, mid: str, seq: int, **extra: Any) -> str:
    return json.dumps({"type": "message", "session_id": sid, "message_id": mid, "seq": seq, "role": "user",
                       "content": "c", "created_at": "2026-01-01T00:00:00+00:00", **extra}) + "\n"


# name -> strategy of file bytes, and the pattern every reported error (or the raised one) matches
IMPORT_CLASSES: dict[str, tuple[st.SearchStrategy[bytes], str]] = {
    "import_invalid_utf8": (st.binary(min_size=1, max_size=8).filter(lambda b: not _is_utf8(b)).map(
        lambda b: (HEADER + _session_line("imp-a", model="MODEL")).encode().replace(b"MODEL", b)
        + _session_line("imp-b").encode()), r"not valid UTF-8|not JSON"),
    "import_truncated_json": (st.integers(5, 40).map(
        lambda n: (HEADER + _session_line("imp-a")[:n] + "\n" + _session_line("imp-b")).encode()),
        r"not JSON|unknown record type|malformed"),
    "import_unknown_version": (st.integers(4, 10**6).map(
        lambda v: (f'{{"format":"sessionq-jsonl","version":{v}}}\n' + _session_line("imp-a")).encode()),
        r"unsupported sessionq-jsonl version"),
    "import_duplicate_ids": (st.just((HEADER + _session_line("imp-a") + _session_line("imp-a")
                                      + _message_line("imp-a", "m1", 1) + _message_line("imp-a", "m1", 1)).encode()),
                             r"^$"),
    "import_hostile_records": (st.sampled_from([
        _session_line(BYSTANDERS[0], model="overwrite?", metadata={"$set": 1}),
        _session_line("imp-a", model="a\u0000b"),
        _session_line("imp-a", created_at="2026-01-01T00:00:00"),
        _session_line("imp-a", created_at="9999-01-01T00:00:00+00:00"),
        _session_line("imp-a", message_count=-5),
        _session_line("imp-a", metadata={"a.b": 1}),
        _message_line(BYSTANDERS[0], "m0", -1),
        _message_line(BYSTANDERS[0], "m0", 1, content="replaced?", role="robot"),
        json.dumps({"type": "agent_state", "agent_id": "imp-a", "key": "k", "value": {"$set": 1}}) + "\n",
        json.dumps({"type": "transport", "mcp_session_id": "imp-t", "status": "zombie"}) + "\n",
        json.dumps({"type": "file", "file_id": "imp-f", "provider_name": "p", "uri": "u", "size": -1}) + "\n",
    ]).map(lambda line: (HEADER + line).encode()),
        r"\$|NUL|timezone-aware|between|must be|contain '\.'|role"),
}


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b'"' not in data and b"\\" not in data and b"\n" not in data


@pytest.mark.parametrize("name", list(IMPORT_CLASSES))
def test_r4_hostile_import_files_are_rejected_per_record(
    name: str, pg_store: Store, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    strategy, pattern = IMPORT_CLASSES[name]
    before = checksum(pg_store)
    reported = 0
    for n, data in enumerate(examples(strategy, 6)):
        path = tmp_path / f"import-{n}.jsonl"
        path.write_bytes(data)
        # When the hostile file is imported
        try:
            report = import_file(pg_store, path)
        except ValidationError as exc:
            # Then either the whole file is refused with one clear error ...
            assert re.search(pattern, str(exc)), str(exc)
            reported += 1
            continue
        # ... or each bad record is reported with its line and the rest is imported
        for error in report.errors:
            assert error.startswith("line ") and re.search(pattern, error), error
        reported += report.error_count
        if pattern == r"^$":
            assert report.error_count == 0
            assert [m.message_id for m in pg_store.load_messages("imp-a")] == ["m1"]
        else:
            assert report.error_count >= 1
    # And no bystander session changed
    assert checksum(pg_store) == before
    record_figures(request, "R4-import", klass=name, files=6, errors_reported=reported)


def test_r4_import_with_invalid_utf8_through_the_cli_is_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes((HEADER + _session_line("imp-a", model="M")).encode().replace(b'"M"', b'"\xff\xfe"'))
    done = subprocess.run([sys.executable, "-m", "sessionq.cli", "import", str(path)], cwd=ROOT,
                          capture_output=True, text=True,
                          env=child_env(STORAGE_URL=f"sqlite:///{tmp_path / 's.db'}"), timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "rejected line 2: model is not valid UTF-8" in done.stdout + done.stderr
