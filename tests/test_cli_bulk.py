"""The bulk CLI commands: migrate (killed and resumed), verify, export-all, import,
backup and restore, with their exit codes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from click.testing import CliRunner

from sessionq.cli import main
from sessionq.models import AgentState, open_store
from tests.conftest import POSTGRES_URL, T0, make_store, reset_store
from tests.support_bulk import REPO_ROOT, cli_command, cli_env, fill, fill_kinds


def _sqlite(path: Path, sessions: int = 0, kinds: int = 0) -> str:
    """A SQLite store with ``sessions`` sessions of 5 messages and ``kinds`` records of every other kind."""
    url = f"sqlite:///{path}"
    store = open_store(url)
    store.upgrade()
    if sessions:
        fill(store, sessions, 5)
    if kinds:
        fill_kinds(store, kinds)
    store.close()
    return url


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args), cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=300
    )


def test_killed_migration_resumes_without_duplicates(tmp_path: Path) -> None:
    # Given a source of 30 sessions and an empty PostgreSQL destination
    source = _sqlite(tmp_path / "src.db", 30)
    pg = make_store("postgresql", tmp_path)
    reset_store(pg)
    dest = POSTGRES_URL
    checkpoint = tmp_path / "ck.json"
    # When a slow migration (3 sessions per batch, a 1.5 s pause between batches, so a
    # starved polling thread still kills it midway) is killed midway
    proc = subprocess.Popen(
        cli_command("migrate", "--from", source, "--to", dest, "--batch-size", "3", "--pause", "1.5",
                    "--checkpoint", str(checkpoint), "--no-progress"),
        cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if checkpoint.exists() and json.loads(checkpoint.read_text())["sessions"] >= 6:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    saved = json.loads(checkpoint.read_text())
    assert not saved["done"] and saved["last_session_id"]
    partial = pg.stats().total_sessions
    assert 6 <= partial < 30
    # Then --resume finishes it from the checkpoint
    resumed = _run("migrate", "--from", source, "--to", dest, "--batch-size", "3", "--resume",
                   "--checkpoint", str(checkpoint), "--verify")
    try:
        assert resumed.returncode == 0, resumed.stderr
        assert f"resumed after '{saved['last_session_id']}'" in resumed.stdout
        assert "EQUAL" in resumed.stdout
        # And nothing is duplicated: every session has exactly its 5 messages, seqs 1..5
        assert pg.stats().total_sessions == 30
        for s in pg.iter_sessions():
            assert [m.seq for m in pg.load_messages(s.session_id)] == [1, 2, 3, 4, 5]
        assert json.loads(checkpoint.read_text())["done"] is True
        checked = _run("verify", "--from", source, "--to", dest)
        assert checked.returncode == 0 and checked.stdout.startswith("EQUAL")
    finally:
        reset_store(pg)
        pg.close()


def test_killed_migration_of_the_other_kinds_resumes_after_the_finished_ones(tmp_path: Path) -> None:
    # Given a source of 5 sessions and 9 records of every other kind, and an empty SQLite destination
    source = _sqlite(tmp_path / "src.db", 5, kinds=9)
    dest = _sqlite(tmp_path / "dst.db")
    checkpoint = tmp_path / "ck.json"
    # When a slow migration (3 records per batch, a pause between batches) is killed among the transports
    proc = subprocess.Popen(
        cli_command("migrate", "--from", source, "--to", dest, "--batch-size", "3", "--pause", "1.5",
                    "--checkpoint", str(checkpoint), "--no-progress"),
        cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if checkpoint.exists() and json.loads(checkpoint.read_text()).get("counts", {}).get("transports", 0) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    saved = json.loads(checkpoint.read_text())
    assert not saved["done"] and saved["counts"]["files"] == 9 and 3 <= saved["counts"]["transports"] < 9
    # Then --resume skips the sessions and files already moved and finishes the rest
    resumed = _run("migrate", "--from", source, "--to", dest, "--batch-size", "3", "--resume",
                   "--checkpoint", str(checkpoint), "--verify")
    assert resumed.returncode == 0, resumed.stderr
    left = 9 - saved["counts"]["transports"]
    assert (
        f"migrated 0 sessions, 0 messages, 0 files, {left} transports, 9 agent states, 9 tasks, 9 handles, "
        "9 idempotency entries (resumed after"
        in resumed.stdout
    )
    assert "EQUAL" in resumed.stdout and "transports source=9 destination=9" in resumed.stdout
    assert json.loads(checkpoint.read_text())["counts"] == {"files": 9, "transports": 9, "agent_states": 9, "tasks": 9,
                                                             "handles": 9, "idempotency_entries": 9}


def test_verify_exit_codes(tmp_path: Path) -> None:
    source = _sqlite(tmp_path / "a.db", 5, kinds=4)
    same = _sqlite(tmp_path / "b.db", 5, kinds=4)
    other = _sqlite(tmp_path / "c.db", 4, kinds=4)
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", "--from", source, "--to", same])
    assert ok.exit_code == 0 and ok.stdout.startswith("EQUAL")
    assert "files source=4 destination=4, transports source=4 destination=4" in ok.stdout
    bad = runner.invoke(main, ["verify", "--from", source, "--to", other])
    assert bad.exit_code == 1
    assert "'s0004': missing in destination" in bad.stdout
    # And a difference in another kind alone fails too
    store = open_store(same)
    store.put_agent_state(AgentState("x", "y", 1, updated_at=T0))
    store.close()
    extra = runner.invoke(main, ["verify", "--from", source, "--to", same])
    assert extra.exit_code == 1
    assert "agent_state ('x', 'y'): only in destination" in extra.stdout


def test_export_all_and_import_with_a_bad_line(tmp_path: Path) -> None:
    # Given an export of 5 sessions and 4 records of every other kind, with one broken line
    source = _sqlite(tmp_path / "a.db", 5, kinds=4)
    target = _sqlite(tmp_path / "b.db")
    out = tmp_path / "all.jsonl"
    runner = CliRunner()
    exported = runner.invoke(main, ["--storage-url", source, "export-all", "-o", str(out)])
    assert exported.exit_code == 0, exported.output
    assert "exported 5 sessions, 25 messages, 4 files, 4 transports, 4 agent states" in exported.stdout
    lines = out.read_text(encoding="utf-8").splitlines()
    lines[3] = "{oops"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # When it is imported: exit 1, the line is named, the rest lands
    result = runner.invoke(main, ["--storage-url", target, "import", str(out)])
    assert result.exit_code == 1
    assert "rejected line 4: not JSON" in result.stderr
    assert "read 5 sessions / 24 messages, 4 files, 4 transports, 4 agent states" in result.stdout
    assert ("inserted 24 messages, 4 files written, 4 transports written, 4 agent states written, 4 tasks written, "
            "4 handles written, 4 idempotency entries written; "
            "1 rejected") in result.stdout
    # And a clean file imports with exit 0, also as plain JSON
    as_json = tmp_path / "all.json"
    assert runner.invoke(main, ["--storage-url", source, "export-all", "-o", str(as_json)]).exit_code == 0
    assert as_json.read_text(encoding="utf-8").startswith('{"format": "sessionq-json"')
    clean = runner.invoke(main, ["--storage-url", target, "import", str(as_json)])
    assert clean.exit_code == 0, clean.output
    assert ("inserted 1 messages, 0 files written, 0 transports written, 0 agent states written, 0 tasks written, "
            "0 handles written, 0 idempotency entries written; "
            "0 rejected") in clean.stdout


def test_import_of_a_foreign_file_is_one_line_error(tmp_path: Path) -> None:
    target = _sqlite(tmp_path / "b.db")
    foreign = tmp_path / "x.jsonl"
    foreign.write_text('{"hello": "world"}\n', encoding="utf-8")
    result = _run("--storage-url", target, "import", str(foreign))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_backup_keeps_n_and_restore(tmp_path: Path) -> None:
    source = _sqlite(tmp_path / "a.db", 3, kinds=3)
    target = _sqlite(tmp_path / "b.db")
    directory = tmp_path / "bk"
    runner = CliRunner()
    for _ in range(3):
        result = runner.invoke(main, ["--storage-url", source, "backup", "--dir", str(directory), "--keep", "2"])
        assert result.exit_code == 0, result.output
    backups = sorted(directory.glob("sessionq-backup-*.jsonl.gz"))
    assert len(backups) == 2
    assert "removed" in result.stdout
    assert "3 sessions, 15 messages, 3 files, 3 transports, 3 agent states" in result.stdout
    restored = runner.invoke(main, ["--storage-url", target, "restore", str(backups[-1])])
    assert restored.exit_code == 0, restored.output
    assert (
        "3 files written, 3 transports written, 3 agent states written, 3 tasks written, "
        "3 handles written, 3 idempotency entries written; 0 rejected" in restored.stdout
    )
    assert runner.invoke(main, ["verify", "--from", source, "--to", target]).exit_code == 0


def test_passwords_are_never_printed(tmp_path: Path) -> None:
    # Given a destination URL with a password, on a port nobody listens on
    source = _sqlite(tmp_path / "a.db", 1)
    secret = "hunter2-secret"
    result = _run("migrate", "--from", source, "--to", f"postgresql://bob:{secret}@127.0.0.1:1/nowhere",
                  "--checkpoint", str(tmp_path / "ck.json"))
    # Then the command fails with one redacted line
    assert result.returncode == 1
    assert secret not in result.stdout + result.stderr
    assert "bob:***@127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr
