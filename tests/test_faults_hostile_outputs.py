"""Hostile input that reaches the files and log lines sessionq writes (issue 14).

* Temporary files: a symlink planted at the name an export, an ``export-all`` or a
  migration checkpoint writes to first must not redirect the write, and the final
  rename must not install it; a directory swapped for a symlink after the export path
  was checked must not let the export out of the export directory.
* A symlink loop in an export path and extreme UTC offsets (``9999-12-31T23:59:59-01:00``)
  are a clear ``InvalidPayload`` at the producer and a dead letter with that reason on
  the wire, never a traceback.
* Export file names are an injective encoding of the session id (``a/b`` and ``a_b``
  are two files).
* A newline in a payload field that reaches a log line (a dead-letter reason) does not
  forge a log line in the default text format.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import redis

from sessionq.models import Settings, open_store
from sessionq.models.transfer import Checkpoint
from sessionq.workers import payloads
from sessionq.workers.embedded import EmbeddedRuntime
from sessionq.workers.errors import InvalidPayload
from sessionq.workers.producer import Producer
from tests.conftest import REDIS_URL, messages, session
from tests.support_faults import SessionqWorker, wait_until
from tests.support_jobs import ROOT, child_env, dead_letters, pending_jobs, push_raw

VICTIM_TEXT = "precious: must never be overwritten by an export\n"
EXTREME_TIMES = ("9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside every export directory that a planted symlink points at."""
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_text(VICTIM_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[EmbeddedRuntime, Producer]]:
    """An embedded runtime on SQLite (export dir ``exports/``) and a producer bound to it."""
    settings = Settings(storage_url=f"sqlite:///{tmp_path / 'e.db'}", export_dir=str(tmp_path / "exports"),
                        outbox_path=str(tmp_path / "outbox.db"))
    runtime = EmbeddedRuntime(settings, threads=2).start()
    producer = Producer(runtime.settings)
    yield runtime, producer
    producer.close()
    runtime.stop()


def test_export_job_does_not_follow_a_symlink_planted_at_its_temporary_name(
    embedded: tuple[EmbeddedRuntime, Producer], victim: Path
) -> None:
    runtime, producer = embedded
    producer.save_session(session("s1"), messages("s1", 2))
    runtime.join(30)
    # Given a symlink to a file outside the export dir, planted at the temporary name
    # the export job used to write to (it runs in this process: this pid)
    exports = Path(runtime.settings.export_dir)
    exports.mkdir(parents=True, exist_ok=True)
    (exports / f".s1.json.{os.getpid()}.tmp").symlink_to(victim)
    # When the session is exported
    producer.export("s1", "json")
    runtime.join(30)
    # Then the victim is untouched and the export is a regular file holding the session
    assert runtime.dead_letters() == []
    assert victim.read_text(encoding="utf-8") == VICTIM_TEXT
    assert not (exports / "s1.json").is_symlink()
    assert json.loads((exports / "s1.json").read_text(encoding="utf-8"))["session_id"] == "s1"


def test_export_job_refuses_a_directory_swapped_for_a_symlink_after_the_check(
    embedded: tuple[EmbeddedRuntime, Producer], victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, producer = embedded
    producer.save_session(session("s1"), messages("s1", 2))
    runtime.join(30)
    exports = Path(runtime.settings.export_dir)
    (exports / "sub").mkdir(parents=True)
    checked = payloads.parse_export

    def check_then_swap(payload: Any, export_dir: Any) -> payloads.ExportRequest:
        request = checked(payload, export_dir)
        if threading.current_thread() is not threading.main_thread():  # the worker's check, not the producer's
            # Given a directory that passes the worker's check and is then swapped for a symlink out
            (exports / "sub").rmdir()
            (exports / "sub").symlink_to(victim.parent, target_is_directory=True)
        return request

    monkeypatch.setattr(payloads, "parse_export", check_then_swap)
    # When the session is exported into that directory
    producer.export("s1", "json", path="sub/s1.json")
    runtime.join(30)
    # Then nothing is written outside the export directory, and the job says why
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"]
    reasons = [d.reason for d in runtime.dead_letters()]
    assert len(reasons) == 1 and "symlink" in reasons[0] and "Traceback" not in reasons[0], reasons


@pytest.mark.parametrize("name", ["all.jsonl", "all.json.gz"])
def test_export_all_does_not_follow_a_symlink_planted_at_its_partial_name(
    tmp_path: Path, victim: Path, name: str
) -> None:
    source = f"sqlite:///{tmp_path / 'a.db'}"
    store = open_store(source)
    store.upgrade()
    store.save_session(session("s1"), messages("s1", 3))
    store.close()
    # Given a symlink planted at the temporary name `sessionq export-all` used to write to
    out = tmp_path / "out" / name
    out.parent.mkdir()
    (out.parent / f".partial-{name}").symlink_to(victim)
    # When the store is exported (a real process)
    done = subprocess.run([sys.executable, "-m", "sessionq.cli", "--storage-url", source, "export-all", "-o", str(out)],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120, check=False)
    # Then the victim is untouched and the export is a regular file in place
    assert done.returncode == 0, done.stderr
    assert victim.read_text(encoding="utf-8") == VICTIM_TEXT
    assert out.is_file() and not out.is_symlink() and out.stat().st_size > 0


def test_migration_checkpoint_does_not_follow_a_symlink_planted_at_its_temporary_name(
    tmp_path: Path, victim: Path
) -> None:
    # Given a symlink planted at the name the checkpoint used to be written to first
    path = tmp_path / "migrate.checkpoint.json"
    path.with_name(path.name + ".tmp").symlink_to(victim)
    # When a checkpoint is saved
    Checkpoint(last_session_id="s9", sessions=9).save(path)
    # Then the victim is untouched and the checkpoint reads back
    assert victim.read_text(encoding="utf-8") == VICTIM_TEXT
    assert not path.is_symlink() and Checkpoint.load(path).last_session_id == "s9"


def test_a_symlink_loop_in_an_export_path_is_a_clear_invalid_payload(tmp_path: Path) -> None:
    # Given an export directory holding a symlink loop
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "loop").symlink_to("loop")
    # When an export into the loop is validated
    with pytest.raises(InvalidPayload) as info:
        payloads.parse_export({"session_id": "s1", "path": "loop/s1.json"}, exports)
    # Then it is refused with one clear line
    assert "symlink loop" in str(info.value) and "loop/s1.json" in str(info.value)


