"""`dst bench --quick --json` runs every target end to end and writes numbers, not errors.

Speed itself is never asserted (that is what the table is for); this only proves the harness
starts dst and its peers, drives fio through each, and reaps everything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.procs import dst_run, need_tool

pytestmark = pytest.mark.integration

JOBS = {
    "seq-read",
    "seq-write",
    "rand-read-qd32",
    "rand-write-qd32",
    "rand-read-qd1",
    "rand-write-qd1",
    "rand-read-qd32-4conn",
    "rand-write-qd32-4conn",
}
NUMBERS = ("mb_s", "iops", "p99_us", "server_cpu_pct", "server_cpu_us_per_op", "runtime_s")


@pytest.mark.timeout(300)
def test_bench_quick_json(tmp_path: Path) -> None:
    need_tool("fio")
    need_tool("nbdkit")
    out = tmp_path / "bench.json"
    cp = dst_run("bench", "--quick", "--runtime", "0.5", "--json", str(out), timeout=280)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "dst / chain" in cp.stdout, cp.stdout

    doc = json.loads(out.read_text())
    names = [t["name"] for t in doc["targets"]]
    expected = {"nbdkit", "nbdkit-chain", "dst"} | (
        {"qemu-nbd"} if shutil.which("qemu-nbd") else set()
    )
    assert set(names) == expected, names
    assert all(t["error"] is None for t in doc["targets"]), doc["targets"]

    rows = {(r["target"], r["job"]): r for r in doc["results"]}
    assert set(rows) == {(t, j) for t in names for j in JOBS}
    for key, row in rows.items():
        assert row["error"] is None, (key, row["error"])
        for field in NUMBERS:
            value = row[field]
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, field)
            assert value >= 0, (key, field, value)
        assert row["mb_s"] > 0 and row["iops"] > 0 and row["p99_us"] > 0, (key, row)

    ratios = [r for r in doc["ratios"] if r["target"] == "dst"]
    assert {r["job"] for r in ratios} == JOBS
    assert all(isinstance(r["iops"], float) for r in ratios), ratios
