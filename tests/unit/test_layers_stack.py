"""Stripe and linear layouts, their failure rules, capabilities and the stack builder."""

from __future__ import annotations

import asyncio
import errno
import logging
import random

import pytest

from dst.backends import open_device
from dst.device import BlockDevice, Capabilities, IoFlags
from dst.errors import DstError, IoError, UsageError
from dst.layers import (
    FaultDevice,
    LinearDevice,
    MirrorDevice,
    StripeDevice,
    build_stack,
    merge_capabilities,
    mirror_of,
)
from tests.model import contents, fault_legs

KIB = 1 << 10
MIB = 1 << 20


def test_stripe_deals_chunks_round_robin() -> None:
    async def main() -> None:
        legs = fault_legs(3, "1M")
        dev = await build_stack("stripe", list(legs), chunk=4 * KIB)
        assert dev.size == 3 * MIB
        data = random.Random(1).randbytes(dev.size)
        await dev.write(0, data[: 2 * MIB])
        await dev.write(2 * MIB, data[2 * MIB :])
        held = [await contents(x) for x in legs]
        for unit in range(dev.size // (4 * KIB)):
            member, row = unit % 3, unit // 3
            want = data[unit * 4 * KIB : (unit + 1) * 4 * KIB]
            assert held[member][row * 4 * KIB : (row + 1) * 4 * KIB] == want, unit
        assert await dev.read(5000, 30000) == data[5000:35000]
        await dev.aclose()

    asyncio.run(main())


def test_stripe_uses_whole_chunks_of_the_smallest_member(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        legs: list[BlockDevice] = [open_device("memory:1M"), open_device("memory:3M")]
        dev = await build_stack("stripe", legs, chunk=384 * KIB)
        assert isinstance(dev, StripeDevice)
        assert dev.per_member == 768 * KIB and dev.size == 1536 * KIB
        await dev.aclose()

    with caplog.at_level(logging.INFO, logger="dst.stack"):
        asyncio.run(main())
    assert "unused" in caplog.text and "chunk 384 KiB" in caplog.text


def test_stripe_member_ranges_match_chunk_walk() -> None:
    dev = StripeDevice([open_device("memory:1M") for _ in range(3)], 4096)
    dev.size, dev.per_member = 3 * MIB, MIB
    rng = random.Random(3)
    for _ in range(3000):
        o = rng.randrange(dev.size)
        n = rng.randrange(min(300_000, dev.size - o) + 1)
        walk = {
            id(dev.members[i]): (p[0][0], sum(x[2] for x in p)) for i, p in dev._split(o, n).items()
        }
        assert {id(m): (s, k) for m, s, k in dev._ranges(o, n)} == walk


@pytest.mark.parametrize(
    ("chunk", "why"), [(3 * MIB, "larger than the smallest member"), (1000, "multiple")]
)
def test_stripe_refuses_bad_chunks(chunk: int, why: str) -> None:
    async def main() -> None:
        legs: list[BlockDevice] = [open_device("memory:1M") for _ in range(2)]
        for leg in legs:
            leg.capabilities = leg.capabilities.with_(min_block=512)
        with pytest.raises(DstError, match=why):
            await build_stack("stripe", legs, chunk=chunk)

    asyncio.run(main())


def test_linear_concatenates_members() -> None:
    async def main() -> None:
        legs: list[BlockDevice] = [open_device(f"memory:{n}K") for n in (64, 128, 64)]
        dev = await build_stack("linear", legs)
        assert dev.size == 256 * KIB
        data = random.Random(2).randbytes(dev.size)
        await dev.write(0, data)
        assert await contents(legs[1]) == data[64 * KIB : 192 * KIB]
        await dev.write_zeroes(60 * KIB, 180 * KIB)
        want = data[: 60 * KIB] + bytes(180 * KIB) + data[240 * KIB :]
        assert await dev.read(0, dev.size) == want
        await dev.trim(0, dev.size)
        assert await dev.read(0, dev.size) == bytes(dev.size)
        await dev.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["stripe", "linear"])
def test_member_failure_is_an_error_to_the_caller(mode: str) -> None:
    async def main() -> None:
        legs = fault_legs(3, "1M")
        dev = await build_stack(mode, list(legs), chunk=64 * KIB if mode == "stripe" else None)
        legs[1].fail("any", count=None)
        where = 64 * KIB if mode == "stripe" else MIB
        with pytest.raises(IoError) as e:
            await dev.write(where, b"x" * 4096)
        assert e.value.errno == errno.EIO
        with pytest.raises(IoError):
            await dev.read(where, 4096)
        with pytest.raises(IoError):
            await dev.flush()
        assert await dev.read(0, 4096) == bytes(4096)  # other members still serve
        legs[1].heal()
        await dev.write(where, b"y" * 4096)
        assert await dev.read(where, 4096) == b"y" * 4096
        await dev.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["stripe", "linear"])
