"""`dst bench`: dst next to nbdkit and qemu-nbd, the same fio jobs, one machine, one table.

- `jobs`: the fio workloads, fio's command line and the parse of its JSON;
- `targets`: the servers compared and how each is started;
- `procs`: starting, readiness, CPU accounting and reaping of server processes;
- `runner`: the run itself (backing file, one target at a time);
- `report`: the terminal table, Markdown and JSON.
"""

from __future__ import annotations

from dst.bench.jobs import JOBS, FioResult, Job
from dst.bench.runner import BenchConfig, BenchReport, Cell, run_suite
from dst.bench.targets import KINDS, TargetSpec, parse_variant

__all__ = [
    "JOBS",
    "KINDS",
    "BenchConfig",
    "BenchReport",
    "Cell",
    "FioResult",
    "Job",
    "TargetSpec",
    "parse_variant",
    "run_suite",
]
