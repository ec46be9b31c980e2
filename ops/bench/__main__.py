"""``python -m ops.bench [--quick] [--only P3,P5] [--json FILE]``: run, print the table, write JSON."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from .bus_bench import bench_bus
from .console_bench import bench_console
from .encryption_bench import bench_encryption_drain, bench_encryption_migrate
from .events_bench import bench_event_store
from .handles_bench import bench_handles
from .harness import Result, print_table, write_json
from .legacy_bench import bench_legacy_migrate
from .queue_bench import bench_drain, bench_enqueue
from .store_bench import bench_append_cost, bench_purge
from .tasks_bench import bench_tasks
from .transfer_bench import bench_migrate

BENCHMARKS: dict[str, Callable[..., Result | list[Result]]] = {
    "P1": bench_enqueue,
    "P2": bench_drain,
    "P3": bench_append_cost,
    "P4": bench_migrate,
    "P5": bench_purge,
    "P6": bench_event_store,
    "T": bench_tasks,  # MCP tasks: T1, T2, T3
    "L1": bench_legacy_migrate,  # seed-era store migration vs sessionq's
    "C1": bench_console,  # ops console pages with 1M sessions: C1-overview, C1-sessions, ...
    "B1": bench_bus,  # MCP event bus across replicas
    "B2": bench_handles,  # MCP state handles: require()
    "E1": bench_encryption_drain,  # P2 with encryption at rest vs without
    "E2": bench_encryption_migrate,  # P4 likewise
}
DEFAULT_JSON = Path(__file__).parent / "results" / "latest.json"


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; exit 1 only if one crashed (a missed goal is reported, not fatal)."""
    parser = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute, for CI")
    parser.add_argument("--only", help="comma-separated ids, e.g. P1,P3")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    args = parser.parse_args(argv)
    chosen = [k.strip().upper() for k in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [k for k in chosen if k not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    results: list[Result] = []
    crashed = False
    for key in chosen:
        print(f"running {key} ...", file=sys.stderr, flush=True)
        try:
            outcome = BENCHMARKS[key](quick=args.quick)
        except Exception:
            crashed = True
            traceback.print_exc()
            continue
        results.extend(outcome if isinstance(outcome, list) else [outcome])
    print_table(results)
    write_json(results, args.json, quick=args.quick)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
