"""Configuration: one frozen :class:`Settings`, from environment > file > defaults.

Each field declares its environment names (the first is canonical; the seed-era
names such as ``STORAGE_EXPIRY_HOURS`` still work) and whether it is a secret.
The config file (YAML or TOML, ``--config`` / ``SESSIONQ_CONFIG``) uses the field
names as keys. A bad value is a :class:`~sessionq.errors.ConfigError` naming the setting.

Nothing here runs at import: the environment is read when :meth:`Settings.load` is
called, and the settings object is then passed explicitly to whatever needs it.
This module also holds the one table of storage URL schemes
(:data:`STORAGE_SCHEMES`), the one list of Redis URL schemes (:data:`REDIS_SCHEMES`)
and the named stores of bulk jobs (``@NAME``, :meth:`Settings.resolve_store`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import quote, urlsplit, urlunsplit

import yaml

from sessionq.errors import ConfigError

from .keyring import KeyRing
from .sealing import Sealer, sealer_for
from .tasks import DEFAULT_DISPATCH_TIMEOUT_MS, DEFAULT_LEASE_MS

ENV_CONFIG_FILE = "SESSIONQ_CONFIG"
# The store used when nothing is configured: a SQLite file in the working directory.
DEFAULT_STORAGE_URL = "sqlite:///sessionq.db"
# Seconds a long-running command waits at start for its store and Redis (`--wait`).
DEFAULT_STARTUP_WAIT = 60.0
#: Names a log level may have (``log_level``, ``SESSIONQ_LOG_LEVEL``), any case.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Prefix of the environment variables naming stores for bulk jobs: SESSIONQ_STORE_ARCHIVE=url is @archive.
STORE_ENV_PREFIX = "SESSIONQ_STORE_"

#: Every storage URL scheme (the part before any ``+driver``) and the backend it names.
STORAGE_SCHEMES: dict[str, str] = {
    "sqlite": "sqlite",
    "postgresql": "postgresql",
    "postgres": "postgresql",
    "mysql": "mysql",
    "mariadb": "mysql",
    "mongodb": "mongodb",
}
#: URL schemes of Redis (the queue, leases, the sweep book, the MCP event store).
REDIS_SCHEMES = ("redis", "rediss", "unix")
#: URL schemes of an AMQP broker (RabbitMQ, ``SESSIONQ_BROKER_URL``).
AMQP_SCHEMES = ("amqp", "amqps")
_BACKENDS = tuple(dict.fromkeys(STORAGE_SCHEMES.values()))


def storage_backend(url: str) -> str | None:
    """The backend a storage URL names (``sqlite``, ``postgresql``, ``mysql``, ``mongodb``),
    or ``None`` for a scheme sessionq does not support."""
    return STORAGE_SCHEMES.get(_scheme(url))


def is_redis_url(url: str | None) -> TypeGuard[str]:
    """True if ``url`` names a Redis server (``redis://``, ``rediss://``, ``unix://``)."""
    return bool(url) and _scheme(str(url)) in REDIS_SCHEMES


def is_amqp_url(url: str | None) -> TypeGuard[str]:
    """True if ``url`` names an AMQP broker (``amqp://``, ``amqps://``)."""
    return bool(url) and _scheme(str(url)) in AMQP_SCHEMES


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.split("+", 1)[0]


def store_name(reference: str) -> str:
    """The name in a store reference ``@NAME``, upper-cased as its environment variable spells it.

    Raises :class:`ConfigError` unless ``reference`` is ``@`` followed by letters, digits or ``_``.
    """
    name = reference[1:] if reference.startswith("@") else ""
    if not name or not name.replace("_", "").isalnum():
        raise ConfigError(f"store name {reference!r:.80} must be @ followed by letters, digits or _")
    return name.upper()


def _setting(default: Any, *env: str, secret: bool = False, ring: bool = False, help: str = "") -> Any:
    # ring: a key ring (models/keyring.py), shown by redacted() as its key fingerprints.
    return field(default=default, metadata={"env": env, "secret": secret, "ring": ring, "help": help})


@dataclass(frozen=True)
class Settings:
    """Every knob of sessionq. Build it with :meth:`load` (or directly in tests)."""

    storage_url: str = _setting(DEFAULT_STORAGE_URL, "STORAGE_URL", "SESSIONQ_STORAGE_URL", secret=True,
                                help="store URL: sqlite:///path, postgresql://, mysql://, mongodb://")
    min_pool_size: int = _setting(1, "STORAGE_MIN_POOL_SIZE", help="connections opened up front (MongoDB minPoolSize)")
    max_pool_size: int = _setting(20, "STORAGE_MAX_POOL_SIZE",
                                  help="largest connection pool (PostgreSQL/MySQL/MongoDB)")
    auto_save: bool = _setting(True, "STORAGE_AUTO_SAVE", help="MCP integration saves sessions as they change")
    expiry_hours: float = _setting(72.0, "STORAGE_EXPIRY_HOURS", help="idle hours before a session expires")
    retention_hours: float = _setting(24.0, "SESSIONQ_RETENTION_HOURS",
                                      help="hours an expired session is kept before purge")
    redis_url: str | None = _setting(None, "REDIS_URL", "SESSIONQ_REDIS_URL", secret=True,
                                     help="Redis for the queue, leases and the event store; unset = embedded mode")
    broker_url: str | None = _setting(None, "SESSIONQ_BROKER_URL", secret=True,
                                      help="queue broker if not REDIS_URL (redis:// or amqp://)")
    session_ttl: int = _setting(3600, "SESSION_TTL", help="seconds an MCP event stream is kept after its last event")
    max_events_per_session: int = _setting(1000, "MAX_EVENTS_PER_SESSION", help="events kept per MCP session stream")
    session_compression: bool = _setting(False, "SESSION_COMPRESSION", help="zlib-compress stored MCP events")
    aggressive_cleanup: bool = _setting(False, "MCP_AGGRESSIVE_CLEANUP", help="extra purge sweep every 10 minutes")
    encryption_keys: str | None = _setting(
        None, "SESSIONQ_ENCRYPTION_KEYS", secret=True, ring=True,
        help="encryption at rest: comma-separated keys, the first seals, all open (sessionq keys generate)")
    api_token: str | None = _setting(None, "SESSIONQ_API_TOKEN", secret=True,
                                     help="Bearer token for the HTTP endpoints")
    export_dir: str = _setting("exports", "SESSIONQ_EXPORT_DIR", help="directory export jobs write into")
    outbox_path: str = _setting("sessionq-outbox.db", "SESSIONQ_OUTBOX_PATH", help="producer spool while Redis is down")
    grace_minutes: float = _setting(10.0, "SESSIONQ_GRACE_MINUTES",
                                    help="recovery window after a transport disconnects")
    heartbeat_seconds: int = _setting(30, "SESSIONQ_HEARTBEAT_SECONDS", help="MCP transport heartbeat interval")
    stale_heartbeat_seconds: int = _setting(120, "SESSIONQ_STALE_HEARTBEAT_SECONDS",
                                            help="silence after which a live transport is marked disconnected")
    max_recovery_attempts: int = _setting(3, "SESSIONQ_MAX_RECOVERY_ATTEMPTS",
                                          help="recoveries allowed per transport session")
    expiry_interval: int = _setting(3600, "SESSIONQ_EXPIRY_INTERVAL", help="seconds between session-expiry sweeps")
    aggressive_interval: int = _setting(600, "SESSIONQ_AGGRESSIVE_INTERVAL", help="seconds between aggressive sweeps")
    transport_interval: int = _setting(300, "SESSIONQ_TRANSPORT_INTERVAL", help="seconds between transport sweeps")
    file_interval: int = _setting(3600, "SESSIONQ_FILE_INTERVAL", help="seconds between file/agent-state sweeps")
    event_trim_interval: int = _setting(600, "SESSIONQ_EVENT_TRIM_INTERVAL", help="seconds between event-log trims")
    task_interval: int = _setting(30, "SESSIONQ_TASK_INTERVAL",
                                  help="seconds between MCP task sweeps (expiry, lost leases)")
    task_lease_ms: int = _setting(DEFAULT_LEASE_MS, "SESSIONQ_TASK_LEASE", help="MCP task lease (ms) a worker renews")
    task_dispatch_timeout_ms: int = _setting(DEFAULT_DISPATCH_TIMEOUT_MS, "SESSIONQ_TASK_DISPATCH_TIMEOUT",
                                             help="ms a queued MCP task waits for a worker before it is sent again")
    handle_interval: int = _setting(300, "SESSIONQ_HANDLE_INTERVAL",
                                    help="seconds between sweeps of dead MCP state handles and idempotency entries")
    handle_ttl: int = _setting(7 * 86400, "SESSIONQ_HANDLE_TTL",
                               help="absolute lifetime (s) of an MCP state handle; 0 = none")
    handle_idle_ttl: int = _setting(86400, "SESSIONQ_HANDLE_IDLE_TTL",
                                    help="idle lifetime (s) of an MCP state handle, pushed out by each use; 0 = none")
    handle_retention: int = _setting(86400, "SESSIONQ_HANDLE_RETENTION",
                                     help="seconds an expired or revoked handle still answers 'expired' or 'revoked'")
    idempotency_ttl: int = _setting(86400, "SESSIONQ_IDEMPOTENCY_TTL",
                                    help="seconds an idempotent tool call's outcome is replayed")
    idempotency_claim_ttl: int = _setting(600, "SESSIONQ_IDEMPOTENCY_CLAIM_TTL",
                                          help="seconds a running idempotent call holds its key (then a retry runs)")
    idempotency_wait: float = _setting(30.0, "SESSIONQ_IDEMPOTENCY_WAIT",
                                       help="seconds a duplicate idempotent call waits for the first one's outcome")
    scheduler_lease_seconds: float = _setting(30.0, "SESSIONQ_SCHEDULER_LEASE_SECONDS",
                                              help="scheduler leader lease; a dead leader is replaced within it")
    sweep_batch_size: int = _setting(1000, "SESSIONQ_SWEEP_BATCH_SIZE", help="rows per sweep statement")
    worker_processes: int = _setting(1, "SESSIONQ_WORKER_PROCESSES", help="worker processes")
    worker_threads: int = _setting(8, "SESSIONQ_WORKER_THREADS", help="threads per worker process")
    job_max_retries: int = _setting(10, "SESSIONQ_JOB_MAX_RETRIES",
                                    help="retries of a transient failure before a dead letter")
    job_min_backoff_ms: int = _setting(1000, "SESSIONQ_JOB_MIN_BACKOFF",
                                       help="first retry delay (ms), doubling per attempt")
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
    log_level: str | None = _setting(
        None, "SESSIONQ_LOG_LEVEL",
        help="DEBUG, INFO, WARNING, ERROR; unset: INFO for worker, scheduler, serve and up, WARNING for the rest")
    startup_wait_seconds: float = _setting(
        DEFAULT_STARTUP_WAIT, "SESSIONQ_STARTUP_WAIT",
        help="seconds worker, scheduler and serve wait at start for the store and Redis to answer (0: no wait)")
    group_commit_delay_ms: float = _setting(
        2.0, "SESSIONQ_GROUP_COMMIT_DELAY_MS",
        help="ms a save batch waits for more saves once the queue is empty (0: none)")
    prometheus_multiproc_dir: str | None = _setting(
        None, "PROMETHEUS_MULTIPROC_DIR",
        help="directory worker processes write their metrics into (prometheus_client reads the same "
             "environment variable); created when the worker is configured")
    request_state_keys: str | None = _setting(
        None, "SESSIONQ_REQUEST_STATE_KEYS", secret=True,
        help="MCP requestState key ring shared by every replica: comma list, first seals, all open "
             "(sessionq keys generate); unset: a per-process key")
    request_state_ttl: float = _setting(600.0, "SESSIONQ_REQUEST_STATE_TTL",
                                        help="seconds a sealed MCP requestState stays valid")
    request_state_audience: str | None = _setting(
        None, "SESSIONQ_REQUEST_STATE_AUDIENCE",
        help="audience sealed into MCP requestState (and the event-bus channel); unset: the MCPServer name")
    forget_window_hours: float = _setting(
        168.0, "SESSIONQ_FORGET_WINDOW_HOURS",
        help="hours a forgotten session's tombstone refuses late saves (dead-lettered `forgotten`)")
    redact_hook: str | None = _setting(
        None, "SESSIONQ_REDACT_HOOK",
        help="module:function (str -> str) export redaction runs after the built-in detectors")
    stores: dict[str, str] = field(
        default_factory=dict, hash=False,
        metadata={"env": (), "env_prefix": STORE_ENV_PREFIX, "secret": True,
                  "help": f"named stores of bulk jobs, @NAME -> URL ({STORE_ENV_PREFIX}NAME=url)"},
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        if storage_backend(self.storage_url) is None:
            scheme = _scheme(self.storage_url)
            raise ConfigError(f"storage_url: unsupported scheme {scheme!r} (use sqlite, postgresql, mysql or mongodb)")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: must be text or json, got {self.log_format!r}")
        if self.log_level is not None and self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r:.80}")
        if self.min_pool_size > self.max_pool_size:
            raise ConfigError("min_pool_size: must not exceed max_pool_size")
        if self.request_state_keys is not None:
            KeyRing.parse(self.request_state_keys, setting="request_state_keys")
        if self.http_port > 65535:
            raise ConfigError(f"http_port: must be a TCP port from 0 to 65535, got {self.http_port}")
        sealer_for(self.encryption_keys)  # a malformed ring fails here, naming the setting

    @property
    def sealer(self) -> Sealer:
        """The at-rest codec of :attr:`encryption_keys` (writes plaintext when unset)."""
        return sealer_for(self.encryption_keys)

    @property
    def backend(self) -> str:
        """``sqlite``, ``postgresql``, ``mysql`` or ``mongodb``."""
        return STORAGE_SCHEMES[_scheme(self.storage_url)]

    @property
    def request_state_ring(self) -> KeyRing | None:
        """The MCP request-state key ring (``request_state_keys``), ``None`` when unset."""
        if self.request_state_keys is None:
            return None
        return KeyRing.parse(self.request_state_keys, setting="request_state_keys")

    @property
    def queue_url(self) -> str | None:
        """The broker URL: ``broker_url`` if set, else ``redis_url`` (``None`` = embedded)."""
        return self.broker_url or self.redis_url

    def resolve_store(self, reference: str) -> str:
        """The URL a bulk job's store reference names: ``@NAME`` from :attr:`stores`
        (``SESSIONQ_STORE_NAME``), anything else is already a URL.

        Raises :class:`ConfigError` for a malformed or unknown name.
        """
        if not reference.startswith("@"):
            return reference
        name = store_name(reference)
        url = self.stores.get(name)
        if not url:
            raise ConfigError(f"store {reference} is not configured here: set {STORE_ENV_PREFIX}{name}")
        return url

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
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        path = config_file or env.get(ENV_CONFIG_FILE)
        if path:
            values.update(read_config_file(path))
            if set(values) - known:
                raise ConfigError(f"config file {path}: unknown setting(s): {unknown_settings(set(values) - known)}")
        values.update(_from_environment(env))
        values.update({k: v for k, v in overrides.items() if v is not None})
        if set(values) - known:
            raise ConfigError(f"unknown setting(s): {unknown_settings(set(values) - known)}")
        return cls(**values)

    def __repr__(self) -> str:
        # Settings end up in tracebacks and debug logs: secrets never do.
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in self.redacted().items())})"

    def redacted(self) -> dict[str, Any]:
        """Every setting, with passwords in URLs and secret values masked."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("ring") and value is not None:
                value = "keys " + ", ".join(KeyRing.parse(value, setting=f.name).fingerprints())
            elif f.metadata.get("secret") and isinstance(value, dict):
                value = {k: redact_url(v) if "://" in v else "***" for k, v in value.items()}
            elif f.metadata.get("secret") and value is not None:
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
        raise ConfigError(f"config file {p}: cannot parse: {_parse_error(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: must hold a mapping of setting names to values")
    data = data.get("sessionq", data) if isinstance(data.get("sessionq"), dict) else data
    return {str(k).lower().replace("-", "_"): v for k, v in data.items()}


# tomllib ends its messages with where: "Invalid value (at line 3, column 9)".
_TOML_WHERE = re.compile(r"^(?P<what>.*?) \(at line (?P<line>\d+), column (?P<column>\d+)\)$")


def _parse_error(exc: Exception) -> str:
    """``line L, column C: what`` for a YAML or TOML syntax error (1-based, as editors count)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem or exc.context or 'invalid syntax'}"
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    where = _TOML_WHERE.match(first)
    return f"line {where['line']}, column {where['column']}: {where['what']}" if where else first


