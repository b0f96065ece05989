"""Run every job against every target, one target at a time, and collect the numbers.

One target runs at a time, so the servers never compete for the machine's cores. All targets
serve the same backing file in a temporary directory on /dev/shm (tmpfs), so the storage under
every server is memory and the table compares the servers, not a disk. The file is written
once in full before the first target starts: a sparse file would make reads of never-written
blocks cheaper than reads of data.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dst.bench.jobs import FioError, FioResult, Job, fio_command, parse_fio_json
from dst.bench.procs import StartError, cpu_seconds, deferred_signals, die_with_parent
from dst.bench.targets import RunningTarget, TargetSpec, Workspace, start_target
from dst.errors import DstError

MiB = 1 << 20
FIO_GRACE_S = 60.0  # on top of the runtime: connect, layout, JSON


@dataclass(frozen=True)
class BenchConfig:
    """What to run: which targets, which jobs, for how long, on how big a file."""

    targets: tuple[TargetSpec, ...]
    jobs: tuple[Job, ...]
    runtime_s: float
    size: int
    fio: str = "fio"
    ready_timeout: float = 30.0


@dataclass(frozen=True)
class Cell:
    """One job on one target: fio's numbers and the server's CPU, or why there are none."""

    target: str
    job: Job
    fio: FioResult | None = None
    server_cpu_pct: float | None = None
    # the same per server process (name, %), to see which one is the bottleneck
    server_cpu_split: tuple[tuple[str, float], ...] = ()
    error: str | None = None


@dataclass
class TargetRun:
    """One target's processes as they ran, and a start failure if it never came up."""

    spec: TargetSpec
    commands: list[list[str]] = field(default_factory=list)
    uri: str = ""
    error: str | None = None


@dataclass
class BenchReport:
    """Everything one `dst bench` measured, in order."""

    config: BenchConfig
    meta: dict[str, object]
    targets: list[TargetRun] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)

    def cell(self, target: str, job: str) -> Cell | None:
        for c in self.cells:
            if c.target == target and c.job.name == job:
                return c
        return None


Progress = Callable[[str], None]


def check_fio(fio: str) -> str:
    """The fio executable, or a DstError saying how to get one with the nbd engine."""
    path = shutil.which(fio)
    if path is None:
        if fio == "fio":
            raise DstError("fio is not installed; install it with: apt-get install fio")
        raise DstError(f"--fio {fio}: no such executable; give the path of a fio binary")
    cp = subprocess.run(
        [path, "--enghelp=nbd"], capture_output=True, text=True, timeout=30, check=False
    )
    if cp.returncode != 0:
        raise DstError(
            f"{path} has no nbd I/O engine (it was built without libnbd); install Debian's "
            "fio package (apt-get install fio), which has it"
        )
    return path


DIR_PREFIX = "dst-bench-"
OWNER_FILE = "owner.pid"


def bench_dir() -> Path:
    """A fresh private directory on /dev/shm (memory), or the default temp dir without it.

    A run that was SIGKILLed could not remove its directory, and on /dev/shm its backing file
    holds memory: such leftovers (their owner process is gone) are removed first.
    """
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    _remove_orphans(where)
    d = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=where))
    (d / OWNER_FILE).write_text(f"{os.getpid()}\n")
    return d


