"""``sessionq``: the one command-line entry point (a click group).

Global options carry ``envvar=`` so the CLI, the environment and the config file
agree; state lives in :class:`App` on ``ctx.obj``. This module holds click
declarations and output formatting only; the work is done in ``sessionq.workers``,
``sessionq.scheduler`` and ``sessionq.models``. Every :class:`~sessionq.errors.SessionqError`
(and a file error) is one clear ``Error: ...`` line and exit 1, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from sessionq.errors import SessionqError, StoreUnavailable
from sessionq.models import Settings, Store, open_store
from sessionq.scheduler.sweeps import SWEEP_KINDS
from sessionq.workers.jobs import QUEUES

F = TypeVar("F", bound=Callable[..., Any])


# Commands that run until stopped: they log at INFO unless told otherwise; the others
# (one-shot commands, whose output is their result) log warnings and errors only.
LONG_RUNNING = frozenset({"worker", "scheduler", "serve", "up"})


@dataclass
class App:
    """What every command shares: the settings and, opened on first use, the store."""

    settings: Settings
    _store: Store | None = field(default=None, repr=False)

    @property
    def store(self) -> Store:
        """The configured store, its schema checked (opened on first use, closed when the
        command ends): a missing or outdated schema is one line naming ``sessionq db upgrade``."""
        return self.open_store(check_schema=True)

    def open_store(self, *, check_schema: bool = True) -> Store:
        """The configured store; ``check_schema=False`` for the commands that bring the
        schema up to date themselves (``db``, ``import``, ``restore``)."""
        if self._store is None:
            store = open_store(self.settings)
            if check_schema:
                try:
                    store.check_schema(create=True)
                except BaseException:
                    store.close()
                    raise
            self._store = store
        return self._store

    def close(self) -> None:
        """Close the store if it was opened."""
        if self._store is not None:
            self._store.close()
            self._store = None


pass_app = click.make_pass_decorator(App)


def user_errors(func: F) -> F:
    """Turn every sessionq error and file error into one redacted ``Error: ...`` line, exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sessionq.workers.logs import redact

        try:
            return func(*args, **kwargs)
        except SessionqError as exc:
            raise click.ClickException(redact(str(exc))) from None
        except BrokenPipeError:
            raise  # the reader went away (`| head`): click ends quietly
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None

    return wrapper  # type: ignore[return-value]


def configure_logging(settings: Settings, command: str | None = None) -> None:
    """Install the process's log handler (only the CLI configures handlers); unless
    ``log_level`` is set, INFO for a long-running ``command``, WARNING for the others."""
    from sessionq.workers.logs import configure

    configure(settings, default_level="INFO" if command in LONG_RUNNING else "WARNING")


def wait_option(func: F) -> F:
    """``--wait SECONDS``: how long a long-running command waits at start for its services."""
    return click.option(
        "--wait", "wait", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
        help="Wait this long at start for the store and Redis to answer, then exit 1 "
             "(default: SESSIONQ_STARTUP_WAIT, 60).",
    )(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_file", envvar="SESSIONQ_CONFIG", type=click.Path(dir_okay=False),
              help="YAML or TOML config file.")
@click.option("--storage-url", envvar="STORAGE_URL", help="Store URL (sqlite:///, postgresql://, mysql://, mongodb://).")
@click.option("--redis-url", envvar="REDIS_URL", help="Redis URL; without it sessionq runs embedded.")
@click.version_option(package_name="mcp-sessionq")
@click.pass_context
def main(ctx: click.Context, config_file: str | None, storage_url: str | None, redis_url: str | None) -> None:
    """sessionq: durable, non-blocking session persistence for MCP servers."""
    try:
        settings = Settings.load(config_file, storage_url=storage_url, redis_url=redis_url)
    except SessionqError as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging(settings, ctx.invoked_subcommand)
    app = App(settings)
    ctx.obj = app
    ctx.call_on_close(app.close)


@main.group()
def db() -> None:
    """Schema versions of the configured store."""


@db.command("upgrade")
@click.option("--to", "target", type=int, help="Stop at this version (default: latest).")
@pass_app
@user_errors
def db_upgrade(app: App, target: int | None) -> None:
    """Apply pending schema migrations (idempotent)."""
    store = app.open_store(check_schema=False)
    applied = store.upgrade(target)
    version = store.schema_version()
    if applied:
        click.echo(f"applied {', '.join(map(str, applied))}; schema at version {version}")
    else:
        click.echo(f"schema already at version {version}")


@db.command("status")
@pass_app
@user_errors
def db_status(app: App) -> None:
    """Print the schema version and whether migrations are pending."""
    store = app.open_store(check_schema=False)
    current, latest = store.schema_version(), store.latest_schema_version()
    state = "up to date" if current >= latest else f"{latest - current} migration(s) pending"
    click.echo(f"backend {store.backend}: schema version {current} of {latest} ({state})")
    if current < latest:
        sys.exit(1)


