"""The CLI skeleton: db upgrade/status, config show, stats, one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from sessionq.cli import main
from sessionq.models import open_store
from tests.conftest import POSTGRES_URL, messages, session

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess (as a user would)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGE_", "REDIS_", "SESSIONQ_API"))}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "sessionq.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=60)


def test_db_upgrade_then_status(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    status = run("--storage-url", url, "db", "status")
    assert status.returncode == 1
    assert "schema version 0 of" in status.stdout
    upgraded = run("--storage-url", url, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "applied 1, 2, 3" in upgraded.stdout
    again = run("--storage-url", url, "db", "upgrade")
    assert "already at version" in again.stdout
    assert run("--storage-url", url, "db", "status").returncode == 0


def test_stats_json_counts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = open_store(url)
    store.upgrade()
    store.save_session(session("a"), messages("a", 3))
    store.close()
    result = CliRunner().invoke(main, ["--storage-url", url, "stats", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {k: data[k] for k in ("total_sessions", "active_sessions", "total_messages", "total_files")} == {
        "total_sessions": 1,
        "active_sessions": 1,
        "total_messages": 3,
        "total_files": 0,
    }
    assert data["archived_sessions"] == data["expired_sessions"] == 0


def test_stats_on_postgresql() -> None:
    result = CliRunner().invoke(main, ["--storage-url", POSTGRES_URL, "stats"])
    assert result.exit_code == 0, result.output
    assert "total_sessions" in result.output


def test_config_show_redacts_secrets() -> None:
    result = run(
        "config", "show", "--json",
        env={"STORAGE_URL": "postgresql://app:topsecret@db/x", "SESSIONQ_API_TOKEN": "tok-abcdef"},
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["storage_url"] == "postgresql://app:***@db/x"
    assert shown["api_token"] == "***"
    assert "topsecret" not in result.stdout + result.stderr
    assert "tok-abcdef" not in result.stdout + result.stderr


def test_user_errors_are_one_line_without_traceback() -> None:
    bad_setting = run("stats", env={"STORAGE_EXPIRY_HOURS": "soon"})
    assert bad_setting.returncode != 0
    assert bad_setting.stderr.strip() == (
        "Error: expiry_hours: invalid value 'soon': could not convert string to float: 'soon'"
    )
    unreachable = run("--storage-url", "postgresql://app:pw123456@127.0.0.1:1/x", "stats")
    assert unreachable.returncode == 1
    last = unreachable.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: postgresql unavailable")
    assert "Traceback" not in unreachable.stderr
    assert "pw123456" not in unreachable.stderr
