"""`dst bench`: the same fio jobs against dst and its peers, in one run, in one table.

Speed is shown side by side with nbdkit and qemu-nbd on the same machine, never by timed
assertions: the absolute numbers depend on the machine, the ratios to the peers much less.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from rich.console import Console

from dst.bench.jobs import JOB_NAMES, select_jobs
from dst.bench.report import markdown, print_table, write_json
from dst.bench.runner import BenchConfig, run_suite
from dst.bench.targets import KINDS, TargetSpec, missing_tool, parse_variant
from dst.cli.options import Parser
from dst.errors import UsageError
from dst.units import parse_size

DEFAULT_RUNTIME_S = 5.0
QUICK_RUNTIME_S = 1.0
DEFAULT_SIZE = "1G"
QUICK_SIZE = "64M"

EPILOG = """\
targets: nbdkit (nbdkit file, one hop), nbdkit-chain (nbdkit nbd -> nbdkit file, two hops,
the base of the ratio column), qemu-nbd (one hop), dst (dst attach --nbd -> dst export).
By default every installed peer and dst run.

jobs: seq-read, seq-write (1M, QD8), rand-read-qd32, rand-write-qd32, rand-read-qd1,
rand-write-qd1 (4K), rand-read-qd32-4conn, rand-write-qd32-4conn (4K, four NBD
connections at once, QD32 each, numbers summed), through fio's nbd engine.

variants: --variant dst:KEY=VALUE[,KEY=VALUE...] adds a dst column with --KEY=VALUE given
to both dst export and dst attach (export.KEY=... or attach.KEY=... for one side). A cipher
variant gets a fresh key file from dst keygen. Example:
  dst bench --targets dst,nbdkit-chain --variant dst:cipher=aes-256-gcm

Options whose value starts with '-' need '=': --dst-export-arg=--checksum=none
"""


def build_parser() -> Parser:
    p = Parser(
        prog="dst bench",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the same fio jobs against dst, nbdkit and qemu-nbd on this "
        "machine and print MB/s, IOPS, p99 latency and server CPU side by "
        "side.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_RUNTIME_S:g} s per job on a {QUICK_SIZE} file (a smoke run)",
    )
    p.add_argument(
        "--runtime",
        metavar="S",
        type=float,
        default=None,
        help=f"seconds per job (default {DEFAULT_RUNTIME_S:g})",
    )
    p.add_argument(
        "--size",
        metavar="SIZE",
        default=None,
        help=f"size of the backing file (default {DEFAULT_SIZE})",
    )
    p.add_argument(
        "--targets",
        metavar="LIST",
        action="append",
        default=None,
        help=f"comma-separated subset of {','.join(KINDS)}",
    )
    p.add_argument(
        "--jobs",
        metavar="LIST",
        action="append",
        default=None,
        help=f"comma-separated subset of {','.join(JOB_NAMES)}",
    )
    p.add_argument(
        "--variant",
        metavar="dst:KEY=VALUE,...",
        action="append",
        default=[],
        help="add a dst column with extra options (repeat for more)",
    )
    p.add_argument(
        "--dst-export-arg",
        metavar="ARG",
        action="append",
        default=[],
        help="extra argument for every dst export (repeat for more)",
    )
    p.add_argument(
        "--dst-attach-arg",
        metavar="ARG",
        action="append",
        default=[],
        help="extra argument for every dst attach (repeat for more)",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="also write the raw numbers")
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the table as Markdown instead of a terminal table",
    )
    p.add_argument("--fio", metavar="PATH", default="fio", help="the fio to run (default fio)")
    return p


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _targets(ns: object, exp: tuple[str, ...], att: tuple[str, ...]) -> tuple[TargetSpec, ...]:
    chosen = _split(getattr(ns, "targets", None))
    for name in chosen:
        if name not in KINDS:
            raise UsageError(f"--targets: unknown target {name!r}; choose from {', '.join(KINDS)}")
    if not chosen:  # every installed peer, and dst
        chosen = [k for k in KINDS if missing_tool(k) is None]
        for k in KINDS:
            why = missing_tool(k)
            if why:
                print(f"dst bench: skipping {k}: {why}", file=sys.stderr)
    specs: list[TargetSpec] = []
    for kind in sorted(set(chosen), key=KINDS.index):  # peers first, in a fixed order
        if kind == "dst":
            specs.append(TargetSpec("dst", "dst", exp, att))
        else:
            specs.append(TargetSpec(kind, kind))
    for text in getattr(ns, "variant", []):
        try:
            v = parse_variant(text, exp, att)
        except ValueError as exc:
            raise UsageError(f"--variant: {exc}") from None
        if any(s.name == v.name for s in specs):
            raise UsageError(f"--variant {text!r} is given twice")
        specs.append(v)
    return tuple(specs)


def parse_config(args: list[str]) -> tuple[BenchConfig, Path | None, bool]:
    """The command line -> what to run, where to write JSON, and whether to print Markdown."""
    if args[:1] == ["--"]:
        args = args[1:]
    ns = build_parser().parse_args(args)
    runtime = (
        ns.runtime
        if ns.runtime is not None
        else (QUICK_RUNTIME_S if ns.quick else DEFAULT_RUNTIME_S)
    )
    if not 0 < runtime <= 3600:
        raise UsageError(f"--runtime {runtime:g}: give seconds per job, more than 0, e.g. 5")
    size = parse_size(ns.size or (QUICK_SIZE if ns.quick else DEFAULT_SIZE), "--size")
    if size < 1 << 20 or size % 4096:
        raise UsageError(f"--size {ns.size}: give at least 1M, a multiple of 4K, e.g. 1G")
    try:
        jobs = select_jobs(_split(ns.jobs))
    except ValueError as exc:
        raise UsageError(f"--jobs: {exc}") from None
    targets = _targets(ns, tuple(ns.dst_export_arg), tuple(ns.dst_attach_arg))
    if not targets:
        raise UsageError("no targets to run; name some with --targets, e.g. --targets dst")
    json_path = Path(ns.json) if ns.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise UsageError(f"--json {ns.json}: the directory {json_path.parent} does not exist")
    return BenchConfig(targets, jobs, runtime, size, ns.fio), json_path, bool(ns.markdown)


def _progress(line: str) -> None:
    print(f"dst bench: {line}", file=sys.stderr, flush=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM stops a run the way Ctrl-C does: every server stopped, files removed."""
    raise KeyboardInterrupt


def run_bench(args: list[str]) -> int:
    """`dst bench [OPTIONS]`: run the suite, print the table, optionally write JSON."""
    cfg, json_path, md = parse_config(list(args))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        report = run_suite(cfg, _progress)
    except KeyboardInterrupt:
        print(
            "dst bench: interrupted; every server was stopped and the temporary files removed",
            file=sys.stderr,
        )
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if md:
        sys.stdout.write(markdown(report))
    else:
        # a pipe or file gets the whole table, however wide; a terminal folds long names
        width = None if sys.stdout.isatty() else 1000
        print_table(report, Console(width=width, highlight=False))
    if json_path is not None:
        write_json(report, json_path)
        _progress(f"wrote {json_path}")
    failed = any(c.error for c in report.cells)
    return 1 if failed else 0
