"""The seed system's JSON export documents through ``sessionq import`` (a file or a
folder) and ``sessionq enqueue save``: one session, a list of them, or
``{"sessions", "files"}``; imported twice, the second time adds nothing."""

from __future__ import annotations

import gzip
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from sessionq.cli import main
from sessionq.models import Store, open_store
from sessionq.models.legacy import derived_message_id
from tests.support_bulk import REPO_ROOT, cli_command, cli_env, fill
from tests.support_legacy import NASTY

#: The seed document's JSON export example, verbatim ("Export Formats", "JSON Format"):
#: message_count says 4, two messages, no message ids, naive times.
SEED_EXPORT: dict[str, Any] = {
    "session_id": "abc-123",
    "model": "gemini-2.5-flash",
    "created_at": "2025-10-16T10:00:00",
    "message_count": 4,
    "messages": [
        {"role": "user", "content": "Hello!", "created_at": "2025-10-16T10:00:01"},
        {"role": "assistant", "content": "Hi there!", "created_at": "2025-10-16T10:00:02"},
    ],
}


def full_session(sid: str, status: str) -> dict[str, Any]:
    """A session as the seed's ``export_to_json`` wrote it (every field, message ids, metadata)."""
    return {
        "session_id": sid, "model": "gemini-2.5-pro", "created_at": "2025-10-16T09:00:00",
        "updated_at": "2025-10-16T09:30:00.250000", "message_count": 2, "status": status,
        "metadata": {"title": "Grüße", "n": 1},
        "messages": [
            {"message_id": f"{sid}-m1", "session_id": sid, "role": "user", "content": NASTY,
             "created_at": "2025-10-16T09:00:01", "metadata": {"tokens": 3}},
            {"message_id": f"{sid}-m2", "session_id": sid, "role": "assistant", "content": "",
             "created_at": "2025-10-16T09:00:02", "metadata": {}},
        ],
    }


SEED_FILE = {
    "file_id": "file-9", "gemini_file_name": "files/zzz", "gemini_file_uri": "https://g.example/v1beta/files/zzz",
    "display_name": "slides.pptx", "size": 10, "mime_type": "application/vnd.ms-powerpoint",
    "uploaded_at": "2025-10-16T09:00:00", "expires_at": "2025-10-18T09:00:00", "metadata": {},
}


