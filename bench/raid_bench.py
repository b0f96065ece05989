"""Mirror resync time by dirty amount, and mirror write throughput next to a single member.

Everything runs as real processes on unix sockets in a private directory on /dev/shm:

- two ``dst export`` nodes (legs A and B) on 1 GiB files and one ``dst attach --mirror``
  over them with a bitmap file, served over NBD; the first start does a full resync;
- per dirty fraction (default 1%, 10%, 100%): leg B's export node is killed with SIGKILL,
  a 4 KiB write through the mirror makes it degraded (its 2 s budget runs out), the
  fraction of the device is written as evenly spread 64 KiB regions (fio, one region every
  ``N`` regions; 100% is the whole device in 1 MiB sequential writes), leg B's node is
  restarted on the same file and socket, and the resync is timed until it is in sync;
- then 1 MiB sequential writes at QD8 (fio, time based) against a single ``dst attach``
  over a third export node and against the in-sync 2-leg mirror, alternately.

The mirror runs with ``--debug=mirror``, which adds one JSON line per leg event
(``degraded``, ``resync-start``, ``resync-done`` with exact bytes and seconds) and nothing
on the data path. For the throughput jobs it reports CPU of every dst process and how
busy the client node's event loop was (running or waiting for a CPU). Needs fio (with
its nbd engine) and qemu-io. Run: ``.venv/bin/python bench/raid_bench.py
[--fractions 0.01,0.1,1] [--runtime 5] [--markdown FILE] [--json FILE]``.
Results: docs/benchmarks-raid.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

from dst.bench.jobs import FioError, Job, parse_fio_json
from dst.bench.procs import (
    ServerProcess,
    StartError,
    cpu_seconds,
    deferred_signals,
    descendants,
    spawn,
)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
REGION = 64 * KiB  # the mirror's bitmap granularity (the default)
SIZE = GiB
_DST_SCRIPT = Path(sys.executable).with_name("dst")
DST = [str(_DST_SCRIPT)] if _DST_SCRIPT.exists() else [sys.executable, "-m", "dst"]
LINK_OPTS = [
    "--resends", "1", "--resend-timeout", "1",
    "--reconnect-min", "0.05", "--reconnect-max", "0.3",
]  # fmt: skip
SEQ_WRITE = Job("seq-write", "write", MiB, 8)

err = Console(stderr=True, highlight=False, soft_wrap=True)


class BenchError(Exception):
    """A step of the run failed; the message says which and why."""


@dataclass
class Cycle:
    """One kill / dirty / restart / resync round of leg B."""

    fraction: float
    regions: int  # 64 KiB regions written while B was away
    written: int  # bytes written while B was away
    write_s: float  # how long that write took
    dirty_bytes: int  # what the mirror's bitmap recorded for B before the restart
    copied: int  # bytes the resync copied (its own count)
    resync_s: float  # the resync's own time, start to finish
    restart_s: float  # from the restart of B's export node to B in sync


@dataclass
class Throughput:
    """fio's 1 MiB sequential write numbers for one target, one entry per round."""

    name: str
    mb_s: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    attach_cpu: list[float] = field(default_factory=list)  # % of one core
    export_cpu: list[float] = field(default_factory=list)  # all its export nodes together
    fio_cpu: list[float] = field(default_factory=list)  # fio itself (libnbd in it)
    attach_busy: list[float] = field(default_factory=list)  # main thread running or runnable

    def mean(self) -> float:
        """Mean MB/s over the rounds."""
        return sum(self.mb_s) / len(self.mb_s) if self.mb_s else 0.0


def say(text: str) -> None:
    """A progress line on stderr."""
    err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}")