@main.group("config")
def config_group() -> None:
    """Inspect the effective configuration."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def config_show(app: App, as_json: bool) -> None:
    """Print the effective settings, secrets redacted."""
    values = app.settings.redacted()
    if as_json:
        click.echo(json.dumps(values, indent=2, default=str))
        return
    width = max(map(len, values))
    for name, value in values.items():
        click.echo(f"{name:<{width}}  {value}")


@main.group("keys")
def keys_group() -> None:
    """Key rings: SESSIONQ_REQUEST_STATE_KEYS (MCP requestState) and
    SESSIONQ_ENCRYPTION_KEYS (encryption at rest)."""


@keys_group.command("generate")
@click.option("--count", type=click.IntRange(1, 100), default=1, show_default=True, help="How many keys.")
def keys_generate(count: int) -> None:
    """Print new random keys (32 bytes each, URL-safe), one per line."""
    from sessionq.models.keyring import generate_key

    for _ in range(count):
        click.echo(generate_key())


@keys_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
@user_errors
def keys_status(app: App, as_json: bool) -> None:
    """Count stored values per key id (fingerprint) and in clear, table by table; decrypts nothing."""
    from sessionq.models.rotation import key_counts, pending

    counts = key_counts(app.store)
    primary = app.settings.sealer.primary
    if as_json:
        click.echo(json.dumps({"primary": primary, "ring": app.settings.sealer.key_ids,
                               "tables": counts.to_json(), "pending": pending(counts, primary)}, indent=2))
        return
    click.echo(f"primary key: {primary or 'none (SESSIONQ_ENCRYPTION_KEYS is not set)'}")
    for table, per_key in counts.to_json().items():
        shown = ", ".join(f"{kid} {n}" for kid, n in per_key.items()) or "empty"
        click.echo(f"{table}: {shown}")
    click.echo(f"not under the primary key: {pending(counts, primary)}")


@keys_group.command("rotate")
@click.option("--batch-size", type=click.IntRange(min=1, max=10_000), default=500, show_default=True,
              help="Rows per rotate_batch job.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Show a progress bar until every value is under the primary key.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between progress checks.")
@pass_app
@user_errors
def keys_rotate(app: App, batch_size: int, wait: bool, interval: float) -> None:
    """Re-seal every stored value under the primary key, in the background: one
    resumable, idempotent `rotate_batch` job per batch on the bulk queue."""
    import time

    from sessionq.models.rotation import key_counts, pending

    if app.settings.queue_url is None:
        raise click.ClickException("keys rotate needs a broker (REDIS_URL): the batches run on `sessionq worker`s")
    from sessionq.workers.broker import configure

    configure(app.settings)  # before the bulk actor module declares its actor
    from sessionq.workers.bulk import fan_out_rotation

    jobs = fan_out_rotation(app.settings, batch_size)
    primary = app.settings.sealer.primary
    click.echo(f"enqueued {jobs} rotate_batch job(s) on the bulk queue (primary key {primary})")
    if not wait or not jobs:
        return
    total = sum(key_counts(app.store).total().values())
    left = pending(key_counts(app.store), primary)
    with click.progressbar(length=total, label="re-sealing", file=sys.stderr) as bar:
        bar.update(total - left)
        while left:
            time.sleep(interval)
            now = pending(key_counts(app.store), primary)
            bar.update(max(left - now, 0))
            left = min(left, now)
    click.echo(f"every stored value is under key {primary}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
@user_errors
def stats(app: App, as_json: bool) -> None:
    """Counts of sessions by status, messages, files and transport sessions."""
    data = app.store.stats().to_json()
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    for name, value in data.items():
        click.echo(f"{name:<20} {value}")


@main.command("scheduler")
@wait_option
@pass_app
@user_errors
def scheduler_command(app: App, wait: float | None) -> None:
    """Enqueue the periodic sweeps (long-running; stop with SIGTERM or Ctrl-C).

    Run as many replicas as you like against one Redis: a lease makes one of them
    fire, each tick exactly once; if it dies another takes over within one lease
    period (SESSIONQ_SCHEDULER_LEASE_SECONDS).
    """
    import signal
    import threading

    from sessionq.scheduler.lease import connect_redis
    from sessionq.scheduler.runner import SweepScheduler, dramatiq_send
    from sessionq.workers.startup import wait_until_ready

    wait_until_ready(app.settings, store=False, wait=wait)
    redis_client = connect_redis(app.settings)
    if redis_client is None:
        logging.getLogger(__name__).warning(
            "no REDIS_URL: this scheduler is the only one, and its jobs run only in this process's "
            "embedded broker (use `sessionq up` to run a worker alongside it)"
        )
    from sessionq.workers.broker import configure

    configure(app.settings)  # the broker of these settings (--redis-url / --config included)
    runner = SweepScheduler(dramatiq_send(), settings=app.settings, redis=redis_client)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    runner.run(stop)


@main.command()
@click.option("--aggressive", is_flag=True, help="Also purge sessions expired for over an hour.")
@click.option("--dry-run", is_flag=True, help="Count what would change; change nothing.")
@click.option("--kind", type=click.Choice(SWEEP_KINDS), help="Run only this sweep.")
@pass_app
@user_errors
def cleanup(app: App, aggressive: bool, dry_run: bool, kind: str | None) -> None:
    """Run the hygiene sweeps now, in this process, and print what they changed."""
    from sessionq.scheduler.lease import connect_redis
    from sessionq.scheduler.sweeps import run_sweeps_now, schedule_for

    kinds = [kind] if kind else list(schedule_for(app.settings))
    if aggressive and "aggressive_cleanup" not in kinds and not kind:
        kinds.append("aggressive_cleanup")
    redis_client = None
    if not dry_run:
        try:
            redis_client = connect_redis(app.settings)
        except StoreUnavailable as exc:
            click.echo(f"warning: {exc}; running without the sweep locks and book", err=True)
    for done in run_sweeps_now(kinds, app.store, app.settings, redis=redis_client, dry_run=dry_run):
        if done.counts is None:
            click.echo(f"{done.kind}: skipped (already running elsewhere)")
            continue
        summary = " ".join(f"{k}={v}" for k, v in done.counts.items())
        prefix = "would change " if dry_run else ""
        click.echo(f"{done.kind}: {prefix}{summary} ({done.seconds:.2f}s)")


@main.command()
@click.option("--host", envvar="SESSIONQ_HTTP_HOST", help="Address to bind (default 127.0.0.1).")
@click.option("--port", envvar="SESSIONQ_HTTP_PORT", type=int, help="Port to bind (default 8080).")
@wait_option
@pass_app
@user_errors
def serve(app: App, host: str | None, port: int | None, wait: float | None) -> None:
    """Serve GET /session-health and GET /metrics (Bearer token: SESSIONQ_API_TOKEN)."""
    from sessionq.workers.http import serve as serve_http

    serve_http(app.settings, host, port, wait=wait)


@main.command()
@click.option("--timeout", type=float, default=None, help="Seconds to wait for each component (default 3).")
@pass_app
def health(app: App, timeout: float | None) -> None:
    """Check the store, broker and sweeps; print one JSON line; exit 0 if healthy, 1 if not."""
    from sessionq.workers.health import DEFAULT_PROBE_TIMEOUT, HealthChecker

    with HealthChecker(app.settings, timeout=timeout or DEFAULT_PROBE_TIMEOUT) as checker:
        report = checker.check()
    click.echo(json.dumps(report.to_json(), sort_keys=True, default=str))
    sys.exit(0 if report.healthy else 1)

# -- bulk operations: migrate, verify, export-all, import, backup, restore ----------------

# Checkpoint file `sessionq migrate` writes (and `--resume` reads) when none is given.
DEFAULT_CHECKPOINT = "sessionq-migrate.checkpoint.json"
# Differences `sessionq verify` lists after its summary unless --all.
DEFAULT_SHOWN_DIFFERENCES = 20


def _per_kind(counts: dict[str, int], suffix: str = "") -> str:
    """``", 3 files, 2 transports, 0 agent states"`` (with ``suffix`` after each count)."""
    return "".join(f", {n} {name.replace('_', ' ')}{suffix}" for name, n in counts.items())


def _zone(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    from sessionq.models.legacy import zone

    try:
        return zone(value) if value else None
    except SessionqError as exc:
        raise click.BadParameter(str(exc)) from None


_LEGACY_TZ = click.option(
    "--legacy-tz", "legacy_tz", metavar="ZONE", callback=_zone,
    help="Zone of the naive times of seed-era data (IANA name, e.g. Europe/Berlin; default UTC).",
)
_FROM_LAYOUT = click.option(
    "--from-layout", "from_layout", type=click.Choice(["sessionq", "legacy"]),
    help="Layout of the store read from (default: detected): sessionq's, or the seed-era tables/collection.",
)
_LEGACY_COLLECTION = click.option(
    "--legacy-collection", "legacy_collection", metavar="NAME",
    help="MongoDB collection of seed-era sessions (default: chat_sessions, else sessions).",
)


def legacy_tz_option(func: F) -> F:
    """``--legacy-tz ZONE``, passed on as ``legacy_tz`` (a tzinfo or None)."""
    return _LEGACY_TZ(func)


def source_layout_options(func: F) -> F:
    """``--from-layout``, ``--legacy-tz`` and ``--legacy-collection``, passed on as one
    ``legacy`` (:class:`~sessionq.models.legacy.LegacyOptions`)."""

    @functools.wraps(func)
    def wrapper(*args: Any, from_layout: str | None, legacy_tz: Any, legacy_collection: str | None,
                **kwargs: Any) -> Any:
        from datetime import UTC

        from sessionq.models.legacy import LegacyOptions

        kwargs["legacy"] = LegacyOptions(from_layout, legacy_tz or UTC, legacy_collection)
        return func(*args, **kwargs)

    return _FROM_LAYOUT(_LEGACY_TZ(_LEGACY_COLLECTION(wrapper)))  # type: ignore[return-value]


def _echo_problems(store: Store) -> bool:
    """Print what a seed-era source found (bad rows, notes) to stderr; True if a row was left out."""
    from sessionq.models.legacy import problems_of

    problems = problems_of(store)
    if problems is None:
        return False
    for line in problems.lines():
        click.echo(line, err=True)
    return problems.bad_count > 0


def _echo_import(report: Any, what: str) -> None:
    click.echo(
        f"{what}: read {report.sessions_read} sessions / {report.messages_read} messages"
        f"{_per_kind(report.kinds_read)}; "
        f"wrote {report.sessions_written} sessions, inserted {report.messages_inserted} messages"
        f"{_per_kind(report.kinds_written, ' written')}; {report.error_count} rejected"
    )
    for line in report.errors:
        click.echo(f"  rejected {line}", err=True)
    if report.error_count > len(report.errors):
        click.echo(f"  ... and {report.error_count - len(report.errors)} more", err=True)
    for line in report.notes.lines():
        click.echo(f"  {line}", err=True)


@main.command("migrate")
@click.option("--from", "source", required=True, help="Source store URL.")
@click.option("--to", "destination", required=True, help="Destination store URL (its schema is brought up to date).")
@click.option("--verify", "check", is_flag=True, help="Verify counts and per-session checksums afterwards.")
@click.option("--batch-size", type=click.IntRange(min=1), default=200, show_default=True,
              help="Sessions per batch (records per batch for files, transports and agent state).")
@click.option("--resume", is_flag=True, help="Continue after the last finished batch of the checkpoint.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=DEFAULT_CHECKPOINT, show_default=True,
              help="Checkpoint file, rewritten after every batch.")
@click.option("--pause", type=click.FloatRange(min=0), default=0.0, help="Seconds to sleep between batches.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a terminal).")
@click.option("--fan-out", is_flag=True,
              help="Enqueue one `migrate_batch` job per batch on the bulk queue instead (stores as @NAME, see docs).")
@source_layout_options
@pass_app
@user_errors
def migrate_command(app: App, source: str, destination: str, check: bool, batch_size: int, resume: bool,
                    checkpoint: str, pause: float, progress: bool | None, fan_out: bool, legacy: Any) -> None:
    """Copy every session and message, file record, transport session and agent-state
    entry from one store to another (resumable, idempotent; the MCP event log stays).

    The source may also be a seed-era store (detected, or --from-layout legacy): rows
    sessionq refuses are listed and left out (exit 1), the rest is migrated."""
    from pathlib import Path

    from sessionq.models.settings import redact_url
    from sessionq.models.transfer import Checkpoint, describe, migrate, open_pair, verify

    if source == destination:
        raise click.ClickException("--from and --to name the same store")
    if fan_out:
        from sessionq.models.legacy import detect_layout

        if (legacy.layout or detect_layout(app.settings.resolve_store(source), legacy)) == "legacy":
            raise click.ClickException("--fan-out reads sessionq stores only; migrate a seed-era store without it")
        if app.settings.queue_url is None:
            raise click.ClickException("--fan-out needs a broker (REDIS_URL): the batches run on `sessionq worker`s")
        from sessionq.workers.broker import configure

        configure(app.settings)  # before the bulk actor module declares its actor
        from sessionq.workers.bulk import fan_out_migration

        jobs = fan_out_migration(app.settings, source, destination, batch_size)
        click.echo(f"enqueued {jobs} migrate_batch job(s) on the bulk queue; "
                   "check with `sessionq verify` when they are done")
        return
    labels = (redact_url(source), redact_url(destination))
    path = Path(checkpoint)
    if resume:
        Checkpoint.load_for(path, labels)  # refuse another migration's checkpoint before touching a store
    with open_pair(source, destination, upgrade=True, source_options=legacy, sealer=app.settings.sealer) as (src, dst):
        click.echo(f"migrating {labels[0]} -> {labels[1]}", err=True)
        try:
            report = migrate(src, dst, batch_size=batch_size, checkpoint=path, resume=resume, show_progress=progress,
                             pause=pause, labels=labels)
        except KeyboardInterrupt:
            click.echo(f"interrupted: every batch up to the checkpoint ({path}) is done; run the same command "
                       "with --resume to continue from there", err=True)
            sys.exit(130)
        start = f" (resumed after {report.resumed_from!r})" if report.resumed_from else ""
        click.echo(
            f"migrated {report.sessions} sessions, {report.messages} messages{_per_kind(report.kinds)}{start} "
            f"in {report.seconds:.1f}s ({report.rows_per_second:.0f} rows/s); {report.sessions_written} sessions "
            f"written, {report.messages_inserted} messages inserted{_per_kind(report.kinds_written, ' written')}"
        )
        equal = True
        if check:
            result = verify(src, dst, show_progress=progress)
            for line in describe(result, limit=DEFAULT_SHOWN_DIFFERENCES):
                click.echo(line)
            equal = result.equal
        if _echo_problems(src) or not equal:
            sys.exit(1)


@main.command("verify")
@click.option("--from", "source", required=True, help="Source store URL.")
@click.option("--to", "destination", required=True, help="Destination store URL.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when a terminal).")
@click.option("--all", "all_", is_flag=True,
              help=f"List every difference found (default: the first {DEFAULT_SHOWN_DIFFERENCES}).")
@source_layout_options
@pass_app
@user_errors
def verify_command(app: App, source: str, destination: str, progress: bool | None, all_: bool, legacy: Any) -> None:
    """Compare two stores (counts, fields, messages, checksums; files, transports and
    agent state record by record and by digest); exit 1 on any difference (or a
    seed-era source row sessionq refuses)."""
    from sessionq.models.transfer import describe, open_pair, verify

    with open_pair(source, destination, source_options=legacy, sealer=app.settings.sealer) as (src, dst):
        result = verify(src, dst, show_progress=progress)
        bad = _echo_problems(src)
    for line in describe(result, limit=None if all_ else DEFAULT_SHOWN_DIFFERENCES):
        click.echo(line)
    if bad or not result.equal:
        sys.exit(1)


def _read_store(app: App, legacy: Any, stack: Any) -> Store:
    """The configured store to read from: seed-era when ``--from-layout legacy`` says so
    or it has the seed system's layout and not sessionq's, else ``app.store``."""
    from sessionq.models.legacy import detect_layout, open_source

    url = app.settings.storage_url
    layout = legacy.layout or detect_layout(url, legacy, "store")
    if layout != "legacy":
        return app.store
    store = open_source(url, legacy, "store")
    stack.callback(store.close)
    return store


@main.command("export-all")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write (.gz compresses).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "json"]), default=None,
              help="jsonl (default) or json (default for a .json name).")
@click.option("--redact", is_flag=True, help="Replace secrets and personal data in the copy (docs/privacy.md).")
@source_layout_options
@pass_app
@user_errors
def export_all_command(app: App, output: str, fmt: str | None, redact: bool, legacy: Any) -> None:
    """Export every session with its messages, file record, transport session and
    agent-state entry from the configured store (sessionq's or seed-era layout)."""
    from contextlib import ExitStack
    from pathlib import Path

    from sessionq.models.archive_io import export_file
    from sessionq.models.redact import Redactor

    redactor = Redactor.from_settings(app.settings) if redact else None
    with ExitStack() as stack:
        store = _read_store(app, legacy, stack)
        report = export_file(store, Path(output), fmt, redactor=redactor)
        click.echo(
            f"exported {report.sessions} sessions, {report.messages} messages{_per_kind(report.kinds)} to {output}"
        )
        if _echo_problems(store):
            sys.exit(1)


@main.command("import")
@click.argument("file", type=click.Path(exists=True))
@legacy_tz_option
@pass_app
@user_errors
def import_command(app: App, file: str, legacy_tz: Any) -> None:
    """Import a .jsonl/.json export (optionally .gz), or every one in a folder, into the
    configured store; idempotent. The seed system's JSON exports import too. Bad records
    are reported with their line and the rest is imported (exit 1)."""
    from datetime import UTC
    from pathlib import Path

    from sessionq.models.archive_io import import_path

    store = app.open_store(check_schema=False)
    store.upgrade()
    report = import_path(store, Path(file), tz=legacy_tz or UTC)
    _echo_import(report, f"imported {file}" + (f" ({report.files} files)" if Path(file).is_dir() else ""))
    if report.error_count:
        sys.exit(1)


@main.command("backup")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False), help="Backup directory.")
@click.option("--keep", type=click.IntRange(min=1), default=7, show_default=True, help="Backups to keep.")
@click.option("--decrypt", is_flag=True,
              help="With SESSIONQ_ENCRYPTION_KEYS set: write the backup in clear (by default it stays sealed).")
