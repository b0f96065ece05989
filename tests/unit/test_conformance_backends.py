"""The conformance suite against every backend: file (ext4 and tmpfs), disk, memory, null."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dst.backends import BackendDevice, open_backend
from dst.device import BlockDevice
from tests import conformance
from tests.conformance import Expect, Factory

SIZE = 16 << 20

RW_FILE = Expect(size=SIZE, trim_reads_zeroes=True, knows_holes=True)
RO_FILE = Expect(size=SIZE, read_only=True, fresh_zeroes=False)
RW_MEMORY = Expect(size=SIZE, trim_reads_zeroes=True, knows_holes=True)
RO_MEMORY = Expect(size=SIZE, read_only=True)
RW_NULL = Expect(size=SIZE, stores_data=False, trim_reads_zeroes=True, knows_holes=True)
RO_NULL = Expect(size=SIZE, read_only=True, stores_data=False)
RW_DISK = Expect(size=SIZE, fresh_zeroes=False)
RO_DISK = Expect(size=SIZE, read_only=True, fresh_zeroes=False)


def run(name: str, factory: Factory, expect: Expect) -> None:
    asyncio.run(conformance.run_check(name, factory, expect))


def file_factory(directory: Path, read_only: bool) -> Factory:
    """Fresh images: empty and sparse, or (read-only) filled with known data first."""
    numbers = itertools.count()

    async def make() -> BlockDevice:
        path = directory / f"disk{next(numbers)}.img"
        if read_only:
            with open(path, "wb") as f:
                f.write(random.Random(7).randbytes(4 << 20))
                f.truncate(SIZE)
        return BackendDevice(open_backend(f"file:{path}", size=SIZE, read_only=read_only))

    return make


def spec_factory(spec: str, read_only: bool) -> Factory:
    async def make() -> BlockDevice:
        return BackendDevice(open_backend(spec, read_only=read_only))

    return make


@pytest.mark.parametrize("check", conformance.names(RW_FILE))
def test_file(check: str, tmp_path: Path) -> None:
    run(check, file_factory(tmp_path, False), RW_FILE)


@pytest.mark.parametrize("check", conformance.names(RW_FILE))
def test_file_tmpfs(check: str, shm_dir: Path) -> None:
    run(check, file_factory(shm_dir, False), RW_FILE)


@pytest.mark.parametrize("check", conformance.names(RO_FILE))
def test_file_read_only(check: str, tmp_path: Path) -> None:
    run(check, file_factory(tmp_path, True), RO_FILE)


@pytest.mark.parametrize("check", conformance.names(RW_MEMORY))
def test_memory(check: str) -> None:
    run(check, spec_factory(f"memory:{SIZE}", False), RW_MEMORY)


@pytest.mark.parametrize("check", conformance.names(RO_MEMORY))
def test_memory_read_only(check: str) -> None:
    run(check, spec_factory("memory:16M", True), RO_MEMORY)


@pytest.mark.parametrize("check", conformance.names(RW_NULL))
def test_null(check: str) -> None:
    run(check, spec_factory("null:16M", False), RW_NULL)


@pytest.mark.parametrize("check", conformance.names(RO_NULL))
def test_null_read_only(check: str) -> None:
    run(check, spec_factory("null:16M", True), RO_NULL)


@pytest.fixture
def loop_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh loop device over a sparse file; its identity is kept under tmp_path."""
    if os.geteuid() != 0:
        pytest.skip("attaching a loop device needs root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is missing: apt-get install util-linux")
    monkeypatch.setenv("DST_STATE_DIR", str(tmp_path / "state"))
    img = tmp_path / "loop.img"
    with open(img, "wb") as f:
        f.write(random.Random(7).randbytes(4 << 20))
        f.truncate(SIZE)
    r = subprocess.run(
        ["losetup", "-f", "--show", str(img)], capture_output=True, text=True, timeout=30
    )
    if r.returncode != 0:
        pytest.skip(f"cannot attach a loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)


@pytest.mark.root
@pytest.mark.parametrize("check", conformance.names(RW_DISK))
def test_disk(check: str, loop_device: str) -> None:
    run(check, spec_factory(f"disk:{loop_device}", False), RW_DISK)


@pytest.mark.root
@pytest.mark.parametrize("check", conformance.names(RO_DISK))
def test_disk_read_only(check: str, loop_device: str) -> None:
    run(check, spec_factory(f"disk:{loop_device}", True), RO_DISK)


def test_whole_suite_in_one_go() -> None:
    """``run_conformance`` is what other suites call with their own factory."""
    asyncio.run(conformance.run_conformance(spec_factory("memory:8M", False), Expect()))
