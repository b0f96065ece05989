"""The conformance suite over representative stacks: mirror, stripe and linear of memory devices."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from dst.backends import open_device
from dst.device import BlockDevice
from dst.layers import FaultDevice, MirrorDevice, build_stack
from tests import conformance
from tests.conformance import Expect, Factory

MIB = 1 << 20

MIRROR = Expect(size=16 * MIB, trim_reads_zeroes=True)  # a resync copies holes as data
CLEAN_MIRROR = Expect(size=16 * MIB, trim_reads_zeroes=True, knows_holes=True)
STRIPE = Expect(size=24 * MIB, trim_reads_zeroes=True, knows_holes=True)
LINEAR = Expect(size=17 * MIB, trim_reads_zeroes=True, knows_holes=True)
READ_ONLY = Expect(size=16 * MIB, read_only=True)


def run(name: str, factory: Factory, expect: Expect) -> None:
    asyncio.run(conformance.run_check(name, factory, expect))


def mirror_factory() -> Factory:
    """Two legs of different sizes and no bitmap: a full resync runs while the checks do."""

    async def make() -> BlockDevice:
        legs: list[BlockDevice] = [open_device("memory:16M"), open_device("memory:20M")]
        return await build_stack("mirror", legs, bitmap=None, granularity=64 << 10)

    return make


def mirror_bitmap_factory(directory: Path) -> Factory:
    """Three legs behind fault layers, a bitmap file and a small activity log."""
    numbers = itertools.count()

    async def make() -> BlockDevice:
        legs: list[BlockDevice] = [
            FaultDevice(open_device("memory:16M"), name=f"leg{i}") for i in range(3)
        ]
        m = MirrorDevice(
            legs,
            bitmap=str(directory / f"bitmap{next(numbers)}"),
            granularity=4096,
            al_extent=256 << 10,
            al_limit=8,
            assume_clean=True,
        )
        await m.start()
        return m

    return make


def stripe_factory() -> Factory:
    async def make() -> BlockDevice:
        legs: list[BlockDevice] = [open_device(f"memory:{n}M") for n in (8, 8, 9)]
        return await build_stack("stripe", legs, chunk=64 << 10)

    return make


def linear_factory() -> Factory:
    async def make() -> BlockDevice:
        legs: list[BlockDevice] = [open_device(f"memory:{n}M") for n in (8, 4, 5)]
        return await build_stack("linear", legs)

    return make


def read_only_factory(mode: str) -> Factory:
    async def make() -> BlockDevice:
        legs: list[BlockDevice] = [
            open_device(f"memory:{16 // (1 if mode == 'mirror' else 2)}M", read_only=True)
            for _ in range(2)
        ]
        return await build_stack(mode, legs, chunk=1 << 20 if mode == "stripe" else None)

    return make


@pytest.mark.parametrize("check", conformance.names(MIRROR))
def test_mirror(check: str) -> None:
    run(check, mirror_factory(), MIRROR)


@pytest.mark.parametrize("check", conformance.names(CLEAN_MIRROR))
def test_mirror_with_bitmap(check: str, tmp_path: Path) -> None:
    run(check, mirror_bitmap_factory(tmp_path), CLEAN_MIRROR)


@pytest.mark.parametrize("check", conformance.names(STRIPE))
def test_stripe(check: str) -> None:
    run(check, stripe_factory(), STRIPE)


@pytest.mark.parametrize("check", conformance.names(LINEAR))
def test_linear(check: str) -> None:
    run(check, linear_factory(), LINEAR)


@pytest.mark.parametrize("mode", ["mirror", "stripe", "linear"])
@pytest.mark.parametrize("check", conformance.names(READ_ONLY))
def test_read_only(mode: str, check: str) -> None:
    run(check, read_only_factory(mode), READ_ONLY)