@source_layout_options
@pass_app
@user_errors
def backup_command(app: App, directory: str, keep: int, decrypt: bool, legacy: Any) -> None:
    """Write a timestamped, compressed backup of the configured store (sessionq's or
    seed-era layout) and keep the last N."""
    from contextlib import ExitStack
    from pathlib import Path

    from sessionq.models.archive_io import backup

    with ExitStack() as stack:
        store = _read_store(app, legacy, stack)
        report = backup(store, Path(directory), keep=keep, decrypt=decrypt)
        click.echo(
            f"backup {report.path}: {report.sessions} sessions, {report.messages} messages{_per_kind(report.kinds)}"
        )
        for old in report.removed:
            click.echo(f"removed {old}")
        if _echo_problems(store):
            sys.exit(1)


@main.command("restore")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@legacy_tz_option
@pass_app
@user_errors
def restore_command(app: App, file: str, legacy_tz: Any) -> None:
    """Restore a backup (or any export) into the configured store; idempotent."""
    from datetime import UTC
    from pathlib import Path

    from sessionq.models.archive_io import restore

    store = app.open_store(check_schema=False)
    store.upgrade()
    report = restore(store, Path(file), tz=legacy_tz or UTC)
    _echo_import(report, f"restored {file}")
    if report.error_count:
        sys.exit(1)

