"""Configuration: one frozen :class:`Settings`, from environment > file > defaults.

Each field declares its environment names (the first is canonical; the seed-era
names such as ``STORAGE_EXPIRY_HOURS`` still work) and whether it is a secret.
The config file (YAML or TOML, ``--config`` / ``SESSIONQ_CONFIG``) uses the field
names as keys. A bad value is a :class:`~sessionq.models.errors.ConfigError` naming the setting.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote, urlsplit, urlunsplit

import yaml

from .errors import ConfigError

ENV_CONFIG_FILE = "SESSIONQ_CONFIG"
# The store used when nothing is configured: a SQLite file in the working directory.
DEFAULT_STORAGE_URL = "sqlite:///sessionq.db"
_BACKENDS = ("sqlite", "postgresql", "mysql", "mongodb")


def _setting(default: Any, *env: str, secret: bool = False, help: str = "") -> Any:
    return field(default=default, metadata={"env": env, "secret": secret, "help": help})


@dataclass(frozen=True)
class Settings:
    """Every knob of sessionq. Build it with :meth:`load` (or directly in tests)."""

    storage_url: str = _setting(DEFAULT_STORAGE_URL, "STORAGE_URL", "SESSIONQ_STORAGE_URL", secret=True,
                                help="store URL: sqlite:///path, postgresql://, mysql://, mongodb://")
    min_pool_size: int = _setting(1, "STORAGE_MIN_POOL_SIZE", help="connections opened up front (MongoDB minPoolSize)")
    max_pool_size: int = _setting(20, "STORAGE_MAX_POOL_SIZE", help="largest connection pool (PostgreSQL/MySQL/MongoDB)")
    auto_save: bool = _setting(True, "STORAGE_AUTO_SAVE", help="MCP integration saves sessions as they change")
    expiry_hours: float = _setting(72.0, "STORAGE_EXPIRY_HOURS", help="idle hours before a session expires")
    retention_hours: float = _setting(24.0, "SESSIONQ_RETENTION_HOURS", help="hours an expired session is kept before purge")
    redis_url: str | None = _setting(None, "REDIS_URL", "SESSIONQ_REDIS_URL", secret=True,
                                     help="Redis for the queue, leases and the event store; unset = embedded mode")
    broker_url: str | None = _setting(None, "SESSIONQ_BROKER_URL", secret=True,
                                      help="queue broker if not REDIS_URL (redis:// or amqp://)")
    session_ttl: int = _setting(3600, "SESSION_TTL", help="seconds an MCP event stream is kept after its last event")
    max_events_per_session: int = _setting(1000, "MAX_EVENTS_PER_SESSION", help="events kept per MCP session stream")
    session_compression: bool = _setting(False, "SESSION_COMPRESSION", help="zlib-compress stored MCP events")
    aggressive_cleanup: bool = _setting(False, "MCP_AGGRESSIVE_CLEANUP", help="extra purge sweep every 10 minutes")
    api_token: str | None = _setting(None, "SESSIONQ_API_TOKEN", secret=True, help="Bearer token for the HTTP endpoints")
    export_dir: str = _setting("exports", "SESSIONQ_EXPORT_DIR", help="directory export jobs write into")
    outbox_path: str = _setting("sessionq-outbox.db", "SESSIONQ_OUTBOX_PATH", help="producer spool while Redis is down")
    grace_minutes: float = _setting(10.0, "SESSIONQ_GRACE_MINUTES", help="recovery window after a transport disconnects")
    heartbeat_seconds: int = _setting(30, "SESSIONQ_HEARTBEAT_SECONDS", help="MCP transport heartbeat interval")
    stale_heartbeat_seconds: int = _setting(120, "SESSIONQ_STALE_HEARTBEAT_SECONDS",
                                            help="silence after which a live transport is marked disconnected")
    max_recovery_attempts: int = _setting(3, "SESSIONQ_MAX_RECOVERY_ATTEMPTS", help="recoveries allowed per transport session")
    expiry_interval: int = _setting(3600, "SESSIONQ_EXPIRY_INTERVAL", help="seconds between session-expiry sweeps")
    aggressive_interval: int = _setting(600, "SESSIONQ_AGGRESSIVE_INTERVAL", help="seconds between aggressive sweeps")
    transport_interval: int = _setting(300, "SESSIONQ_TRANSPORT_INTERVAL", help="seconds between transport sweeps")
    file_interval: int = _setting(3600, "SESSIONQ_FILE_INTERVAL", help="seconds between file/agent-state sweeps")
    event_trim_interval: int = _setting(600, "SESSIONQ_EVENT_TRIM_INTERVAL", help="seconds between event-log trims")
    scheduler_lease_seconds: float = _setting(30.0, "SESSIONQ_SCHEDULER_LEASE_SECONDS",
                                              help="scheduler leader lease; a dead leader is replaced within it")
    sweep_batch_size: int = _setting(1000, "SESSIONQ_SWEEP_BATCH_SIZE", help="rows per sweep statement")
    worker_processes: int = _setting(1, "SESSIONQ_WORKER_PROCESSES", help="worker processes")
    worker_threads: int = _setting(8, "SESSIONQ_WORKER_THREADS", help="threads per worker process")
    job_max_retries: int = _setting(10, "SESSIONQ_JOB_MAX_RETRIES", help="retries of a transient failure before a dead letter")
    job_min_backoff_ms: int = _setting(1000, "SESSIONQ_JOB_MIN_BACKOFF", help="first retry delay (ms), doubling per attempt")
    job_max_backoff_ms: int = _setting(300_000, "SESSIONQ_JOB_MAX_BACKOFF", help="longest retry delay (ms)")
    job_time_limit_ms: int = _setting(600_000, "SESSIONQ_JOB_TIME_LIMIT", help="longest a job may run (ms)")
    worker_heartbeat_timeout_ms: int = _setting(60_000, "SESSIONQ_WORKER_HEARTBEAT_TIMEOUT",
                                                help="silence (ms) after which a dead worker's jobs are redelivered")
    worker_maintenance_chance: int = _setting(1000, "SESSIONQ_WORKER_MAINTENANCE_CHANCE",
                                              help="per-million chance a Dramatiq Redis call runs its own maintenance")
    worker_prometheus: bool = _setting(False, "SESSIONQ_WORKER_PROMETHEUS", help="workers export Dramatiq's metrics")
    http_host: str = _setting("127.0.0.1", "SESSIONQ_HTTP_HOST", help="address sessionq serve binds")
    http_port: int = _setting(8080, "SESSIONQ_HTTP_PORT", help="port sessionq serve binds")
    log_format: str = _setting("text", "SESSIONQ_LOG_FORMAT", help="text or json")
    log_level: str = _setting("INFO", "SESSIONQ_LOG_LEVEL", help="DEBUG, INFO, WARNING, ERROR")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        scheme = urlsplit(self.storage_url).scheme.split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mongodb", "mongodb+srv"):
            raise ConfigError(f"storage_url: unsupported scheme {scheme!r} (use sqlite, postgresql, mysql or mongodb)")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: must be text or json, got {self.log_format!r}")
        if self.min_pool_size > self.max_pool_size:
            raise ConfigError("min_pool_size: must not exceed max_pool_size")

    @property
    def backend(self) -> str:
        """``sqlite``, ``postgresql``, ``mysql`` or ``mongodb``."""
        scheme = urlsplit(self.storage_url).scheme.split("+", 1)[0]
        return {"postgres": "postgresql", "mariadb": "mysql"}.get(scheme, scheme)

    @property
    def queue_url(self) -> str | None:
        """The broker URL: ``broker_url`` if set, else ``redis_url`` (``None`` = embedded)."""
        return self.broker_url or self.redis_url

    @classmethod
    def load(
        cls,
        config_file: str | os.PathLike[str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Settings from ``overrides`` > environment > config file > defaults.

        ``config_file`` defaults to ``$SESSIONQ_CONFIG``; ``None`` overrides are ignored.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = config_file or env.get(ENV_CONFIG_FILE)
        if path:
            values.update(read_config_file(path))
        values.update(_from_environment(env))
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**values)

    def redacted(self) -> dict[str, Any]:
        """Every setting, with passwords in URLs and secret values masked."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value is not None:
                value = redact_url(value) if "://" in str(value) else "***"
            out[f.name] = value
        return out


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file into a dict."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p}: not valid UTF-8") from None
    try:
        if p.suffix == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file {p}: cannot parse: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: must hold a mapping of setting names to values")
    data = data.get("sessionq", data) if isinstance(data.get("sessionq"), dict) else data
    return {str(k).lower().replace("-", "_"): v for k, v in data.items()}


