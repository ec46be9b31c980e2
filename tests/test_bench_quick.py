"""The benchmark suite's quick mode runs end to end and proves its work.

Figures are never asserted against goals (timing on a shared box), but every timed path
must have done its work (the suite itself fails otherwise: counts, dead letters, empty
outbox) and every ratio must stay within wide sanity bounds that only a broken path leaves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.conftest import MONGO_URL, MYSQL_URL, POSTGRES_URL, REDIS_URL

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
               SESSIONQ_BENCH_MYSQL_URL=_bench_db(MYSQL_URL), SESSIONQ_BENCH_MONGO_URL=_bench_db(MONGO_URL),
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
    mixes = {f"P1-{mix}{suffix}" for mix in ("unicode", "resave", "append") for suffix in ("", "-p99", "-buffered")}
    assert {"P1", "P1-p99", "P1-buffered", *mixes, "P2", "P2-unicode", "P2-resave", "P2-append", "P2-ack1",
            "P2-50", "P2-scale-N", "P2-scale-procs", "P3", "P4", "P4-rss", "P5", "P6", "P6-replay",
            "P7-50", "P7-50-buffered", "P7-90", "P7-90-buffered", "P8", "P8-append", "P9-mysql", "P9-mongo", "P10-rss",
            "P10-outage", "P11", "T1", "T2", "T3", "L1", "C1-overview", "C1-sessions", "C1-metadata", "B1", "B2",
            "E1", "E2"} <= keys
    for result in data["results"]:
        assert result["ours"] > 0 and result["ceiling"] > 0
        assert result["ratio"] > 0
        if result.get("sanity"):
            low, high = result["sanity"]
            assert low <= result["ratio"] <= high, result
    # And the proofs of the timed paths were made (a failed one fails the run above)
    proved = {r["key"]: r["proof"] for r in data["results"] if r.get("proof")}
    assert {"P1", "P1-unicode", "P2", "P2-resave", "P3", "P4", "P5", "P7-50", "P8", "P9-mysql", "P9-mongo",
            "P10-rss", "P10-outage", "P11"} <= set(proved)
    assert proved["P1"]["outbox_and_buffer_after"] == 0 and proved["P2"]["dead_letters"] == 0
    # And the environment that bounds the figures is recorded
    env = data["environment"]
    assert env["postgresql"]["synchronous_commit"] and env["postgresql"]["fsync"]
    assert env["redis"]["redis_version"] and env["cpus"] and len(env["load_average"]) == 3
    assert "| P3 |" in proc.stdout
