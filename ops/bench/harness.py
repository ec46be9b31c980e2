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

# Repetitions per measurement (the median is reported).
DEFAULT_REPEATS = 3
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
) -> Result:
    """Build a result from repeated samples: medians, ratio ours/ceiling, goal check.

    ``goal_op="info"`` reports the ratio without a goal (scale rows, context figures).
    """
    ours_m, ceiling_m = statistics.median(ours), statistics.median(ceiling)
    ratio = ours_m / ceiling_m if ceiling_m else float("inf")
    del higher_is_better
    if goal_op == "info":
        return Result(key, title, ours_m, ceiling_m, unit, ratio, "—", None, ours + ceiling, notes)
    met = ratio >= goal if goal_op == ">=" else ratio <= goal
    return Result(key, title, ours_m, ceiling_m, unit, ratio, f"{goal_op} {goal}", met, ours + ceiling, notes)


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


def write_json(results: list[Result], path: Path, *, quick: bool) -> None:
    """Write results and machine info as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"quick": quick, "machine": machine(), "time": time.time(), "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(data, indent=2))
