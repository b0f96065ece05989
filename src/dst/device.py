"""The one block-device interface that every data holder and every layer implements.

Modelled on nbdkit plugins and filters: a layer wraps devices and passes through
what it does not override, so stacks (mirror over remote members, retry over a
backend, ...) compose freely.
"""

from __future__ import annotations

import asyncio
import errno
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from enum import IntFlag
from typing import Any

from mypy_extensions import mypyc_attr

from dst.errors import IoError

MAX_REQUEST = 32 << 20

Buffer = bytes | bytearray | memoryview
Done = Callable[[BaseException | None], None]
"""Called once when a started request ended: with None, or with the error it failed with."""


class IoFlags(IntFlag):
    """Per-request flags, carried unchanged from the front end to the export node."""

    NONE = 0
    FUA = 1  # durable on stable storage before the ack
    PREFLUSH = 2  # every write acked before this request is durable before it runs
    NO_HOLE = 4  # WRITE_ZEROES must allocate, not punch
    FAST_ZERO = 8  # WRITE_ZEROES: fail at once with ENOTSUP rather than write zeroes


class ExtentFlags(IntFlag):
    """The allocation status of a range; the values are NBD's ``base:allocation`` bits."""

    DATA = 0  # allocated, or the device cannot tell: read it
    HOLE = 1  # not allocated in the backing store (writing there may need space)
    ZERO = 2  # reads back as zeroes


HOLE_ZERO = ExtentFlags.HOLE | ExtentFlags.ZERO


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes from ``offset`` that share one allocation status."""

    offset: int
    length: int
    flags: ExtentFlags = ExtentFlags.DATA

    @property
    def end(self) -> int:
        return self.offset + self.length


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Join touching neighbours with the same flags: fewer, longer extents, same meaning."""
    out: list[Extent] = []
    for e in extents:
        if e.length <= 0:
            continue
        if out and out[-1].end == e.offset and out[-1].flags == e.flags:
            out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.flags)
        else:
            out.append(e)
    return out


def checked_extents(name: str, offset: int, length: int, extents: list[Extent]) -> list[Extent]:
    """The extents a device answered, verified against the ``extents`` contract: consecutive
    from ``offset``, none empty, none past ``offset + length``, at least one. A device that
    breaks it is failing (EIO), not something a caller could work around."""
    pos, end = offset, offset + length
    for e in extents:
        if e.offset != pos or e.length <= 0 or e.end > end:
            raise IoError(
                errno.EIO,
                f"{name}: extents of [{offset}, {end}) answered [{e.offset}, {e.end}) where "
                f"[{pos}, ...) was due",
            )
        pos = e.end
    if length and not extents:
        raise IoError(errno.EIO, f"{name}: no extents for [{offset}, {end})")
    return extents


async def all_extents(dev: BlockDevice, offset: int, length: int) -> list[Extent]:
    """Every extent of the range, asking again where a device's answer stopped short; merged.

    Each answer covers at least one byte, so this ends after at most ``length`` calls
    (in practice after one or a few)."""
    out: list[Extent] = []
    pos, end = offset, offset + length
    while pos < end:
        got = checked_extents(dev.name, pos, end - pos, await dev.extents(pos, end - pos))
        out.extend(got)
        pos = got[-1].end
    return merge_extents(out)


@dataclass(frozen=True)
class Capabilities:
    """What a device can do; front ends advertise exactly this."""

    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = False
    can_zero: bool = True
    # honours FAST_ZERO: zeroes natively, or refuses at once (ENOTSUP) where zeroing would
    # mean writing zeroes, and never emulates; False where such a zero could never succeed
    can_fast_zero: bool = False
    can_multi_conn: bool = True
    min_block: int = 1
    preferred_block: int = 4096
    max_request: int = MAX_REQUEST

    def with_(self, **changes: Any) -> Capabilities:
        return replace(self, **changes)


@dataclass
class IoCounters:
    """Plain counters every device keeps; layers add their own keys."""

    reads: int = 0
    writes: int = 0
    flushes: int = 0
    trims: int = 0
    zeroes: int = 0
    caches: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        # the dataclass's fields, not __dict__: a compiled class has none
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d.pop("extra")
        d.update(self.extra)
        return d


@dataclass(frozen=True, slots=True)
class Rule:
    """How one kind of request is admitted, the same on every device (and on the wire:
    docs/protocol.md, "Validation on the export node")."""

    op: str
    changes: bool  # refused with EPERM on a read-only device
    limited: bool  # at most ``max_request`` bytes (EINVAL); the others are split by the device
    past_end: int  # the errno of a range past the end


