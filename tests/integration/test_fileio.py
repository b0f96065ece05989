"""dst.fileio: a device as a Python file, used by shutil, tarfile and hashlib.

Runs against a real `dst export` process through the synchronous Python API.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import dst
from dst.api import Device
from dst.fileio import DeviceFile, open_file
from tests.procs import Procs, member_uri

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture
def export(procs: Procs, sockdir: Path) -> tuple[Path, str]:
    img = sockdir / "d.img"
    _, addr = procs.export(f"file:{img}", "--size", "16M")
    return img, member_uri(addr)


@pytest.fixture
def device(export: tuple[Path, str]) -> Iterator[Device]:
    with dst.open_device(export[1], client_id="fileio-test") as dev:
        yield dev


def test_copyfileobj_in_and_out_and_close_makes_it_durable(
    export: tuple[Path, str], device: Device, sockdir: Path
) -> None:
    img = export[0]
    data = os.urandom(5 * MiB + 333)
    with open_file(device, "r+b") as f:
        shutil.copyfileobj(io.BytesIO(data), f, MiB)
        assert f.tell() == len(data)
    # closed: flushed to the export node; the backing file has it
    with open(img, "rb") as f:
        assert f.read(len(data)) == data
    out = io.BytesIO()
    with open_file(device, "rb") as f:
        shutil.copyfileobj(f, out, 3 * MiB)
    got = out.getvalue()
    assert len(got) == 16 * MiB
    assert got[: len(data)] == data and got[len(data) :] == bytes(16 * MiB - len(data))


def test_tarfile_written_to_and_read_back_from_the_device(device: Device, sockdir: Path) -> None:
    src = sockdir / "src"
    src.mkdir()
    files = {f"dir/file{i}.bin": os.urandom(1000 * i + 7) for i in range(20)}
    for name, data in files.items():
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_bytes(data)
    with open_file(device, "r+b") as f, tarfile.open(fileobj=f, mode="w") as tar:
        tar.add(src / "dir", arcname="dir")
    with open_file(device, "rb") as f, tarfile.open(fileobj=f, mode="r") as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        assert names == sorted(files)
        for name, data in files.items():
            member = tar.extractfile(name)
            assert member is not None and member.read() == data
    with open_file(device, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:  # streaming
        assert sum(1 for m in tar if m.isfile()) == len(files)


def test_raw_file_seek_tell_ends_and_digest(device: Device) -> None:
    with DeviceFile(device, "r+b") as f:
        assert f.readable() and f.writable() and f.seekable()
        assert f.seek(0, os.SEEK_END) == 16 * MiB == f.size
        assert f.read(10) == b""
        f.seek(-4, os.SEEK_END)
        assert f.write(b"abcdefgh") == 4  # short at the end
        with pytest.raises(OSError) as ei:
            f.write(b"x")
        assert ei.value.errno == errno.ENOSPC
        f.seek(-4, os.SEEK_CUR)
        assert f.read(100) == b"abcd"
        buf = bytearray(8)
        f.seek(16 * MiB - 6)
        assert f.readinto(buf) == 6 and bytes(buf[:6]) == b"\0\0abcd"
        with pytest.raises(OSError):
            f.seek(-1)
        with pytest.raises(io.UnsupportedOperation):
            f.truncate(0)
        f.seek(MiB)
        f.write(b"hello world")
        f.flush()
        f.seek(MiB)
        assert f.read(11) == b"hello world"
    with open_file(device, "rb") as f:
        want = hashlib.sha256(device.read(0, 16 * MiB)).hexdigest()
        assert hashlib.file_digest(f, "sha256").hexdigest() == want


def test_modes_and_closed_file(device: Device) -> None:
    f = DeviceFile(device, "rb")
    assert f.readable() and not f.writable()
    with pytest.raises(io.UnsupportedOperation):
        f.write(b"x")
    f.close()
    with pytest.raises(ValueError):
        f.read(1)
    w = DeviceFile(device, "wb")
    with pytest.raises(io.UnsupportedOperation):
        w.read(1)
    w.close()
    with pytest.raises(ValueError):
        DeviceFile(device, "a")
    assert isinstance(open_file(device, "rb", buffering=0), DeviceFile)
    assert isinstance(open_file(device, "wb"), io.BufferedWriter)
    assert isinstance(open_file(device, "r+b", buffering=4096), io.BufferedRandom)


def test_read_only_device_refuses_write_modes(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "ro.img"
    img.write_bytes(b"\x5a" * MiB)
    _, addr = procs.export(f"file:{img}", "--read-only", listen=f"unix:{sockdir / 'ro.sock'}")
    with dst.open_device(member_uri(addr), client_id="ro-test") as dev:
        with pytest.raises(OSError) as ei:
            DeviceFile(dev, "r+b")
        assert ei.value.errno == errno.EROFS
        with open_file(dev, "rb") as f:
            assert f.read() == b"\x5a" * MiB


def test_closefd_closes_the_device(export: tuple[Path, str]) -> None:
    dev = dst.open_device(export[1], client_id="closefd-test")
    with open_file(dev, "r+b", closefd=True) as f:
        f.write(b"data")
    with pytest.raises(ValueError):
        dev.read(0, 4)