def _from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        for name in reversed(f.metadata["env"]):
            if env.get(name, "") != "":
                values[f.name] = env[name]
    if "storage_url" not in values:
        url = _seed_storage_url(env)
        if url:
            values["storage_url"] = url
    return values


def _seed_storage_url(env: Mapping[str, str]) -> str | None:
    """The store URL from the seed-era STORAGE_BACKEND / _CONNECTION_STRING / _DATABASE_PATH."""
    backend = env.get("STORAGE_BACKEND", "").strip().lower()
    conn = env.get("STORAGE_CONNECTION_STRING", "").strip()
    path = env.get("STORAGE_DATABASE_PATH", "").strip()
    if not backend:
        return conn or (f"sqlite:///{path}" if path else None)
    backend = {"postgres": "postgresql", "mariadb": "mysql", "mongo": "mongodb"}.get(backend, backend)
    if backend not in _BACKENDS:
        raise ConfigError(f"STORAGE_BACKEND: must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    if backend == "sqlite":
        return f"sqlite:///{path or conn.removeprefix('sqlite:///') or 'sessionq.db'}"
    if not conn:
        raise ConfigError(f"STORAGE_CONNECTION_STRING: required when STORAGE_BACKEND={backend}")
    return conn if "://" in conn else f"{backend}://{conn}"


_TRUE = {"1", "true", "yes", "on"}
# Numeric settings for which 0 means something (any port; no retries).
_ZERO_ALLOWED = frozenset({"http_port", "job_max_retries"})
_FALSE = {"0", "false", "no", "off", ""}


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    name, kind = f.name, str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{name}: a value is required")
    try:
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("expected true or false")
        if kind.startswith("int") or kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError("expected a number")
            number = int(str(value).strip()) if kind.startswith("int") else float(str(value).strip())
            if number < 0 or (number == 0 and name not in _ZERO_ALLOWED):
                raise ValueError("must be positive")
            return number
        if not isinstance(value, str | int | float):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        text = str(value).strip()
        if "\x00" in text:
            raise ValueError("contains a NUL character")
        if not text and "None" in kind:
            return None
        if not text:
            raise ValueError("must not be empty")
        return text
    except ValueError as exc:
        raise ConfigError(f"{name}: invalid value {redact_url(str(value))!r:.80}: {exc}") from None


# The scheme is bounded: an unbounded ``[a-z][a-z0-9+.-]*`` backtracks quadratically
# over a long run of letters (redacting a 4 MiB message would take days).
_PASSWORD_RE = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]{0,31}://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@", re.I
)


def redact_url(text: str) -> str:
    """Mask the password of every URL in ``text`` (``user:***@host``)."""
    parts = urlsplit(text) if "://" in text and " " not in text.strip() else None
    if parts is not None and parts.password:
        user = quote(parts.username or "", safe="")
        host = parts.hostname or ""
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return _PASSWORD_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
