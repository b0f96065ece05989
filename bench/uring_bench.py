"""Uncached file reads from an asyncio loop: io_uring against the worker pool DST uses.

DST's file backend serves a read inline when the page cache has it and otherwise hands
it to a thread pool (``dst.backends.device``: ``run_in_executor`` on 8 threads). This
measures whether an io_uring ring driven from the same loop would serve the reads that
do reach the disk better. Every method reads the same file through the same driver: a
fixed number of requests kept in flight (the queue depth), each one's completion a
callback on the loop that records its latency and starts the next.

- ``pool``: ``loop.run_in_executor`` of ``os.preadv`` on a ThreadPoolExecutor of DST's
  size, the future's done callback as the completion (the least a pool costs);
- ``dst``: DST's own path, ``BackendDevice.start_read`` over ``FileBackend`` (an
  ``RWF_NOWAIT`` try that misses, then a task that awaits the pool); buffered mode only,
  since DST does not open files with ``O_DIRECT``;
- ``pool32``: the same with 32 threads (``--methods``; not DST's size), so that the disk
  sees as many requests at QD32 as the ring gives it;
- ``uring``: one ring (``liburing``, the Cython binding), its eventfd on
  ``loop.add_reader``; requests started in one loop iteration go to the kernel in one
  ``io_uring_submit`` (``call_soon``), completions are reaped in a batch per wake-up;
- ``inline``: ``os.preadv`` on the loop thread itself, blocking it (QD1 only: the floor
  of one synchronous read, not an option for a server).

Two ways to keep the pages uncached: ``direct`` opens the file with ``O_DIRECT`` (the
page cache is bypassed); ``buffered`` opens it normally and drops the file's pages with
``posix_fadvise(POSIX_FADV_DONTNEED)`` before every run, as DST's reads of a cold file
would see it; a 1 MiB sequential run stops before it wraps round the file. The file
must be on a disk-backed filesystem (not tmpfs: there nothing blocks).

Each round runs every method once per workload, in a rotated order; the table gives
medians and ranges over the rounds and the paired ratio uring / pool of each round.
Ops/s, mean and p99 latency per read, and CPU per read: of the whole process (all
threads; io_uring's kernel workers, when any, are threads of the process) and of the
loop thread alone (the one that bounds a DST node).

Run (liburing 2024.5.3 builds from source with a C compiler, a few minutes; the newer
Zig-built wheels need a CPU with AVX-512)::

    .venv/bin/pip install liburing==2024.5.3
    .venv/bin/python bench/uring_bench.py --file /var/tmp/uring/data.img --size 4G

Results and the decision: docs/benchmarks.md, "io_uring for uncached file reads".
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import mmap
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dst.backends.device import DEFAULT_WORKERS, BackendDevice
from dst.backends.file import FileBackend, filesystem_of
from dst.cli.runtime import loop_factory
from dst.device import IoFlags
from dst.units import parse_size

try:
    import liburing as L  # type: ignore[import-untyped,import-not-found,unused-ignore]
except ImportError:  # measured without the ring; main() says why
    L = None

KiB, MiB = 1 << 10, 1 << 20
Done = Callable[[int], None]  # bytes read, or -errno


@dataclass(frozen=True)
class Workload:
    name: str
    bs: int
    qd: int
    sequential: bool


WORKLOADS = {
    "qd1": Workload("4K rand read QD1", 4 * KiB, 1, False),
    "qd32": Workload("4K rand read QD32", 4 * KiB, 32, False),
    "seq": Workload("1M seq read QD8", MiB, 8, True),
}


class Pool:
    """``run_in_executor`` of ``os.preadv`` on DST's pool size; done from the future."""

    name = "pool"

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, path: str) -> None:
        self.loop, self.fd = loop, fd
        self.pool = concurrent.futures.ThreadPoolExecutor(DEFAULT_WORKERS, "bench-pool")

    def start(self, offset: int, view: memoryview, done: Done) -> None:
        fut = self.loop.run_in_executor(self.pool, os.preadv, self.fd, [view], offset)
        fut.add_done_callback(lambda f: done(f.result()))

    def close(self) -> None:
        self.pool.shutdown()


class Pool32(Pool):
    """The same with as many threads as requests in flight at QD32: the disk sees QD32 too."""

    name = "pool32"

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, path: str) -> None:
        self.loop, self.fd = loop, fd
        self.pool = concurrent.futures.ThreadPoolExecutor(32, "bench-pool32")


class Inline:
    """``os.preadv`` on the loop thread: the loop waits for the disk."""

    name = "inline"

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, path: str) -> None:
        self.fd = fd

    def start(self, offset: int, view: memoryview, done: Done) -> None:
        done(os.preadv(self.fd, [view], offset))

    def close(self) -> None:
        pass


class Dst:
    """DST's file backend as the export node runs it: ``BackendDevice.start_read``."""

    name = "dst"

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, path: str) -> None:
        self.backend = FileBackend.open(f"file:{path}", path, size=None, read_only=True)
        self.dev = BackendDevice(self.backend)

    def start(self, offset: int, view: memoryview, done: Done) -> None:
        n = len(view)
        self.dev.start_read(offset, view, IoFlags.NONE, lambda e: done(-5 if e else n))

    def close(self) -> None:
        self.backend.close()


