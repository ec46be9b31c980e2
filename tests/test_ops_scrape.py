"""Every Prometheus scrape target in ops/ is served by what ops/ declares for it.

Docker is not needed. For each target ``HOST:PORT`` of ops/prometheus/prometheus.yml,
the compose service named ``HOST`` is started as a real local process: the image's
entry point and ``ENV`` (ops/Dockerfile), the service's ``environment`` (compose
``${VAR:-default}`` interpolation applied) and its ``command``. As inside a container,
other services' host names resolve to the real test services, absolute paths live in a
private root, and the process binds the port it was configured with, mapped onto a free
local port (a ``socket.bind`` shim loaded through ``sitecustomize``). Prometheus' request
(path, Bearer token from the compose secret) must then answer with metrics. The systemd
unit of the same role is checked the same way.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MONGO_URL, POSTGRES_URL, REDIS_URL
from tests.support_services import free_port
from tests.test_ops import OPS, compose, units

# Values the operator passes to `docker compose` (ops/compose.yaml's header).
COMPOSE_VARIABLES = {"SESSIONQ_API_TOKEN": "scrape-test-token-5d1c", "POSTGRES_PASSWORD": "unused"}
# Which real test service stands in for a compose service, by the image it runs.
TEST_SERVICES = {"redis": REDIS_URL, "postgres": POSTGRES_URL, "mongo": MONGO_URL}
# Settings a systemd unit reads from its EnvironmentFile (/etc/sessionq/sessionq.env).
SYSTEMD_ENVIRONMENT_FILE = {"STORAGE_URL": POSTGRES_URL, "REDIS_URL": REDIS_URL,
                            "SESSIONQ_API_TOKEN": COMPOSE_VARIABLES["SESSIONQ_API_TOKEN"]}
# Seconds a started process may take before its port answers with metrics.
DEFAULT_SCRAPE_DEADLINE = 90.0
# Loaded by every Python process of the service: binds of a mapped port go to the free one.
_SITECUSTOMIZE = '''\
import os, socket
_MAP = dict((int(a), int(b)) for a, b in (p.split(":") for p in os.environ["SESSIONQ_TEST_PORT_MAP"].split(",")))
_bind = socket.socket.bind
def _mapped_bind(self, address):
    if isinstance(address, tuple) and len(address) >= 2 and address[1] in _MAP:
        address = (address[0], _MAP[address[1]], *address[2:])
    return _bind(self, address)
socket.socket.bind = _mapped_bind
'''
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


@dataclass(frozen=True)
class Target:
    """One address Prometheus scrapes."""

    job: str
    host: str
    port: int
    path: str
    credentials_file: str | None

    def __str__(self) -> str:
        return f"{self.job}:{self.host}:{self.port}"


def scrape_targets() -> list[Target]:
    """Every target of ops/prometheus/prometheus.yml (static and DNS A-record discovery)."""
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    targets = []
    for job in config["scrape_configs"]:
        unchecked = sorted(k for k in job if k.endswith("_sd_configs") and k != "dns_sd_configs")
        assert not unchecked, f"{job['job_name']}: this test cannot follow {unchecked}"
        assert job.get("scheme", "http") == "http"
        addresses = [t.rsplit(":", 1) for sc in job.get("static_configs", []) for t in sc["targets"]]
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A", "SRV records carry their own port"
            addresses += [[name, sd["port"]] for name in sd["names"]]
        credentials = (job.get("authorization") or {}).get("credentials_file")
        targets += [Target(job["job_name"], host, int(port), job.get("metrics_path", "/metrics"), credentials)
                    for host, port in addresses]
    return targets


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``."""

    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"] or ""
        given = variables.get(name)
        if op in (":-", "-") and (given is None or (op == ":-" and not given)):
            return arg
        if op in (":?", "?") and (given is None or (op == ":?" and not given)):
            raise AssertionError(f"compose needs {name}: {arg}")
        return given or ""

    return _VARIABLE.sub(one, value)


def image_environment() -> tuple[list[str], dict[str, str]]:
    """ops/Dockerfile's ENTRYPOINT and ENV."""
    text = re.sub(r"\\\n", " ", (OPS / "Dockerfile").read_text())
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    for line in text.splitlines():
        words = line.split(maxsplit=1)
        if words[:1] == ["ENV"]:
            env.update(word.split("=", 1) for word in shlex.split(words[1]))  # type: ignore[misc]
        elif words[:1] == ["ENTRYPOINT"]:
            entrypoint = yaml.safe_load(words[1])
    return entrypoint, env


def unit_environment(path: Path) -> dict[str, str]:
    """Every ``Environment=`` assignment of a systemd unit, in order (the key may repeat)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "Environment":
            env.update(word.split("=", 1) for word in shlex.split(value))  # type: ignore[misc]
    return env


def as_container(env: dict[str, str], root: Path, hosts: dict[str, str]) -> dict[str, str]:
    """``env`` as seen from inside the deployment: service URLs and absolute paths mapped here."""
    out = {}
    for key, value in env.items():
        url = urlsplit(value) if "://" in value else None
        if url is not None and url.hostname in hosts:
            value = hosts[url.hostname]
        elif value.startswith("/"):
            value = str(root / value.lstrip("/"))
        out[key] = value
    return out


@dataclass
class Running:
    """A service started by the test: its process, its log and the local port its target maps to."""

    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def output(self) -> str:
        """What the process printed so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")[-3000:]


