"""A flat reference model of a block device: what every stack must read back.

Bytes whose content is undefined (a write that failed with an error may or may not
have reached them) are marked *unknown*: reads compare only the known bytes, and
the next successful change makes them known again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from dst.backends import open_device
from dst.device import BlockDevice
from dst.layers.faults import FaultDevice
from dst.layers.stack import MirrorDevice


class FlatModel:
    """A bytearray with a mask of bytes whose content is not known."""

    def __init__(self, size: int, trim_reads_zeroes: bool = True) -> None:
        self.size = size
        self.data = bytearray(size)
        self.known = bytearray(b"\x01" * size)
        self.trim_reads_zeroes = trim_reads_zeroes

    def _range(self, offset: int, length: int) -> slice:
        assert offset >= 0 and length >= 0 and offset + length <= self.size, (offset, length)
        return slice(offset, offset + length)

    def write(self, offset: int, data: bytes) -> None:
        r = self._range(offset, len(data))
        self.data[r] = data
        self.known[r] = b"\x01" * len(data)

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def trim(self, offset: int, length: int) -> None:
        if self.trim_reads_zeroes:
            self.zero(offset, length)
        else:
            self.forget(offset, length)

    def forget(self, offset: int, length: int) -> None:
        """A change that failed: these bytes may be old or new from now on."""
        self.known[self._range(offset, length)] = bytes(length)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[self._range(offset, length)])

    def matches(self, offset: int, got: bytes) -> bool:
        """Whether ``got`` (read at ``offset``) agrees with every known byte."""
        r = self._range(offset, len(got))
        want, mask = self.data[r], self.known[r]
        if got == want:
            return True
        return all(not k or g == w for g, w, k in zip(got, want, mask, strict=True))

    def first_difference(self, offset: int, got: bytes) -> int | None:
        r = self._range(offset, len(got))
        for i, (g, w, k) in enumerate(zip(got, self.data[r], self.known[r], strict=True)):
            if k and g != w:
                return offset + i
        return None

    def learn(self, offset: int, got: bytes) -> None:
        """Adopt what a device holds where the model did not know."""
        r = self._range(offset, len(got))
        for i in range(r.start, r.stop):
            if not self.known[i]:
                self.data[i] = got[i - offset]
                self.known[i] = 1


# ---------------------------------------------------------------- helpers for stack tests


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Wait (bounded) until ``predicate()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


def fault_legs(n: int, size: str = "1M", prefix: str = "leg") -> list[FaultDevice]:
    """Memory devices behind fault layers, named leg0, leg1, ..."""
    return [FaultDevice(open_device(f"memory:{size}"), name=f"{prefix}{i}") for i in range(n)]


async def contents(dev: BlockDevice, size: int | None = None) -> bytes:
    """Everything a device (or a fault layer's inner device, bypassing faults) holds."""
    inner = dev.inner if isinstance(dev, FaultDevice) else dev
    return await inner.read(0, size if size is not None else inner.size)


async def started(legs: list[FaultDevice] | list[BlockDevice], **kw: Any) -> MirrorDevice:
    """A started mirror over ``legs`` with small regions and quick retries, for unit tests."""
    kw.setdefault("granularity", 4096)
    kw.setdefault("assume_clean", True)
    m = MirrorDevice(list(legs), **kw)
    m.retry_min = 0.05
    await m.start()
    return m


def member(m: MirrorDevice, name: str) -> dict[str, Any]:
    """The status entry of one leg."""
    return next(x for x in m.statistics()["members"] if x["uri"] == name)


async def in_sync(m: MirrorDevice, timeout: float = 10.0) -> None:
    await until(lambda: m.statistics()["sync"] == "in-sync", timeout, "the mirror to be in sync")