READ = Rule("read", changes=False, limited=True, past_end=errno.EINVAL)
WRITE = Rule("write", changes=True, limited=True, past_end=errno.ENOSPC)
TRIM = Rule("trim", changes=True, limited=False, past_end=errno.EINVAL)
ZERO = Rule("write_zeroes", changes=True, limited=False, past_end=errno.ENOSPC)
EXTENTS = Rule("extents", changes=False, limited=False, past_end=errno.EINVAL)
CACHE = Rule("cache", changes=False, limited=False, past_end=errno.EINVAL)


def fast_zero_refused(name: str, why: str) -> IoError:
    """The answer to a FAST_ZERO request that could only be served by writing zeroes: the
    caller writes them itself (qemu-img does), nothing was changed."""
    return IoError(
        errno.EOPNOTSUPP,
        f"{name}: no fast zeroing here ({why}); write the zeroes instead, or zero without "
        "FAST_ZERO",
    )


def refusal(
    rule: Rule, name: str, size: int, offset: int, length: int, read_only: bool, max_request: int
) -> IoError | None:
    """Why a request must not reach the storage, or None: permission first (EPERM), then a
    negative range (EINVAL), then a length over ``max_request`` (EINVAL), then a range
    past the end: ENOSPC for a write or zeroes (there is no room there), EINVAL for a
    read, a trim or an extents query (there is nothing there). NBD asks the same."""
    op = rule.op
    if rule.changes and read_only:
        return IoError(errno.EPERM, f"{name} is read-only: {op} refused; attach it read-write")
    if offset < 0 or length < 0:
        return IoError(
            errno.EINVAL, f"{name}: {op} with negative offset {offset} or length {length}"
        )
    if rule.limited and length > max_request:
        return IoError(
            errno.EINVAL,
            f"{name}: {op} of {length} bytes exceeds the maximum of {max_request}; split it",
        )
    if offset + length > size:
        return IoError(
            rule.past_end,
            f"{name}: {op} of [{offset}, {offset + length}) is beyond the end of the "
            f"{size}-byte device",
        )
    return None


def pieces(offset: int, length: int, step: int) -> Iterator[tuple[int, int, bool]]:
    """``(offset, length, last)`` of consecutive pieces of at most ``step`` bytes: how a
    device splits a request larger than what the next one down takes (a FUA belongs on
    the last piece only, so that it covers all of them)."""
    step = max(step, 1)
    pos, end = offset, offset + length
    while pos < end:
        n = min(step, end - pos)
        yield pos, n, pos + n >= end
        pos += n


def piece_flags(flags: IoFlags, last: bool) -> IoFlags:
    """The flags of one piece of pieces sent in order: FUA on the last only (it covers the
    earlier ones); every other flag, PREFLUSH included, stays on every piece."""
    return flags if last else flags & ~IoFlags.FUA


