"""Measure where AEAD and checksum work should run: inline, on threads, or on processes.

First it asks whether each primitive releases the GIL: one call on a 16 MiB
buffer runs in a second thread while the main thread spins and records its
longest stall.  A primitive that holds the GIL stalls the main thread for the
whole call; one that releases it does not stall it at all.

Then, for 1 MiB, 64 KiB and 4 KiB buffers it times AES-256-GCM and
ChaCha20-Poly1305 seal/open (``cryptography``) and the crc32c, xxh3, blake2b
and sha256 checksums (best of 3 interleaved runs, since other work on the host
only ever makes a run slower):

- ``inline``: one thread, calling the primitive in a loop;
- ``raw2``: two plain threads, each looping over its own buffer (parallelism
  with no hand-off: ~2x when the GIL is released and two cores are free);
- ``thr2``: a ThreadPoolExecutor with 2 threads, one job per buffer, submitted
  from the main thread in batches (the hand-off cost is included);
- ``proc2``: a ProcessPoolExecutor with 2 processes (spawn); buffers live in a
  multiprocessing.shared_memory block, jobs carry offsets only and AEAD output
  is written into shared memory with ``encrypt_into``/``decrypt_into``;
- ``proc2+cp``: the same, plus the parent copying each input into shared
  memory and each output back out (what it costs when buffers are not already
  allocated in shared memory).

Last it times hand-offs from an asyncio event loop (``run_in_executor`` of a
no-op) for each pool kind, one at a time and 64 at once: the round-trip latency
and the CPU the loop thread itself spends per hand-off, and derives the buffer
size below which the work costs the loop less inline than handing it over.  Run: ``.venv/bin/python bench/crypto_workers.py [--quick]``.
Results and the recommendation: docs/crypto-measurements.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from multiprocessing.shared_memory import SharedMemory

import cryptography
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from dst.crypto.aead import get_cipher
from dst.crypto.checksums import get_checksum

KIB = 1024
MIB = 1024 * KIB
SIZES = (MIB, 64 * KIB, 4 * KIB)
AEADS = ("aes-256-gcm", "chacha20-poly1305")
SUMS = ("crc32c", "xxh3", "blake2b", "sha256")
OPS = tuple(f"{a} {d}" for a in AEADS for d in ("seal", "open")) + SUMS
TAG = 16
KEY = bytes(range(32))
NONCE = bytes(12)  # fixed: this is a benchmark, never reuse a nonce for real
AAD = b"\x00\x00\x10\x10"
BATCH = {MIB: 16, 64 * KIB: 32, 4 * KIB: 64}  # jobs in flight per batch (and shm slots)
SLOT = MIB + TAG

Job = Callable[[memoryview, memoryview], object]


def make_op(op: str) -> Job:
    """A function (input, output) -> result doing one unit of ``op`` work."""
    if op == "control":
        return lambda src, dst: src.obj.count(b"\x01\x02\x03\x04\x05")  # type: ignore[attr-defined]
    if op in SUMS:
        compute = get_checksum(op).compute
        return lambda src, dst: compute(src)
    name, direction = op.split()
    prim = AESGCM(KEY) if name == "aes-256-gcm" else ChaCha20Poly1305(KEY)
    if direction == "seal":
        return lambda src, dst: prim.encrypt_into(NONCE, src, AAD, dst)
    return lambda src, dst: prim.decrypt_into(NONCE, src, AAD, dst)


def io_sizes(op: str, size: int) -> tuple[int, int]:
    """Bytes read and written by one job on a ``size``-byte payload."""
    if op.endswith("seal"):
        return size, size + TAG
    if op.endswith("open"):
        return size + TAG, size
    return size, 0


def make_input(op: str, size: int) -> bytes:
    plain = os.urandom(size)
    if op.endswith("open"):
        prim = AESGCM(KEY) if op.startswith("aes") else ChaCha20Poly1305(KEY)
        return prim.encrypt(NONCE, plain, AAD)
    return plain


# ---- process workers -------------------------------------------------------

_SHM: SharedMemory | None = None
_OPS: dict[str, Job] = {}


def _init_worker(shm_name: str) -> None:
    global _SHM
    _SHM = SharedMemory(name=shm_name)
    _OPS.update({op: make_op(op) for op in OPS})


def _work(op: str, slot: int, n_in: int, n_out: int) -> int:
    assert _SHM is not None and _SHM.buf is not None
    base = 2 * slot * SLOT
    with _SHM.buf[base : base + n_in] as src, _SHM.buf[base + SLOT : base + SLOT + n_out] as d:
        _OPS[op](src, d)
    return n_out


def _noop() -> None:
    return None


# ---- measurements ----------------------------------------------------------


def timed(budget: float, step: Callable[[], int]) -> float:
    """Run ``step`` (returns bytes processed) until ``budget`` seconds pass; bytes/s."""
    step()  # warm up
    done = 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < budget:
        done += step()
    return done / elapsed


def bench_inline(op: str, size: int, budget: float) -> float:
    fn, src = make_op(op), make_input(op, size)
    out = bytearray(io_sizes(op, size)[1])
    reps = max(1, (4 * MIB) // size)

    def step() -> int:
        for _ in range(reps):
            fn(memoryview(src), memoryview(out))
        return reps * size

    return timed(budget, step)


def bench_raw_threads(op: str, size: int, budget: float) -> float:
    """Two plain threads, each looping over its own buffer: parallelism without hand-off."""
    totals = [0, 0]

    def loop(i: int) -> None:
        fn, src = make_op(op), make_input(op, size)
        out = bytearray(io_sizes(op, size)[1])
        reps = max(1, (4 * MIB) // size)
        end = time.perf_counter() + budget
        while time.perf_counter() < end:
            for _ in range(reps):
                fn(memoryview(src), memoryview(out))
            totals[i] += reps * size

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(totals) / (time.perf_counter() - t0)


def bench_threads(pool: ThreadPoolExecutor, op: str, size: int, budget: float) -> float:
    fn, batch = make_op(op), BATCH[size]
    srcs = [make_input(op, size) for _ in range(batch)]
    outs = [bytearray(io_sizes(op, size)[1]) for _ in range(batch)]

    def step() -> int:
        futs = [
            pool.submit(fn, memoryview(s), memoryview(o)) for s, o in zip(srcs, outs, strict=True)
        ]
        wait(futs)
        for f in futs:
            f.result()
        return batch * size

    return timed(budget, step)


def bench_procs(
    pool: ProcessPoolExecutor, shm: SharedMemory, op: str, size: int, budget: float, copy: bool
) -> float:
    batch, buf = BATCH[size], shm.buf
    assert buf is not None
    n_in, n_out = io_sizes(op, size)
    src = make_input(op, size)
    sink = bytearray(n_out)
    for slot in range(batch):
        buf[2 * slot * SLOT : 2 * slot * SLOT + n_in] = src

    def step() -> int:
        futs = []
        for slot in range(batch):
            base = 2 * slot * SLOT
            if copy:
                buf[base : base + n_in] = src
            futs.append(pool.submit(_work, op, slot, n_in, n_out))
        for slot, f in enumerate(futs):
            f.result()
            if copy and n_out:
                base = 2 * slot * SLOT + SLOT
                sink[:] = buf[base : base + n_out]
        return batch * size

    return timed(budget, step)


def gil_probe(op: str, reps: int = 5) -> tuple[float, float]:
    """(call seconds, main-thread CPU seconds during the call / call seconds).

    A second thread signals the main thread, then enters one 16 MiB call.  If the
    call holds the GIL the main thread waits for it without using CPU (share ~0);
    if it releases the GIL the main thread spins through most of it (share ~1).
    The largest share over ``reps`` tries is kept: other load can only lower it.
    The ``control`` row is ``bytes.count``, a single call known to hold the GIL.
    """
    size = 16 * MIB
    fn, src = make_op(op), make_input(op, size)
    out = bytearray(io_sizes(op, size)[1])
    best, call = 0.0, float("inf")
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # GIL hand-backs after the call then cost 0.1 ms, not 5 ms
    try:
        for _ in range(reps):
            share, took = _probe_once(fn, src, out)
            best, call = max(best, share), min(call, took)
    finally:
        sys.setswitchinterval(switch)
    return call, best


def _probe_once(fn: Job, src: bytes, out: bytearray) -> tuple[float, float]:
    """(main-thread CPU share, seconds) of one call of ``fn`` in a second thread."""
    entered, done = threading.Event(), threading.Event()
    span = [0.0, 0.0]

    def run() -> None:
        entered.set()
        span[0] = time.perf_counter()
        fn(memoryview(src), memoryview(out))
        span[1] = time.perf_counter()
        done.set()

    th = threading.Thread(target=run)
    th.start()
    entered.wait()
    c0 = time.thread_time()
    while not done.is_set():
        pass
    spun = time.thread_time() - c0  # CPU time: a thread waiting for the GIL uses none
    th.join()
    return min(1.0, spun / (span[1] - span[0])), span[1] - span[0]


def handoff(pool: Executor, count: int, width: int) -> tuple[float, float]:
    """(wall seconds, loop-thread CPU seconds) per no-op hand-off, ``width`` in flight."""

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            await loop.run_in_executor(pool, _noop)
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(count // width):
            await asyncio.gather(*(loop.run_in_executor(pool, _noop) for _ in range(width)))
        n = width * (count // width)
        return (time.perf_counter() - t0) / n, (time.thread_time() - c0) / n

    best = (float("inf"), float("inf"))
    for _ in range(5):
        wall, cpu = asyncio.run(main())
        best = (min(best[0], wall), min(best[1], cpu))
    return best


# ---- report ----------------------------------------------------------------


def fmt_size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


MODES = ("inline", "raw2", "thr2", "proc2", "proc2+cp")


def measure(budget: float, reps: int) -> dict[tuple[str, int, str], float]:
    """Best-of-``reps`` bytes/s for every (operation, size, mode)."""
    rates: dict[tuple[str, int, str], float] = {}
    shm = SharedMemory(create=True, size=2 * SLOT * max(BATCH.values()))
    ctx = mp.get_context("spawn")
    try:
        with (
            ThreadPoolExecutor(2) as tpool,
            ProcessPoolExecutor(
                2, mp_context=ctx, initializer=_init_worker, initargs=(shm.name,)
            ) as ppool,
        ):
            for kind, pool, count in (("thread", tpool, 2048), ("process", ppool, 512)):
                for width in (1, 64):
                    wall, cpu = handoff(pool, count, width)
                    rates[kind, width, "wall"], rates[kind, width, "cpu"] = wall, cpu
            for _ in range(reps):
                for size in SIZES:
                    for op in OPS:
                        got = {
                            "inline": bench_inline(op, size, budget),
                            "raw2": bench_raw_threads(op, size, budget),
                            "thr2": bench_threads(tpool, op, size, budget),
                            "proc2": bench_procs(ppool, shm, op, size, budget, False),
                            "proc2+cp": bench_procs(ppool, shm, op, size, budget, True),
                        }
                        for mode, rate in got.items():
                            key = (op, size, mode)
                            rates[key] = max(rates.get(key, 0.0), rate)
    finally:
        shm.close()
        shm.unlink()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short run, noisier numbers")
    quick = ap.parse_args().quick
    budget, reps = (0.04, 1) if quick else (0.07, 3)
    started = time.perf_counter()
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"cryptography {cryptography.__version__}; load average {os.getloadavg()[0]:.2f}"
    )

    print("\n## GIL: one 16 MiB call in a second thread; share of it the main thread ran\n")
    print(f"| {'operation':<22} | {'call ms':>7} | {'share':>5} | GIL released |")
    print(f"|{'-' * 24}|{'-' * 9}|{'-' * 7}|--------------|")
    for op in (*OPS, "control"):
        call, share = gil_probe(op, 2 if quick else 5)
        verdict = "yes" if share >= 0.5 else "no"
        print(f"| {op:<22} | {call * 1e3:>7.1f} | {share:>5.2f} | {verdict:<12} |")

    rates = measure(budget, reps)
    print(
        f"\n## Throughput, MB/s of payload (best of {reps}, {budget}s per run); "
        "x = relative to inline\n"
    )
    head = (
        f"| {'operation':<22} | {'size':>6} | {'inline':>6} | {'raw2':>6} | {'x':>4} |"
        f" {'thr2':>6} | {'x':>4} | {'proc2':>6} | {'x':>4} | {'proc2+cp':>8} | {'x':>4} |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for size in SIZES:
        for op in OPS:
            r = {m: rates[op, size, m] for m in MODES}
            x = {m: r[m] / r["inline"] for m in r}
            print(
                f"| {op:<22} | {fmt_size(size):>6} | {r['inline'] / 1e6:>6.0f} |"
                f" {r['raw2'] / 1e6:>6.0f} | {x['raw2']:>4.2f} |"
                f" {r['thr2'] / 1e6:>6.0f} | {x['thr2']:>4.2f} | {r['proc2'] / 1e6:>6.0f} |"
                f" {x['proc2']:>4.2f} | {r['proc2+cp'] / 1e6:>8.0f} | {x['proc2+cp']:>4.2f} |"
            )

    print("\n## Hand-off of a no-op from an asyncio loop (run_in_executor), per job\n")
    print("| pool    | in flight | wall us | loop CPU us |")
    print("|---------|-----------|---------|-------------|")
    for kind in ("thread", "process"):
        for width in (1, 64):
            print(
                f"| {kind:<7} | {width:>9} | {rates[kind, width, 'wall'] * 1e6:>7.1f} |"
                f" {rates[kind, width, 'cpu'] * 1e6:>11.1f} |"
            )

    print("\n## Break-even size: inline work == loop CPU of one thread-pool hand-off\n")
    print(
        "| operation              | 4 KiB inline us | 64 KiB inline us | break-even, "
        "1 / 64 in flight | inline_limit |"
    )
    print(
        "|------------------------|-----------------|------------------|"
        "-----------------------------|--------------|"
    )
    for op in OPS:
        inline = rates[op, 64 * KIB, "inline"]
        one, many = (rates["thread", w, "cpu"] * inline / KIB for w in (1, 64))
        algo = op.split()[0]
        limit = (get_checksum(algo) if algo in SUMS else get_cipher(algo)).inline_limit
        print(
            f"| {op:<22} | {4 * KIB / rates[op, 4 * KIB, 'inline'] * 1e6:>15.1f} |"
            f" {64 * KIB / inline * 1e6:>16.1f} | {one:>9.0f} KiB / {many:>6.0f} KiB    |"
            f" {limit // KIB:>8} KiB |"
        )
    print(
        f"\n# load average at the end {os.getloadavg()[0]:.2f}; "
        f"total run time {time.perf_counter() - started:.1f}s"
    )


if __name__ == "__main__":
    main()