def write_documents(folder: Path) -> list[Path]:
    """The three shapes of seed export: one session, a list, {"sessions", "files"}."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = {
        "single.json": SEED_EXPORT,
        "list.json": [full_session("list-1", "active"), full_session("list-2", "archived")],
        "both.json": {"sessions": [full_session("both-1", "expired")], "files": [SEED_FILE]},
    }
    paths = []
    for name, doc in docs.items():
        path = folder / name
        path.write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
        paths.append(path)
    return paths


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_imported(store: Store) -> None:
    """What the three documents hold, as sessionq stores it."""
    abc = store.load_session("abc-123")
    assert (abc.model, abc.status, abc.message_count) == ("gemini-2.5-flash", "active", 2)
    assert abc.created_at == datetime(2025, 10, 16, 10, 0, tzinfo=UTC)
    assert abc.updated_at == datetime(2025, 10, 16, 10, 0, 2, tzinfo=UTC)  # the last message's time
    messages = store.load_messages("abc-123")
    assert [(m.seq, m.message_id, m.role, m.content) for m in messages] == [
        (1, derived_message_id("abc-123", 1, "Hello!"), "user", "Hello!"),
        (2, derived_message_id("abc-123", 2, "Hi there!"), "assistant", "Hi there!"),
    ]
    for sid, status in (("list-1", "active"), ("list-2", "archived"), ("both-1", "expired")):
        session = store.load_session(sid)
        assert (session.status, session.metadata, session.message_count) == (status, {"title": "Grüße", "n": 1}, 2)
        assert session.updated_at == datetime(2025, 10, 16, 9, 30, 0, 250000, tzinfo=UTC)
        kept = store.load_messages(sid)
        assert [(m.message_id, m.content, m.metadata) for m in kept] == [
            (f"{sid}-m1", NASTY, {"tokens": 3}), (f"{sid}-m2", "", {})]
    record = store.load_file("file-9")
    assert (record.provider_name, record.uri, record.display_name, record.size) == (
        "gemini", "https://g.example/v1beta/files/zzz", "slides.pptx", 10)
    assert record.metadata == {"gemini_file_name": "files/zzz"}
    assert record.expires_at == datetime(2025, 10, 18, 9, 0, tzinfo=UTC)


def test_each_seed_export_shape_imports_twice_without_duplicates(store: Store, tmp_path: Path) -> None:
    # Given the seed's export documents and a sessionq store on any backend
    single, listed, both = write_documents(tmp_path / "docs")
    url = store.location
    expected = {
        single: ("1 sessions / 2 messages", "wrote 1 sessions, inserted 2 messages"),
        listed: ("2 sessions / 4 messages", "wrote 2 sessions, inserted 4 messages"),
        both: ("1 sessions / 2 messages, 1 files", "wrote 1 sessions, inserted 2 messages, 1 files written"),
    }
    for path, (read, wrote) in expected.items():
        # When each is imported
        done = cli("--storage-url", url, "import", str(path))
        # Then everything lands, and the wrong message_count is a note, not an error
        assert done.exit_code == 0, done.output
        assert f"read {read}" in done.stdout and wrote in done.stdout and "0 rejected" in done.stdout
        # And importing it again adds nothing
        again = cli("--storage-url", url, "import", str(path))
        assert again.exit_code == 0, again.output
        assert "wrote 0 sessions, inserted 0 messages" in again.stdout and "1 files written" not in again.stdout
    note = cli("--storage-url", url, "import", str(single)).stderr
    assert "note: session #1 'abc-123': message_count says 4, 2 message(s) found" in note
    assert_imported(store)
    assert store.stats().total_sessions == 4 and store.stats().total_messages == 8


def test_import_a_folder_with_one_summary(tmp_path: Path) -> None:
    # Given a folder of seed exports, a sessionq export (gzip JSON Lines), a file that is
    # not JSON and a file of another kind
    folder = tmp_path / "exports"
    write_documents(folder)
    other = open_store(f"sqlite:///{tmp_path / 'other.db'}")
    other.upgrade()
    fill(other, 3, 2, prefix="q")
    other.close()
    assert cli("--storage-url", f"sqlite:///{tmp_path / 'other.db'}", "export-all", "-o",
               str(folder / "sessionq.jsonl.gz")).exit_code == 0
    (folder / "broken.json").write_text("{oops", encoding="utf-8")
    (folder / "readme.txt").write_text("not imported", encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'dest.db'}"
    # When the folder is imported
    done = cli("--storage-url", url, "import", str(folder))
    # Then one summary counts every file; the broken one is named and makes it exit 1
    assert done.exit_code == 1, done.output
    assert done.stdout.count("\n") == 1
    assert f"imported {folder} (5 files): read 7 sessions / 14 messages, 1 files" in done.stdout
    assert "rejected broken.json: malformed JSON" in done.stderr
    assert "note: single.json: session #1 'abc-123': message_count says 4" in done.stderr
    with open_store(url) as store:
        assert_imported(store)
        assert store.stats().total_sessions == 7
    # And a second import adds nothing
    again = cli("--storage-url", url, "import", str(folder))
    assert "wrote 0 sessions, inserted 0 messages" in again.stdout, again.output


def test_naive_export_times_in_the_legacy_zone(tmp_path: Path) -> None:
    # Given the seed's export written in New York (UTC-4 on 2025-10-16)
    (single, *_) = write_documents(tmp_path / "docs")
    url = f"sqlite:///{tmp_path / 'dest.db'}"
    # When imported with --legacy-tz
    done = cli("--storage-url", url, "import", str(single), "--legacy-tz", "America/New_York")
    assert done.exit_code == 0, done.output
    # Then its times are four hours later in UTC
    with open_store(url) as store:
        assert store.load_session("abc-123").created_at == datetime(2025, 10, 16, 14, 0, tzinfo=UTC)
        assert store.load_messages("abc-123")[0].created_at == datetime(2025, 10, 16, 14, 0, 1, tzinfo=UTC)


def test_a_bad_seed_session_is_named_and_the_rest_imports(tmp_path: Path) -> None:
    # Given a list with a session whose message has an unknown role, gzip-compressed
    bad = full_session("bad-1", "active")
    bad["messages"][1]["role"] = "model"
    path = tmp_path / "list.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as out:
        json.dump([bad, full_session("good-1", "active")], out)
    url = f"sqlite:///{tmp_path / 'dest.db'}"
    # When imported
    done = cli("--storage-url", url, "import", str(path))
    # Then the bad session is named, the good one lands, exit 1
    assert done.exit_code == 1
    assert "rejected session #1 ('bad-1'): message 2: role must be one of" in done.stderr
    with open_store(url) as store:
        assert [s.session_id for s in store.iter_sessions()] == ["good-1"]


def _enqueue(url: str, path: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command("--storage-url", url, "enqueue", "save", str(path), *extra), cwd=REPO_ROOT,
        env=cli_env(SESSIONQ_OUTBOX_PATH=str(tmp_path / "outbox.db"), REDIS_URL=""), capture_output=True,
        text=True, timeout=120,
    )


def test_enqueue_save_takes_seed_exports_twice(tmp_path: Path) -> None:
    # Given the seed's export documents and no broker (the jobs run embedded)
    single, listed, both = write_documents(tmp_path / "docs")
    url = f"sqlite:///{tmp_path / 'dest.db'}"
    for _ in range(2):
        # When each is enqueued (twice)
        one = _enqueue(url, single, tmp_path)
        assert one.returncode == 0, one.stderr
        assert "saved session abc-123 (2 messages)" in one.stdout
        assert "note: session #1 'abc-123': message_count says 4, 2 message(s) found" in one.stderr
        many = _enqueue(url, listed, tmp_path)
        assert many.returncode == 0 and "saved 2 sessions (4 messages), 0 file records; 2 jobs" in many.stdout
        files = _enqueue(url, both, tmp_path)
        assert files.returncode == 0 and "saved 1 sessions (2 messages), 1 file records; 2 jobs" in files.stdout
    # Then everything is stored once
    with open_store(url) as store:
        assert_imported(store)
        assert store.stats().total_messages == 8
    # And a save payload with a bad field is still refused with one line
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(SEED_EXPORT, messages=[{"role": "robot", "content": "x",
                                                           "created_at": "2025-10-16T10:00:01"}])))
    refused = _enqueue(url, bad, tmp_path)
    assert refused.returncode == 1 and "session #1: message 1: role must be one of" in refused.stderr
    assert "Traceback" not in refused.stderr