# -- jobs: worker, enqueue, export, archive, up, dlq (issue 3) ------------------


def _root_params(ctx: click.Context) -> dict[str, Any]:
    return ctx.find_root().params


def _export_settings_env(ctx: click.Context) -> None:
    """Pass the global options to child processes (they load Settings from the environment)."""
    import os

    params = _root_params(ctx)
    for name, env in (("config_file", "SESSIONQ_CONFIG"), ("storage_url", "STORAGE_URL"), ("redis_url", "REDIS_URL")):
        if params.get(name):
            os.environ[env] = str(params[name])


def _run_jobs(app: App, jobs: list[tuple[str, Any]]) -> list[str]:
    """Send jobs (embedded: run them and wait, see ``workers.embedded.run_jobs``); report spooled ones."""
    from sessionq.workers.embedded import run_jobs

    app.close()  # the jobs use the worker side's store
    sent = run_jobs(app.settings, jobs)
    if sent.spooled:
        click.echo(f"broker unreachable: {sent.spooled} job(s) spooled to {sent.outbox_path}", err=True)
    return sent.ids


@main.command()
@click.option("--processes", "-p", type=click.IntRange(1),
              help="Worker processes (default: settings.worker_processes).")
@click.option("--threads", "-t", type=click.IntRange(1), help="Threads per process (default: settings.worker_threads).")
@click.option("--queues", "-Q", multiple=True, type=click.Choice(QUEUES),
              help="Queues to consume (repeatable; default: all, tasks only with --mcp-app).")
