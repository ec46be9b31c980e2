"""The benchmark harness: results, repetitions, medians, the table and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Repetitions per measurement (the median is reported); --quick runs one (it proves
# the work and checks sanity bounds, it does not judge goals).
DEFAULT_REPEATS = 3


def repeats(quick: bool) -> int:
    """Repetitions of a measurement: one in a quick run, ``DEFAULT_REPEATS`` otherwise."""
    return 1 if quick else DEFAULT_REPEATS
BENCH_POSTGRES_URL = os.environ.get("SESSIONQ_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/sessionq_bench")
BENCH_REDIS_URL = os.environ.get("SESSIONQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")


@dataclass
class Result:
    """One measured goal: ours vs the raw ceiling, their ratio, and the goal."""

    key: str
    title: str
    ours: float
    ceiling: float
    unit: str
    ratio: float
    goal: str
    met: bool | None
    samples: list[float] = field(default_factory=list)
    notes: str = ""
    #: Wide bounds a working path's ratio stays within, whatever the load (``--quick``
    #: asserts them: a ratio outside means a broken path, not a slow one); None: unchecked.
    sanity: tuple[float, float] | None = None
    #: What the run proved about the work it timed (row counts, queue lengths, ...).
    proof: dict[str, Any] = field(default_factory=dict)

    def row(self) -> list[str]:
        """The table row."""
        return [self.key, self.title, f"{_num(self.ours)} {self.unit}", f"{_num(self.ceiling)} {self.unit}",
                f"{self.ratio:.2f}", self.goal, "—" if self.met is None else ("yes" if self.met else "NO")]


def _num(value: float) -> str:
    """Readable figure: thousands separated, three significant digits below 1,000."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def ratio_result(
    key: str, title: str, ours: list[float], ceiling: list[float], unit: str, *,
    goal_op: str, goal: float, higher_is_better: bool, notes: str = "",
    sanity: tuple[float, float] | None = None, proof: dict[str, Any] | None = None,
) -> Result:
    """Build a result from repeated samples: medians, ratio ours/ceiling, goal check.

    ``goal_op="info"`` reports the ratio without a goal (scale rows, context figures).
    """
    ours_m, ceiling_m = statistics.median(ours), statistics.median(ceiling)
    ratio = ours_m / ceiling_m if ceiling_m else float("inf")
    del higher_is_better
    if goal_op == "info":
        return Result(key, title, ours_m, ceiling_m, unit, ratio, "—", None, ours + ceiling, notes, sanity,
                      proof or {})
    met = ratio >= goal if goal_op == ">=" else ratio <= goal
    return Result(key, title, ours_m, ceiling_m, unit, ratio, f"{goal_op} {goal}", met, ours + ceiling, notes,
                  sanity, proof or {})


def prove(what: str, actual: object, expected: object) -> None:
    """Check that a timed path did its work (a count, a length); raise if it did not.

    A benchmark whose work was not done measured nothing: the run fails (and so does
    ``--quick`` in CI) instead of reporting a flattering figure.
    """
    if actual != expected:
        raise RuntimeError(f"benchmark proof failed: {what} is {actual!r}, expected {expected!r}")


def timed(func: Callable[[], Any]) -> float:
    """Seconds one call takes (perf_counter)."""
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def print_table(results: list[Result]) -> str:
    """Render the results as a Markdown table (returned and printed)."""
    header = ["id", "measure", "ours", "raw ceiling", "ratio", "goal", "met"]
    rows = [header, ["---"] * len(header)] + [r.row() for r in results]
    text = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    print(text)
    for r in results:
        if r.notes:
            print(f"- {r.key}: {r.notes}")
    return text


def _proc_field(path: str, name: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine() -> dict[str, Any]:
    """What the numbers were measured on (CPU model and RAM from /proc on Linux)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name"),
        "memory": _proc_field("/proc/meminfo", "MemTotal"),
    }


def _postgres_settings(url: str) -> dict[str, Any]:
    from urllib.parse import urlsplit, urlunsplit

    import psycopg2

    names = ("server_version", "synchronous_commit", "fsync", "full_page_writes", "shared_buffers", "wal_level")
    try:
        conn = psycopg2.connect(urlunsplit(urlsplit(url)._replace(path="/postgres", query="")))
    except Exception as exc:  # recorded, not fatal: the run still says what it could not read
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    try:
        with conn.cursor() as cur:
            out: dict[str, Any] = {}
            for name in names:
                cur.execute(f"SHOW {name}")
                out[name] = cur.fetchone()[0]
            return out
    finally:
        conn.close()


def _redis_settings(url: str) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        info = client.info("server")
        out: dict[str, Any] = {"redis_version": info.get("redis_version")}
        persistence = client.info("persistence")
        out["aof_enabled"] = persistence.get("aof_enabled")
        try:
            for name in ("appendonly", "appendfsync", "save"):
                out.update({_text(k): _text(v) for k, v in client.config_get(name).items()})
        except redis.ResponseError as exc:  # CONFIG renamed or disabled on this server
            out["config"] = f"unavailable: {exc}"
        return out
    except redis.RedisError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        client.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def environment() -> dict[str, Any]:
    """The services' settings that bound the figures (durability, versions) and the load."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpus": os.cpu_count(),
        "load_average": list(load) if load else None,
        "postgresql": _postgres_settings(BENCH_POSTGRES_URL),
        "redis": _redis_settings(BENCH_REDIS_URL),
        "packages": _versions("dramatiq", "redis", "peewee", "psycopg2-binary", "pymysql", "pymongo"),
    }


def _versions(*names: str) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_json(results: list[Result], path: Path, *, quick: bool, before: dict[str, Any] | None = None) -> None:
    """Write results, machine info and the environment (at the start, ``before``, and now) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"quick": quick, "machine": machine(), "environment": before or environment(),
            "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "time": time.time(), "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(data, indent=2, default=str))
