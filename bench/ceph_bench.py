"""fio on one Ceph RBD image: `dst export rbd:` behind `dst attach --nbd` next to qemu-nbd.

One run, one machine, one image, the same fio jobs (``dst.bench.jobs``: 1 MiB sequential
read/write at QD8, 4 KiB random read/write at QD32, time based) for every target, the
targets taking turns (round 1 in one order, round 2 in the other, and so on):

- ``qemu-nbd``: ``qemu-nbd -f raw --persistent --shared=8 rbd:POOL/IMAGE:conf=...``, one
  NBD hop to librbd (the way Ceph storage is usually put behind NBD);
- ``dst``: ``dst attach --nbd`` in front of ``dst export rbd:POOL/IMAGE``, an NBD hop plus
  a DST-protocol hop (resends, checksums) to librbd;
- ``librbd``: fio's own ``rbd`` engine, no NBD and no server: what librbd and the cluster
  give on this machine, the floor under both.

The cluster is the tests' one-node cluster (``tests/ceph.py``: one mon, one memstore
OSD, a pool of one replica, on loopback) unless ``--conf`` names another one. The image
(default 256 MiB) is written in full with random data first, so no read finds a hole.
Server CPU is user + system of the target's own processes (qemu-nbd; dst export + dst
attach), Ceph CPU that of ceph-osd + ceph-mon (only when the script started them), both
over the job's runtime, as % of one core.

Needs fio (with its nbd and rbd engines), qemu-nbd with qemu-block-extra, and Ceph
(``scripts/dev env`` installs them). Run:
``.venv/bin/python bench/ceph_bench.py [--size 256M] [--runtime 5] [--rounds 2]
[--json FILE]``. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.ceph

from dst.bench.jobs import JOBS, FioError, FioResult, Job, fio_command, parse_fio_json
from dst.bench.procs import ServerProcess, cpu_seconds
from dst.units import parse_size

DST = [sys.executable, "-m", "dst"]
TARGETS = ("qemu-nbd", "dst", "librbd")
DEFAULT_JOBS = ("seq-read", "seq-write", "rand-read-qd32", "rand-write-qd32")
MiB = 1 << 20


@dataclass
class Where:
    """The cluster and image every target serves."""

    conf: Path
    pool: str
    image: str
    ceph_pids: list[int] = field(default_factory=list)


@dataclass
class Target:
    """One running target: how fio reaches it and whose CPU it costs."""

    name: str
    engine: list[str]
    pids: list[int]
    commands: list[str]


def say(text: str) -> None:
    print(f"ceph_bench: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def started(name: str, w: Where, work: Path) -> Iterator[Target]:
    """Start one target on the image; stop it (and release the image) afterwards."""
    servers: list[ServerProcess] = []
    try:
        if name == "qemu-nbd":
            sock = work / "q.sock"
            q = ServerProcess(
                "qemu-nbd",
                ["qemu-nbd", "-f", "raw", "-k", str(sock), "--persistent", "--shared=8",
                 f"rbd:{w.pool}/{w.image}:conf={w.conf}"],
                work / "qemu-nbd.log",
            )  # fmt: skip
            servers.append(q)
            q.wait_for_socket(sock, 60)
            yield Target(name, [f"--uri=nbd+unix:///?socket={sock}"], [q.pid], [" ".join(q.args)])
        elif name == "dst":
            esock, nsock = work / "e.sock", work / "n.sock"
            spec = f"rbd:{w.pool}/{w.image}?conf={w.conf}"
            e = ServerProcess(
                "dst export", [*DST, "export", "--listen", f"unix:{esock}", spec], work / "e.log"
            )
            servers.append(e)
            e.wait_for_line(r"listening on ", 60, "listening")
            a = ServerProcess(
                "dst attach",
                [*DST, "attach", f"dst+unix:///default?socket={esock}", "--nbd", f"unix:{nsock}"],
                work / "a.log",
            )
            servers.append(a)
            a.wait_for_line(r"serving NBD on ", 60, "serving NBD")
            yield Target(
                name,
                [f"--uri=nbd+unix:///?socket={nsock}"],
                [e.pid, a.pid],
                [" ".join(e.args), " ".join(a.args)],
            )
        else:
            engine = [
                "--ioengine=rbd",
                "--clientname=admin",
                f"--pool={w.pool}",
                f"--rbdname={w.image}",
            ]
            yield Target(name, engine, [], [f"fio {' '.join(engine)} (CEPH_CONF={w.conf})"])
    finally:
        for s in reversed(servers):
            s.stop()


def run_fio(fio: str, job: Job, t: Target, runtime: float, out: Path, conf: Path) -> FioResult:
    if t.engine[0].startswith("--uri="):
        args = fio_command(fio, job, t.engine[0][len("--uri=") :], runtime, out)
    else:
        args = fio_command(fio, job, "x", runtime, out)
        args = [a for a in args if not a.startswith(("--ioengine=", "--uri="))] + t.engine
    env = {**os.environ, "CEPH_CONF": str(conf)}
    cp = subprocess.run(args, capture_output=True, text=True, timeout=runtime + 120, env=env)
    if cp.returncode != 0:
        raise FioError(f"fio exited {cp.returncode}: {cp.stderr.strip()[-300:]}")
    return parse_fio_json(out.read_text(), job)


def measure(
    fio: str, jobs: list[Job], t: Target, w: Where, runtime: float, work: Path, rnd: int
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for job in jobs:
        s0, c0 = cpu_seconds(t.pids) if t.pids else 0.0, cpu_seconds(w.ceph_pids)
        try:
            r = run_fio(fio, job, t, runtime, work / f"{t.name}-{job.name}-{rnd}.json", w.conf)
        except (FioError, subprocess.TimeoutExpired) as exc:
            out[job.name] = {"error": str(exc)}
            say(f"  {t.name} {job.name}: error: {exc}")
            continue
        server = (cpu_seconds(t.pids) - s0) / r.runtime_s * 100 if t.pids else None
        ceph = (cpu_seconds(w.ceph_pids) - c0) / r.runtime_s * 100 if w.ceph_pids else None
        out[job.name] = {
            "mb_s": r.mb_s,
            "iops": r.iops,
            "p99_us": r.p99_us,
            "server_cpu_pct": server,
            "ceph_cpu_pct": ceph,
            "fio_cpu_pct": r.fio_cpu_pct,
        }
        say(
            f"  round {rnd} {t.name} {job.name}: {r.mb_s:.0f} MB/s, {r.iops:.0f} IOPS, "
            f"p99 {r.p99_us:.0f} µs, server CPU {server or 0:.0f}%, Ceph CPU {ceph or 0:.0f}%"
        )
    return out


def median(rounds: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rounds if "error" not in r and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "us":
        return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def table(jobs: list[Job], targets: list[str], res: dict[str, dict[str, list[Any]]]) -> str:
    lines = [
        "| job | target | MB/s | IOPS | p99 | server CPU % | CPU µs/op | Ceph CPU % | / qemu-nbd |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for job in jobs:
        base = median(res.get("qemu-nbd", {}).get(job.name, []), "iops")
        for t in targets:
            rounds = res.get(t, {}).get(job.name, [])
            iops = median(rounds, "iops")
            if iops is None:
                lines.append(f"| {job.label} | {t} | error | | | | | | |")
                continue
            cpu = median(rounds, "server_cpu_pct")
            per_op = None if cpu is None else cpu / 100 / iops * 1e6
            ratio = f"**{iops / base:.2f}**" if base and t != "qemu-nbd" else ""
            lines.append(
                f"| {job.label} | {t} | {fmt(median(rounds, 'mb_s'))} | {fmt(iops)} | "
                f"{fmt(median(rounds, 'p99_us'), 'us')} | {fmt(cpu)} | {fmt(per_op)} | "
                f"{fmt(median(rounds, 'ceph_cpu_pct'))} | {ratio} |"
            )
    return "\n".join(lines)


def fill(w: Where, size: int, work: Path) -> None:
    """Random data over the whole image (``rbd import`` of a file made in memory)."""
    src = work / "fill.raw"
    block = os.urandom(MiB)
    with open(src, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    subprocess.run(
        ["rbd", "-c", str(w.conf), "rm", "--no-progress", f"{w.pool}/{w.image}"],
        capture_output=True,
        check=False,
    )
    subprocess.run(
        ["rbd", "-c", str(w.conf), "import", "--no-progress", str(src), f"{w.pool}/{w.image}"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    src.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256M", help="image size (default 256M)")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per job (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="turns per target (default 2)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets")
    ap.add_argument("--jobs", default=",".join(DEFAULT_JOBS), help="comma-separated jobs")
    ap.add_argument("--conf", help="an existing cluster's ceph.conf (default: start one)")
    ap.add_argument("--pool", default="rbd", help="pool of the image (default rbd)")
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    a = ap.parse_args()
    fio = shutil.which("fio")
    missing = [t for t in ("fio", "qemu-nbd", "rbd") if shutil.which(t) is None]
    if missing or fio is None:
        say(f"needs {', '.join(missing)}: run scripts/dev env (it installs fio, qemu, Ceph)")
        return 2
    by_name = {j.name: j for j in JOBS}
    jobs = [by_name[n] for n in a.jobs.split(",")]
    targets = [t for t in a.targets.split(",") if t]
    if any(t not in TARGETS for t in targets) or a.rounds < 1:
        say(f"choose targets from {','.join(TARGETS)} and at least one round")
        return 2
    size = parse_size(a.size)
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="dst-cephbench-", dir="/tmp"))
    cluster = None
    results: dict[str, dict[str, list[Any]]] = {t: {} for t in targets}
    commands: dict[str, list[str]] = {}
    try:
        if a.conf:
            w = Where(Path(a.conf), a.pool, f"dst-bench-{os.getpid()}")
        else:
            from tests import ceph

            why = ceph.missing()
            if why:
                say(why)
                return 2
            say("starting a one-node Ceph cluster")
            cluster = ceph.start(store_bytes=max(2 << 30, 4 * size))
            w = Where(cluster.conf, cluster.pool, "bench", [p.pid for _, p in cluster.daemons])
        say(f"writing {a.size} of random data to {w.pool}/{w.image}")
        fill(w, size, work)
        for rnd in range(1, a.rounds + 1):
            order = targets if rnd % 2 else list(reversed(targets))
            for name in order:
                with started(name, w, work) as t:
                    commands[name] = t.commands
                    for job, r in measure(fio, jobs, t, w, a.runtime, work, rnd).items():
                        results[name].setdefault(job, []).append(r)
        subprocess.run(
            ["rbd", "-c", str(w.conf), "rm", "--no-progress", f"{w.pool}/{w.image}"],
            capture_output=True,
            check=False,
        )
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    versions = {
        "fio": subprocess.run([fio, "--version"], capture_output=True, text=True).stdout.strip(),
        "qemu-nbd": subprocess.run(["qemu-nbd", "--version"], capture_output=True, text=True)
        .stdout.splitlines()[0]
        .strip(),
        "ceph": subprocess.run(["ceph", "--version"], capture_output=True, text=True)
        .stdout.strip()
        .split(" (")[0],
    }
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
        "size": a.size,
        "runtime_s": a.runtime,
        "rounds": a.rounds,
        "loadavg_at_start": load,
        "cluster": a.conf or "one-node test cluster (tests/ceph.py)",
    }
    print(
        f"{meta['date']}, kernel {meta['kernel']}, {meta['cpus']} CPUs, {versions['fio']}, "
        f"{versions['qemu-nbd']}, {versions['ceph']}, {a.size} image, {a.runtime:g} s per job, "
        f"median of {a.rounds} rounds, load average {load:.2f} at the start\n"
    )
    print(table(jobs, targets, results))
    if a.json:
        Path(a.json).write_text(
            json.dumps({"meta": meta, "results": results, "commands": commands}, indent=2)
        )
    ok = all("error" not in r for t in results.values() for rs in t.values() for r in rs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
