"""`dst bench`'s jobs: choosing them on the command line, fio's command line for them, the
parse of fio's JSON (one group for several connections) and the rows they make."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dst.bench.jobs import (
    JOB_NAMES,
    JOBS,
    FioError,
    FioResult,
    Job,
    fio_command,
    parse_fio_json,
    select_jobs,
)
from dst.bench.report import CONN_LEGEND, markdown, to_json
from dst.bench.runner import BenchConfig, BenchReport, Cell, TargetRun
from dst.bench.targets import TargetSpec
from dst.cli.bench_cmd import parse_config
from dst.errors import UsageError

FOUR = ("rand-read-qd32-4conn", "rand-write-qd32-4conn")


def _job(name: str) -> Job:
    return next(j for j in JOBS if j.name == name)


def test_the_four_connection_jobs_are_in_the_list() -> None:
    for name in FOUR:
        j = _job(name)
        assert (j.bs, j.iodepth, j.numjobs) == (4096, 32, 4)
    assert _job("rand-read-qd32-4conn").label == "4K rand read 4x QD32"
    assert _job("rand-write-qd32-4conn").label == "4K rand write 4x QD32"
    assert _job("rand-read-qd32").label == "4K rand read QD32"  # one connection: as before
    assert len(set(JOB_NAMES)) == len(JOB_NAMES)
    assert len({j.label for j in JOBS}) == len(JOBS)  # every row of the table tells apart


def test_select_jobs_keeps_the_table_order() -> None:
    assert select_jobs([]) == JOBS
    got = select_jobs(["rand-write-qd32-4conn", "seq-read", "rand-read-qd32-4conn"])
    assert [j.name for j in got] == ["seq-read", "rand-read-qd32-4conn", "rand-write-qd32-4conn"]
    with pytest.raises(ValueError, match=r"unknown job 'rand-read-4conn'.*rand-read-qd32-4conn"):
        select_jobs(["rand-read-4conn"])


def test_jobs_option_picks_four_connection_jobs() -> None:
    cfg, _, _ = parse_config(
        ["--targets", "dst", "--jobs", "rand-read-qd32-4conn,rand-read-qd1", "--jobs", FOUR[1]]
    )
    assert [j.name for j in cfg.jobs] == ["rand-read-qd1", *FOUR]
    cfg, _, _ = parse_config(["--targets", "dst"])
    assert {j.name for j in cfg.jobs} >= set(FOUR)  # in the default run
    with pytest.raises(UsageError, match=r"--jobs: unknown job 'rand-read-qd64'"):
        parse_config(["--targets", "dst", "--jobs", "rand-read-qd64"])


def test_fio_command_runs_one_group_of_connections(tmp_path: Path) -> None:
    out = tmp_path / "o.json"
    cmd = fio_command("fio", _job("rand-read-qd32-4conn"), "nbd+unix:///?socket=s", 2.0, out)
    assert "--numjobs=4" in cmd and "--iodepth=32" in cmd and "--group_reporting" in cmd
    assert "--rw=randread" in cmd and "--bs=4096" in cmd and f"--output={out}" in cmd
    one = fio_command("fio", _job("rand-read-qd32"), "nbd+unix:///?socket=s", 2.0, out)
    assert "--numjobs=1" in one


def _fio_doc(entries: int, usr: float, sys: float) -> str:
    job = {
        "jobname": "rand-read-qd32-4conn",
        "error": 0,
        "usr_cpu": usr,
        "sys_cpu": sys,
        "read": {
            "total_ios": 100_000,
            "iops": 50_000.5,
            "bw_bytes": 204_802_048,
            "runtime": 2008,
            "clat_ns": {"percentile": {"99.000000": 3_000_000}},
        },
    }
    return "fio: a warning first\n" + json.dumps({"jobs": [job] * entries})


def test_group_json_gives_sums_and_the_whole_client_cpu() -> None:
    four = _job("rand-read-qd32-4conn")
    res = parse_fio_json(_fio_doc(1, 6.0, 12.5), four)
    assert res.iops == 50_000.5 and res.mb_s == pytest.approx(204.802048)
    assert res.p99_us == 3000.0 and res.runtime_s == pytest.approx(2.008)
    # fio's group CPU is the mean of its jobs: four processes used four times that
    assert res.fio_cpu_pct == pytest.approx(74.0)
    one = parse_fio_json(_fio_doc(1, 6.0, 12.5), _job("rand-read-qd32"))
    assert one.fio_cpu_pct == pytest.approx(18.5)


def test_json_with_one_entry_per_connection_is_refused() -> None:
    with pytest.raises(FioError, match=r"4 job entries.*--group_reporting"):
        parse_fio_json(_fio_doc(4, 1.0, 1.0), _job("rand-read-qd32-4conn"))


def test_table_shows_the_four_connection_rows_and_their_ratio() -> None:
    jobs = select_jobs(list(FOUR))
    targets = (TargetSpec("nbdkit-chain", "nbdkit-chain"), TargetSpec("dst", "dst"))
    report = BenchReport(BenchConfig(targets, jobs, 1.0, 1 << 20), {"date": "d"})
    report.targets = [TargetRun(t) for t in targets]
    for name, iops in (("nbdkit-chain", 20_000.0), ("dst", 10_000.0)):
        for j in jobs:
            fio = FioResult(iops * 4096 / 1e6, iops, 3000.0, 1.0, 50.0)
            report.cells.append(Cell(name, j, fio=fio, server_cpu_pct=100.0))
    md = markdown(report)
    assert "| 4K rand read 4x QD32 | MB/s |" in md
    assert "| 4K rand write 4x QD32 | MB/s |" in md
    assert "| | IOPS | 20,000 | 10,000 | **0.50** |" in md.replace("|  |", "| |")
    assert CONN_LEGEND in md
    doc = to_json(report)
    listed = doc["jobs"]
    assert isinstance(listed, list) and [j["numjobs"] for j in listed] == [4, 4]
    ratios = doc["ratios"]
    assert isinstance(ratios, list) and {r["iops"] for r in ratios} == {0.5}
