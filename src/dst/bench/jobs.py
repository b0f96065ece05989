"""The fio jobs of `dst bench`, the fio command line that runs one, and the parse of its JSON.

Every target gets exactly the same jobs through fio's `nbd` engine (libnbd in the fio
process), so the only thing that differs between two columns of the table is the server.
A job with ``numjobs`` above 1 runs that many fio jobs at once, each with its own NBD
connection and its own queue depth, reported as one group (IOPS and MB/s summed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KiB = 1 << 10
MiB = 1 << 20


@dataclass(frozen=True)
class Job:
    """One fio workload: access pattern, block size, queue depth and connections."""

    name: str
    rw: str  # fio's rw=: read, write, randread, randwrite
    bs: int
    iodepth: int  # per connection
    numjobs: int = 1  # fio jobs at once, one NBD connection each

    @property
    def label(self) -> str:
        """A short human name for the table, e.g. ``4K rand read QD32`` or, for four
        connections at QD32 each, ``4K rand read 4x QD32``."""
        size = f"{self.bs // MiB}M" if self.bs >= MiB else f"{self.bs // KiB}K"
        kind = {
            "read": "seq read",
            "write": "seq write",
            "randread": "rand read",
            "randwrite": "rand write",
        }[self.rw]
        conns = f"{self.numjobs}x " if self.numjobs > 1 else ""
        return f"{size} {kind} {conns}QD{self.iodepth}"

    @property
    def direction(self) -> str:
        """The section of fio's JSON that holds this job's numbers."""
        return "read" if self.rw in ("read", "randread") else "write"


JOBS: tuple[Job, ...] = (
    Job("seq-read", "read", MiB, 8),
    Job("seq-write", "write", MiB, 8),
    Job("rand-read-qd32", "randread", 4 * KiB, 32),
    Job("rand-write-qd32", "randwrite", 4 * KiB, 32),
    Job("rand-read-qd1", "randread", 4 * KiB, 1),
    Job("rand-write-qd1", "randwrite", 4 * KiB, 1),
    # four NBD connections at once, as a multi-connection client (qemu, the kernel's
    # nbd-client -C 4) opens them: QD32 each, so one connection of them is loaded like
    # rand-*-qd32 and the difference shows what more connections cost or gain
    Job("rand-read-qd32-4conn", "randread", 4 * KiB, 32, numjobs=4),
    Job("rand-write-qd32-4conn", "randwrite", 4 * KiB, 32, numjobs=4),
)
JOB_NAMES = tuple(j.name for j in JOBS)


def select_jobs(names: list[str]) -> tuple[Job, ...]:
    """The jobs named (all of them for an empty list), in the table's fixed order.

    Raises ValueError naming an unknown job and the known ones.
    """
    for n in names:
        if n not in JOB_NAMES:
            raise ValueError(f"unknown job {n!r}; choose from {', '.join(JOB_NAMES)}")
    return tuple(j for j in JOBS if not names or j.name in names)


@dataclass(frozen=True)
class FioResult:
    """What fio measured for one job, in the units the table prints."""

    mb_s: float  # 10**6 bytes per second
    iops: float
    p99_us: float  # 99th percentile completion latency
    runtime_s: float  # fio's own measured job runtime
    fio_cpu_pct: float  # the fio (client) process, user + system, % of one core


class FioError(Exception):
    """fio did not produce a usable result; the message says why."""


def fio_command(fio: str, job: Job, uri: str, runtime_s: float, output: Path) -> list[str]:
    """fio's command line for `job` against the NBD server at `uri`.

    The job is time based, so every target runs for the same time however fast it is; the
    export size is taken from the NBD handshake, so no `size=` is given. Several fio jobs
    (``numjobs``) are reported as one group, so the JSON has one entry with their sums.
    """
    return [
        fio,
        f"--name={job.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--numjobs={job.numjobs}",
        "--group_reporting",
        "--time_based",
        f"--runtime={max(1, round(runtime_s * 1000))}ms",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
        f"--output={output}",
    ]


def _number(obj: Any, *keys: str) -> float:
    """A number deep in fio's JSON, or FioError naming the missing key."""
    cur = obj
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            raise FioError(f"fio's JSON has no {'.'.join(keys)}")
        cur = cur[k]
    if isinstance(cur, bool) or not isinstance(cur, (int, float)) or not math.isfinite(cur):
        raise FioError(f"fio's JSON has a non-numeric {'.'.join(keys)}: {cur!r}")
    return float(cur)


def parse_fio_json(text: str, job: Job) -> FioResult:
    """Bandwidth, IOPS, p99 completion latency and fio's CPU from `--output-format=json`."""
    start = text.find("{")  # fio may put warnings before the JSON object
    if start < 0:
        raise FioError("fio wrote no JSON")
    try:
        doc = json.loads(text[start:])
    except json.JSONDecodeError as exc:
        raise FioError(f"fio wrote malformed JSON ({exc})") from None
    jobs = doc.get("jobs") if isinstance(doc, dict) else None
    if not isinstance(jobs, list) or not jobs:
        raise FioError("fio's JSON has no jobs")
    if len(jobs) != 1:  # one entry per job: the numbers would be one connection's only
        raise FioError(
            f"fio's JSON has {len(jobs)} job entries where one group was expected; "
            "run fio with --group_reporting"
        )
    j = jobs[0]
    err = j.get("error", 0) if isinstance(j, dict) else 0
    if err:
        raise FioError(f"fio reported error {err} for job {job.name}")
    d = job.direction
    ops = _number(j, d, "total_ios")
    if ops <= 0:
        raise FioError(f"fio completed no {d}s in job {job.name}")
    pct = j.get(d, {}).get("clat_ns", {}).get("percentile", {})
    p99 = pct.get("99.000000") if isinstance(pct, dict) else None
    if not isinstance(p99, (int, float)):
        raise FioError("fio's JSON has no 99th percentile completion latency")
    runtime_ms = _number(j, d, "runtime")
    # a group's usr_cpu and sys_cpu are the mean over its jobs (fio divides the summed CPU
    # time by the summed runtime): times numjobs, it is the whole client's CPU again
    cpu = (_number(j, "usr_cpu") + _number(j, "sys_cpu")) * job.numjobs
    return FioResult(
        mb_s=_number(j, d, "bw_bytes") / 1e6,
        iops=_number(j, d, "iops"),
        p99_us=float(p99) / 1000.0,
        runtime_s=runtime_ms / 1000.0,
        fio_cpu_pct=cpu,
    )