@click.option("--mcp-app", metavar="MODULE:ATTR", help="The MCPServer whose task tools this worker runs (queue tasks).")
@wait_option
@click.pass_context
@user_errors
def worker(ctx: click.Context, processes: int | None, threads: int | None, queues: tuple[str, ...],
           mcp_app: str | None, wait: float | None) -> None:
    """Run Dramatiq worker processes against the configured broker (graceful on SIGTERM)."""
    app: App = ctx.obj
    if app.settings.queue_url is None:
        raise click.ClickException("no broker configured (set REDIS_URL or --redis-url); `sessionq up` runs embedded")
    _export_settings_env(ctx)
    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    from sessionq.workers.broker import configure
    from sessionq.workers.startup import wait_until_ready

    configure(app.settings)  # forked worker processes inherit this broker
    from sessionq.workers.tool_tasks import worker_queues

    queues = worker_queues(queues, mcp_app)
    wait_until_ready(app.settings, wait=wait)

    argv = ["sessionq.workers.actors", "--processes", str(processes or app.settings.worker_processes),
            "--threads", str(threads or app.settings.worker_threads), "--skip-logging"]
    if queues:
        argv += ["--queues", *queues]
    app.close()
    sys.exit(dramatiq_main(make_argument_parser().parse_args(argv)))


