"""FAST_ZERO and cache in the backends, the device framework and the layers.

A fast zero is one the storage does natively; where it would mean writing zeroes it is
refused with EOPNOTSUPP before anything changed. Real files on ext4 (punch and
ZERO_RANGE) and tmpfs (punch, no ZERO_RANGE) and a loop device show which is which.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from dst.backends import BackendDevice, open_backend, open_device
from dst.backends import file as file_mod
from dst.backends.base import Backend
from dst.device import BlockDevice, IoFlags
from dst.errors import IoError
from dst.layers import FaultDevice, LinearDevice, StripeDevice
from dst.layers.tracker import ChangeTracker
from tests.model import contents, started
from tests.unit.test_backends import loop_device, read  # noqa: F401 - a fixture

MIB = 1 << 20
FAST = IoFlags.FAST_ZERO
FAST_NO_HOLE = IoFlags.FAST_ZERO | IoFlags.NO_HOLE


def refused(exc: pytest.ExceptionInfo[BaseException]) -> bool:
    return isinstance(exc.value, OSError) and exc.value.errno == errno.EOPNOTSUPP


# ---- backends ---------------------------------------------------------------------------
def test_file_on_ext4_zeroes_fast_with_and_without_holes(tmp_path: Path) -> None:
    b = open_backend(f"file:{tmp_path}/a.img", size=8 * MIB)
    try:
        b.pwrite(memoryview(b"\x55" * (4 * MIB)), 0)
        b.zero(0, MIB, may_trim=True, fast=True)  # punch
        b.zero(MIB, MIB, may_trim=False, fast=True)  # ZERO_RANGE
        assert read(b, 0, 3 * MIB) == bytes(2 * MIB) + b"\x55" * MIB
    finally:
        b.close()


def test_file_on_tmpfs_refuses_a_fast_zero_that_keeps_the_range_allocated(shm_dir: Path) -> None:
    b = open_backend(f"file:{shm_dir}/a.img", size=8 * MIB)
    try:
        b.pwrite(memoryview(b"\x66" * (4 * MIB)), 0)
        with pytest.raises(OSError) as exc:
            b.zero(MIB, MIB, may_trim=False, fast=True)
        assert refused(exc) and "ZERO_RANGE" in str(exc.value)
        assert read(b, 0, 4 * MIB) == b"\x66" * (4 * MIB)  # nothing changed
        b.zero(MIB, MIB, may_trim=True, fast=True)  # a punch is fast there
        b.zero(2 * MIB, MIB, may_trim=False)  # and NO_HOLE without FAST_ZERO works
        assert read(b, 0, 4 * MIB) == b"\x66" * MIB + bytes(2 * MIB) + b"\x66" * MIB
    finally:
        b.close()


def test_a_file_without_fallocate_refuses_every_fast_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(file_mod, "fallocate", unsupported)

    async def main() -> None:
        dev = open_device(f"file:{tmp_path}/a.img", size=MIB)
        try:
            assert dev.capabilities.can_zero and not dev.capabilities.can_fast_zero
            await dev.write(0, b"\x11" * 9000)
            for flags in (FAST, FAST_NO_HOLE):
                with pytest.raises(IoError) as exc:
                    await dev.write_zeroes(100, 5000, flags)
                assert refused(exc)
            assert await dev.read(0, 9000) == b"\x11" * 9000
            await dev.write_zeroes(100, 5000)  # written as zeroes
            assert await dev.read(0, 9000) == b"\x11" * 100 + bytes(5000) + b"\x11" * 3900
        finally:
            await dev.aclose()

    asyncio.run(main())


class Plain(Backend):
    """A plugin with nothing but reads and writes: the framework emulates zeroing."""

    kind = "plain"
    blocking = False

    def __init__(self, size: int) -> None:
        self.spec, self.size, self.data = "plain:", size, bytearray(size)
        self.writes = 0
        self.identity = uuid.uuid4()

    def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.data[offset : offset + len(buf)]

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        self.writes += 1
        self.data[offset : offset + len(buf)] = buf


def test_the_framework_refuses_instead_of_emulating() -> None:
    async def main() -> None:
        plugin = Plain(MIB)
        dev = BackendDevice(plugin)
        assert dev.capabilities.can_zero and not dev.capabilities.can_fast_zero
        await dev.write(0, b"\x22" * 4096)
        with pytest.raises(IoError) as exc:
            await dev.write_zeroes(0, 4096, FAST | IoFlags.FUA)
        assert refused(exc) and "write the zeroes instead" in str(exc.value)
        assert plugin.writes == 1 and plugin.data[:4096] == b"\x22" * 4096
        await dev.write_zeroes(0, 4096)
        assert plugin.writes == 2 and plugin.data[:4096] == bytes(4096)
        await dev.aclose()

    asyncio.run(main())


def test_memory_and_null_zero_fast() -> None:
    async def main() -> None:
        kept = b"\x33" * 100 + bytes(8000) + b"\x33" * 92
        for spec, want in (("memory:1M", kept), ("null:1M", bytes(8192))):
            dev = open_device(spec)
            assert dev.capabilities.can_fast_zero
            await dev.write(0, b"\x33" * 8192)
            await dev.write_zeroes(100, 8000, FAST_NO_HOLE)
            assert await dev.read(0, 8192) == want
            await dev.aclose()

    asyncio.run(main())


@pytest.mark.root
def test_disk_zeroes_fast_only_without_fallback(
    loop_device: str,  # noqa: F811 - the fixture
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DST_STATE_DIR", str(tmp_path / "state"))
    b = open_backend(f"disk:{loop_device}")
    try:
        b.pwrite(memoryview(b"\x42" * (4 * MIB)), 0)
        for off, n, may_trim in ((MIB, MIB, False), (100, 8192, True)):  # NO_HOLE, unaligned
            with pytest.raises(OSError) as exc:
                b.zero(off, n, may_trim=may_trim, fast=True)
            assert refused(exc)
        assert read(b, 0, 4 * MIB) == b"\x42" * (4 * MIB)
        try:
            b.zero(MIB, MIB, may_trim=True, fast=True)  # the kernel's zero-out, no fallback
        except OSError as e:  # a loop device over a file without write-zeroes offload
            assert e.errno == errno.EOPNOTSUPP
            assert read(b, 0, 4 * MIB) == b"\x42" * (4 * MIB)
        else:
            assert read(b, 0, 3 * MIB) == b"\x42" * MIB + bytes(MIB) + b"\x42" * MIB
    finally:
        b.close()


def resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux fincore)."""
    cp = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(cp.stdout.strip())