@mypyc_attr(allow_interpreted_subclasses=True)
class BlockDevice(ABC):
    """An asynchronous block device of fixed size.

    ``read_into`` fills a caller-owned buffer so that a remote member can receive
    straight into it (no copy); ``read`` is the convenient form.

    ``state`` is one of ``connecting``, ``connected``, ``reconnecting``, ``degraded``,
    ``resyncing``, ``failed``; local devices are always ``connected``.  Layers that
    care (a mirror) subscribe to state changes of the devices below them.
    """

    size: int
    capabilities: Capabilities
    counters: IoCounters | None = None  # a device that counts keeps refusals in .errors
    name: str = "device"
    identity: uuid.UUID | None = None
    state: str = "connected"
    _state_listeners: list[Callable[[BlockDevice, str], None]] | None = None

    def subscribe(self, callback: Callable[[BlockDevice, str], None]) -> None:
        """Call ``callback(device, new_state)`` on every state change."""
        if self._state_listeners is None:
            self._state_listeners = []
        self._state_listeners.append(callback)

    def set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        for cb in list(self._state_listeners or ()):
            cb(self, state)

    def check(self, rule: Rule, offset: int, length: int, *, split: bool = False) -> None:
        """The one admission check of a request before any I/O (:func:`refusal`): raises
        the IoError, counted in ``counters.errors`` where the device counts. ``split``: this
        device splits a request over ``max_request`` itself, so its length is not limited."""
        caps = self.capabilities
        limit = caps.max_request if not split else 1 << 63
        err = refusal(rule, self.name, self.size, offset, length, caps.read_only, limit)
        if err is not None:
            if self.counters is not None:
                self.counters.errors += 1
            raise err

    @abstractmethod
    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""

    @abstractmethod
    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        """Write ``data`` at ``offset``; with FUA it is durable before this returns."""

    @abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable."""

    async def trim(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        """Discard a range (a hint; reads may return old data or zeroes)."""
        raise IoError(errno.EOPNOTSUPP, f"{self.name} does not support trim")

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        """Make a range read back as zeroes; the default emulates it with writes, so with
        FAST_ZERO it refuses (ENOTSUP) before writing anything."""
        self.check(ZERO, offset, length)
        if flags & IoFlags.FAST_ZERO:
            raise fast_zero_refused(self.name, "it zeroes by writing zeroes")
        zero = memoryview(bytes(min(length, 1 << 20)))
        for pos, n, last in pieces(offset, length, len(zero)):
            await self.write(pos, zero[:n], piece_flags(flags, last))

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch a range for reads to come (NBD_CMD_CACHE): a hint that changes nothing.
        The default, for devices that cannot prefetch, checks the range and does nothing."""
        self.check(CACHE, offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """The allocation status of ``[offset, offset + length)``: consecutive extents from
        ``offset`` on, none empty, none past the range, at least one when ``length`` > 0.
        They may stop short of the range's end (ask again from there, or use
        :func:`all_extents`). The default, for devices that cannot tell, is all data, which
        is always a correct answer: readers then read it instead of skipping it."""
        self.check(EXTENTS, offset, length)
        return [Extent(offset, length)] if length else []

    async def read(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> bytes:
        buf = bytearray(length)
        await self.read_into(offset, memoryview(buf), flags)
        return bytes(buf)

    def start_read(self, offset: int, buf: memoryview, flags: IoFlags, done: Done) -> None:
        """Start a read into ``buf``; ``done`` is called once when it ended, possibly before
        this returns (a request that needed no waiting completes inline, with no task).
        Every error, a refused range included, goes to ``done``; none is raised.

        The default runs :meth:`read_into` in a task; a device that can finish without
        one (a page-cache read, a reply matched by the network member) overrides it."""
        run_in_task(self.read_into(offset, buf, flags), done)

    def start_write(self, offset: int, data: memoryview, flags: IoFlags, done: Done) -> None:
        """Start a write of ``data`` (which stays valid until ``done``); see start_read."""
        run_in_task(self.write(offset, data, flags), done)

    def statistics(self) -> dict[str, Any]:
        return {}

    def fence(self, reason: str) -> bool:
        """Give up every request in flight, now: each fails at once and none is retried,
        and none of them reaches the store after a request issued later (a mirror that
        stopped waiting for this device must not have its old writes land over a resync).
        True if this device can do that; a local device cannot and returns False (its
        requests finish by themselves)."""
        return False

    async def aclose(self) -> None:  # noqa: B027 - a no-op default is right for most devices
        """Release everything; idempotent."""

    async def __aenter__(self) -> BlockDevice:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def run_in_task(coro: Coroutine[Any, Any, None], done: Done) -> None:
    """Run ``coro`` in a task and report its end to ``done`` (a cancellation included)."""

    def ended(task: asyncio.Task[None]) -> None:
        done(asyncio.CancelledError() if task.cancelled() else task.exception())

    task = asyncio.get_running_loop().create_task(coro)
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    task.add_done_callback(ended)


_RUNNING: set[asyncio.Task[None]] = set()  # strong references: a task must not vanish


@mypyc_attr(allow_interpreted_subclasses=True)
class Layer(BlockDevice):
    """A device over one other device that passes through what it does not override."""

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.size = inner.size
        self.capabilities = inner.capabilities
        self.name = inner.name

    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        await self.inner.read_into(offset, buf, flags)

    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        await self.inner.write(offset, data, flags)

    async def flush(self) -> None:
        await self.inner.flush()

    async def trim(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        await self.inner.trim(offset, length, flags)

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        await self.inner.write_zeroes(offset, length, flags)

    async def cache(self, offset: int, length: int) -> None:
        await self.inner.cache(offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return await self.inner.extents(offset, length)

    def statistics(self) -> dict[str, Any]:
        return self.inner.statistics()

    def fence(self, reason: str) -> bool:
        return self.inner.fence(reason)

    async def aclose(self) -> None:
        await self.inner.aclose()
