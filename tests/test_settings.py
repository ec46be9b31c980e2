"""Settings: precedence environment > file > defaults, seed-era names, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sessionq.models import ConfigError, Settings
from sessionq.models.settings import DEFAULT_STORAGE_URL, redact_url


def test_defaults_are_embedded_sqlite() -> None:
    s = Settings.load(environ={})
    assert (s.storage_url, s.backend, s.redis_url, s.queue_url) == (DEFAULT_STORAGE_URL, "sqlite", None, None)
    assert (s.expiry_hours, s.max_events_per_session, s.aggressive_cleanup) == (72.0, 1000, False)


def test_environment_beats_file_beats_defaults(tmp_path: Path) -> None:
    # Given a YAML file setting three values
    path = tmp_path / "sessionq.yaml"
    path.write_text("expiry_hours: 12\nsession_ttl: 99\nstorage_url: postgresql://u@db/x\n")
    # When the environment also sets one of them
    s = Settings.load(path, environ={"STORAGE_EXPIRY_HOURS": "6"})
    # Then the environment wins, the file fills in, defaults cover the rest
    assert (s.expiry_hours, s.session_ttl, s.backend, s.max_pool_size) == (6.0, 99, "postgresql", 20)


def test_toml_file_and_config_env_var(tmp_path: Path) -> None:
    path = tmp_path / "sessionq.toml"
    path.write_text('[sessionq]\nredis_url = "redis://localhost:6379/3"\naggressive_cleanup = true\n')
    s = Settings.load(environ={"SESSIONQ_CONFIG": str(path)})
    assert (s.redis_url, s.aggressive_cleanup) == ("redis://localhost:6379/3", True)


def test_overrides_beat_environment() -> None:
    s = Settings.load(environ={"STORAGE_URL": "sqlite:///a.db"}, storage_url="sqlite:///b.db", redis_url=None)
    assert s.storage_url == "sqlite:///b.db"


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({"STORAGE_BACKEND": "sqlite", "STORAGE_DATABASE_PATH": "/data/s.db"}, "sqlite:////data/s.db"),
        ({"STORAGE_BACKEND": "postgresql", "STORAGE_CONNECTION_STRING": "postgresql://u@h/db"}, "postgresql://u@h/db"),
        ({"STORAGE_BACKEND": "mongodb", "STORAGE_CONNECTION_STRING": "mongodb://h:27017/x"}, "mongodb://h:27017/x"),
        ({"STORAGE_BACKEND": "mysql", "STORAGE_CONNECTION_STRING": "root@h/db"}, "mysql://root@h/db"),
        ({"STORAGE_DATABASE_PATH": "rel.db"}, "sqlite:///rel.db"),
        ({"STORAGE_URL": "mysql://a@b/c", "STORAGE_BACKEND": "sqlite"}, "mysql://a@b/c"),
    ],
)
def test_seed_era_storage_names(env: dict[str, str], url: str) -> None:
    assert Settings.load(environ=env).storage_url == url


def test_seed_era_names_for_other_settings() -> None:
    env = {
        "STORAGE_MIN_POOL_SIZE": "2",
        "STORAGE_MAX_POOL_SIZE": "9",
        "STORAGE_AUTO_SAVE": "false",
        "REDIS_URL": "redis://r:6379/0",
        "SESSION_TTL": "60",
        "MAX_EVENTS_PER_SESSION": "5",
        "SESSION_COMPRESSION": "yes",
        "MCP_AGGRESSIVE_CLEANUP": "1",
    }
    s = Settings.load(environ=env)
    assert (s.min_pool_size, s.max_pool_size, s.auto_save, s.redis_url) == (2, 9, False, "redis://r:6379/0")
    assert (s.session_ttl, s.max_events_per_session, s.session_compression, s.aggressive_cleanup) == (60, 5, True, True)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STORAGE_EXPIRY_HOURS": "soon"}, "expiry_hours: invalid value 'soon'"),
        ({"STORAGE_EXPIRY_HOURS": "-1"}, "expiry_hours: invalid value '-1': must be positive"),
        ({"MCP_AGGRESSIVE_CLEANUP": "maybe"}, "aggressive_cleanup: invalid value 'maybe': expected true or false"),
        ({"STORAGE_MAX_POOL_SIZE": "1.5"}, "max_pool_size"),
        ({"STORAGE_URL": "oracle://x"}, "storage_url: unsupported scheme 'oracle'"),
        ({"STORAGE_BACKEND": "cassandra"}, "STORAGE_BACKEND: must be one of"),
        ({"STORAGE_BACKEND": "postgresql"}, "STORAGE_CONNECTION_STRING: required"),
        ({"SESSIONQ_LOG_FORMAT": "xml"}, "log_format"),
        ({"STORAGE_MIN_POOL_SIZE": "30"}, "min_pool_size: must not exceed max_pool_size"),
        ({"SESSIONQ_HTTP_PORT": "70000"}, "http_port: must be a TCP port from 0 to 65535, got 70000"),
        ({"SESSIONQ_HTTP_PORT": "-1"}, "http_port: invalid value '-1': must be positive"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ=env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("expiry_hours: [1, 2]\n", ".yaml", "expiry_hours"),
        ("not: valid: yaml: here\n", ".yaml", "cannot parse"),
        ("- a\n- b\n", ".yaml", "must hold a mapping"),
        ("x = \n", ".toml", "cannot parse"),
        ("colour: red\n", ".yaml", "unknown setting(s): colour"),
    ],
)
def test_bad_config_files(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.load(path, environ={})


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        Settings.load(tmp_path / "absent.yaml", environ={})


def test_redaction_hides_passwords_and_tokens() -> None:
    s = Settings.load(
        environ={
            "STORAGE_URL": "postgresql://app:s3cr%40t@db:5432/x",
            "REDIS_URL": "redis://:hunter2@cache:6379/0",
            "SESSIONQ_API_TOKEN": "tok-123456",
        }
    )
    shown = repr(s.redacted())
    for secret in ("s3cr", "hunter2", "tok-123456"):
        assert secret not in shown
    assert s.redacted()["storage_url"] == "postgresql://app:***@db:5432/x"
    assert redact_url("connect to mysql://root:pw@h/db failed") == "connect to mysql://root:***@h/db failed"


def test_http_port_bounds() -> None:
    # 0 (any free port) and 65535 are ports; one past the top is not, however it is given
    assert Settings(http_port=0).http_port == 0
    assert Settings.load(environ={"SESSIONQ_HTTP_PORT": "65535"}).http_port == 65535
    with pytest.raises(ConfigError, match=r"^http_port: must be a TCP port from 0 to 65535, got 65536$"):
        Settings(http_port=65536)