class Uring:
    """One io_uring ring on the loop: eventfd -> ``add_reader`` -> batch of callbacks."""

    name = "uring"

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, path: str) -> None:
        assert L is not None
        self.loop, self.fd = loop, fd
        self.ring = L.io_uring()
        L.io_uring_queue_init(256, self.ring)
        self.cqe = L.io_uring_cqe()
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        L.io_uring_register_eventfd(self.ring, self.efd)
        loop.add_reader(self.efd, self._reap)
        self.waiting: dict[int, Done] = {}
        self.token = 0
        self.unsubmitted = 0

    def start(self, offset: int, view: memoryview, done: Done) -> None:
        self.token += 1
        sqe = L.io_uring_get_sqe(self.ring)
        L.io_uring_prep_read(sqe, self.fd, view, len(view), offset)
        L.io_uring_sqe_set_data64(sqe, self.token)
        self.waiting[self.token] = done
        if not self.unsubmitted:
            self.loop.call_soon(self._submit)
        self.unsubmitted += 1

    def _submit(self) -> None:
        self.unsubmitted = 0
        L.io_uring_submit(self.ring)

    def _reap(self) -> None:
        with contextlib.suppress(BlockingIOError):  # woken by an earlier batch's count
            os.eventfd_read(self.efd)
        ring, cqe, waiting = self.ring, self.cqe, self.waiting
        while n := L.io_uring_cq_ready(ring):
            for _ in range(n):
                L.io_uring_peek_cqe(ring, cqe)
                res, token = cqe.res, cqe.user_data
                L.io_uring_cqe_seen(ring, cqe)
                waiting.pop(token)(res)

    def close(self) -> None:
        self.loop.remove_reader(self.efd)
        L.io_uring_queue_exit(self.ring)
        os.close(self.efd)


METHODS: dict[str, Any] = {
    "pool": Pool,
    "pool32": Pool32,
    "dst": Dst,
    "uring": Uring,
    "inline": Inline,
}


@dataclass
class Run:
    ops: int
    wall_s: float
    cpu_s: float  # the process, every thread
    loop_cpu_s: float  # the loop thread
    lat_us: list[float]

    def summary(self) -> dict[str, float]:
        lat = sorted(self.lat_us)
        return {
            "ops_s": self.ops / self.wall_s,
            "mean_us": statistics.fmean(lat),
            "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "cpu_us_op": self.cpu_s / self.ops * 1e6,
            "loop_cpu_us_op": self.loop_cpu_s / self.ops * 1e6,
        }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def drive(method: Any, wl: Workload, size: int, seconds: float) -> Run:
    """Keep ``wl.qd`` reads in flight until ``seconds`` have passed; every one counted."""
    loop = asyncio.get_running_loop()
    buf = mmap.mmap(-1, wl.bs * wl.qd)  # page-aligned, as O_DIRECT wants
    views = [memoryview(buf)[i * wl.bs : (i + 1) * wl.bs] for i in range(wl.qd)]
    blocks = size // wl.bs
    finished = loop.create_future()
    lat: list[float] = []
    state = {"next": 0, "active": wl.qd, "errors": 0}
    deadline = time.perf_counter() + seconds

    def offset() -> int | None:
        if not wl.sequential:
            return random.randrange(blocks) * wl.bs
        at = state["next"]
        if at >= blocks:  # never read a block twice: it would be cached
            return None
        state["next"] = at + 1
        return at * wl.bs

    def issue(slot: int) -> None:
        while True:  # a read that completes inside start() loops here, never recursing
            off = offset() if time.perf_counter() < deadline else None
            if off is None:
                state["active"] -= 1
                if not state["active"] and not finished.done():
                    finished.set_result(None)
                return
            t0 = time.perf_counter()
            inside, again = [True], [False]

            def done(
                res: int, t0: float = t0, inside: list[bool] = inside, again: list[bool] = again
            ) -> None:
                lat.append((time.perf_counter() - t0) * 1e6)
                if res != wl.bs:
                    state["errors"] += 1
                if inside[0]:
                    again[0] = True
                else:
                    issue(slot)

            method.start(off, views[slot], done)
            inside[0] = False
            if not again[0]:
                return

    c0, l0, w0 = _cpu(), time.thread_time(), time.perf_counter()
    for slot in range(wl.qd):
        issue(slot)
    await finished
    w1, l1, c1 = time.perf_counter(), time.thread_time(), _cpu()
    for v in views:
        v.release()
    buf.close()
    if state["errors"]:
        raise RuntimeError(f"{method.name}: {state['errors']} reads failed or came back short")
    return Run(len(lat), w1 - w0, c1 - c0, l1 - l0, lat)


def cached_pages(path: str) -> str:
    """fincore's count of the file's pages in the page cache (a check that none are)."""
    try:
        cp = subprocess.run(
            ["fincore", "-nb", "-o", "RES", path], capture_output=True, text=True, check=False
        )
    except OSError:
        return "?"
    return cp.stdout.strip() or "?"


