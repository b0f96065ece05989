"""The driver's sending: small output leaves with its loop iteration's, large at once."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from dst.aio.driver import SEND_AT_ONCE, CoreDriver
from dst.proto.jobs import Job


class QueueCore:
    """A core that only sends what the test queues on it."""

    def __init__(self) -> None:
        self.out: list[Any] = []
        self._buf = bytearray(4096)

    def connection_made(self, now: float) -> None: ...
    def connection_lost(self, now: float) -> None: ...
    def get_buffer(self) -> memoryview:
        return memoryview(self._buf)

    def buffer_updated(self, nbytes: int, now: float) -> None: ...
    def next_event(self) -> object | None:
        return None

    def data_to_send(self) -> list[Any]:
        out, self.out = self.out, []
        return out

    def take_handed(self) -> list[Callable[[], None]]:
        return []

    def take_jobs(self) -> list[Job]:
        return []

    def job_done(self, job: Job, now: float) -> None: ...
    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None: ...


def pending(sock: socket.socket) -> int:
    """Bytes waiting on ``sock`` now, without waiting."""
    total = 0
    while True:
        try:
            got = sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return total
        total += len(got)


def test_a_large_reply_leaves_at_once_a_small_one_with_its_iteration() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        core = QueueCore()
        driver: CoreDriver[object] = CoreDriver(core, lambda ev: None, name="test")
        driver.attach(a)
        driver.start()
        try:
            core.out.append(b"s" * 4096)
            driver.queued(4096)
            assert pending(b) == 0  # not yet: it waits for the others of this iteration
            await asyncio.sleep(0)
            assert pending(b) == 4096
            core.out.append(b"L" * SEND_AT_ONCE)
            driver.queued(SEND_AT_ONCE)
            assert pending(b) == SEND_AT_ONCE  # sent before this callback returned
        finally:
            driver.close()
            b.close()
            await driver.aclose()

    asyncio.run(main())
