"""Configuration in one place: importing sessionq reads no environment, creates no file
and builds no broker; the worker entry point configures once, from the environment
of that moment; every knob reaches its user through ``Settings``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sessionq.models import Settings
from tests.support_jobs import ROOT

# Runs in a fresh interpreter. It records every read of os.environ made directly by a
# sessionq module and every Broker built, then imports every sessionq module except the
# worker entry point (sessionq.workers.actors) and the job modules it imports: by
# Dramatiq's convention those declare their actors on the broker configured first.
IMPORT_EVERYTHING = r"""
import collections.abc, importlib, json, os, pkgutil, sys
from pathlib import Path

reads = []
real_environ = os.environ


class RecordingEnviron(collections.abc.MutableMapping):
    def _note(self, key):
        # The first frame outside this probe and os (os.getenv) is the reader.
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__") in ("os", "__main__"):
            frame = frame.f_back
        name = frame.f_globals.get("__name__", "") if frame is not None else ""
        if name.startswith("sessionq"):
            reads.append(f"{name}: {key}")

    def __getitem__(self, key):
        self._note(key)
        return real_environ[key]

    def get(self, key, default=None):
        self._note(key)
        return real_environ.get(key, default)

    def __contains__(self, key):
        self._note(key)
        return key in real_environ

    def __setitem__(self, key, value):
        real_environ[key] = value

    def __delitem__(self, key):
        del real_environ[key]

    def __iter__(self):
        self._note("*")
        return iter(real_environ)

    def __len__(self):
        return len(real_environ)

    def copy(self):
        return dict(real_environ)


os.environ = RecordingEnviron()

import dramatiq.broker

built = []
real_init = dramatiq.broker.Broker.__init__


def recording_init(self, *args, **kwargs):
    built.append(type(self).__name__)
    real_init(self, *args, **kwargs)


dramatiq.broker.Broker.__init__ = recording_init

import sessionq.models, sessionq.scheduler, sessionq.workers

ACTOR_SIDE = {"actors", "bulk", "exports", "forget", "maintenance", "records", "sessions", "tool_tasks"}
root = Path(sessionq.models.__file__).resolve().parent.parent
names = [f"sessionq.{p.stem}" for p in sorted(root.glob("*.py"))]
for package in (sessionq.models, sessionq.scheduler, sessionq.workers):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not (package is sessionq.workers and info.name.split(".")[2] in ACTOR_SIDE):
            names.append(info.name)
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "reads": reads, "built": built,
                  "global_broker": repr(dramatiq.broker.global_broker)}))