def one_run(
    kind: str, mode: str, wl: Workload, path: str, size: int, seconds: float
) -> tuple[Run, int]:
    """One method on one workload, and the file's bytes in the page cache at its start."""
    flags = os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0)
    fd = os.open(path, flags)
    try:
        if mode == "buffered":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        pages = cached_pages(path)
        cached = int(pages) if pages.isdigit() else -1

        async def main() -> Run:
            m = METHODS[kind](asyncio.get_running_loop(), fd, path)
            try:
                return await drive(m, wl, size, seconds)
            finally:
                m.close()

        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(main()), cached
    finally:
        os.close(fd)


def prepare(path: str, size: int) -> None:
    """Write the file in full once (no holes: a hole reads without the disk)."""
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def methods_for(mode: str, wl: Workload, chosen: list[str]) -> list[str]:
    """The chosen methods that make sense for this mode and workload."""
    names = ["dst", "pool", "pool32", "uring", "inline"]
    return [
        n
        for n in names
        if n in chosen
        and (n != "dst" or mode == "buffered")  # DST never opens with O_DIRECT
        and (n != "inline" or wl.qd == 1)  # deeper, it is QD1 anyway
        and (n != "pool32" or wl.qd > 8)
        and (n != "uring" or L is not None)
    ]


def fmt(values: list[float], digits: int = 0) -> str:
    med = statistics.median(values)
    return f"{med:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--file", required=True, help="a file on a disk-backed filesystem")
    ap.add_argument("--size", default="4G", help="its size (written once if missing)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", default="direct,buffered")
    ap.add_argument(
        "--workloads", default="qd1,qd32,seq", help="a subset of qd1,qd32,seq (the three above)"
    )
    ap.add_argument(
        "--methods", default="dst,pool,uring,inline", help="a subset of " + ",".join(METHODS)
    )
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    size = parse_size(ns.size, "--size")
    workloads = [WORKLOADS[k] for k in ns.workloads.split(",")]
    chosen = ns.methods.split(",")
    prepare(ns.file, size)
    probe = os.open(ns.file, os.O_RDONLY)
    fs = filesystem_of(probe)
    os.close(probe)
    if fs in ("tmpfs", "ramfs"):
        print(f"{ns.file} is on {fs}: nothing blocks there; use a disk", file=sys.stderr)
        return 2
    meta = {
        "file": ns.file,
        "filesystem": fs,
        "size": size,
        "seconds": ns.seconds,
        "rounds": ns.rounds,
        "pool_workers": DEFAULT_WORKERS,
        "liburing": getattr(L, "__version__", None) if L is not None else None,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loop": os.environ.get("DST_LOOP", "uvloop"),
        "loadavg_start": os.getloadavg(),
    }
    print(json.dumps(meta), file=sys.stderr)
    if L is None:
        print(
            "liburing is not installed, so there are no uring rows; install it with: "
            ".venv/bin/pip install liburing==2024.5.3",
            file=sys.stderr,
        )
    results: dict[str, list[dict[str, float]]] = {}
    for r in range(ns.rounds):
        for mode in ns.modes.split(","):
            for wl in workloads:
                names = methods_for(mode, wl, chosen)
                k = r % len(names)
                for kind in names[k:] + names[:k]:  # a rotated order each round
                    run, cached = one_run(kind, mode, wl, ns.file, size, ns.seconds)
                    s = run.summary()
                    s["cached_bytes_at_start"] = float(cached)
                    results.setdefault(f"{mode}|{wl.name}|{kind}", []).append(s)
                    print(
                        f"round {r + 1} {mode:8} {wl.name:18} {kind:6} {s['ops_s']:9,.0f} ops/s "
                        f"mean {s['mean_us']:8.0f} us p99 {s['p99_us']:8.0f} us "
                        f"cpu {s['cpu_us_op']:6.1f} us/op loop {s['loop_cpu_us_op']:6.1f} "
                        f"cached {cached >> 20} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
    meta["loadavg_end"] = os.getloadavg()
    print(
        "| mode | workload | method | ops/s | mean µs | p99 µs | CPU µs/op | loop CPU µs/op "
        "| ops/s uring / pool, paired |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for mode in ns.modes.split(","):
        for wl in workloads:
            for kind in methods_for(mode, wl, chosen):
                rs = results[f"{mode}|{wl.name}|{kind}"]
                ratio = ""
                pool = results.get(f"{mode}|{wl.name}|pool")
                if kind == "uring" and pool:
                    ratio = fmt([u["ops_s"] / p["ops_s"] for u, p in zip(rs, pool, strict=True)], 2)
                print(
                    f"| {mode} | {wl.name} | {kind} | {fmt([x['ops_s'] for x in rs])} | "
                    f"{fmt([x['mean_us'] for x in rs])} | {fmt([x['p99_us'] for x in rs])} | "
                    f"{fmt([x['cpu_us_op'] for x in rs], 1)} | "
                    f"{fmt([x['loop_cpu_us_op'] for x in rs], 1)} | {ratio} |"
                )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