@main.group()
def enqueue() -> None:
    """Enqueue jobs from the shell."""


@enqueue.command("save")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@legacy_tz_option
@pass_app
@user_errors
def enqueue_save(app: App, file: Any, legacy_tz: Any) -> None:
    """Save a session from FILE.json (the `sessionq export --format json` shape; - for stdin).

    The seed system's export documents are accepted too: one session, a list of them,
    or {"sessions": [...], "files": [...]} (one job per session and file record).
    With no broker configured the jobs run embedded and this returns once they are stored.
    """
    from datetime import UTC

    from sessionq.workers.payloads import export_jobs

    try:
        payload = json.load(file)
    except ValueError as exc:
        raise click.ClickException(f"{file.name}: not valid JSON: {exc}") from None
    jobs, notes = export_jobs(payload, legacy_tz or UTC)
    for line in notes.lines():
        click.echo(line, err=True)
    job_ids = _run_jobs(app, jobs)
    done = "saved" if app.settings.queue_url is None else "enqueued"
    saves = [p for name, p in jobs if name == "save_session"]
    if len(jobs) == 1 and saves:
        count = len(saves[0].get("messages", [])) if isinstance(saves[0], dict) else 0
        click.echo(f"{done} session {saves[0].get('session_id')} ({count} messages); job {job_ids[0]}")
        return
    messages = sum(len(p["messages"]) for p in saves)
    click.echo(f"{done} {len(saves)} sessions ({messages} messages), {len(jobs) - len(saves)} file records; "
               f"{len(job_ids)} jobs")


