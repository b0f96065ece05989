"""fio through the FUSE front end (loop device and the file itself) next to --nbd and the file.

One run, one machine, the same backing file and the same fio jobs for every target:

- ``file``: fio on the backing file itself (libaio, O_DIRECT): the storage alone;
- ``nbd``: ``dst export`` + ``dst attach --nbd``, fio's nbd engine (libnbd in fio);
- ``fuse-loop``: ``dst export`` + ``dst attach --fuse DIR``, ``losetup --direct-io=on
  DIR/disk``, fio on /dev/loopN (libaio, O_DIRECT): what a filesystem on top sees;
- ``fuse-loop-dio-off``: the same with ``losetup --direct-io=off``;
- ``fuse-file``: fio on DIR/disk itself (libaio, O_DIRECT).

Jobs are dst bench's (``dst.bench.jobs``): 1 MiB sequential read/write at QD8, 4 KiB
random read/write at QD32, time based. The backing file lives on /dev/shm (memory), so
the table compares the paths, not a disk. Server CPU is user + system of ``dst export``
and ``dst attach`` over the job, as % of one core (kernel loop/FUSE threads not included).

Needs root, /dev/fuse, losetup and fio. Run:
``.venv/bin/python bench/fuse_bench.py [--size 1G] [--runtime 5] [--markdown]``.
Results: docs/benchmarks-fuse.md.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dst.bench.jobs import JOBS, FioError, FioResult, Job, fio_command, parse_fio_json
from dst.bench.procs import cpu_seconds
from dst.units import parse_size

DST = [sys.executable, "-m", "dst"]
TARGETS = ("file", "nbd", "fuse-loop", "fuse-loop-dio-off", "fuse-file")
DEFAULT_JOBS = ("seq-read", "seq-write", "rand-read-qd32", "rand-write-qd32")


@dataclass
class Target:
    """Where fio points for one column, and the dst processes behind it (if any)."""

    name: str
    engine: list[str]  # fio arguments naming the engine and the file / URI
    pids: list[int] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


class Server:
    """A `dst` process whose stderr goes to a file; waits for its readiness line."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self._f = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            args, stdout=self._f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            m = re.search(pattern, text)
            if m:
                return m
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{' '.join(self.args)} did not print {pattern!r}:\n{text}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._f.close()


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120).stdout