@pytest.mark.parametrize("value", EXTREME_TIMES)
@pytest.mark.parametrize("field", ["created_at", "updated_at", "message"])
def test_extreme_utc_offsets_are_a_clear_invalid_payload_at_the_producer(
    embedded: tuple[EmbeddedRuntime, Producer], field: str, value: str
) -> None:
    _, producer = embedded
    payload: dict[str, Any] = {"session_id": "s1", "model": "m"}
    if field == "message":
        payload["messages"] = [{"message_id": "m1", "role": "user", "content": "x", "created_at": value}]
    else:
        payload[field] = value
    # When a save carries a timestamp whose UTC value is outside what datetime holds
    with pytest.raises(InvalidPayload) as info:
        producer.save_session(payload)
    # Then the producer names the field and the range
    assert re.search(r"between 1970 and 2200", str(info.value)), info.value


def test_export_file_names_are_injective_and_reversible() -> None:
    # Given ids that the old mapping sent to one file name, and long ones that differ at the end
    ids = ["a/b", "a_b", "a.b", "a%2Fb", "A_B", "..", ".hidden", "~", "x" * 255, "/" * 254 + "a", "/" * 254 + "b"]
    names = [payloads.export_filename(i, "json") for i in ids]
    # Then each id has its own file name: a plain name, at most 255 bytes, not hidden
    assert len(set(names)) == len(ids)
    for session_id, name in zip(ids, names, strict=False):
        assert "/" not in name and not name.startswith(".") and len(name.encode()) <= 255
        stem = name.removesuffix(".json")
        if "~" not in stem:  # short enough: the name decodes back to the id
            assert unquote(stem) == session_id
    assert names[:2] == ["a%2Fb.json", "a_b.json"]


def test_export_jobs_of_colliding_ids_write_two_files(embedded: tuple[EmbeddedRuntime, Producer]) -> None:
    runtime, producer = embedded
    # Given sessions "a/b" and "a_b"
    for sid in ("a/b", "a_b"):
        producer.save_session(session(sid), messages(sid, 1))
    runtime.join(30)
    # When both are exported without a path
    producer.export("a/b", "json")
    producer.export("a_b", "json")
    runtime.join(30)
    # Then each has its own file, holding its own session
    exports = Path(runtime.settings.export_dir)
    written = {unquote(p.name.removesuffix(".json")): json.loads(p.read_text(encoding="utf-8"))["session_id"]
               for p in exports.iterdir()}
    assert written == {"a/b": "a/b", "a_b": "a_b"}


FORGED = "2030-01-01 00:00:00,000 CRITICAL sessionq.forged: admin login from 10.0.0.1"


@pytest.mark.slow
def test_hostile_payloads_on_the_wire_are_dead_lettered_without_traceback_or_forged_lines(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    # Given, on the wire: a save whose unknown field name carries a forged log line,
    # saves with extreme UTC offsets, and an export into a symlink loop
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "loop").symlink_to("loop")
    push_raw(redis_client, [("save_session", {"session_id": "s1", f"x\n{FORGED}\r\x1b[2K": 1})]
                           + [("save_session", {"session_id": "s1", "created_at": v}) for v in EXTREME_TIMES])
    push_raw(redis_client, [("export_session", {"session_id": "s1", "path": "loop/s1.json"})], queue="bulk")
    # When a real worker (default text log format) drains the queues
    worker = SessionqWorker(f"sqlite:///{tmp_path / 'w.db'}", REDIS_URL, log=tmp_path / "worker.log",
                            env={"SESSIONQ_EXPORT_DIR": str(exports), "SESSIONQ_LOG_FORMAT": "text"})
    try:
        wait_until(lambda: pending_jobs(redis_client) == 0 or not worker.alive(), timeout=120, what="queues drained")
        assert worker.alive(), worker.output()[-3000:]
    finally:
        worker.stop()
    # Then every job is dead-lettered with its clear reason ...
    reasons = sorted(
        d["options"]["dead_letter_reason"] for q in ("sessions", "bulk") for d in dead_letters(redis_client, q)
    )
    assert len(reasons) == 4, reasons
    assert sum("between 1970 and 2200" in r for r in reasons) == 2, reasons
    assert sum("symlink loop" in r for r in reasons) == 1, reasons
    assert sum("unknown field" in r for r in reasons) == 1, reasons
    # ... the log has no traceback, and no line begins with the forged text or holds a raw control character
    log = worker.output()
    assert "Traceback" not in log and "OverflowError" not in log and "RuntimeError" not in log, log[-3000:]
    assert "unknown field" in log
    assert not any(line.startswith(FORGED[:20]) for line in log.splitlines()), log[-3000:]
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", log), log[-3000:]
