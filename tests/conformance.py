"""The block-device conformance suite, shared by every backend and every stack.

A test supplies an async *factory* that returns a fresh, open device of at
least ``MIN_SIZE`` bytes, and an :class:`Expect` saying what that device is
meant to do. Each check opens its own device, so checks are independent and
can be parametrised one by one::

    from tests import conformance
    from tests.conformance import Expect

    EXPECT = Expect(size=16 << 20, trim_reads_zeroes=True)

    @pytest.mark.parametrize("check", conformance.names(EXPECT))
    def test_conformance(check, tmp_path):
        asyncio.run(conformance.run_check(check, make_factory(tmp_path), EXPECT))

or all at once with ``asyncio.run(conformance.run_conformance(factory, EXPECT))``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from dst.device import BlockDevice, Extent, ExtentFlags, IoFlags, all_extents
from dst.errors import IoError

MIB = 1 << 20
MIN_SIZE = 8 * MIB
CHECK_TIMEOUT = 60.0

Factory = Callable[[], Awaitable[BlockDevice]]
CheckFn = Callable[[Factory, "Expect"], Awaitable[None]]


@dataclass(frozen=True)
class Expect:
    """What the device under test promises."""

    size: int | None = None  # exact size, when the test knows it
    read_only: bool = False
    stores_data: bool = True  # False for a null device: every read stays zeroes
    fresh_zeroes: bool = True  # a fresh device reads zeroes where nothing was written
    trim_reads_zeroes: bool = False  # a trimmed range reads back as zeroes
    knows_holes: bool = False  # extents reports unwritten and trimmed ranges as holes


@dataclass(frozen=True)
class Check:
    name: str
    fn: CheckFn
    read_write: bool  # applies to read-write devices
    read_only: bool  # applies to read-only devices
    needs_data: bool  # meaningless unless the device keeps what is written


CHECKS: dict[str, Check] = {}


def check(*, rw: bool = True, ro: bool = False, data: bool = False) -> Callable[[CheckFn], CheckFn]:
    def register(fn: CheckFn) -> CheckFn:
        name = fn.__name__.removeprefix("check_")
        CHECKS[name] = Check(name, fn, rw, ro, data)
        return fn

    return register


def applies(c: Check, expect: Expect) -> bool:
    if c.needs_data and not expect.stores_data:
        return False
    return c.read_only if expect.read_only else c.read_write


def names(expect: Expect) -> list[str]:
    """The checks that apply to a device like ``expect``, for ``pytest.mark.parametrize``."""
    return [name for name, c in CHECKS.items() if applies(c, expect)]


async def run_check(name: str, factory: Factory, expect: Expect) -> None:
    async with asyncio.timeout(CHECK_TIMEOUT):
        await CHECKS[name].fn(factory, expect)


async def run_conformance(factory: Factory, expect: Expect) -> None:
    for name in names(expect):
        await run_check(name, factory, expect)


# ---------------------------------------------------------------- building blocks


@contextlib.asynccontextmanager
async def opened(factory: Factory) -> AsyncIterator[BlockDevice]:
    dev = await factory()
    try:
        yield dev
    finally:
        await dev.aclose()


def pattern(n: int, seed: int) -> bytes:
    """Reproducible, non-repeating data, so a misplaced byte cannot go unnoticed."""
    return random.Random(seed).randbytes(n)


def stored(expect: Expect, data: bytes) -> bytes:
    """What reading back ``data`` must give on this device."""
    return data if expect.stores_data else bytes(len(data))


async def assert_reads(dev: BlockDevice, offset: int, want: bytes, what: str) -> None:
    got = await dev.read(offset, len(want))
    if got != want:
        first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        raise AssertionError(
            f"{what}: {len(want)} bytes at {offset} differ, first at byte {offset + first} "
            f"(got {got[first]:#04x}, want {want[first]:#04x})"
        )


async def assert_errno(err: int, aw: Awaitable[object], what: str) -> None:
    want = errno.errorcode[err]
    try:
        await aw
    except IoError as e:
        assert e.errno == err, f"{what}: got {e!r}, want {want}"
    else:
        raise AssertionError(f"{what}: succeeded, want IoError {want}")


def layout(size: int) -> list[tuple[int, int]]:
    """Non-overlapping (offset, length) pairs at aligned and odd places, ends included."""
    return [
        (0, 4096),
        (4096, 1),
        (8191, 4095),
        (3 * 4096 + 1, 4096),
        (64 * 1024 - 3, 7),
        (MIB, MIB),
        (2 * MIB + 5, MIB + 3),
        (4 * MIB + 4095, 4097),
        (size - 4096 - 4095, 4095),
        (size - 1, 1),
    ]


# ---------------------------------------------------------------- checks


@check(ro=True)
async def check_size(factory: Factory, expect: Expect) -> None:
    async with opened(factory) as dev:
        if expect.size is not None:
            assert dev.size == expect.size, f"size {dev.size}, want {expect.size}"
        assert dev.size >= MIN_SIZE, f"the suite needs at least {MIN_SIZE} bytes"
        assert dev.capabilities.read_only == expect.read_only
        assert isinstance(dev.statistics(), dict)
        if expect.read_only:
            assert not dev.capabilities.can_trim, "a read-only device advertises trim"


@check(ro=True)
async def check_fresh_reads_zeroes(factory: Factory, expect: Expect) -> None:
    if not expect.fresh_zeroes:
        return
    async with opened(factory) as dev:
        for offset, length in layout(dev.size):
            await assert_reads(dev, offset, bytes(length), "fresh device")
        await assert_reads(dev, dev.size - MIB, bytes(MIB), "fresh device end")


@check(data=True)
async def check_roundtrip(factory: Factory, expect: Expect) -> None:
    async with opened(factory) as dev:
        spots = layout(dev.size)
        for i, (offset, length) in enumerate(spots):
            await dev.write(offset, pattern(length, i))
        for i, (offset, length) in enumerate(spots):
            await assert_reads(dev, offset, pattern(length, i), f"write {i}")
        # reads across neighbouring writes, and across the never-written gap after them
        await assert_reads(dev, 0, pattern(4096, 0) + pattern(1, 1), "read across writes")
        if expect.fresh_zeroes:
            want = pattern(4096, 0) + pattern(1, 1) + bytes(8191 - 4097) + pattern(4095, 2)
            await assert_reads(dev, 0, want, "read across a gap")


@check(data=True)
async def check_overwrite(factory: Factory, expect: Expect) -> None:
    async with opened(factory) as dev:
        base, a, b = 3 * MIB + 100, pattern(3 * 4096, 10), pattern(333, 11)
        await dev.write(base, a)
        await dev.write(base + 4000, b)
        await assert_reads(dev, base, a[:4000] + b + a[4333:], "overwrite in the middle")


@check(ro=True)
async def check_read_into_view(factory: Factory, expect: Expect) -> None:
    async with opened(factory) as dev:
        if not expect.read_only:
            await dev.write(MIB + 7, pattern(5000, 20))
        whole = await dev.read(MIB + 7, 5000)
        big = bytearray(b"\xaa" * 6000)
        await dev.read_into(MIB + 7, memoryview(big)[500:5500])
        assert big[:500] == b"\xaa" * 500 and big[5500:] == b"\xaa" * 500, "wrote outside"
        assert bytes(big[500:5500]) == whole
        if not expect.read_only:
            assert whole == stored(expect, pattern(5000, 20))


@check()
async def check_fua_and_preflush(factory: Factory, expect: Expect) -> None:
    async with opened(factory) as dev:
        for i, flags in enumerate(
            (IoFlags.FUA, IoFlags.PREFLUSH, IoFlags.FUA | IoFlags.PREFLUSH), start=30
        ):
            data = pattern(4096 + i, i)
            await dev.write(i * MIB // 8, data, flags)
            await assert_reads(dev, i * MIB // 8, stored(expect, data), f"write {flags!r}")
        await dev.read(0, 4096, IoFlags.PREFLUSH)


@check()
async def check_flush(factory: Factory, expect: Expect) -> None:
    async with opened(factory) as dev:
        await dev.flush()
        data = pattern(MIB + 3, 40)
        await dev.write(5, data)
        await dev.flush()
        await dev.flush()
        await assert_reads(dev, 5, stored(expect, data), "after flush")


@check()
async def check_trim(factory: Factory, expect: Expect) -> None:
    async with opened(factory) as dev:
        if not dev.capabilities.can_trim:
            return
        data = pattern(3 * MIB, 50)
        await dev.write(0, data)
        cuts = [(MIB, MIB, IoFlags.NONE), (2 * MIB + 100, 5000, IoFlags.FUA), (0, 1, IoFlags.NONE)]
        for offset, length, flags in cuts:
            await dev.trim(offset, length, flags)
        after = await dev.read(0, 3 * MIB)
        want = bytearray(stored(expect, data))
        for offset, length, _ in cuts:
            if expect.trim_reads_zeroes:
                want[offset : offset + length] = bytes(length)
            else:  # each byte old or zero (a disk discards only whole blocks), nothing else
                got = after[offset : offset + length]
                old = want[offset : offset + length]
                assert all(g in (o, 0) for g, o in zip(got, old, strict=True)), "trim wrote data"
                want[offset : offset + length] = got
        assert after == want, "trim changed data outside its range or did not zero"


@check()
async def check_write_zeroes(factory: Factory, expect: Expect) -> None:
    async with opened(factory) as dev:
        data = pattern(3 * MIB, 60)
        await dev.write(0, data)
        holes = [
            (MIB, MIB, IoFlags.NONE),
            (2 * MIB + 100, 5000, IoFlags.NO_HOLE),
            (4096, 4096, IoFlags.NO_HOLE | IoFlags.FUA),
            (3, 4000, IoFlags.NONE),
        ]
        for offset, length, flags in holes:
            await dev.write_zeroes(offset, length, flags)
        want = bytearray(stored(expect, data))
        for offset, length, _ in holes:
            want[offset : offset + length] = bytes(length)
        await assert_reads(dev, 0, bytes(want), "write_zeroes")


@check()
async def check_out_of_range(factory: Factory, expect: Expect) -> None:
    async with opened(factory) as dev:
        size = dev.size
        marker = pattern(4096, 70)
        await dev.write(size - 4096, marker)
        bad = [(size, 1), (size - 1, 2), (-1, 1), (size + 4096, 4096), (size - 4096, 8192)]
        for offset, length in bad:
            what = f"[{offset}, +{length}) on a {size}-byte device"
            # the same errno for the same mistake on every device: no room past the end for
            # a write or zeroes (ENOSPC), nothing there to read or trim (EINVAL)
            room = errno.EINVAL if offset < 0 else errno.ENOSPC
            await assert_errno(errno.EINVAL, dev.read(offset, max(length, 0)), f"read {what}")
            await assert_errno(room, dev.write(offset, b"\x55" * length), f"write {what}")
            await assert_errno(room, dev.write_zeroes(offset, length), f"zero {what}")
            if dev.capabilities.can_trim:
                await assert_errno(errno.EINVAL, dev.trim(offset, length), f"trim {what}")
        too_big = dev.capabilities.max_request + 1
        await assert_errno(errno.EINVAL, dev.read(0, too_big), "read past max_request")
        assert await dev.read(size, 0) == b"", "an empty read at the end is allowed"
        await assert_reads(dev, size - 4096, stored(expect, marker), "after refused requests")


@check(rw=False, ro=True)
async def check_read_only(factory: Factory, expect: Expect) -> None:
    async with opened(factory) as dev:
        assert dev.capabilities.read_only
        before = await dev.read(0, 2 * MIB)
        await assert_errno(errno.EPERM, dev.write(0, b"x" * 4096), "write")
        await assert_errno(errno.EPERM, dev.write(MIB, b"x", IoFlags.FUA), "write FUA")
        await assert_errno(errno.EPERM, dev.trim(0, MIB), "trim")
        await assert_errno(errno.EPERM, dev.write_zeroes(0, MIB), "write_zeroes")
        await assert_errno(
            errno.EPERM, dev.write_zeroes(0, 4096, IoFlags.NO_HOLE), "write_zeroes NO_HOLE"
        )
        await assert_errno(errno.EINVAL, dev.read(dev.size, 1), "read past the end")
        await dev.flush()
        assert await dev.read(0, 2 * MIB) == before, "a refused request changed data"


@check()
async def check_concurrent(factory: Factory, expect: Expect) -> None:
    async with opened(factory) as dev:
        stride, length = 96 * 1024 + 13, 64 * 1024 + 17
        spots = [(i * stride + i, pattern(length, 100 + i)) for i in range(48)]
        assert spots[-1][0] + length <= dev.size
        await asyncio.gather(
            *(
                dev.write(o, d, IoFlags.FUA if i % 5 == 0 else IoFlags.NONE)
                for i, (o, d) in enumerate(spots)
            ),
            dev.flush(),
        )
        got = await asyncio.gather(*(dev.read(o, length) for o, _ in spots))
        for i, ((offset, data), back) in enumerate(zip(spots, got, strict=True)):
            assert back == stored(expect, data), f"concurrent write {i} at {offset} lost"


@check(ro=True)
async def check_close_twice(factory: Factory, expect: Expect) -> None:
    dev = await factory()
    await dev.read(0, 512)
    await dev.aclose()
    await dev.aclose()


def flags_at(extents: list[Extent], offset: int, length: int) -> set[ExtentFlags]:
    """Every flag value the map ``extents`` gives to bytes of ``[offset, offset + length)``."""
    return {e.flags for e in extents if e.offset < offset + length and offset < e.end}


@check(ro=True)
async def check_extents(factory: Factory, expect: Expect) -> None:
    async with opened(factory) as dev:
        size = dev.size
        written = [(MIB, 64 * 1024), (3 * MIB + 4096, 8192)]
        trimmed = (5 * MIB, MIB)
        if not expect.read_only:
            for i, (offset, length) in enumerate(written):
                await dev.write(offset, pattern(length, 200 + i))
            await dev.write(trimmed[0], pattern(trimmed[1], 210))
            if dev.capabilities.can_trim:
                await dev.trim(*trimmed)
            await dev.flush()
        whole = await all_extents(dev, 0, size)
        assert whole[0].offset == 0 and whole[-1].end == size, "extents do not cover the device"
        for a, b in itertools.pairwise(whole):
            assert a.end == b.offset and a.flags != b.flags, f"{a} and {b}: not merged or apart"
        for e in whole:  # the one promise a copy relies on: ZERO means it reads zeroes
            if e.flags & ExtentFlags.ZERO:
                for pos in range(e.offset, e.end, MIB):
                    n = min(MIB, e.end - pos)
                    await assert_reads(dev, pos, bytes(n), f"{e} says zeroes")
        if expect.knows_holes and not expect.read_only:
            data = (
                {ExtentFlags.DATA} if expect.stores_data else {ExtentFlags.HOLE | ExtentFlags.ZERO}
            )
            for offset, length in written:
                assert flags_at(whole, offset, length) == data, f"written [{offset}, +{length})"
            hole = {ExtentFlags.HOLE | ExtentFlags.ZERO}
            assert flags_at(whole, 7 * MIB, MIB) == hole, "never written, yet not a hole"
            if dev.capabilities.can_trim and expect.trim_reads_zeroes:
                assert flags_at(whole, *trimmed) == hole, "trimmed, yet not a hole"
        for offset, length in [(0, size), (1, 4095), (MIB + 100, 3 * MIB), (size - 1, 1)]:
            got = await dev.extents(offset, length)
            assert got and got[0].offset == offset, f"extents({offset}, {length}) = {got}"
            for a, b in itertools.pairwise(got):
                assert a.end == b.offset, f"extents({offset}, {length}): a gap after {a}"
            assert all(e.length > 0 for e in got) and got[-1].end <= offset + length
            if expect.knows_holes:  # the same answer as the whole map, byte for byte
                for e in got:
                    assert flags_at(whole, e.offset, e.length) == {e.flags}, (offset, length, e)
        for offset, length in [(size, 1), (size - 1, 2), (-1, 1)]:
            await assert_errno(errno.EINVAL, dev.extents(offset, length), f"extents {offset}")
        assert await dev.extents(size, 0) == [], "an empty query at the end is allowed"