def make_backing_file(path: Path, size: int) -> None:
    """Non-zero data everywhere, so no read lands in a hole."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.write(block[: size & ((1 << 20) - 1)])


@contextlib.contextmanager
def dst_target(
    name: str, work: Path, img: Path, extra: list[str]
) -> Iterator[tuple[Server, Server, Path]]:
    """`dst export` on the image and `dst attach` with ``extra`` front-end options."""
    d = work / name
    d.mkdir()
    exp = Server(
        [*DST, "export", "--listen", f"unix:{d / 'e.sock'}", f"file:{img}"], d / "export.log"
    )
    att: Server | None = None
    try:
        exp.wait_for(r"listening on ")
        member = f"dst+unix:///default?socket={d / 'e.sock'}"
        att = Server([*DST, "attach", member, *extra], d / "attach.log")
        att.wait_for(r"serving ")
        yield exp, att, d
    finally:
        if att is not None:
            att.stop()
        exp.stop()


def file_engine(path: str) -> list[str]:
    return [f"--filename={path}", "--ioengine=libaio", "--direct=1"]


def run_fio(fio: str, job: Job, target: Target, runtime: float, out: Path) -> FioResult:
    if target.engine[0].startswith("--uri="):
        args = fio_command(fio, job, target.engine[0][len("--uri=") :], runtime, out)
    else:
        args = [
            fio,
            f"--name={job.name}",
            *target.engine,
            f"--rw={job.rw}",
            f"--bs={job.bs}",
            f"--iodepth={job.iodepth}",
            "--numjobs=1",
            "--time_based",
            f"--runtime={max(1, round(runtime * 1000))}ms",
            "--norandommap",
            "--randrepeat=0",
            "--output-format=json",
            f"--output={out}",
        ]
    target.commands.append(" ".join(args))
    subprocess.run(args, check=True, capture_output=True, timeout=runtime + 120)
    return parse_fio_json(out.read_text(), job)


def measure(
    fio: str, jobs: list[Job], target: Target, runtime: float, work: Path
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for job in jobs:
        c0 = cpu_seconds(target.pids) if target.pids else 0.0
        try:
            r = run_fio(fio, job, target, runtime, work / f"{target.name}-{job.name}.json")
        except (FioError, subprocess.CalledProcessError) as exc:
            results[job.name] = {"error": str(exc)}
            print(f"  {job.name}: error: {exc}", file=sys.stderr)
            continue
        cpu = (cpu_seconds(target.pids) - c0) / r.runtime_s * 100 if target.pids else None
        results[job.name] = {
            "mb_s": r.mb_s,
            "iops": r.iops,
            "p99_us": r.p99_us,
            "server_cpu_pct": cpu,
        }
        print(f"  {job.name}: {r.mb_s:.0f} MB/s, {r.iops:.0f} IOPS", file=sys.stderr)
    return results


def run_target(
    name: str, fio: str, jobs: list[Job], work: Path, img: Path, runtime: float
) -> tuple[dict[str, dict[str, Any]], Target]:
    print(f"{name}:", file=sys.stderr)
    if name == "file":
        t = Target(name, file_engine(str(img)))
        return measure(fio, jobs, t, runtime, work), t
    if name == "nbd":
        with dst_target(name, work, img, ["--nbd", f"unix:{work / 'nbd.sock'}"]) as (e, a, _):
            uri = re.search(r"serving NBD on (\S+)", a.log.read_text())
            assert uri is not None
            t = Target(name, [f"--uri={uri.group(1)}"], [e.popen.pid, a.popen.pid])
            t.commands += [" ".join(e.args), " ".join(a.args)]
            return measure(fio, jobs, t, runtime, work), t
    mnt = work / f"{name}-mnt"
    mnt.mkdir()
    with dst_target(name, work, img, ["--fuse", str(mnt)]) as (e, a, _):
        pids = [e.popen.pid, a.popen.pid]
        cmds = [" ".join(e.args), " ".join(a.args)]
        disk = str(mnt / "disk")
        if name == "fuse-file":
            t = Target(name, file_engine(disk), pids, cmds)
            return measure(fio, jobs, t, runtime, work), t
        dio = "off" if name.endswith("dio-off") else "on"
        loop = sh("losetup", f"--direct-io={dio}", "--show", "-f", disk).strip()
        try:
            cmds.append(f"losetup --direct-io={dio} --show -f {disk}")
            t = Target(name, file_engine(loop), pids, cmds)
            return measure(fio, jobs, t, runtime, work), t
        finally:
            for _ in range(50):
                if subprocess.run(["losetup", "-d", loop], check=False).returncode == 0:
                    break
                time.sleep(0.1)


def table(jobs: list[Job], targets: list[str], res: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| job | target | MB/s | IOPS | p99 latency | dst CPU (% of a core) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for job in jobs:
        for t in targets:
            r = res.get(t, {}).get(job.name, {"error": "not run"})
            if "error" in r:
                lines.append(f"| {job.label} | {t} | error | | | |")
                continue
            p99 = r["p99_us"]
            lat = f"{p99 / 1000:.2f} ms" if p99 >= 1000 else f"{p99:.0f} µs"
            cpu = "-" if r["server_cpu_pct"] is None else f"{r['server_cpu_pct']:.0f}"
            lines.append(
                f"| {job.label} | {t} | {r['mb_s']:.0f} | {r['iops']:.0f} | {lat} | {cpu} |"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="backing file size (default 1G)")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per job (default 5)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets")
    ap.add_argument("--jobs", default=",".join(DEFAULT_JOBS), help="comma-separated jobs")
    ap.add_argument("--dir", default="/dev/shm", help="where the backing file goes")
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    a = ap.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("fuse_bench: needs root and /dev/fuse (FUSE mounts, loop devices)", file=sys.stderr)
        return 2
    fio = shutil.which("fio")
    if fio is None or shutil.which("losetup") is None:
        print("fuse_bench: needs fio and losetup: apt-get install fio util-linux", file=sys.stderr)
        return 2
    by_name = {j.name: j for j in JOBS}
    jobs = [by_name[n] for n in a.jobs.split(",")]
    targets = [t for t in a.targets.split(",") if t]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        print(f"fuse_bench: unknown targets {bad}; choose from {TARGETS}", file=sys.stderr)
        return 2
    size = parse_size(a.size)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(
            f"fuse_bench: load average {load:.2f} at the start: numbers may be low", file=sys.stderr
        )
    work = Path(tempfile.mkdtemp(prefix="dst-fusebench-", dir=a.dir))
    results: dict[str, dict[str, Any]] = {}
    commands: dict[str, list[str]] = {}
    try:
        img = work / "backing.img"
        print(f"writing a {a.size} backing file in {work}", file=sys.stderr)
        make_backing_file(img, size)
        for name in targets:
            try:
                results[name], t = run_target(name, fio, jobs, work, img, a.runtime)
                commands[name] = t.commands
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                print(f"  {name}: could not start: {exc}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "fio": subprocess.run([fio, "--version"], capture_output=True, text=True).stdout.strip(),
        "size": a.size,
        "runtime_s": a.runtime,
        "loadavg_at_start": load,
    }
    print(
        f"{meta['date']}, kernel {meta['kernel']}, {meta['cpus']} CPUs, {meta['fio']}, "
        f"{a.size} backing file on {a.dir}, {a.runtime:g} s per job, "
        f"load average {load:.2f} at the start\n"
    )
    print(table(jobs, targets, results))
    if a.json:
        Path(a.json).write_text(
            json.dumps({"meta": meta, "results": results, "commands": commands}, indent=2)
        )
    return 0 if all("error" not in r for t in results.values() for r in t.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
