"""Measure where AEAD and checksum work should run: inline, on threads, or on processes.

For 1 MiB, 64 KiB and 4 KiB buffers it times AES-256-GCM and ChaCha20-Poly1305
seal/open (``cryptography``) and the crc32c, xxh3, blake2b and sha256 checksums:

- ``inline``: one thread, calling the primitive in a loop;
- ``thr2``: a ThreadPoolExecutor with 2 threads, one job per buffer, submitted
  from the main thread in batches (the hand-off cost is included);
- ``proc2``: a ProcessPoolExecutor with 2 processes (spawn); buffers live in a
  multiprocessing.shared_memory block, jobs carry offsets only and AEAD output
  is written into shared memory with ``encrypt_into``/``decrypt_into``;
- ``proc2+cp``: the same, plus the parent copying each input into shared
  memory and each output back out (what it costs when buffers are not already
  allocated in shared memory).

It then times a hand-off from an asyncio event loop (``run_in_executor`` of a
no-op) for each pool kind: the round-trip latency and the CPU the loop thread
itself spends per hand-off, and derives the buffer size below which work is
cheaper inline.  Run: ``.venv/bin/python bench/crypto_workers.py [--quick]``.
Results and the recommendation: docs/crypto-measurements.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from multiprocessing.shared_memory import SharedMemory

import cryptography
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

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
BATCH = {MIB: 8, 64 * KIB: 32, 4 * KIB: 64}  # jobs in flight per batch (and shm slots)
SLOT = MIB + TAG

Job = Callable[[memoryview, memoryview], object]


def make_op(op: str) -> Job:
    """A function (input, output) -> result doing one unit of ``op`` work."""
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
    assert _SHM is not None
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


def bench_threads(pool: ThreadPoolExecutor, op: str, size: int, budget: float) -> float:
    fn, batch = make_op(op), BATCH[size]
    srcs = [make_input(op, size) for _ in range(batch)]
    outs = [bytearray(io_sizes(op, size)[1]) for _ in range(batch)]

    def step() -> int:
        futs = [pool.submit(fn, memoryview(s), memoryview(o)) for s, o in zip(srcs, outs)]
        wait(futs)
        for f in futs:
            f.result()
        return batch * size

    return timed(budget, step)


def bench_procs(
    pool: ProcessPoolExecutor, shm: SharedMemory, op: str, size: int, budget: float, copy: bool
) -> float:
    batch = BATCH[size]
    n_in, n_out = io_sizes(op, size)
    src = make_input(op, size)
    sink = bytearray(n_out)
    for slot in range(batch):
        shm.buf[2 * slot * SLOT : 2 * slot * SLOT + n_in] = src

    def step() -> int:
        futs = []
        for slot in range(batch):
            base = 2 * slot * SLOT
            if copy:
                shm.buf[base : base + n_in] = src
            futs.append(pool.submit(_work, op, slot, n_in, n_out))
        for slot, f in enumerate(futs):
            f.result()
            if copy and n_out:
                base = 2 * slot * SLOT + SLOT
                sink[:] = shm.buf[base : base + n_out]
        return batch * size

    return timed(budget, step)


def handoff(pool: Executor, count: int) -> tuple[float, float]:
    """(round-trip seconds, loop-thread CPU seconds) per no-op hand-off from asyncio."""

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            await loop.run_in_executor(pool, _noop)
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(count):
            await loop.run_in_executor(pool, _noop)
        return (time.perf_counter() - t0) / count, (time.thread_time() - c0) / count

    return asyncio.run(main())


# ---- report ----------------------------------------------------------------


def fmt_size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs, noisier numbers")
    budget = 0.05 if ap.parse_args().quick else 0.15
    started = time.perf_counter()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, cryptography {cryptography.__version__}")
    print(f"# MB/s (10^6 bytes of payload per second); budget {budget}s per cell\n")

    rates: dict[tuple[str, int, str], float] = {}
    shm = SharedMemory(create=True, size=2 * SLOT * max(BATCH.values()))
    ctx = mp.get_context("spawn")
    try:
        with ThreadPoolExecutor(2) as tpool, ProcessPoolExecutor(
            2, mp_context=ctx, initializer=_init_worker, initargs=(shm.name,)
        ) as ppool:
            for size in SIZES:
                for op in OPS:
                    rates[op, size, "inline"] = bench_inline(op, size, budget)
                    rates[op, size, "thr2"] = bench_threads(tpool, op, size, budget)
                    rates[op, size, "proc2"] = bench_procs(ppool, shm, op, size, budget, False)
                    rates[op, size, "proc2+cp"] = bench_procs(ppool, shm, op, size, budget, True)
            t_rt, t_cpu = handoff(tpool, 2000)
            p_rt, p_cpu = handoff(ppool, 500)
    finally:
        shm.close()
        shm.unlink()

    head = f"| {'operation':<22} | {'size':>7} | {'inline':>7} | {'thr2':>7} | {'x':>4} |" \
           f" {'proc2':>7} | {'x':>4} | {'proc2+cp':>8} | {'x':>4} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for size in SIZES:
        for op in OPS:
            r = {m: rates[op, size, m] for m in ("inline", "thr2", "proc2", "proc2+cp")}
            x = {m: r[m] / r["inline"] for m in r}
            print(f"| {op:<22} | {fmt_size(size):>7} | {r['inline'] / 1e6:>7.0f} |"
                  f" {r['thr2'] / 1e6:>7.0f} | {x['thr2']:>4.2f} | {r['proc2'] / 1e6:>7.0f} |"
                  f" {x['proc2']:>4.2f} | {r['proc2+cp'] / 1e6:>8.0f} | {x['proc2+cp']:>4.2f} |")

    print("\n# hand-off of a no-op from an asyncio loop (run_in_executor)")
    print(f"thread pool : round trip {t_rt * 1e6:6.1f} us, loop CPU {t_cpu * 1e6:6.1f} us")
    print(f"process pool: round trip {p_rt * 1e6:6.1f} us, loop CPU {p_cpu * 1e6:6.1f} us")
    print("\n# break-even size: inline time of the work == loop CPU per hand-off")
    for op in OPS:
        inline = rates[op, 64 * KIB, "inline"]  # bytes/s, in the size range that matters
        print(f"{op:<22} thread {t_cpu * inline / KIB:7.1f} KiB   "
              f"process {p_cpu * inline / KIB:7.1f} KiB   "
              f"(4 KiB inline {4 * KIB / rates[op, 4 * KIB, 'inline'] * 1e6:5.1f} us)")
    print(f"\n# total run time {time.perf_counter() - started:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
