"""A tiny in-memory BlockDevice and a helper that serves it over NBD from a thread.

Test-only: the integration tests drive real NBD clients (qemu-io, nbdinfo, ...)
against :class:`dst.frontends.nbd.NbdFrontend` running on its own event loop in a
background thread, so the test body stays plain synchronous code.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from dst.device import READ, TRIM, WRITE, ZERO, BlockDevice, Buffer, Capabilities, IoFlags
from dst.errors import IoError
from dst.frontends.nbd import NbdFrontend
from dst.units import Address

START_TIMEOUT = 10.0
STOP_TIMEOUT = 20.0


class RamDevice(BlockDevice):
    """A bytearray with the device interface; counts what it was asked to do."""

    def __init__(self, size: int, capabilities: Capabilities | None = None) -> None:
        self.size = size
        self.capabilities = capabilities or Capabilities(can_trim=True)
        self.name = "ram"
        self.data = bytearray(size)
        self.calls: dict[str, int] = {"read": 0, "write": 0, "flush": 0, "trim": 0, "zero": 0}
        self.fua_writes = 0
        self.fail_reads_at: int | None = None  # an offset whose reads fail with EIO
        self.read_delay = 0.0  # seconds each read takes, to keep requests in flight

    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        self.check(READ, offset, buf.nbytes)
        self.calls["read"] += 1
        if self.read_delay:
            await asyncio.sleep(self.read_delay)
        if self.fail_reads_at is not None and offset <= self.fail_reads_at < offset + buf.nbytes:
            raise IoError(errno.EIO, f"injected read error at {self.fail_reads_at}")
        buf[:] = self.data[offset : offset + buf.nbytes]

    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        mv = memoryview(data).cast("B")
        self.check(WRITE, offset, mv.nbytes)
        self.calls["write"] += 1
        if flags & IoFlags.FUA:
            self.fua_writes += 1
        self.data[offset : offset + mv.nbytes] = mv

    async def flush(self) -> None:
        self.calls["flush"] += 1

    async def trim(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        self.check(TRIM, offset, length)
        self.calls["trim"] += 1
        self.data[offset : offset + length] = bytes(length)

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        self.check(ZERO, offset, length)
        self.calls["zero"] += 1
        self.data[offset : offset + length] = bytes(length)


@dataclass
class Served:
    """A running front end: its URI, and a way to run code on its loop."""

    frontend: NbdFrontend
    device: RamDevice
    loop: asyncio.AbstractEventLoop
    logs: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return self.frontend.uri

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the server's loop thread and return its result."""
        fut: Future[Any] = Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout=START_TIMEOUT)

    def statistics(self) -> dict[str, Any]:
        return dict(self.call(self.frontend.statistics))


@contextlib.contextmanager
def serve_in_thread(
    device: RamDevice, address: Address, **frontend_options: Any
) -> Iterator[Served]:
    """Serve ``device`` over NBD on ``address`` from a background event loop."""
    ready: Future[Served] = Future()
    stop: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        front = NbdFrontend(device, address, **frontend_options)
        try:
            await front.start()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(Served(front, device, asyncio.get_running_loop()))
        try:
            await stop.wait()
        finally:
            await front.aclose()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="nbd-server", daemon=True)
    thread.start()
    served = ready.result(timeout=START_TIMEOUT)
    try:
        yield served
    finally:
        assert stop is not None
        served.loop.call_soon_threadsafe(stop.set)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"the NBD server thread did not stop within {STOP_TIMEOUT} s")
