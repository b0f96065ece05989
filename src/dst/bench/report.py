"""The outputs of `dst bench`: a rich table, the same table in Markdown, and raw JSON.

Rows are jobs, one sub-row per metric; columns are targets, then, for each dst column, its
ratio to the two-hop nbdkit chain (the peer with the same shape). A ratio above 1 is better
for MB/s and IOPS, below 1 is better for p99 latency and server CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from dst.bench.runner import BenchReport, Cell
from dst.bench.targets import BASELINE


@dataclass(frozen=True)
class Metric:
    """One sub-row: a number taken from a cell and how it is printed."""

    key: str
    title: str
    get: Callable[[Cell], float | None]
    fmt: Callable[[float], str]


LEGEND = (
    "MB/s = 10^6 bytes/s; p99 = 99th percentile completion latency seen by fio; "
    "server CPU = user+system time of all the target's server processes / job runtime, "
    "in % of one core; CPU µs/op = that CPU time per request"
)
CONN_LEGEND = (
    "Nx QDd = N NBD connections at once (N fio jobs), QDd each: MB/s and IOPS are their "
    "sums, p99 over all their requests"
)
RATIO_LEGEND = (
    "X / chain = X / nbdkit-chain: above 1 is better for MB/s and IOPS, below 1 "
    "is better for p99 and CPU"
)


def cpu_per_op(c: Cell) -> float | None:
    """Server CPU microseconds per request: the cost that stays put when cores are scarce."""
    if c.fio is None or c.server_cpu_pct is None or c.fio.iops <= 0:
        return None
    return c.server_cpu_pct / 100.0 / c.fio.iops * 1e6


def _big(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


METRICS: tuple[Metric, ...] = (
    Metric("mb_s", "MB/s", lambda c: c.fio.mb_s if c.fio else None, _big),
    Metric("iops", "IOPS", lambda c: c.fio.iops if c.fio else None, lambda v: f"{v:,.0f}"),
    Metric("p99_us", "p99 µs", lambda c: c.fio.p99_us if c.fio else None, _big),
    Metric("server_cpu_pct", "server CPU", lambda c: c.server_cpu_pct, lambda v: f"{v:.0f}%"),
    Metric("server_cpu_us_per_op", "CPU µs/op", cpu_per_op, _big),
)


def ratio_columns(report: BenchReport) -> list[str]:
    """The dst columns that get a ratio to the baseline (when the baseline was run)."""
    names = [t.spec.name for t in report.targets]
    if BASELINE not in names:
        return []
    return [t.spec.name for t in report.targets if t.spec.kind == "dst"]


def ratio(report: BenchReport, target: str, job: str, m: Metric) -> float | None:
    a, b = report.cell(target, job), report.cell(BASELINE, job)
    if a is None or b is None:
        return None
    va, vb = m.get(a), m.get(b)
    if va is None or vb is None or vb == 0:
        return None
    return va / vb


def _value(report: BenchReport, target: str, job: str, m: Metric) -> str | None:
    """The printed cell, or None when the target has an error for this job."""
    c = report.cell(target, job)
    if c is None or c.fio is None:
        return None
    v = m.get(c)
    return m.fmt(v) if v is not None else "?"


def _multi_conn(report: BenchReport) -> bool:
    return any(j.numjobs > 1 for j in report.config.jobs)


def _ratio_header(name: str) -> str:
    return f"{name} / chain"


def title(report: BenchReport) -> str:
    meta = report.meta
    mach = meta.get("machine")
    where = ""
    if isinstance(mach, dict):
        where = f" on {mach.get('cpus')} CPUs ({mach.get('cpu_model')})"
    size = report.config.size
    size_s = f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"
    return (
        f"dst bench {meta.get('date', '')}{where}, {report.config.runtime_s:g} s per job, "
        f"{size_s} file on /dev/shm, fio ioengine=nbd"
    )


def legend(report: BenchReport) -> list[str]:
    """What each column ran, so a variant's name never has to be decoded."""
    return [f"{t.spec.name}: {t.spec.description}" for t in report.targets]


def errors(report: BenchReport) -> list[str]:
    """One line per target that failed to start, or per job that failed."""
    out: list[str] = []
    for t in report.targets:
        if t.error:
            out.append(f"{t.spec.name}: error: {t.error}")
            continue
        out.extend(
            f"{t.spec.name} {c.job.name}: error: {c.error}"
            for c in report.cells
            if c.target == t.spec.name and c.error
        )
    return out


