"""The benchmark suite's quick mode runs end to end (figures are reported, never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.conftest import POSTGRES_URL, REDIS_URL

ROOT = Path(__file__).resolve().parent.parent


def _bench_db(url: str) -> str:
    """The test database's URL with ``_bench`` appended to the database name."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "_bench"))


def test_quick_benchmarks_run_and_write_json(tmp_path: Path) -> None:
    # Given the test session's own services (never the shared bench database and Redis
    # db, which a full benchmark run may be using at the same time)
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               SESSIONQ_BENCH_POSTGRES_URL=_bench_db(POSTGRES_URL), SESSIONQ_BENCH_REDIS_URL=REDIS_URL,
               SESSIONQ_BENCH_WORKDIR=str(tmp_path / "work"))
    # When the quick suite runs
    proc = subprocess.run(
        [sys.executable, "-m", "ops.bench", "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    # Then it exits cleanly and reports every benchmark with positive figures
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    keys = {r["key"] for r in data["results"]}
    assert {"P1", "P1-p99", "P1-buffered", "P2", "P2-50", "P2-scale-N", "P2-scale-procs", "P3", "P4", "P4-rss",
            "P5", "P6", "P6-replay", "T1", "T2", "T3", "L1", "C1-overview", "C1-sessions", "C1-metadata",
            "B1", "B2"} <= keys
    for result in data["results"]:
        assert result["ours"] > 0 and result["ceiling"] > 0
        assert result["ratio"] > 0
    assert "| P3 |" in proc.stdout