@pytest.fixture
def start_service(tmp_path: Path, redis_client: redis.Redis) -> Iterator[Any]:
    """``start(argv, env, target_port)``: run a service with ``target_port`` mapped to a free port."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    started: list[Running] = []

    def start(argv: list[str], env: dict[str, str], target_port: int) -> Running:
        port = free_port()
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        full_env = {**base, **env, "PYTHONPATH": str(shim), "SESSIONQ_TEST_PORT_MAP": f"{target_port}:{port}"}
        cwd = tmp_path / "workdir"
        cwd.mkdir(exist_ok=True)
        log = tmp_path / f"service-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        running = Running(proc, log, port)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            os.killpg(running.proc.pid, signal.SIGTERM)
            try:
                running.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(running.proc.pid, signal.SIGKILL)
                running.proc.wait()


def scrape(running: Running, target: Target, token: str | None) -> list[str]:
    """Scrape like Prometheus until metrics come back; the metric family names served."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + DEFAULT_SCRAPE_DEADLINE
    last = "nothing listens"
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            pytest.fail(f"{target}: the service exited with {running.proc.returncode}\n{running.output()}")
        try:
            response = httpx.get(f"http://127.0.0.1:{running.port}{target.path}", headers=headers, timeout=10)
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            names = [f.name for f in text_string_to_metric_families(response.text)] if response.is_success else []
            if any(name.startswith(("sessionq_", "dramatiq_")) for name in names):
                return names
            last = f"HTTP {response.status_code} with families {names[:10]}"
        time.sleep(0.5)
    pytest.fail(f"{target} is not served by what ops/ declares ({last})\n{running.output()}")


def compose_token(target: Target) -> str | None:
    """The Bearer token Prometheus sends: the compose secret mounted at ``credentials_file``."""
    if target.credentials_file is None:
        return None
    secret = compose()["secrets"][Path(target.credentials_file).name]
    return COMPOSE_VARIABLES[secret["environment"]]


TARGETS = scrape_targets()


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_compose_service_serves_its_scrape_target(target: Target, start_service: Any, tmp_path: Path) -> None:
    # Given the compose service the target names, started as the image would run it
    services = compose()["services"]
    assert target.host in services, f"{target}: no compose service {target.host!r}"
    service = services[target.host]
    entrypoint, image_env = image_environment()
    assert entrypoint == ["sessionq"] and str(service.get("image", "")).startswith("mcp-sessionq")
    declared = service.get("environment") or {}
    if isinstance(declared, list):
        declared = dict(item.split("=", 1) for item in declared)
    env = {**image_env, **{k: interpolate(str(v), COMPOSE_VARIABLES) for k, v in declared.items()}}
    hosts = {name: TEST_SERVICES[str(s["image"]).split(":")[0]] for name, s in services.items()
             if str(s.get("image", "")).split(":")[0] in TEST_SERVICES}
    argv = [str(Path(sys.executable).with_name("sessionq")), *map(str, service["command"])]
    running = start_service(argv, as_container(env, tmp_path / "root", hosts), target.port)
    # When Prometheus scrapes it
    names = scrape(running, target, compose_token(target))
    # Then metrics come back (so `up{job=...}` is 1 and the alert rules see their series)
    assert names


@pytest.mark.parametrize("target", [t for t in TARGETS if f"sessionq-{t.host}.service" in dict(units())], ids=str)
def test_systemd_unit_serves_the_same_scrape_target(target: Target, start_service: Any, tmp_path: Path) -> None:
    # Given the systemd unit of the role the target names, with its settings file
    path = OPS / "systemd" / f"sessionq-{target.host}.service"
    argv = shlex.split(dict(units())[path.name]["Service"]["ExecStart"])
    assert Path(argv[0]).name == "sessionq"
    env = {**SYSTEMD_ENVIRONMENT_FILE, **unit_environment(path)}
    argv[0] = str(Path(sys.executable).with_name("sessionq"))
    running = start_service(argv, as_container(env, tmp_path / "root", {}), target.port)
    # When the same scrape reaches that host
    names = scrape(running, target, SYSTEMD_ENVIRONMENT_FILE["SESSIONQ_API_TOKEN"] if target.credentials_file else None)
    # Then it is served there too
    assert names


def test_targets_cover_every_scrape_job() -> None:
    # The scrape config is read whole: each job yields a target this file starts and scrapes
    jobs = {t.job for t in TARGETS}
    assert jobs == {"sessionq-serve", "sessionq-worker"}
    assert {(t.host, t.port) for t in TARGETS} == {("serve", 8080), ("worker", 9191)}


def test_interpolation_follows_compose() -> None:
    variables = {"SET": "x", "EMPTY": ""}
    assert interpolate("a${SET}b$${SET}", variables) == "ax" + "b${SET}"
    assert interpolate("${EMPTY:-d}|${EMPTY-d}|${UNSET-d}", variables) == "d||d"
    with pytest.raises(AssertionError, match="compose needs UNSET: set it"):
        interpolate("${UNSET:?set it}", variables)


def test_bind_shim_maps_only_the_target_port(tmp_path: Path) -> None:
    # Given the shim mapping 9191 onto a free port
    (tmp_path / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    port = free_port()
    code = ("import socket\ns = socket.socket(); s.bind(('127.0.0.1', 9191)); print(s.getsockname()[1])\n"
            "t = socket.socket(); t.bind(('127.0.0.1', 0)); print(t.getsockname()[1] != 9191)")
    # When a process binds 9191
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(tmp_path),
                         "SESSIONQ_TEST_PORT_MAP": f"9191:{port}"}, capture_output=True, text=True, check=True,
                         timeout=60).stdout.split()
    # Then it is listening on the mapped port, and other binds are untouched
    assert out == [str(port), "True"]