def unknown_settings(names: Iterable[str]) -> str:
    """``storge_url (did you mean storage_url?), colour`` for names that are not settings,
    each with the closest setting name when one is close enough."""
    known = [f.name for f in dataclasses.fields(Settings)]
    out = []
    for name in sorted(names):
        shown = name if name.isprintable() and len(name) <= 80 else f"{name!r:.80}"
        close = difflib.get_close_matches(name, known, n=1)
        out.append(f"{shown} (did you mean {close[0]}?)" if close else shown)
    return ", ".join(out)


def _from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        for name in reversed(f.metadata["env"]):
            if env.get(name, "") != "":
                values[f.name] = env[name]
        prefix = f.metadata.get("env_prefix")
        if prefix:
            named = {k[len(prefix):]: v for k, v in env.items() if k.startswith(prefix) and len(k) > len(prefix) and v}
            if named:
                values[f.name] = named
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
    backend = {**STORAGE_SCHEMES, "mongo": "mongodb"}.get(backend, backend)
    if backend not in _BACKENDS:
        raise ConfigError(f"STORAGE_BACKEND: must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    if backend == "sqlite":
        return f"sqlite:///{path or conn.removeprefix('sqlite:///') or 'sessionq.db'}"
    if not conn:
        raise ConfigError(f"STORAGE_CONNECTION_STRING: required when STORAGE_BACKEND={backend}")
    return conn if "://" in conn else f"{backend}://{conn}"


_TRUE = {"1", "true", "yes", "on"}
# Numeric settings for which 0 means something (any port; no retries; no gather delay; no wait).
_ZERO_ALLOWED = frozenset({"http_port", "job_max_retries", "group_commit_delay_ms", "startup_wait_seconds",
                           "handle_ttl", "handle_idle_ttl", "handle_retention"})
_FALSE = {"0", "false", "no", "off", ""}


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    name, kind = f.name, str(f.type)
    if kind.startswith("dict"):
        return _coerce_stores(name, value)
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
        if kind.startswith(("int", "float")):
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


def _coerce_stores(name: str, value: Any) -> dict[str, str]:
    """``{NAME: url}`` with names as :func:`store_name` spells them (a file may write them in any case)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: expected a mapping of store names to URLs, got {type(value).__name__}")
    out: dict[str, str] = {}
    for key, url in value.items():
        label = store_name(f"@{key}")
        if not isinstance(url, str) or not url.strip() or "\x00" in url:
            raise ConfigError(f"{name}: @{label.lower()}: expected a store URL")
        out[label] = url.strip()
    return out


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