def test_cache_prefetches_into_the_page_cache(tmp_path: Path) -> None:
    if shutil.which("fincore") is None:
        pytest.skip("fincore is missing: apt-get install util-linux")
    path = tmp_path / "a.img"
    with open(path, "wb") as f:
        f.write(os.urandom(4 * MIB))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if resident(path) > MIB:
        pytest.skip("this kernel keeps the file cached after POSIX_FADV_DONTNEED")

    async def main() -> None:
        dev = open_device(f"file:{path}")
        try:
            with pytest.raises(IoError) as exc:
                await dev.cache(3 * MIB, 2 * MIB)
            assert exc.value.errno == errno.EINVAL
            await dev.cache(MIB, 2 * MIB)
            assert dev.statistics()["caches"] == 1
        finally:
            await dev.aclose()

    asyncio.run(main())
    # read-ahead runs in the background: wait for it, a bounded number of times
    for _ in range(200):
        if resident(path) >= 2 * MIB:
            break
        time.sleep(0.05)
    assert resident(path) >= 2 * MIB


# ---- layers ---------------------------------------------------------------------------
def file_legs(*dirs: Path) -> list[FaultDevice]:
    return [
        FaultDevice(open_device(f"file:{d}/leg{i}.img", size=MIB), name=f"leg{i}")
        for i, d in enumerate(dirs)
    ]


def test_mirror_zeroes_a_leg_that_refused_without_fast_zero(tmp_path: Path, shm_dir: Path) -> None:
    async def main() -> None:
        legs = file_legs(tmp_path, shm_dir)  # ext4 takes NO_HOLE fast, tmpfs refuses
        m = await started(legs)
        await m.write(0, b"\x77" * (256 << 10))
        await m.write_zeroes(4096, 65536, FAST_NO_HOLE)
        a, b = await contents(legs[0]), await contents(legs[1])
        assert a == b and a[4096 : 4096 + 65536] == bytes(65536)
        assert legs[1].counts["zero"] == 2  # refused once, then zeroed without FAST_ZERO
        assert m.degrades == 0 and m.state == "connected"
        await m.aclose()

    asyncio.run(main())


