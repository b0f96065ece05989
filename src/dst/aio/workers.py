"""The worker pool for crypto and checksums on large payloads (``--crypto-workers N``).

Measured (docs/crypto-measurements.md): hashlib, crc32c, xxhash and
cryptography >= 50's AEAD all release the GIL, and a thread hand-off costs the
event loop 12-40 us, so threads (not processes) and only above each algorithm's
``inline_limit``.  Zero workers keeps everything inline on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable

from dst.proto.jobs import Job

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_workers = os.cpu_count() or 1


def configure(workers: int | None) -> None:
    """Set the pool size before the first job (None: one per CPU)."""
    global _workers
    _workers = (os.cpu_count() or 1) if workers is None else workers


def enabled() -> bool:
    return _workers > 0


def pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(
            max(1, _workers), thread_name_prefix="dst-crypto"
        )
    return _pool


def run_jobs(jobs: list[Job], done: Callable[[Job], None]) -> None:
    """Run each job on the pool; ``done(job)`` is called on the loop thread afterwards."""
    if not jobs:
        return
    loop = asyncio.get_running_loop()
    ex = pool()
    for job in jobs:
        fut = loop.run_in_executor(ex, job.run)
        fut.add_done_callback(_callback(job, done))


def _callback(job: Job, done: Callable[[Job], None]) -> Callable[[asyncio.Future[None]], None]:
    def call(_fut: asyncio.Future[None]) -> None:
        done(job)

    return call
