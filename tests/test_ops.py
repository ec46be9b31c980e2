"""The deployment files agree with the code: commands exist, alert rules name real metrics."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import promql_parser
import pytest
import yaml

from sessionq import cli
from sessionq.workers.metrics import exported_metric_names

OPS = Path(__file__).resolve().parent.parent / "ops"
ROOT = OPS.parent
# The Redis database the test suite (and the benchmark) may FLUSHDB.
TEST_REDIS_DB = 15
# Prometheus' own series, which alert rules may use besides ours.
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
SESSIONQ_IMAGE = "mcp-sessionq"


def resolve(args: list[str]) -> click.Command:
    """The click command ``sessionq ARGS`` runs (options skipped); KeyError naming a missing one."""
    command: click.Command = cli.main
    for word in args:
        if word.startswith("-") or not isinstance(command, click.Group):
            break
        if word not in command.commands:
            raise KeyError(f"`sessionq {' '.join(args)}`: no command {word!r} in {sorted(command.commands)}")
        command = command.commands[word]
    return command


def compose() -> dict[str, Any]:
    """ops/compose.yaml, parsed (merge keys resolved by the YAML loader)."""
    data = yaml.safe_load((OPS / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def sessionq_services() -> dict[str, list[str]]:
    """Service name -> command, for the services running the sessionq image."""
    return {
        name: list(service["command"])
        for name, service in compose()["services"].items()
        if str(service.get("image", "")).startswith(SESSIONQ_IMAGE)
    }


def test_compose_services_and_commands() -> None:
    # Given the compose file
    services = compose()["services"]
    # Then it runs the stores, Redis, Prometheus and every sessionq role
    assert {"redis", "postgres", "mongo", "prometheus"} <= set(services)
    assert services["mongo"]["image"] == "mongo:7"
    commands = sessionq_services()
    roles = {tuple(cmd[:1]) for cmd in commands.values()}
    assert {("worker",), ("scheduler",), ("serve",)} <= roles
    assert services["scheduler"]["deploy"]["replicas"] == 2
    assert services["worker"]["environment"]["REDIS_URL"] == services["serve"]["environment"]["REDIS_URL"]
    # And every sessionq service's command exists in the CLI (worker/scheduler come from other issues)
    missing = []
    for name, command in commands.items():
        try:
            resolve(command)
        except KeyError as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, missing


def test_compose_runs_the_example_mcp_server_and_its_tasks_workers() -> None:
    services = compose()["services"]
    tasks = services["tasks-worker"]
    for mcp in (services["mcp-a"], services["mcp-b"]):
        # The example server and its task workers see the same ops/ directory (not in the image)
        assert mcp["entrypoint"] == ["python", "ops/example_server.py"]
        assert mcp["volumes"] == tasks["volumes"] and mcp["working_dir"] == tasks["working_dir"]
        mount = mcp["volumes"][0].split(":")
        assert mount[0] == "./" and mount[1] == f"{mcp['working_dir']}/ops"
        # ... with the same settings as the workers that run its tools on the tasks queue
        assert mcp["environment"] == tasks["environment"]
    assert tasks["command"] == ["worker", "--queues", "tasks", "--mcp-app", "ops.example_server:server"]
    assert resolve(tasks["command"]).name == "worker"


def test_compose_runs_two_mcp_replicas_behind_a_round_robin_proxy() -> None:
    services = compose()["services"]
    replicas = {name: s for name, s in services.items() if s.get("entrypoint") == ["python", "ops/example_server.py"]}
    # Two replicas of one server: same command, one Redis, one request-state key ring (required)
    assert sorted(replicas) == ["mcp-a", "mcp-b"]
    a, b = replicas.values()
    assert a == b
    assert a["environment"]["SESSIONQ_REQUEST_STATE_KEYS"].startswith("${SESSIONQ_REQUEST_STATE_KEYS:?")
    assert a["environment"]["REDIS_URL"] == services["worker"]["environment"]["REDIS_URL"]
    port = a["command"][a["command"].index("--port") + 1]
    assert a["expose"] == [port] and "ports" not in a  # reached through the proxy only
    # And the proxy publishes that port and spreads requests over both, round robin, streams unbuffered
    proxy = services["mcp-proxy"]
    assert proxy["image"].startswith("nginx:") and proxy["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert set(proxy["depends_on"]) == set(replicas)
    host_path, mounted, _ = proxy["volumes"][0].split(":")
    config = (OPS / host_path).read_text()
    assert mounted == "/etc/nginx/conf.d/default.conf"
    upstream = re.search(r"upstream (\w+) \{(.*?)\}", config, re.S)
    assert upstream is not None
    assert re.findall(r"server ([\w-]+:\d+);", upstream[2]) == [f"{name}:{port}" for name in sorted(replicas)]
    assert re.search(r"^\s*listen (\d+);", config, re.M)[1] == port  # type: ignore[index]
    assert f"proxy_pass http://{upstream[1]};" in config
    assert "proxy_buffering off;" in config and "ip_hash" not in config and "hash " not in config


def test_dockerfile_runs_as_non_root_with_a_health_check() -> None:
    text = (OPS / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "pip install ." in text and "\nUSER sessionq" in text
    healthcheck = next(line for line in text.splitlines() if line.startswith("HEALTHCHECK"))
    assert healthcheck.endswith('CMD ["sessionq", "health"]')
    resolve(["health"])
    assert 'ENTRYPOINT ["sessionq"]' in text


def units() -> Iterator[tuple[str, configparser.ConfigParser]]:
    for path in sorted((OPS / "systemd").glob("*.service")):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(path)
        yield path.name, parser


def test_systemd_units_stop_gracefully_and_restart() -> None:
    names = {name for name, _ in units()}
    assert names == {"sessionq-worker.service", "sessionq-scheduler.service", "sessionq-serve.service"}
    missing = []
    for name, unit in units():
        service = unit["Service"]
        argv = shlex.split(service["ExecStart"])
        assert Path(argv[0]).name == "sessionq" and name == f"sessionq-{argv[1]}.service"
        assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) >= 30
        assert service["Restart"] == "on-failure"
        assert service["EnvironmentFile"].startswith("/etc/sessionq/")
        assert service["User"] == "sessionq"
        # The unit runs `sessionq <role>` and the role is a CLI command (worker/scheduler come from other issues)
        try:
            resolve(argv[1:])
        except KeyError as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, missing


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("unit", ["sessionq-worker.service", "sessionq-scheduler.service", "sessionq-serve.service"])
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    # systemd's own parser; the only complaint allowed is the binary not being installed here
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(OPS / "systemd" / unit)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.strip() and "is not executable" not in line]
    assert not complaints, complaints


def metric_names(node: Any) -> Iterator[str]:
    """Every metric name a parsed PromQL expression selects."""
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            yield node.name
        return
    if isinstance(node, promql_parser.MatrixSelector):
        yield from metric_names(node.vector_selector)
        return
    for attr in ("lhs", "rhs", "expr", "param"):
        child = getattr(node, attr, None)
        if child is not None and type(child).__module__.startswith("promql_parser"):
            yield from metric_names(child)
    for arg in getattr(node, "args", None) or ():
        yield from metric_names(arg)


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_metric_name_walker_finds_nested_selectors() -> None:
    expr = promql_parser.parse(
        'sum by (a) (rate(x_total[5m])) / ignoring(s) clamp_min(y{s="1"}, 1) > 2 and absent(up == 1)'
    )
    assert sorted(metric_names(expr)) == ["up", "x_total", "y"]


def test_alert_rules_parse_and_name_exported_metrics() -> None:
    # Given the metric names sessionq and Dramatiq export
    exported = exported_metric_names() | PROMETHEUS_BUILTINS
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    # Then every rule parses as PromQL and selects only exported metrics
    for rule in rules:
        used = set(metric_names(promql_parser.parse(rule["expr"])))
        assert used, rule["alert"]
        assert used <= exported, f"{rule['alert']} uses unknown metrics {sorted(used - exported)}"
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]
    # And the conditions ops asked for are covered
    exprs = " ".join(rule["expr"] for rule in rules)
    for needle in ("sessionq_healthy", 'sessionq_up{component="database"}', "sessionq_sweep_consecutive_failures",
                   'sessionq_sessions{status="expired"}', "sessionq_dead_letters", "sessionq_queue_depth"):
        assert needle in exprs


def test_prometheus_scrapes_serve_and_workers() -> None:
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    serve = jobs["sessionq-serve"]
    assert serve["metrics_path"] == "/metrics" and serve["authorization"]["type"] == "Bearer"
    assert serve["static_configs"][0]["targets"] == ["serve:8080"]
    assert jobs["sessionq-worker"]["dns_sd_configs"][0]["port"] == 9191
    # The alert rules select scrape jobs that exist
    for rule in alert_rules():
        for job in ("sessionq-serve", "sessionq-worker"):
            if f'job="{job}"' in rule["expr"]:
                assert job in jobs
    # And compose mounts this directory and the token Prometheus reads
    prometheus = compose()["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert serve["authorization"]["credentials_file"] == f"/run/secrets/{prometheus['secrets'][0]}"


def test_the_suite_flushes_a_dedicated_redis_database_by_default() -> None:
    # Given the test Redis URL each entry point defaults to when nothing overrides it
    env = {k: v for k, v in os.environ.items() if k != "SESSIONQ_TEST_REDIS_URL"}
    conftest = subprocess.run([sys.executable, "-c", "from tests.conftest import REDIS_URL; print(REDIS_URL)"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    ci = re.search(r"SESSIONQ_TEST_REDIS_URL:=([^}]+)}", (ROOT / ".ci" / "run").read_text())
    services = re.search(r'echo "SESSIONQ_TEST_REDIS_URL=([^"]+)"', (OPS / "services.sh").read_text())
    assert ci and services
    # Then conftest, .ci/run and ops/services.sh agree on one database, which is not a developer's 0
    assert conftest == ci[1] == services[1]
    assert conftest.endswith(f":6379/{TEST_REDIS_DB}")
    # And the README names it, and its test command installs what the Node.js producer test needs
    readme = (ROOT / "README.md").read_text()
    assert f"Redis database {TEST_REDIS_DB}" in readme
    command = next(line for line in readme.splitlines() if line.startswith("python3 -m venv") and "pytest" in line)
    assert "(cd tests/node && npm ci) && bash ops/services.sh" in command
