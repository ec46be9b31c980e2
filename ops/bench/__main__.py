"""``python -m ops.bench [--quick] [--only P3,P5] [--json FILE]``: run, print the table, write JSON."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from .backends_bench import bench_backends
from .bus_bench import bench_bus
from .console_bench import bench_console
from .e2e_bench import bench_end_to_end
from .encryption_bench import bench_encryption_drain, bench_encryption_migrate
from .events_bench import bench_event_store
from .handles_bench import bench_handles
from .harness import Result, environment, print_table, write_json
from .legacy_bench import bench_legacy_migrate
from .queue_bench import bench_drain, bench_enqueue
from .scale_bench import bench_scale
from .soak_bench import bench_outage, bench_purge_under_load, bench_worker_memory
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
    "P7": bench_end_to_end,
    "P8": bench_scale,
    "P9": bench_backends,
    "P10": lambda *, quick: [bench_worker_memory(quick=quick), bench_outage(quick=quick)],
    "P11": bench_purge_under_load,
    "T": bench_tasks,  # MCP tasks: T1, T2, T3
    "L1": bench_legacy_migrate,  # seed-era store migration vs sessionq's
    "C1": bench_console,  # ops console pages with 1M sessions: C1-overview, C1-sessions, ...
    "B1": bench_bus,  # MCP event bus across replicas
    "B2": bench_handles,  # MCP state handles: require()
    "E1": bench_encryption_drain,  # P2 with encryption at rest vs without
    "E2": bench_encryption_migrate,  # P4 likewise
}
# Quick runs (CI) overwrite this file; full runs are kept, one file per run, under
# docs/benchmarks/<date>.json (the README's table names the one it comes from).
DEFAULT_JSON = Path(__file__).parent / "results" / "latest.json"
KEPT_DIR = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


def kept_path(chosen: list[str], everything: bool) -> Path:
    """Where a full run keeps its results: ``<UTC date>.json``, or ``<date>-P1-P2.json`` for a partial run."""
    stem = time.strftime("%Y-%m-%d", time.gmtime())
    return KEPT_DIR / (f"{stem}.json" if everything else f"{stem}-{'-'.join(chosen)}.json")


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; exit 1 only if one crashed (a missed goal is reported, not fatal)."""
    parser = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute, for CI")
    parser.add_argument("--only", help="comma-separated ids, e.g. P1,P3")
    parser.add_argument("--json", type=Path, help="where to write the results (default: ops/bench/results/"
                        "latest.json for --quick, docs/benchmarks/<date>.json for a full run)")
    args = parser.parse_args(argv)
    chosen = [k.strip().upper() for k in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [k for k in chosen if k not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    json_path = args.json or (DEFAULT_JSON if args.quick else kept_path(chosen, not args.only))
    before = environment()
    results: list[Result] = []
    crashed = False
    for key in chosen:
        print(f"running {key} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            outcome = BENCHMARKS[key](quick=args.quick)
        except Exception:
            crashed = True
            traceback.print_exc()
            continue
        print(f"{key} done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        results.extend(outcome if isinstance(outcome, list) else [outcome])
        write_json(results, json_path, quick=args.quick, before=before)  # kept as it goes
    print_table(results)
    write_json(results, json_path, quick=args.quick, before=before)
    print(f"results written to {json_path}", file=sys.stderr)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