def test_preflush_flushes_every_member(mode: str) -> None:
    async def main() -> None:
        legs = fault_legs(3, "1M")
        dev = await build_stack(mode, list(legs), chunk=64 * KIB if mode == "stripe" else None)
        await dev.write(0, b"a" * 100, IoFlags.PREFLUSH | IoFlags.FUA)
        assert [x.applied["flush"] for x in legs] == [1, 1, 1]
        assert legs[0].applied["write"] == 1 and legs[1].applied["write"] == 0
        await dev.aclose()

    asyncio.run(main())


def test_state_follows_the_sickest_member() -> None:
    async def main() -> None:
        legs = fault_legs(2, "1M")
        dev = await build_stack("linear", list(legs))
        seen: list[str] = []
        dev.subscribe(lambda d, s: seen.append(s))
        legs[0].go_down(budget=None)
        legs[1].fail_permanently()
        legs[1].come_up()
        legs[0].come_up()
        assert seen == ["reconnecting", "failed", "reconnecting", "connected"]
        stats = dev.statistics()
        assert stats["mode"] == "linear" and stats["state"] == "connected"
        assert [m["uri"] for m in stats["members"]] == ["leg0", "leg1"]
        assert all(m["state"] == "connected" and m["identity"] for m in stats["members"])
        await dev.aclose()

    asyncio.run(main())


def test_capabilities_are_the_intersection() -> None:
    a = Capabilities(can_trim=True, min_block=512, preferred_block=4096, max_request=1 << 20)
    b = Capabilities(can_trim=False, min_block=1, preferred_block=65536, max_request=1 << 25)
    c = Capabilities(read_only=True, can_trim=True, can_fua=False)
    m = merge_capabilities([a, b])
    assert (m.can_trim, m.min_block, m.preferred_block, m.max_request) == (
        False,
        512,
        65536,
        1 << 20,
    )
    m = merge_capabilities([a, c])
    assert m.read_only and not m.can_trim and not m.can_fua


def test_build_stack_rules() -> None:
    async def main() -> None:
        one = open_device("memory:1M")
        assert await build_stack(None, [one]) is one
        two: list[BlockDevice] = [open_device("memory:1M") for _ in range(2)]
        with pytest.raises(UsageError, match="need --mirror, --stripe CHUNK or --linear"):
            await build_stack(None, two)
        with pytest.raises(UsageError, match="--chunk applies to --stripe only"):
            await build_stack("mirror", two, chunk=4096)
        with pytest.raises(UsageError, match="--resync-rate applies to --mirror only"):
            await build_stack("linear", two, resync_rate=1 << 20)
        with pytest.raises(UsageError, match="needs a chunk size"):
            await build_stack("stripe", two)
        with pytest.raises(UsageError, match="unknown stack mode"):
            await build_stack("raid5", two)
        mirror = await build_stack("mirror", two)
        assert mirror_of(mirror) is mirror and isinstance(mirror, MirrorDevice)
        assert mirror_of(one) is None
        await mirror.aclose()
        await one.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["stripe", "linear", "mirror"])
def test_unreachable_members_stop_the_start(mode: str) -> None:
    async def main() -> None:
        legs = fault_legs(2, "1M")
        legs[0].go_down(budget=None)
        if mode == "mirror":
            legs[1].go_down(budget=None)
        with pytest.raises(DstError, match=r"not reachable|no leg of the mirror is reachable"):
            await build_stack(mode, list(legs), chunk=64 * KIB if mode == "stripe" else None)
        # a failed start closes what it was given
        with pytest.raises(IoError):
            await legs[1].inner.read(0, 1)

    asyncio.run(main())


def test_linear_pieces_run_concurrently() -> None:
    async def main() -> None:
        legs = fault_legs(2, "64K")
        for x in legs:
            x.delay = 0.2
        dev = LinearDevice(list(legs))
        await dev.start()
        t0 = asyncio.get_running_loop().time()
        await dev.write(60 * KIB, b"z" * 8 * KIB)
        assert asyncio.get_running_loop().time() - t0 < 0.35
        assert isinstance(dev.members[0], FaultDevice)
        await dev.aclose()

    asyncio.run(main())