def test_mirror_refuses_when_every_leg_refuses(shm_dir: Path) -> None:
    async def main() -> None:
        d2 = shm_dir / "b"
        d2.mkdir()
        legs = file_legs(shm_dir, d2)
        m = await started(legs)
        await m.write(0, b"\x78" * 8192)
        with pytest.raises(IoError) as exc:
            await m.write_zeroes(0, 8192, FAST_NO_HOLE)
        assert refused(exc)
        for leg in legs:
            assert (await contents(leg))[:8192] == b"\x78" * 8192
        assert m.degrades == 0 and m.state == "connected"
        await m.write_zeroes(0, 8192, FAST)  # a punch: fast on both
        assert (await contents(legs[1]))[:8192] == bytes(8192)
        await m.aclose()

    asyncio.run(main())


def test_mirror_refuses_before_any_leg_when_one_cannot_zero_fast() -> None:
    async def main() -> None:
        legs = [FaultDevice(open_device("memory:1M"), name=f"leg{i}") for i in range(2)]
        legs[1].capabilities = legs[1].capabilities.with_(can_fast_zero=False)
        m = await started(legs)
        assert not m.capabilities.can_fast_zero
        with pytest.raises(IoError) as exc:
            await m.write_zeroes(0, 4096, FAST)
        assert refused(exc) and "leg1" in str(exc.value)
        assert [x.counts["zero"] for x in legs] == [0, 0]
        await m.aclose()

    asyncio.run(main())


def test_mirror_cache_goes_to_every_in_sync_leg() -> None:
    async def main() -> None:
        devs = [open_device("memory:1M") for _ in range(2)]
        m = await started([FaultDevice(d, name=f"leg{i}") for i, d in enumerate(devs)])
        await m.cache(0, MIB)
        with pytest.raises(IoError) as exc:
            await m.cache(MIB - 1, 2)
        assert exc.value.errno == errno.EINVAL
        assert [d.counters.caches for d in devs] == [1, 1]
        await m.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["stripe", "linear"])
def test_stripe_and_linear_pass_fast_zero_and_cache_to_members(kind: str, shm_dir: Path) -> None:
    async def main() -> None:
        devs: list[BlockDevice] = [
            open_device(f"file:{shm_dir}/m{i}.img", size=MIB) for i in range(2)
        ]
        dev = StripeDevice(devs, 64 << 10) if kind == "stripe" else LinearDevice(devs)
        await dev.start()
        assert dev.capabilities.can_fast_zero
        await dev.write(0, b"\x99" * (256 << 10))
        with pytest.raises(IoError) as exc:  # tmpfs: NO_HOLE is not fast
            await dev.write_zeroes(0, 256 << 10, FAST_NO_HOLE)
        assert refused(exc)
        assert await dev.read(0, 256 << 10) == b"\x99" * (256 << 10)
        await dev.write_zeroes(0, 256 << 10, FAST)
        assert await dev.read(0, 256 << 10) == bytes(256 << 10)
        await dev.cache(0, dev.size)
        assert [d.counters.caches for d in devs if isinstance(d, BackendDevice)] == [1, 1]
        await dev.aclose()

    asyncio.run(main())


def test_a_stripe_with_a_member_that_cannot_zero_fast_refuses_at_once() -> None:
    async def main() -> None:
        members = [FaultDevice(open_device("memory:1M"), name=f"m{i}") for i in range(2)]
        members[0].capabilities = members[0].capabilities.with_(can_fast_zero=False)
        dev = StripeDevice(members, 64 << 10)
        await dev.start()
        with pytest.raises(IoError) as exc:
            await dev.write_zeroes(0, 256 << 10, FAST)
        assert refused(exc)
        assert [m.counts["zero"] for m in members] == [0, 0]
        await dev.aclose()

    asyncio.run(main())


def test_the_change_tracker_passes_fast_zero_and_cache_through(tmp_path: Path) -> None:
    async def main() -> None:
        for can in (True, False):
            inner = FaultDevice(open_device("memory:1M"), name="m")
            inner.capabilities = inner.capabilities.with_(can_fast_zero=can)
            t = ChangeTracker(inner, bitmap=str(tmp_path / f"bm-{can}"), granularity=4096)
            await t.start()
            await t.write(0, b"\x55" * 8192)
            if can:
                await t.write_zeroes(0, 4096, FAST)
                assert await t.read(0, 8192) == bytes(4096) + b"\x55" * 4096
            else:  # refused before the activity log or the device below sees it
                with pytest.raises(IoError) as exc:
                    await t.write_zeroes(0, 4096, FAST)
                assert refused(exc) and inner.counts["zero"] == 0
            await t.cache(0, MIB)
            assert isinstance(inner.inner, BackendDevice) and inner.inner.counters.caches == 1
            await t.aclose()

    asyncio.run(main())
