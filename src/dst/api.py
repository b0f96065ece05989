"""The Python API: open a remote export as a block device, async or sync.

    import dst
    with dst.open_device("dst://node1/default") as dev:
        dev.write(0, b"hello")
        assert dev.read(0, 5) == b"hello"

    async with await dst.open_device_async("dst+unix:///default?socket=/run/dst.sock") as dev:
        await dev.write(0, b"hello")

The sync flavour runs the asyncio device on a private event-loop thread, so it
can be used from ordinary threaded code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from dst.config import MemberOptions
from dst.device import BlockDevice, Buffer, IoFlags
from dst.errors import UsageError
from dst.uri import parse_member

T = TypeVar("T")


class AsyncDevice:
    """A block device for asyncio code; a thin, documented face over the device stack."""

    def __init__(self, device: BlockDevice) -> None:
        self.device = device

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def read_only(self) -> bool:
        return self.device.capabilities.read_only

    async def read(self, offset: int, length: int) -> bytes:
        return await self.device.read(offset, length)

    async def read_into(self, offset: int, buf: Buffer) -> None:
        await self.device.read_into(offset, memoryview(buf).cast("B"))

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self.device.write(offset, data, IoFlags.FUA if fua else IoFlags.NONE)

    async def flush(self) -> None:
        await self.device.flush()

    async def trim(self, offset: int, length: int) -> None:
        await self.device.trim(offset, length)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.device.write_zeroes(offset, length, IoFlags.FUA if fua else IoFlags.NONE)

    def statistics(self) -> dict[str, Any]:
        return self.device.statistics()

    async def aclose(self) -> None:
        await self.device.aclose()

    async def __aenter__(self) -> AsyncDevice:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def open_device_async(
    uri: str, options: MemberOptions | None = None, **kwargs: Any
) -> AsyncDevice:
    """Connect to one export (``dst://`` or ``dst+unix://``) and return it as a device.

    ``options`` are the :class:`dst.config.MemberOptions` that `dst attach` uses for each
    member; or give its fields as keywords (``key_file``, ``client_id``, ``read_only``,
    ``resends``, ``resend_timeout``, ``ping_interval``, ``ping_timeout``,
    ``connect_timeout``, ``reconnect_min``, ``reconnect_max``, ``takeover``, ``ciphers``,
    ``checksums``), each with the default of the `dst attach` option of the same name.
    """
    member = parse_member(uri)
    if member.protocol != "dst":
        raise UsageError(f"{uri}: open_device takes dst:// or dst+unix:// URIs")
    if options is None:
        options = MemberOptions.create(**kwargs)
    elif kwargs:
        raise UsageError("give either options or keyword options to open_device, not both")
    dev = options.device(member)
    await dev.connect()
    return AsyncDevice(dev)


class Device:
    """Synchronous face of :class:`AsyncDevice`, driven on a private loop thread."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, dev: AsyncDevice
    ) -> None:
        self._loop = loop
        self._thread = thread
        self._dev = dev
        self._closed = False

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise ValueError("the device is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def size(self) -> int:
        return self._dev.size

    @property
    def read_only(self) -> bool:
        return self._dev.read_only

    def read(self, offset: int, length: int) -> bytes:
        return self._call(self._dev.read(offset, length))

    def read_into(self, offset: int, buf: Buffer) -> None:
        self._call(self._dev.read_into(offset, buf))

    def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self._call(self._dev.write(offset, data, fua=fua))

    def flush(self) -> None:
        self._call(self._dev.flush())

    def trim(self, offset: int, length: int) -> None:
        self._call(self._dev.trim(offset, length))

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._call(self._dev.write_zeroes(offset, length, fua=fua))

    def statistics(self) -> dict[str, Any]:
        return self._call(_as_coro(self._dev.statistics))

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._call(self._dev.aclose())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _as_coro(fn: Any) -> Any:
    return fn()


def open_device(uri: str, options: MemberOptions | None = None, **kwargs: Any) -> Device:
    """Synchronous :func:`open_device_async`; close the device (or use ``with``) when done."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def runner() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    thread = threading.Thread(target=runner, name="dst-device", daemon=True)
    thread.start()
    ready.wait()
    fut: concurrent.futures.Future[AsyncDevice] = asyncio.run_coroutine_threadsafe(
        open_device_async(uri, options, **kwargs), loop
    )
    try:
        dev = fut.result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        raise
    return Device(loop, thread, dev)