"""


def _python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with only ``env`` (and the import path)."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd)}
    if os.environ.get("PYTHONPATH"):
        base["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=base | env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_importing_every_module_reads_no_environment_creates_nothing_builds_no_broker(tmp_path: Path) -> None:
    # Given an empty working directory and a metrics directory that does not exist yet
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    prometheus = tmp_path / "prometheus"
    # When every sessionq module is imported in a fresh interpreter
    result = _python(IMPORT_EVERYTHING, cwd, PROMETHEUS_MULTIPROC_DIR=str(prometheus),
                     SESSIONQ_GROUP_COMMIT_DELAY_MS="7", SESSIONQ_STORE_ARCHIVE="sqlite:///x.db")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"sessionq.cli", "sessionq.errors", "sessionq.workers.broker", "sessionq.workers.metrics",
            "sessionq.workers.groupcommit", "sessionq.workers.payloads", "sessionq.workers.embedded",
            "sessionq.workers.dlq", "sessionq.scheduler.lease"} <= set(report["imported"])
    # Then no sessionq module read the environment
    assert report["reads"] == []
    # ... no broker was built or made the global one
    assert report["built"] == [] and report["global_broker"] == "None"
    # ... and no file or directory was created
    assert list(cwd.iterdir()) == []
    assert not prometheus.exists()


def test_the_worker_entry_point_configures_once_from_the_environment_at_that_moment(tmp_path: Path) -> None:
    # Given an environment naming a Redis broker (nothing is contacted to build it)
    code = (
        "import dramatiq, sessionq.workers.actors as actors\n"
        "from sessionq.workers import broker\n"
        "print(type(dramatiq.get_broker()).__name__, broker.get_settings().redis_url,"
        " actors.sessions.save_session.broker is dramatiq.get_broker())\n"
    )
    env = {"REDIS_URL": "redis://127.0.0.1:9/5", "STORAGE_URL": f"sqlite:///{tmp_path / 'a.db'}"}
    # When `dramatiq sessionq.workers.actors` would import its module
    result = _python(code, tmp_path, **env)
    # Then the broker of that environment is the global one, and the actors are bound to it
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SessionqRedisBroker", "redis://127.0.0.1:9/5", "True"]


def test_a_process_that_configured_first_keeps_its_broker_when_the_actors_load(tmp_path: Path) -> None:
    # Given a process that configured embedded settings although its environment names Redis
    code = (
        "from sessionq.models import Settings\n"
        "from sessionq.workers import broker\n"
        f"broker.configure(Settings(storage_url='sqlite:///{tmp_path / 'a.db'}'))\n"
        "import dramatiq, sessionq.workers.actors as actors\n"
        "print(type(dramatiq.get_broker()).__name__, actors.bulk.migrate_batch.broker is dramatiq.get_broker())\n"
    )
    result = _python(code, tmp_path, REDIS_URL="redis://127.0.0.1:9/5")
    # Then importing the actors neither read the environment nor replaced the broker
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["StubBroker", "True"]


def test_an_actor_module_imported_before_configure_is_rebound(tmp_path: Path) -> None:
    # Given a job module imported on its own (its actor lands on Dramatiq's default broker)
    code = (
        "import sessionq.workers.records as records\n"
        "from sessionq.models import Settings\n"
        "from sessionq.workers import broker\n"
        f"configured = broker.configure(Settings(storage_url='sqlite:///{tmp_path / 'a.db'}'))\n"
        "print(records.save_file.broker is configured, 'save_file' in configured.actors)\n"
    )
    # When the process configures its broker afterwards
    result = _python(code, tmp_path)
    # Then the actor moved to the configured broker
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_group_commit_delay_and_metrics_directory_come_from_settings(tmp_path: Path) -> None:
    from sessionq.workers import broker

    # Given settings (from an environment) with a gather delay and a metrics directory not created yet
    prometheus = tmp_path / "prometheus"
    settings = Settings.load(environ={
        "STORAGE_URL": f"sqlite:///{tmp_path / 'a.db'}",
        "SESSIONQ_GROUP_COMMIT_DELAY_MS": "0",
        "PROMETHEUS_MULTIPROC_DIR": str(prometheus),
    })
    assert (settings.group_commit_delay_ms, settings.prometheus_multiproc_dir) == (0.0, str(prometheus))
    try:
        # When a worker is configured with them
        broker.configure(settings)
        broker.get_store().upgrade()
        # Then the metrics directory exists and the group committer does not wait
        assert prometheus.is_dir()
        assert broker.get_committer().gather_delay == 0.0
    finally:
        broker.runtime.reset()


def test_named_stores_resolve_from_settings() -> None:
    # Given settings naming a store through the environment and another through a file's mapping
    settings = Settings.load(environ={"SESSIONQ_STORE_ARCHIVE": "postgresql://app:pw@db/archive"})
    from_file = Settings(stores={"Backup": "sqlite:///backup.db"})
    # Then @NAME resolves case-insensitively, a URL is passed through, and secrets stay masked
    assert settings.resolve_store("@archive") == "postgresql://app:pw@db/archive"
    assert from_file.resolve_store("@BACKUP") == "sqlite:///backup.db"
    assert settings.resolve_store("sqlite:///plain.db") == "sqlite:///plain.db"
    assert settings.redacted()["stores"] == {"ARCHIVE": "postgresql://app:***@db/archive"}


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("@nowhere", "store @nowhere is not configured here: set SESSIONQ_STORE_NOWHERE"),
        ("@", "store name '@' must be @ followed by letters, digits or _"),
        ("@bad-name", "store name '@bad-name' must be @ followed by letters, digits or _"),
    ],
)
def test_an_unknown_or_malformed_store_name_is_a_config_error(reference: str, message: str) -> None:
    from sessionq.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        Settings().resolve_store(reference)
    assert str(info.value) == message


def test_a_worker_that_does_not_know_a_store_dead_letters_the_batch_with_its_reason(tmp_path: Path) -> None:
    # Given an embedded worker whose settings name no store @elsewhere
    from sessionq.workers.embedded import EmbeddedRuntime
    from sessionq.workers.producer import Producer

    settings = Settings(storage_url=f"sqlite:///{tmp_path / 'a.db'}", outbox_path=str(tmp_path / "outbox.db"))
    with EmbeddedRuntime(settings, threads=1) as runtime:
        # When a migrate_batch job names it
        Producer(settings).send("migrate_batch", {"source": "@elsewhere", "destination": f"sqlite:///{tmp_path}/b.db",
                                                  "after": None, "until": None, "limit": 5})
        runtime.join()
        letters = runtime.dead_letters()
    # Then the job is dead-lettered at once as an invalid payload naming the variable to set
    assert [letter.reason for letter in letters] == [
        "InvalidPayload: store @elsewhere is not configured here: set SESSIONQ_STORE_ELSEWHERE"
    ]


def test_readme_lists_every_setting() -> None:
    import dataclasses

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(Settings):
        assert f"`{f.name}`" in readme or f.name.endswith("_interval"), f.name