def print_table(report: BenchReport, console: Console) -> None:
    """The side-by-side table, with failures marked in place and spelled out below."""
    targets = [t.spec.name for t in report.targets]
    ratios = ratio_columns(report)
    rows: list[list[str]] = []
    for job in report.config.jobs:
        for i, m in enumerate(METRICS):
            row = [job.label if i == 0 else "", m.title]
            for name in targets:
                v = _value(report, name, job.name, m)
                row.append(v if v is not None else "error")
            for name in ratios:
                r = ratio(report, name, job.name, m)
                row.append(f"{r:.2f}" if r is not None else "-")
            rows.append(row)
    # numbers never wrap; long column names (variants) fold instead
    widths = [
        max((len(r[k]) for r in rows), default=1) for k in range(2 + len(targets) + len(ratios))
    ]
    table = Table()
    table.add_column("job", no_wrap=True)
    table.add_column("metric", no_wrap=True)
    for k, name in enumerate(targets, 2):
        table.add_column(name, justify="right", overflow="fold", min_width=widths[k])
    for k, name in enumerate(ratios, 2 + len(targets)):
        table.add_column(
            _ratio_header(name), justify="right", style="bold", overflow="fold", min_width=widths[k]
        )
    for n, row in enumerate(rows):
        cells = [Text(c, style="red") if c == "error" else c for c in row]
        table.add_row(*cells, end_section=(n % len(METRICS) == len(METRICS) - 1))
    console.print(Text(title(report), style="bold"), soft_wrap=True)
    console.print(table)
    console.print(LEGEND, soft_wrap=True)
    if _multi_conn(report):
        console.print(CONN_LEGEND, soft_wrap=True)
    if ratios:
        console.print(RATIO_LEGEND, soft_wrap=True)
    for line in legend(report):
        console.print(line, soft_wrap=True, markup=False)
    for line in errors(report):
        console.print(Text(line, style="red"), soft_wrap=True)


def markdown(report: BenchReport) -> str:
    """The same table in GitHub Markdown, for docs and issues."""
    targets = [t.spec.name for t in report.targets]
    ratios = ratio_columns(report)
    head = ["job", "metric", *targets, *(_ratio_header(n) for n in ratios)]
    lines = [
        f"{title(report)}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|",
    ]
    for job in report.config.jobs:
        for i, m in enumerate(METRICS):
            row = [job.label if i == 0 else "", m.title]
            for name in targets:
                v = _value(report, name, job.name, m)
                row.append(v if v is not None else "error")
            for name in ratios:
                r = ratio(report, name, job.name, m)
                row.append(f"**{r:.2f}**" if r is not None else "-")
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", LEGEND + "."]
    if _multi_conn(report):
        lines += ["", CONN_LEGEND + "."]
    if ratios:
        lines += ["", RATIO_LEGEND + "."]
    lines += ["", *(f"- `{t.spec.name}`: {t.spec.description}" for t in report.targets)]
    errs = errors(report)
    if errs:
        lines += ["", *(f"- {e}" for e in errs)]
    return "\n".join(lines) + "\n"


def _num(v: float | None, digits: int) -> float | None:
    return round(v, digits) if v is not None else None


def to_json(report: BenchReport) -> dict[str, object]:
    """The raw numbers: one result per target and job (null numbers where it failed)."""
    results: list[dict[str, object]] = []
    for c in report.cells:
        f = c.fio
        results.append(
            {
                "target": c.target,
                "job": c.job.name,
                "mb_s": _num(f.mb_s, 3) if f else None,
                "iops": _num(f.iops, 1) if f else None,
                "p99_us": _num(f.p99_us, 3) if f else None,
                "server_cpu_pct": _num(c.server_cpu_pct, 2),
                "server_cpu_pct_by_process": {n: _num(p, 2) for n, p in c.server_cpu_split},
                "server_cpu_us_per_op": _num(cpu_per_op(c), 2),
                "fio_cpu_pct": _num(f.fio_cpu_pct, 2) if f else None,
                "runtime_s": _num(f.runtime_s, 3) if f else None,
                "error": c.error,
            }
        )
    ratios: list[dict[str, object]] = []
    for name in ratio_columns(report):
        for job in report.config.jobs:
            entry: dict[str, object] = {"target": name, "baseline": BASELINE, "job": job.name}
            for m in METRICS:
                entry[m.key] = _num(ratio(report, name, job.name, m), 4)
            ratios.append(entry)
    return {
        "meta": report.meta,
        "jobs": [
            {
                "name": j.name,
                "label": j.label,
                "rw": j.rw,
                "bs": j.bs,
                "iodepth": j.iodepth,
                "numjobs": j.numjobs,
            }
            for j in report.config.jobs
        ],
        "targets": [
            {
                "name": t.spec.name,
                "kind": t.spec.kind,
                "description": t.spec.description,
                "commands": t.commands,
                "uri": t.uri,
                "error": t.error,
            }
            for t in report.targets
        ],
        "results": results,
        "ratios": ratios,
    }


def write_json(report: BenchReport, path: Path) -> None:
    path.write_text(json.dumps(to_json(report), indent=2) + "\n")