@main.command("export")
@click.argument("session_id")
@click.option("--format", "fmt", type=click.Choice(["json", "text", "markdown"]), default="json", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), help="Write here (default: stdout).")
@click.option("--redact", is_flag=True, help="Replace secrets and personal data in the copy (docs/privacy.md).")
@pass_app
@user_errors
def export_command(app: App, session_id: str, fmt: str, output: str | None, redact: bool) -> None:
    """Export one session from the store as JSON, text or Markdown."""
    from pathlib import Path

    from sessionq.models.redact import Redactor
    from sessionq.workers.exports import export_to_file, write_export

    redactor = Redactor.from_settings(app.settings) if redact else None
    if output:
        count = export_to_file(app.store, session_id, fmt, Path(output), redactor=redactor)
        click.echo(f"exported {session_id} ({count} messages) to {output}", err=True)
    else:
        write_export(app.store, session_id, fmt, sys.stdout, redactor=redactor)


@main.command("forget")
@click.option("--session", "session_id", metavar="ID", help="Erase this session.")
@click.option("--metadata", metavar="KEY=VALUE", help="Erase every session whose metadata has KEY=VALUE.")
@click.option("--receipt", "receipt_id", metavar="ID", help="Show the stored receipt ID instead.")
@click.option("--enqueue", is_flag=True, help="Run as a forget job on the workers; print the receipt id.")
@click.option("--json", "as_json", is_flag=True, help="Print the receipt as JSON.")
@pass_app
@user_errors
def forget_command(app: App, session_id: str | None, metadata: str | None, receipt_id: str | None,
                   enqueue: bool, as_json: bool) -> None:
    """Erase a session, or every session with a metadata value, everywhere sessionq keeps
    it (store, queues, dead letters, outbox, MCP event streams, export files), and print
    the receipt (docs/privacy.md)."""
    from sessionq.models.erasure import Selector
    from sessionq.workers.forget import erase, format_receipt, new_receipt_id, redis_for

    if receipt_id is not None:
        if session_id or metadata or enqueue:
            raise click.UsageError("--receipt shows a receipt; give it alone")
        receipt = app.store.load_receipt(receipt_id)
    else:
        if (session_id is None) == (metadata is None):
            raise click.UsageError("give exactly one of --session ID or --metadata KEY=VALUE")
        selector = Selector(session_id=session_id) if metadata is None else Selector.parse_metadata(metadata)
        if enqueue:
            new_id = new_receipt_id()
            (job_id,) = _run_jobs(app, [("forget", {"receipt_id": new_id, **selector.to_payload()})])
            click.echo(f"forget job {job_id}; show its receipt with `sessionq forget --receipt {new_id}`")
            return
        receipt = erase(selector, store=app.store, settings=app.settings, redis=redis_for(app.settings))
    click.echo(json.dumps(receipt.to_json(), indent=2) if as_json else format_receipt(receipt))


@main.command("archive")
@click.argument("session_id")
@click.option("--force", is_flag=True, help="Enqueue without looking the session up in the store first.")
@pass_app
@user_errors
def archive_command(app: App, session_id: str, force: bool) -> None:
    """Archive a session (an archive_session job; embedded: waits until done).

    An unknown session is an error here and now (exit 1), not a job that dead-letters
    later; --force enqueues anyway (e.g. for a save still queued)."""
    from sessionq.models import utcnow

    if not force:
        app.store.load_session(session_id)
    (job_id,) = _run_jobs(app, [("archive_session", {"session_id": session_id, "at": utcnow()})])
    click.echo(f"{'archived' if app.settings.queue_url is None else 'enqueued archive of'} {session_id}; job {job_id}")


@main.command("up")
@click.option("--demo", is_flag=True, help="Run a self-contained tour in a temporary directory and exit.")
@click.option("--threads", "-t", type=click.IntRange(1), help="Worker threads (default: settings.worker_threads).")
@click.option("--no-http", is_flag=True, help="Do not serve /session-health and /metrics.")
@click.option("--host", envvar="SESSIONQ_HTTP_HOST", help="Address the HTTP side binds (default 127.0.0.1).")
@click.option("--port", envvar="SESSIONQ_HTTP_PORT", type=int,
              help="Port the HTTP side binds (default 8080; 0: any free).")