def _remove_orphans(where: Path) -> None:
    for d in where.glob(f"{DIR_PREFIX}*"):
        try:
            pid = int((d / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue  # not ours, or just being made
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def precondition(path: Path, size: int) -> None:
    """Write the whole backing file once with non-zero data, so no read lands in a hole."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, MiB)
            f.write(chunk[:n])
            left -= n


def machine() -> dict[str, object]:
    """Where the numbers were taken: they mean little without it."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "cpus": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def tool_version(args: Sequence[str]) -> str | None:
    """First line of `TOOL --version`, or None when the tool is missing."""
    if shutil.which(args[0]) is None:
        return None
    try:
        cp = subprocess.run(list(args), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (cp.stdout or cp.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def run_fio(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run fio to completion (or kill it); returns its status and last stderr line."""
    proc: subprocess.Popen[str] | None = None
    try:
        with deferred_signals():
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        assert proc is not None
        _kill_group(proc)
        proc.communicate()
        return -1, f"fio did not finish within {timeout:g} s and was killed"
    finally:
        if proc is not None and proc.poll() is None:  # interrupted: never leave fio behind
            _kill_group(proc)
            proc.wait()
    lines = [ln for ln in (err + out).splitlines() if ln.strip()]
    return proc.returncode, (lines[-1].strip() if lines else "")


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL fio and the job processes it forked (its session's process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_job(t: RunningTarget, job: Job, cfg: BenchConfig, ws: Workspace, tag: str) -> Cell:
    """One fio job against a running target, with the target's CPU over the same interval."""
    name = t.spec.name
    try:
        t.check_alive()
    except StartError as exc:
        return Cell(name, job, error=str(exc))
    out = ws.dir / f"{tag}-{job.name}.json"
    cmd = fio_command(cfg.fio, job, t.uri, cfg.runtime_s, out)
    cpu0 = [cpu_seconds([s.pid]) for s in t.servers]
    status, last = run_fio(cmd, cfg.runtime_s + FIO_GRACE_S)
    cpu1 = [cpu_seconds([s.pid]) for s in t.servers]
    text = out.read_text(errors="replace") if out.exists() else ""
    with contextlib.suppress(OSError):
        out.unlink()
    if status != 0:
        dead = "" if all(s.alive() for s in t.servers) else f"; {t.last_words()}"
        return Cell(name, job, error=f"fio exited with status {status}: {last}{dead}")
    try:
        res = parse_fio_json(text, job)
    except FioError as exc:
        return Cell(name, job, error=str(exc))
    if res.runtime_s <= 0:
        return Cell(name, job, fio=res)
    split = tuple(
        (s.name, (b - a) / res.runtime_s * 100.0)
        for s, a, b in zip(t.servers, cpu0, cpu1, strict=True)
    )
    return Cell(
        name, job, fio=res, server_cpu_pct=sum(pct for _, pct in split), server_cpu_split=split
    )


def describe(c: Cell) -> str:
    if c.fio is None:
        return f"error: {c.error}"
    cpu = f"{c.server_cpu_pct:.0f}%" if c.server_cpu_pct is not None else "?"
    if len(c.server_cpu_split) > 1:
        cpu += " (" + ", ".join(f"{n} {p:.0f}%" for n, p in c.server_cpu_split) + ")"
    return (
        f"{c.fio.mb_s:9.1f} MB/s {c.fio.iops:10.0f} IOPS  p99 {c.fio.p99_us:8.0f} us  "
        f"server CPU {cpu}"
    )


def run_suite(cfg: BenchConfig, progress: Progress) -> BenchReport:
    """Measure every target in turn; a target that fails is reported, never fatal.

    Every process is stopped and the directory removed on the way out, also on Ctrl-C.
    """
    fio = check_fio(cfg.fio)
    cfg = BenchConfig(cfg.targets, cfg.jobs, cfg.runtime_s, cfg.size, fio, cfg.ready_timeout)
    report = BenchReport(
        cfg,
        {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "versions": {
                "fio": tool_version([fio, "--version"]),
                "nbdkit": tool_version(["nbdkit", "--version"]),
                "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
                "python": sys.version.split()[0],
            },
            "runtime_s": cfg.runtime_s,
            "size_bytes": cfg.size,
            "backing": "one file on /dev/shm, written once in full before the first target",
        },
    )
    load = os.getloadavg()[0]
    report.meta["loadavg_at_start"] = round(load, 2)
    if load > 0.5:
        progress(
            f"warning: the machine is busy (load average {load:.2f}); other work "
            "competes for the cores and the numbers will be noisy"
        )
    root = bench_dir()
    try:
        image = root / "backing.img"
        progress(f"writing the {cfg.size // MiB} MiB backing file {image}")
        precondition(image, cfg.size)
        ws = Workspace(root, image, cfg.size, cfg.ready_timeout)
        for i, spec in enumerate(cfg.targets, 1):
            _run_target(report, spec, f"t{i}", ws, progress)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report


def _run_target(
    report: BenchReport, spec: TargetSpec, tag: str, ws: Workspace, progress: Progress
) -> None:
    cfg = report.config
    run = TargetRun(spec)
    report.targets.append(run)
    progress(f"{spec.name}: starting ({spec.description})")
    t0 = time.monotonic()
    try:
        t = start_target(spec, tag, ws)
    except StartError as exc:
        run.error = str(exc)
        progress(f"{spec.name}: error: {exc}")
        report.cells.extend(Cell(spec.name, j, error=run.error) for j in cfg.jobs)
        return
    try:
        run.commands, run.uri = t.commands, t.uri
        progress(f"{spec.name}: ready in {time.monotonic() - t0:.1f} s on {t.uri}")
        for job in cfg.jobs:
            cell = run_job(t, job, cfg, ws, tag)
            report.cells.append(cell)
            progress(f"{spec.name:>14}  {job.label:<20} {describe(cell)}")
    finally:
        t.stop()