def run_tool(args: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Run a short-lived tool in its own session; kill its whole group afterwards, always.

    fio forks a process per job: killing the session's group (and any descendant that left
    it) reaps those too, whether the tool finished, timed out or we were interrupted.
    """
    with deferred_signals():
        p = spawn(args, log)
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(
            f"{args[0]} did not finish within {timeout:g} s: {' '.join(args)}"
        ) from None
    finally:
        left = descendants([p.pid])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)
    return rc, log.read_text(errors="replace")


def sched_ns(pid: int) -> int:
    """Nanoseconds a process's main thread has run plus waited on a run queue for a CPU.

    Over an interval, this divided by the elapsed time near 100% means the thread always
    had work: it was limited by the CPU it got, not by waiting for its peers.
    """
    try:
        run, wait = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[:2]
    except (OSError, ValueError):
        return 0
    return int(run) + int(wait)


def fill(path: Path, size: int) -> None:
    """Write ``size`` bytes of non-zero data, so no resync copy is a cheap write-zeroes."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)


def same_files(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


class Bench:
    """The run's directory, its processes and the steps of the measurement."""

    def __init__(self, work: Path, fio: str, qemu_io: str) -> None:
        self.work = work
        self.fio_bin = fio
        self.qemu_io = qemu_io
        self.procs: list[ServerProcess] = []
        self.commands: list[str] = []
        self.counter = 0

    # ---- processes ------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """A file in the run's directory."""
        return self.work / name

    def _log(self, stem: str) -> Path:
        """A fresh, numbered log file for one process."""
        self.counter += 1
        return self.path(f"{self.counter:02d}-{stem}.log")

    def start(self, name: str, args: list[str], ready: str, timeout: float = 30) -> ServerProcess:
        """Start a server and wait for its readiness line."""
        with deferred_signals():
            proc = ServerProcess(name, args, self._log(name))
            self.procs.append(proc)
        self.commands.append(" ".join(args))
        proc.wait_for_line(ready, timeout, f"ready ({ready!r})")
        return proc

    def export(self, name: str) -> ServerProcess:
        """An export node on ``name.img`` listening on ``name.sock``."""
        args = [
            *DST, "export", "--listen", f"unix:{self.path(name + '.sock')}",
            f"file:{self.path(name + '.img')}", "--size", "1G",
        ]  # fmt: skip
        return self.start(f"export-{name}", args, r"listening on ")

    def member(self, name: str) -> str:
        """The member URI of export node ``name``."""
        return f"dst+unix:///default?socket={self.path(name + '.sock')}"

    def attach(self, name: str, legs: list[str], mirror: bool) -> tuple[ServerProcess, str]:
        """A client node over ``legs``; returns it and its NBD URI."""
        args = [*DST, "attach", *(self.member(x) for x in legs)]
        if mirror:
            args += ["--mirror", "--bitmap", str(self.path(name + ".bitmap")), "--debug=mirror"]
        args += [
            "--nbd", f"unix:{self.path(name + '.nbd')}",
            "--control", str(self.path(name + ".ctl")), *LINK_OPTS,
        ]  # fmt: skip
        proc = self.start(f"attach-{name}", args, r"serving NBD on (\S+)")
        m = re.search(r"serving NBD on (\S+)", proc.output())
        assert m is not None
        return proc, m.group(1)

    def kill_hard(self, proc: ServerProcess) -> None:
        """SIGKILL a server and its whole group, as a node dying would."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait(10)

    def stop_all(self) -> None:
        """Stop every server, client nodes first (they flush and close), newest first."""
        for proc in sorted(reversed(self.procs), key=lambda p: not p.name.startswith("attach")):
            try:
                proc.stop(15)
            except Exception as exc:  # keep reaping the others
                say(f"[red]stopping {proc.name}: {exc}[/red]")
        self.procs.clear()

    # ---- tools ----------------------------------------------------------------------------
    def status(self, name: str) -> dict[str, Any]:
        """``dst status --json`` of client node ``name`` (exit 1 just means not all healthy)."""
        args = [*DST, "status", "--control", str(self.path(name + ".ctl")), "--json"]
        _, out = run_tool(args, self._log("status"), 30)
        start = out.find("{")
        try:
            doc: dict[str, Any] = json.loads(out[start:])
        except (ValueError, json.JSONDecodeError):
            raise BenchError(f"dst status gave no JSON: {out.strip()[-300:]}") from None
        return doc

    def fio(self, stem: str, uri: str, extra: list[str], timeout: float) -> dict[str, Any]:
        """Run one fio job through its nbd engine; returns fio's JSON document."""
        out = self.path(f"{stem}.json")
        args = [
            self.fio_bin, f"--name={stem}", "--ioengine=nbd", f"--uri={uri}",
            *extra, "--output-format=json", f"--output={out}",
        ]  # fmt: skip
        self.commands.append(" ".join(args))
        rc, text = run_tool(args, self._log("fio"), timeout)
        if rc != 0:
            raise BenchError(f"fio exited with status {rc}: {text.strip()[-400:]}")
        raw = out.read_text()
        doc: dict[str, Any] = json.loads(raw[raw.find("{") :])
        return doc

    # ---- waiting on the mirror's log ------------------------------------------------------
    @staticmethod
    def events(proc: ServerProcess, since: int) -> list[dict[str, Any]]:
        """The ``--debug=mirror`` JSON events in ``proc``'s output after offset ``since``."""
        found = []
        for line in proc.output()[since:].splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    found.append(json.loads(line))
        return found

    def wait_event(
        self, proc: ServerProcess, since: int, event: str, leg: str, timeout: float
    ) -> dict[str, Any]:
        """Wait for mirror event ``event`` about ``leg`` after offset ``since``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events(proc, since):
                if ev.get("event") == event and ev.get("leg") == leg:
                    return ev
            proc.check_alive()
            time.sleep(0.01)
        raise BenchError(f"no {event!r} event for {leg} within {timeout:g} s: {proc.last_words()}")

    def wait_in_sync(self, name: str, timeout: float) -> dict[str, Any]:
        """Poll status until no member is ``resyncing``/``degraded`` and the mirror is in sync."""
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status(name)
            states = [m.get("state") for m in doc.get("members", [])]
            if doc.get("device", {}).get("sync") == "in-sync" and all(
                s == "connected" for s in states
            ):
                return doc
            if time.monotonic() > deadline:
                raise BenchError(f"mirror not in sync within {timeout:g} s: members {states}")
            time.sleep(0.1)

    # ---- the measurements -----------------------------------------------------------------
    def dirty(self, uri: str, fraction: float) -> tuple[int, int, float]:
        """Write ``fraction`` of the device as evenly spread 64 KiB regions.

        Returns (regions, bytes written, seconds). 100% is one sequential 1 MiB pass.
        """
        total = SIZE // REGION
        n = max(1, round(fraction * total))
        if n >= total:
            opts = ["--rw=write", "--bs=1M", "--iodepth=8", f"--size={SIZE}"]
            n = total
        else:
            stride = total // n  # one region written every `stride` regions
            rw = "--rw=write" if stride == 1 else f"--rw=write:{(stride - 1) * REGION}"
            opts = [
                rw,
                f"--bs={REGION}",
                "--iodepth=8",
                f"--size={SIZE}",
                f"--io_size={n * REGION}",
            ]
        t0 = time.monotonic()
        self.fio(f"dirty-{fraction:g}", uri, opts, 120)
        return n, n * REGION, time.monotonic() - t0

    def cycle(self, mirror: ServerProcess, mirror_uri: str, fraction: float) -> Cycle:
        """Kill leg B, degrade it, dirty ``fraction``, restart B and time its resync."""
        leg_b = self.member("b")
        b = next(p for p in self.procs if p.name == "export-b" and p.alive())
        since = len(mirror.output())
        self.kill_hard(b)
        rc, out = run_tool(
            [self.qemu_io, "-f", "raw", "-c", "write 0 4k", mirror_uri], self._log("qemu-io"), 30
        )
        if rc != 0:
            raise BenchError(f"qemu-io write to the mirror failed: {out.strip()[-300:]}")
        mirror.wait_for_line(re.escape(leg_b) + r": degraded", 10, "B degraded")
        regions, written, write_s = self.dirty(mirror_uri, fraction)
        legs = {m["uri"]: m for m in self.status("m")["members"]}
        dirty_bytes = int(legs[leg_b].get("dirty_bytes") or 0)
        say(
            f"  {fraction:.0%}: {regions} regions ({written / MiB:.1f} MiB) written in "
            f"{write_s:.2f} s; bitmap says {dirty_bytes / MiB:.1f} MiB dirty; restarting B"
        )
        since = len(mirror.output())
        t_restart = time.time()
        self.export("b")
        done = self.wait_event(mirror, since, "resync-done", leg_b, 120)
        self.wait_in_sync("m", 30)
        c = Cycle(
            fraction=fraction,
            regions=regions,
            written=written,
            write_s=write_s,
            dirty_bytes=dirty_bytes,
            copied=int(done["bytes"]),
            resync_s=float(done["seconds"]),
            restart_s=float(done["ts"]) - t_restart,
        )
        say(
            f"  {fraction:.0%}: resync copied {c.copied / MiB:.1f} MiB in {c.resync_s:.3f} s; "
            f"{c.restart_s:.2f} s from the restart to in sync"
        )
        return c

    def throughput(
        self, t: Throughput, uri: str, pids: dict[str, list[int]], runtime: float
    ) -> None:
        """One fio 1 MiB sequential write QD8 round on ``uri``; CPU of its dst processes."""
        before = {k: cpu_seconds(v) for k, v in pids.items()}
        busy0, wall0 = sched_ns(pids["attach"][0]), time.monotonic_ns()
        opts = [
            "--rw=write", "--bs=1M", "--iodepth=8", f"--size={SIZE}", "--numjobs=1",
            "--time_based", f"--runtime={runtime:g}",
        ]  # fmt: skip
        stem = f"{t.name.replace(' ', '-')}-{len(t.mb_s) + 1}"
        doc = self.fio(stem, uri, opts, runtime + 60)
        try:
            r = parse_fio_json(json.dumps(doc), SEQ_WRITE)
        except FioError as exc:
            raise BenchError(f"fio on {t.name}: {exc}") from None
        cpu = {k: (cpu_seconds(v) - before[k]) / r.runtime_s * 100 for k, v in pids.items()}
        busy = (sched_ns(pids["attach"][0]) - busy0) / (time.monotonic_ns() - wall0) * 100
        t.mb_s.append(r.mb_s)
        t.p99_us.append(r.p99_us)
        t.attach_cpu.append(cpu["attach"])
        t.export_cpu.append(cpu["export"])
        t.fio_cpu.append(r.fio_cpu_pct)
        t.attach_busy.append(busy)
        say(
            f"  {t.name}: {r.mb_s:.0f} MB/s, p99 {r.p99_us / 1000:.1f} ms, attach CPU "
            f"{cpu['attach']:.0f}% (busy {busy:.0f}%), export CPU {cpu['export']:.0f}%, "
            f"fio CPU {r.fio_cpu_pct:.0f}%"
        )


# ---- report ------------------------------------------------------------------------------
def pct(f: float) -> str:
    """A fraction as a short percentage."""
    return f"{f * 100:g}%"


def resync_rows(full: Cycle | None, cycles: list[Cycle]) -> list[list[str]]:
    """Rows of the resync table (the initial full resync first)."""
    rows = []
    for c in ([full] if full else []) + cycles:
        label = "full (new bitmap)" if c is full else pct(c.fraction)
        mb_s = c.copied / c.resync_s / 1e6 if c.resync_s > 0 else float("nan")
        rows.append(
            [
                label,
                "-" if c is full else str(c.regions),
                f"{c.dirty_bytes / MiB:.1f} MiB",
                f"{c.copied / MiB:.1f} MiB",
                f"{c.resync_s:.3f}",
                f"{mb_s:.0f}",
                "-" if c is full else f"{c.restart_s:.2f}",
            ]
        )
    return rows


RESYNC_HEAD = [
    "dirty", "regions written", "dirty (bitmap)", "copied", "resync s", "MB/s",
    "restart to in sync s",
]  # fmt: skip
TPUT_HEAD = [
    "target", "MB/s per round", "mean MB/s", "p99 (mean)", "attach CPU", "attach busy",
    "export CPU", "fio CPU", "attach CPU ms per MB", "dst CPU ms per MB",
]  # fmt: skip


def tput_rows(single: Throughput, mirror: Throughput) -> list[list[str]]:
    """Rows of the throughput table."""
    rows = []
    for t in (single, mirror):
        n = max(1, len(t.mb_s))
        attach, export = sum(t.attach_cpu) / n, sum(t.export_cpu) / n
        # CPU time per MB written, in ms: the client node alone, and all dst processes
        mean = t.mean() or float("nan")
        attach_mb, per_mb = attach / 100 / mean * 1000, (attach + export) / 100 / mean * 1000
        rows.append(
            [
                t.name,
                " / ".join(f"{x:.0f}" for x in t.mb_s),
                f"{t.mean():.0f}",
                f"{sum(t.p99_us) / n / 1000:.1f} ms",
                f"{attach:.0f}%",
                f"{sum(t.attach_busy) / n:.0f}%",
                f"{export:.0f}%",
                f"{sum(t.fio_cpu) / n:.0f}%",
                f"{attach_mb:.2f}",
                f"{per_mb:.2f}",
            ]
        )
    return rows


def markdown(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, numbers right-aligned."""
    align = ["---"] + ["---:"] * (len(head) - 1)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def rich_table(title: str, head: list[str], rows: list[list[str]]) -> Table:
    """The same table for the terminal."""
    t = Table(title=title, title_justify="left")
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    return t


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def loadavg() -> str:
    """The first three fields of /proc/loadavg."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def tool_version(args: list[str]) -> str:
    """First line of a tool's version output."""
    out = subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
    return out.splitlines()[0].strip() if out else "unknown"


# ---- main --------------------------------------------------------------------------------
def measure(b: Bench, fractions: list[float], runtime: float, rounds: int) -> dict[str, Any]:
    """The whole run: set up, resync cycles, throughput; returns the results."""
    say("filling three 1 GiB backing files with non-zero data")
    for name in ("a", "b", "s"):
        fill(b.path(name + ".img"), SIZE)
    b.export("a")
    b.export("b")
    t0 = time.time()
    mirror, muri = b.attach("m", ["a", "b"], mirror=True)
    say(f"mirror serving on {muri}; waiting for the initial full resync")
    done = b.wait_event(mirror, 0, "resync-done", b.member("b"), 120)
    b.wait_in_sync("m", 30)
    full = Cycle(1.0, 0, 0, 0.0, SIZE, int(done["bytes"]), float(done["seconds"]),
                 float(done["ts"]) - t0)  # fmt: skip
    say(f"  initial full resync: {full.copied / MiB:.0f} MiB in {full.resync_s:.2f} s")
    cycles = [b.cycle(mirror, muri, f) for f in fractions]
    say("checking that both legs' files hold the same bytes")
    identical = same_files(b.path("a.img"), b.path("b.img"))
    if not identical:
        say("[red]  leg files differ after the resyncs[/red]")

    say("throughput: 1 MiB sequential writes, QD8")
    b.export("s")
    single_proc, suri = b.attach("s", ["s"], mirror=False)
    exports = {p.name: p.pid for p in b.procs if p.alive()}
    single_pids = {"attach": [single_proc.pid], "export": [exports["export-s"]]}
    mirror_pids = {"attach": [mirror.pid], "export": [exports["export-a"], exports["export-b"]]}
    single, mir = Throughput("single member"), Throughput("2-leg mirror")
    for _ in range(rounds):
        b.throughput(single, suri, single_pids, runtime)
        b.throughput(mir, muri, mirror_pids, runtime)
    return {"full": full, "cycles": cycles, "identical": identical, "single": single, "mirror": mir}


def main() -> int:
    """Parse the command line, run, print the tables, write the optional files."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--fractions", default="0.01,0.1,1", help="dirty fractions (default 0.01,0.1,1)"
    )
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per fio throughput job")
    ap.add_argument("--rounds", type=int, default=2, help="throughput rounds, alternating (2)")
    ap.add_argument("--dir", default="/dev/shm", help="where the run's directory goes")
    ap.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown here")
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    a = ap.parse_args()
    try:
        fractions = [float(x) for x in a.fractions.split(",") if x]
    except ValueError:
        ap.error("--fractions: give numbers between 0 and 1, e.g. 0.01,0.1,1")
    if not fractions or any(not 0 < f <= 1 for f in fractions) or a.rounds < 1:
        ap.error("--fractions must be in (0, 1] and --rounds at least 1")
    fio, qemu_io = shutil.which("fio"), shutil.which("qemu-io")
    if fio is None or qemu_io is None:
        print("raid_bench: needs fio and qemu-io: apt-get install fio qemu-utils", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: FrameType | None) -> None:
        """SIGTERM unwinds like Ctrl-C, so every process is reaped on the way out."""
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **machine(),
        "fio": tool_version([fio, "--version"]),
        "qemu_io": tool_version([qemu_io, "--version"]),
        "loadavg_start": loadavg(),
    }
    say(f"load average at the start: {meta['loadavg_start']}")
    work = Path(tempfile.mkdtemp(prefix="dst-raidbench-", dir=a.dir))
    b = Bench(work, fio, qemu_io)
    started = time.monotonic()
    try:
        res = measure(b, fractions, a.runtime, a.rounds)
    except KeyboardInterrupt:
        say("interrupted; stopping everything")
        return 130
    except (
        BenchError,
        StartError,
        OSError,
        ValueError,
        KeyError,
        subprocess.SubprocessError,
    ) as exc:
        say(f"[red]raid_bench: {type(exc).__name__}: {exc}[/red]")
        return 1
    finally:
        b.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    meta["loadavg_end"] = loadavg()
    meta["seconds"] = round(time.monotonic() - started, 1)
    single, mirror = res["single"], res["mirror"]
    ratio = mirror.mean() / single.mean() if single.mean() else float("nan")
    r_rows = resync_rows(res["full"], res["cycles"])
    t_rows = tput_rows(single, mirror)

    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    out.print(
        f"{meta['date']}; {meta['nproc']} CPUs ({meta['cpu_model']}), kernel {meta['kernel']}; "
        f"load average {meta['loadavg_start']} at the start, {meta['loadavg_end']} at the end; "
        f"{meta['seconds']} s"
    )
    out.print(rich_table("Resync of leg B of a 1 GiB mirror (64 KiB regions)", RESYNC_HEAD, r_rows))
    out.print(rich_table(f"1 MiB sequential write, QD8, {a.runtime:g} s", TPUT_HEAD, t_rows))
    out.print(f"mirror / single member: {ratio:.2f}")
    out.print(f"leg files identical after the resyncs: {'yes' if res['identical'] else 'NO'}")

    if a.markdown:
        Path(a.markdown).write_text(
            f"Date: {meta['date']}; machine: {meta['nproc']} CPUs ({meta['cpu_model']}), "
            f"kernel {meta['kernel']}, Python {meta['python']}, {meta['fio']}, "
            f"{meta['qemu_io']}; load average {meta['loadavg_start']} at the start, "
            f"{meta['loadavg_end']} at the end; the run took {meta['seconds']} s.\n\n"
            f"{markdown(RESYNC_HEAD, r_rows)}\n\n{markdown(TPUT_HEAD, t_rows)}\n\n"
            f"Mirror / single member (mean MB/s): {ratio:.2f}. Leg files identical after the "
            f"resyncs: {'yes' if res['identical'] else 'no'}.\n"
        )
    if a.json:
        doc = {
            "meta": meta,
            "commands": b.commands,
            "full_resync": res["full"].__dict__,
            "cycles": [c.__dict__ for c in res["cycles"]],
            "identical": res["identical"],
            "throughput": [single.__dict__, mirror.__dict__],
            "ratio": ratio,
        }
        Path(a.json).write_text(json.dumps(doc, indent=2))
    return 0 if res["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