@pass_app
@user_errors
def up(app: App, demo: bool, threads: int | None, no_http: bool, host: str | None, port: int | None) -> None:
    """Worker, scheduler and HTTP in one process (embedded queue unless a broker is set)."""
    if demo:
        from sessionq.workers.demo import run_demo

        app.close()
        run_demo(app.settings, click.echo)
        return
    import signal
    import threading

    from sessionq.workers.up import AllInOne

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    app.close()
    with AllInOne(app.settings, threads=threads, http=not no_http, host=host, port=port) as running:
        where = f"; http://{running.settings.http_host}:{running.http_port}" if running.http_port else ""
        click.echo(f"sessionq up: worker and scheduler running{where} (Ctrl-C or SIGTERM to stop)", err=True)
        stop.wait()
        click.echo("sessionq up: stopping (draining queued jobs)", err=True)


@main.group()
def dlq() -> None:
    """Dead-lettered jobs (Redis broker): list, requeue, purge."""


def _dead_letters(app: App) -> Any:
    from sessionq.workers.dlq import DeadLetters

    return DeadLetters.from_settings(app.settings)


def _redis_errors(func: F) -> F:
    """Turn a Redis error into one redacted ``Error: Redis unavailable: ...`` line, exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return func(*args, **kwargs)
        except redis.RedisError as exc:
            from sessionq.workers.logs import redact

            raise click.ClickException(f"Redis unavailable: {redact(str(exc))}") from None

    return wrapper  # type: ignore[return-value]


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@pass_app
@user_errors
@_redis_errors
def dlq_list(app: App, as_json: bool) -> None:
    """List dead letters with their reasons."""
    count = 0
    for letter in _dead_letters(app):
        count += 1
        if as_json:
            click.echo(json.dumps(letter.to_json(), ensure_ascii=False))
        else:
            click.echo(f"{letter.id}  {letter.queue:<11} {letter.actor_name:<17} "
                       f"{letter.dead_lettered_at:%Y-%m-%d %H:%M:%S}  {letter.reason[:200]}")
    if not as_json:
        click.echo(f"{count} dead letter(s)", err=True)


@dlq.command("requeue")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Requeue every dead letter.")
@pass_app
@user_errors
@_redis_errors
def dlq_requeue(app: App, ids: tuple[str, ...], all_: bool) -> None:
    """Put dead letters (by id, or --all) back on their queues."""
    if not ids and not all_:
        raise click.ClickException("give dead-letter ids or --all")
    moved = _dead_letters(app).requeue(None if all_ else ids)
    click.echo(f"requeued {moved} job(s)")
    wanted = len(set(ids))
    if ids and not all_ and moved < wanted:
        raise click.ClickException(f"{wanted - moved} of {wanted} id(s) are not dead letters (see `sessionq dlq list`)")


@dlq.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_app
@user_errors
@_redis_errors
def dlq_purge(app: App, yes: bool) -> None:
    """Delete every dead letter."""
    letters = _dead_letters(app)
    count = letters.count()
    if count and not yes:
        click.confirm(f"delete {count} dead letter(s)?", abort=True)  # declining: "Aborted!", exit 1
    click.echo(f"purged {letters.purge()} dead letter(s)")


@main.group("tasks")
def tasks_group() -> None:
    """Durable MCP tasks (SEP-2663): list, show, cancel."""


@tasks_group.command("list")
@click.option("--status", type=click.Choice(["working", "input_required", "completed", "failed", "cancelled"]))
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
@user_errors
def tasks_list(app: App, status: str | None, limit: int, as_json: bool) -> None:
    """Tasks in task_id order, optionally of one status."""
    from sessionq.workers.task_admin import list_tasks

    rows = list_tasks(app.store, status=status, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['task_id']}  {row['status']:<14} {row['tool']:<24} attempt {row['attempt']:<5} "
                   f"created {row['created_at']}")
    click.echo(f"{len(rows)} task(s)", err=True)


@tasks_group.command("show")
@click.argument("task_id")
@pass_app
@user_errors
def tasks_show(app: App, task_id: str) -> None:
    """Every field of one task, as JSON."""
    from sessionq.workers.task_admin import show_task

    click.echo(json.dumps(show_task(app.store, task_id), indent=2, ensure_ascii=False))


@tasks_group.command("cancel")
@click.argument("task_id")
@pass_app
@user_errors
def tasks_cancel(app: App, task_id: str) -> None:
    """Cancel a task (a running one is cancelled by its worker; a final one stays)."""
    from sessionq.errors import StoreUnavailable
    from sessionq.scheduler.lease import connect_redis
    from sessionq.workers.task_admin import cancel_task

    try:
        client = connect_redis(app.settings)
    except StoreUnavailable as exc:
        click.echo(f"warning: {exc}; the running worker sees the cancellation at its next lease renewal", err=True)
        client = None
    task = cancel_task(app.store, task_id, redis=client)
    state = "cancellation requested (running)" if task.status == "working" else task.status
    click.echo(f"task {task_id}: {state}")


if __name__ == "__main__":  # pragma: no cover
    main()
