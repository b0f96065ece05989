"""Write latency and throughput of a local mirror with and without an asynchronous leg 60 ms away.

Everything runs as real processes on unix sockets in a private directory on /dev/shm:
export nodes A and B (the local, synchronous legs) and C (the far one) on 1 GiB files,
and tests/wan.py in front of C: 30 ms each way (a 60 ms round trip), optionally a
bandwidth limit. Then, alternately and in the same run, ``dst attach A B --mirror``
("local mirror"), ``dst attach A B --mirror --async-leg C`` ("+ async leg") and, for
reference, ``dst attach A B C --mirror`` ("+ sync leg 60 ms away"), each started fresh
with a new bitmap and ``--assume-clean``, get the same fio jobs through
NBD: 4 KiB random writes at QD1 (alone and with a flush every 32 writes), 4 KiB random
writes at QD32, 1 MiB sequential writes at QD8.

For the async leg it also polls ``dst status`` during each job (largest lag in bytes
and seconds, pull-aheads) and, after the job, times how long the leg takes to have
everything (lag 0, consistent); the next job starts only then. Needs fio (with its nbd
engine). Run: ``.venv/bin/python bench/async_bench.py [--runtime 5] [--rounds 2]
[--wan-rate 100M] [--markdown FILE] [--json FILE]``. Results: docs/benchmarks-raid.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

from dst.bench.jobs import FioError, Job, parse_fio_json
from dst.bench.procs import ServerProcess, StartError, cpu_seconds, deferred_signals
from dst.control.client import ControlClient

MiB = 1 << 20
HERE = Path(__file__).resolve().parent
WAN = HERE.parent / "tests" / "wan.py"
_DST_SCRIPT = Path(sys.executable).with_name("dst")
DST = [str(_DST_SCRIPT)] if _DST_SCRIPT.exists() else [sys.executable, "-m", "dst"]

JOBS: list[tuple[str, Job, list[str]]] = [
    ("4K rand write QD1", Job("qd1", "randwrite", 4096, 1), []),
    ("4K rand write QD1, flush every 32", Job("qd1-flush", "randwrite", 4096, 1), ["--fsync=32"]),
    ("4K rand write QD32", Job("qd32", "randwrite", 4096, 32), []),
    ("1M seq write QD8", Job("seq", "write", MiB, 8), []),
]
CONFIGS = ("local mirror", "+ async leg", "+ sync leg 60 ms away")

err = Console(stderr=True, highlight=False, soft_wrap=True)


def say(text: str) -> None:
    err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}")


class BenchError(Exception):
    """A step of the run failed; the message says which and why."""


@dataclass
class Cell:
    """One job on one configuration, over the rounds."""

    mb_s: list[float] = field(default_factory=list)
    iops: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    attach_cpu: list[float] = field(default_factory=list)
    far_cpu: list[float] = field(default_factory=list)
    lag_bytes: list[int] = field(default_factory=list)
    lag_seconds: list[float] = field(default_factory=list)
    pull_aheads: list[int] = field(default_factory=list)
    catch_up_s: list[float] = field(default_factory=list)


def mean(xs: list[float] | list[int]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


class Bench:
    def __init__(self, work: Path, fio: str, wan_rate: str | None) -> None:
        self.work = work
        self.fio_bin = fio
        self.wan_rate = wan_rate
        self.procs: list[ServerProcess] = []
        self.commands: list[str] = []
        self.n = 0

    def path(self, name: str) -> Path:
        return self.work / name

    def start(self, name: str, args: list[str], ready: str, timeout: float = 30) -> ServerProcess:
        self.n += 1
        with deferred_signals():
            proc = ServerProcess(name, args, self.path(f"{self.n:02d}-{name}.log"))
            self.procs.append(proc)
        self.commands.append(" ".join(args))
        proc.wait_for_line(ready, timeout, f"ready ({ready!r})")
        return proc

    def setup(self) -> None:
        for name in "abc":
            img = self.path(f"{name}.img")
            with open(img, "wb") as f:  # written in full: no write lands in a hole
                block = b"\x5a" * (4 * MiB)
                for _ in range(256):
                    f.write(block)
            self.start(
                f"export-{name}",
                [*DST, "export", "--listen", f"unix:{self.path(name + '.sock')}", f"file:{img}"],
                r"listening on ",
            )
        wan = [sys.executable, str(WAN), "--listen", str(self.path("wan.sock"))]
        wan += ["--target", str(self.path("c.sock")), "--delay", "0.03"]
        wan += ["--rate", self.wan_rate] if self.wan_rate else []
        self.start("wan", wan, r"listening on ")

    def member(self, name: str) -> str:
        return f"dst+unix:///default?socket={self.path(name + '.sock')}"

    def attach(self, config: str, k: int) -> tuple[ServerProcess, str]:
        far = f"dst+unix:///default?socket={self.path('wan.sock')}"
        args = [*DST, "attach", self.member("a"), self.member("b"), "--mirror"]
        if config == CONFIGS[1]:
            args += ["--async-leg", far]
        elif config == CONFIGS[2]:
            args.insert(-1, far)
        args += ["--bitmap", str(self.path(f"m{k}.bitmap")), "--assume-clean"]
        args += ["--nbd", f"unix:{self.path('m.nbd')}", "--control", str(self.path("m.ctl"))]
        proc = self.start(f"attach-{k}", args, r"serving NBD on (\S+)")
        uri = proc.wait_for_line(r"serving NBD on (\S+)", 5, "the NBD URI").group(1)
        return proc, uri

    def far(self) -> dict[str, Any] | None:
        with ControlClient(str(self.path("m.ctl"))) as c:
            st = c.call("status")
        return next((m for m in st["members"] if m.get("mode") == "async"), None)

    def caught_up(self, timeout: float) -> float:
        """Seconds until the async leg has everything (lag 0, consistent, connected)."""
        t0 = time.monotonic()
        while True:
            m = self.far()
            if m is None or (m["lag_bytes"] == 0 and m["consistent"] and m["state"] == "connected"):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"the async leg did not catch up within {timeout:g} s: {m}")
            time.sleep(0.05)

    def job(self, cell: Cell, label: str, job: Job, extra: list[str], uri: str, attach: int,
            far: list[int], runtime: float) -> None:  # fmt: skip
        out = self.path(f"{job.name}-{len(cell.mb_s)}.json")
        args = [
            self.fio_bin, f"--name={job.name}", "--ioengine=nbd", f"--uri={uri}",
            f"--rw={job.rw}", f"--bs={job.bs}", f"--iodepth={job.iodepth}", *extra,
            "--numjobs=1", "--time_based", f"--runtime={runtime:g}", "--norandommap",
            "--randrepeat=0", "--output-format=json", f"--output={out}",
        ]  # fmt: skip
        self.commands.append(" ".join(args))
        seen: dict[str, float] = {"lag": 0, "lag_s": 0.0}
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.1):
                with contextlib.suppress(Exception):
                    m = self.far()
                    if m is not None:
                        seen["lag"] = max(seen["lag"], m["lag_bytes"])
                        seen["lag_s"] = max(seen["lag_s"], m["lag_seconds"])

        far0 = self.far()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        cpu0, far0_cpu = cpu_seconds([attach]), cpu_seconds(far)
        try:
            cp = subprocess.run(args, capture_output=True, text=True, timeout=runtime + 120)
        finally:
            stop.set()
            watcher.join(5)
        if cp.returncode != 0:
            raise BenchError(f"fio exited with status {cp.returncode}: {cp.stderr[-400:]}")
        raw = out.read_text()
        try:
            r = parse_fio_json(raw[raw.find("{") :], job)
        except FioError as exc:
            raise BenchError(f"fio on {label}: {exc}") from None
        cell.mb_s.append(r.mb_s)
        cell.iops.append(r.iops)
        cell.p99_us.append(r.p99_us)
        cell.attach_cpu.append((cpu_seconds([attach]) - cpu0) / r.runtime_s * 100)
        cell.far_cpu.append((cpu_seconds(far) - far0_cpu) / r.runtime_s * 100)
        line = f"{r.mb_s:.1f} MB/s, {r.iops:.0f} IOPS, p99 {r.p99_us / 1000:.2f} ms"
        if far0 is not None:
            far1 = self.far()
            assert far1 is not None
            cell.lag_bytes.append(int(seen["lag"]))
            cell.lag_seconds.append(seen["lag_s"])
            cell.pull_aheads.append(far1["async"]["pull_aheads"] - far0["async"]["pull_aheads"])
            cell.catch_up_s.append(self.caught_up(300))
            line += (
                f"; async leg: lag up to {seen['lag'] / MiB:.1f} MiB / {seen['lag_s']:.2f} s, "
                f"{cell.pull_aheads[-1]} pull-ahead(s), had everything "
                f"{cell.catch_up_s[-1]:.1f} s after the job"
            )
        say(f"  {label}: {line}")

    def stop(self, proc: ServerProcess) -> None:
        proc.stop(30)
        self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in sorted(reversed(self.procs), key=lambda p: not p.name.startswith("attach")):
            with contextlib.suppress(Exception):
                proc.stop(15)
        self.procs.clear()


def measure(b: Bench, runtime: float, rounds: int) -> dict[str, dict[str, Cell]]:
    cells = {label: {c: Cell() for c in CONFIGS} for label, _, _ in JOBS}
    b.setup()
    k = 0
    for rnd in range(rounds):
        for config in CONFIGS:
            k += 1
            say(f"round {rnd + 1}: {config}")
            proc, uri = b.attach(config, k)
            b.caught_up(60)
            far = [p.pid for p in b.procs if p.name in ("export-c", "wan")]
            for label, job, extra in JOBS:
                b.job(cells[label][config], label, job, extra, uri, proc.pid, far, runtime)
            b.stop(proc)
    return cells


HEAD = [
    "job", "target", "IOPS per round", "MB/s (mean)", "p99 ms per round", "attach CPU",
    "far side CPU", "async lag, most", "pull-aheads", "everything on the far leg after",
]  # fmt: skip


def rows(cells: dict[str, dict[str, Cell]]) -> list[list[str]]:
    out = []
    for label, _, _ in JOBS:
        for config in CONFIGS:
            c = cells[label][config]
            far = config == CONFIGS[1]
            out.append(
                [
                    label,
                    config,
                    " / ".join(f"{x:.0f}" for x in c.iops),
                    f"{mean(c.mb_s):.1f}",
                    " / ".join(f"{p / 1000:.2f}" for p in c.p99_us),
                    f"{mean(c.attach_cpu):.0f}%",
                    f"{mean(c.far_cpu):.0f}%" if config != CONFIGS[0] else "-",
                    (
                        f"{max(c.lag_bytes) / MiB:.1f} MiB, {max(c.lag_seconds):.2f} s"
                        if far
                        else "-"
                    ),
                    str(sum(c.pull_aheads)) if far else "-",
                    " / ".join(f"{s:.1f} s" for s in c.catch_up_s) if far else "-",
                ]
            )
    return out


def markdown(head: list[str], body: list[list[str]]) -> str:
    align = ["---", "---"] + ["---:"] * (len(head) - 2)
    lines = [head, align, *body]
    return "\n".join("| " + " | ".join(r) + " |" for r in lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per fio job (5)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, alternating targets (2)")
    ap.add_argument("--wan-rate", default=None, help="bandwidth of the far link (unlimited)")
    ap.add_argument("--dir", default="/dev/shm", help="where the run's directory goes")
    ap.add_argument("--markdown", metavar="FILE")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    fio = shutil.which("fio")
    if fio is None:
        print("async_bench: needs fio: apt-get install fio", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fio": subprocess.run([fio, "--version"], capture_output=True, text=True).stdout.strip(),
        "wan": f"30 ms each way, {a.wan_rate or 'unlimited'} bandwidth",
        "loadavg_start": " ".join(load0),
    }
    say(f"load average at the start: {meta['loadavg_start']}")
    work = Path(tempfile.mkdtemp(prefix="dst-asyncbench-", dir=a.dir))
    b = Bench(work, fio, a.wan_rate)
    started = time.monotonic()
    try:
        cells = measure(b, a.runtime, a.rounds)
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        return 130
    except (BenchError, StartError, OSError, ValueError, KeyError) as exc:
        say(f"[red]async_bench: {type(exc).__name__}: {exc}[/red]")
        return 1
    finally:
        b.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    meta["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    meta["seconds"] = round(time.monotonic() - started, 1)
    body = rows(cells)
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    out.print(
        f"{meta['date']}; {meta['nproc']} CPUs, kernel {meta['kernel']}; far link {meta['wan']}; "
        f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}; {meta['seconds']} s"
    )
    t = Table(title=f"writes, {a.runtime:g} s per job and round", title_justify="left")
    for h in HEAD:
        t.add_column(h, justify="left" if h in ("job", "target") else "right")
    for r in body:
        t.add_row(*r)
    out.print(t)
    if a.markdown:
        Path(a.markdown).write_text(
            f"Date: {meta['date']}; {meta['nproc']} CPUs, kernel {meta['kernel']}, Python "
            f"{meta['python']}, {meta['fio']}; far link {meta['wan']}; load average "
            f"{meta['loadavg_start']} at the start, {meta['loadavg_end']} at the end; the run "
            f"took {meta['seconds']} s.\n\n{markdown(HEAD, body)}\n"
        )
    if a.json:
        doc = {
            "meta": meta,
            "commands": b.commands,
            "cells": {label: {c: v.__dict__ for c, v in d.items()} for label, d in cells.items()},
        }
        Path(a.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
