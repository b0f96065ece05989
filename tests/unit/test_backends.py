"""Backends: spec parsing and its messages, files on disk, locking, identity, memory, null."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dst.backends import BackendDevice, open_backend, open_device
from dst.backends import file as file_mod
from dst.backends import identity as identity_mod
from dst.backends.base import Backend, open_error
from dst.backends.file import DiskBackend, FileBackend
from dst.backends.memory import MemoryBackend
from dst.device import IoFlags
from dst.errors import IoError, StorageError, UsageError

MIB = 1 << 20
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


@pytest.fixture(params=["tmp", "shm"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A directory on the disk's filesystem (ext4 here) and one on tmpfs."""
    if request.param == "tmp":
        yield tmp_path
        return
    yield request.getfixturevalue("shm_dir")


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A fresh 16 MiB loop device over a sparse file (root only)."""
    if os.geteuid() != 0:
        pytest.skip("attaching a loop device needs root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is missing: apt-get install util-linux")
    img = tmp_path / "loop.img"
    img.write_bytes(b"")
    os.truncate(img, 16 * MIB)
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


def blocks(path: Path) -> int:
    return os.stat(path).st_blocks


def read(b: Backend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    b.pread_into(memoryview(buf), offset)
    return bytes(buf)


# ---------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "use file:PATH, disk:/dev/X, memory:SIZE, null:SIZE or rbd:POOL/IMAGE"),
        ("foo:bar", "unknown kind 'foo'"),
        ("/srv/a.img", "say which kind it is, e.g. file:/srv/a.img"),
        ("file:", "the path is empty; e.g. file:/srv/a.img"),
        ("disk:", "the path is empty; e.g. disk:/dev/sdb"),
        ("memory:", "the size is missing; e.g. memory:64M"),
        ("null:lots", "invalid size in backend 'null:lots'"),
        ("memory:0", "the size must be greater than 0"),
        ("memory:1.5", "whole number of bytes"),
        ("rbd:", "name the image as rbd:POOL/IMAGE"),
        ("rbd:vm1", "name the image as rbd:POOL/IMAGE"),
        ("rbd:rbd//vm1", "name the image as rbd:POOL/IMAGE"),
        ("rbd:a/b/c/d", "or rbd:POOL/NAMESPACE/IMAGE"),
        ("rbd:rbd/vm1?pool=x", "unknown option 'pool'; rbd: takes conf=PATH"),
        ("rbd:rbd/vm1?conf", "must be KEY=VALUE joined by '&'"),
        ("rbd:rbd/vm1?id=", "id= has no value"),
        ("rbd:rbd/vm1?id=a&id=b", "id= is given twice"),
        ("rbd:rbd/vm1?timeout=soon", "timeout=soon is not a whole number of seconds"),
        ("rbd:rbd/vm1?timeout=0", "timeout=0 is not a whole number of seconds"),
        ("rbd:rbd/vm1?timeout=1.5", "timeout=1.5 is not a whole number of seconds"),
        ("rbd:rbd/vm1?conf=/nonexistent/ceph.conf", "the config /nonexistent/ceph.conf given"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace(".", r"\.")):
        open_backend(spec)


def test_bad_size_option(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="invalid --size 0"):
        open_backend(f"file:{tmp_path}/a.img", size=0)


def test_memory_and_null_specs() -> None:
    m = open_backend("memory:64M")
    n = open_backend("NULL:1G", size=5)  # --size is for files; these carry their own
    try:
        assert (m.kind, m.size, m.blocking, m.spec) == ("memory", 64 * MIB, False, "memory:64M")
        assert (n.kind, n.size, n.blocking) == ("null", 1 << 30, False)
        assert m.identity != n.identity
    finally:
        m.close()
        n.close()


# ---------------------------------------------------------------- file: opening


def test_missing_file_needs_size(tmp_path: Path) -> None:
    spec = f"file:{tmp_path}/a.img"
    with pytest.raises(UsageError, match="does not exist; give --size SIZE to create it sparse"):
        open_backend(spec)
    with pytest.raises(UsageError, match="read-only export cannot create it"):
        open_backend(spec, size=MIB, read_only=True)
    assert not (tmp_path / "a.img").exists()


def test_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    b = open_backend("file:~/a.img", size=MIB)
    b.close()
    assert (tmp_path / "a.img").stat().st_size == MIB and b.spec == "file:~/a.img"


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"the directory .*/nope does not exist; create it"):
        open_backend(f"file:{tmp_path}/nope/a.img", size=MIB)


def test_created_sparse(where: Path) -> None:
    path = where / "a.img"
    b = open_backend(f"file:{path}", size=256 * MIB)
    try:
        assert isinstance(b, FileBackend) and b.size == 256 * MIB
        assert os.stat(path).st_size == 256 * MIB
        assert blocks(path) * 512 <= 64 * 1024, "creating the file allocated its data"
        assert (b.kind, b.read_only) == ("file", False)
        assert b.blocking is (b.filesystem != "tmpfs")  # tmpfs is served inline
    finally:
        b.close()


def test_existing_size_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "a.img"
    path.write_bytes(b"x" * 4096)
    with pytest.raises(UsageError, match="nothing is truncated or grown silently") as e:
        open_backend(f"file:{path}", size=8192)
    assert "4096 bytes" in str(e.value) and f"truncate -s 8192 {path}" in str(e.value)
    assert path.read_bytes() == b"x" * 4096
    b = open_backend(f"file:{path}", size=4096)  # the same size is fine
    b.close()


def test_empty_existing_file(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(b"")
    with pytest.raises(UsageError, match=r"is empty \(0 bytes\); remove it and give --size"):
        open_backend(f"file:{tmp_path}/a.img")


@pytest.mark.parametrize("read_only", [False, True])
def test_directory(tmp_path: Path, read_only: bool) -> None:
    with pytest.raises(StorageError, match="is a directory; give the path of an image file"):
        open_backend(f"file:{tmp_path}", read_only=read_only)


def test_fifo_and_dangling_link(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(StorageError, match="is not a regular file"):
        open_backend(f"file:{tmp_path}/fifo", read_only=True)
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(StorageError, match="symbolic link to nothing"):
        open_backend(f"file:{tmp_path}/link", size=MIB)


def test_disk_spec_errors(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(b"\0" * 4096)
    with pytest.raises(StorageError, match=f"is not a block device; use file:{tmp_path}/a.img"):
        open_backend(f"disk:{tmp_path}/a.img")
    with pytest.raises(StorageError, match="does not exist; check the path"):
        open_backend("disk:/dev/dst-no-such-disk")


def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "a.img"
    path.write_bytes(b"\0" * 4096)
    if os.geteuid() != 0:
        path.chmod(0)
        with pytest.raises(StorageError, match="permission denied; run as a user that may read"):
            open_backend(f"file:{path}")
        return
    # root passes permission bits, but not the immutable flag
    with open(path, "rb") as f:
        flags = bytearray(8)
        try:
            fcntl.ioctl(f.fileno(), FS_IOC_GETFLAGS, flags)
            old = struct.unpack("l", flags)[0]
            fcntl.ioctl(f.fileno(), FS_IOC_SETFLAGS, struct.pack("l", old | FS_IMMUTABLE_FL))
        except OSError as e:
            pytest.skip(f"cannot make a file immutable here: {e}")
        try:
            with pytest.raises(StorageError, match=r"permission denied.*or export it with --read"):
                open_backend(f"file:{path}")
            b = open_backend(f"file:{path}", read_only=True)
            b.close()
        finally:
            fcntl.ioctl(f.fileno(), FS_IOC_SETFLAGS, struct.pack("l", old))


@pytest.mark.parametrize(
    ("err", "message"),
    [
        (errno.EROFS, "read-only filesystem; use --read-only"),
        (errno.EBUSY, "in use (mounted, or held by another program)"),
        (errno.ENOTDIR, "is not a directory; check the path"),
        (errno.EIO, "Input/output error; check the path"),
    ],
)
def test_open_error_messages(err: int, message: str) -> None:
    e = open_error("disk:/dev/x", "/dev/x", OSError(err, os.strerror(err)), False)
    assert message in str(e)


# ---------------------------------------------------------------- file: I/O


def test_io_and_eof(where: Path) -> None:
    path = where / "a.img"
    b = open_backend(f"file:{path}", size=MIB)
    try:
        b.pwrite(memoryview(b"hello"), 4093)
        assert read(b, 4090, 10) == b"\0\0\0hello\0\0"
        os.truncate(path, 4096)  # shortened behind our back: the rest reads as zeroes
        assert read(b, 4090, 10) == b"\0\0\0hel\0\0\0\0"
    finally:
        b.close()


def test_trim_punches_holes(where: Path) -> None:
    path = where / "a.img"
    b = open_backend(f"file:{path}", size=8 * MIB)
    try:
        assert b.can_trim and b.trim_reads_zeroes
        b.pwrite(memoryview(b"\x77" * (4 * MIB)), 0)
        b.flush()
        full = blocks(path)
        assert full * 512 >= 4 * MIB
        b.trim(MIB, 2 * MIB)
        assert full - blocks(path) >= (2 * MIB - 8192) // 512, "the hole was not punched"
        assert read(b, MIB - 1, 2 * MIB + 2) == b"\x77" + bytes(2 * MIB) + b"\x77"
    finally:
        b.close()


def test_zero_with_and_without_holes(where: Path) -> None:
    path = where / "a.img"
    b = open_backend(f"file:{path}", size=8 * MIB)
    try:
        b.pwrite(memoryview(b"\x55" * (4 * MIB)), 0)
        b.flush()
        full = blocks(path)
        b.zero(0, 2 * MIB, may_trim=False)  # NO_HOLE: zeroes, still allocated
        assert blocks(path) >= full - 16
        b.zero(2 * MIB, 2 * MIB - 7, may_trim=True)
        assert blocks(path) <= full - (2 * MIB - 8192) // 512
        assert read(b, 0, 4 * MIB) == bytes(4 * MIB - 7) + b"\x55" * 7
        assert b.can_zero
    finally:
        b.close()


def test_no_fallocate_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not here")

    monkeypatch.setattr(file_mod, "fallocate", unsupported)
    b = open_backend(f"file:{tmp_path}/a.img", size=MIB)
    try:
        assert not b.can_trim and not b.can_zero  # probed at open
        b.pwrite(memoryview(b"\x11" * 9000), 0)
        b.trim(0, 4096)  # a hint: ignored
        assert read(b, 0, 2) == b"\x11\x11"
        b.zero(100, 5000, may_trim=True)  # written as zeroes
        assert read(b, 0, 9000) == b"\x11" * 100 + bytes(5000) + b"\x11" * 3900
    finally:
        b.close()


def test_fua_uses_rwf_dsync_then_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

    def pwritev(fd: int, bufs: list[memoryview], offset: int, flags: int = 0) -> int:
        calls.append(("pwritev", flags))
        if flags and refuse:
            raise OSError(errno.EOPNOTSUPP, "no RWF_DSYNC")
        return real_pwritev(fd, bufs, offset, flags)

    def fdatasync(fd: int) -> None:
        calls.append(("fdatasync",))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    b = open_backend(f"file:{tmp_path}/a.img", size=MIB)
    try:
        refuse = False
        b.pwrite(memoryview(b"a"), 0, fua=True)
        assert calls == [("pwritev", os.RWF_DSYNC)]
        calls.clear()
        refuse = True
        b.pwrite(memoryview(b"b"), 1, fua=True)
        assert calls == [("pwritev", os.RWF_DSYNC), ("pwritev", 0), ("fdatasync",)]
        calls.clear()
        b.pwrite(memoryview(b"c"), 2, fua=True)  # remembered: straight to the fallback
        assert calls == [("pwritev", 0), ("fdatasync",)]
        assert read(b, 0, 3) == b"abc"
    finally:
        b.close()


def test_statistics(tmp_path: Path) -> None:
    b = open_backend(f"file:{tmp_path}/a.img", size=MIB)
    try:
        b.pwrite(memoryview(b"x" * 8192), 0)
        s = b.statistics()
        assert s["path"] == f"{tmp_path}/a.img" and s["size"] == MIB
        assert s["allocated_bytes"] >= 8192 and s["fs_free_bytes"] > 0
        assert 0 <= s["fs_used_percent"] <= 100 and s["identity"] == str(b.identity)
    finally:
        b.close()


# ---------------------------------------------------------------- locking


def test_lock_in_one_process(tmp_path: Path) -> None:
    spec = f"file:{tmp_path}/a.img"
    a = open_backend(spec, size=MIB)
    try:
        with pytest.raises(StorageError, match="already exported by another process"):
            open_backend(spec)
        with pytest.raises(StorageError, match="stop the other export node or use another file"):
            open_backend(spec, read_only=True)
    finally:
        a.close()
    r1, r2 = open_backend(spec, read_only=True), open_backend(spec, read_only=True)
    try:
        with pytest.raises(StorageError, match="locked"):
            open_backend(spec)
    finally:
        r1.close()
        r2.close()
    open_backend(spec).close()  # all released


def test_lock_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "a.img"
    open_backend(f"file:{path}", size=MIB).close()
    holder = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", holder, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as p:
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "locked"
            with pytest.raises(StorageError, match=f"file:{path} is already exported"):
                open_backend(f"file:{path}")
        finally:
            p.communicate(timeout=30)
    open_backend(f"file:{path}").close()  # the holder is gone


# ---------------------------------------------------------------- identity


def test_identity_in_xattr_survives_reopen(where: Path) -> None:
    path = where / "a.img"
    b = open_backend(f"file:{path}", size=MIB)
    first = b.identity
    b.close()
    assert isinstance(b, FileBackend) and b.identity_store == "xattr"
    assert os.getxattr(path, "user.dst.identity").decode() == str(first)
    assert not Path(f"{path}.dst-identity").exists()
    b = open_backend(f"file:{path}", read_only=True)
    b.close()
    assert b.identity == first and first.version == 4


def test_identity_sidecar_without_xattrs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_xattr(*args: object) -> bytes:
        raise OSError(errno.EOPNOTSUPP, "no user xattrs")

    monkeypatch.setattr(os, "getxattr", no_xattr)
    monkeypatch.setattr(os, "setxattr", no_xattr)
    path = tmp_path / "a.img"
    b = open_backend(f"file:{path}", size=MIB)
    b.close()
    assert isinstance(b, FileBackend) and b.identity_store == "sidecar"
    side = Path(f"{path}.dst-identity")
    assert uuid.UUID(side.read_text().strip()) == b.identity
    again = open_backend(f"file:{path}")
    again.close()
    assert again.identity == b.identity
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.img", "a.img.dst-identity"]


def test_identity_derived_when_nothing_can_be_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object) -> bytes:
        raise OSError(errno.EROFS, "read-only")

    path = tmp_path / "a.img"
    path.write_bytes(b"\0" * 4096)
    monkeypatch.setattr(os, "setxattr", refuse)
    monkeypatch.setattr(identity_mod, "_create_text", refuse)
    a, b = (
        open_backend(f"file:{path}", read_only=True),
        open_backend(f"file:{path}", read_only=True),
    )
    a.close()
    b.close()
    assert isinstance(a, FileBackend) and a.identity_store == "derived"
    assert a.identity == b.identity


def test_identity_garbage(tmp_path: Path) -> None:
    path = tmp_path / "a.img"
    path.write_bytes(b"\0" * 4096)
    os.setxattr(path, "user.dst.identity", b"not-a-uuid")
    with pytest.raises(StorageError, match=r"is not a UUID.*setfattr -x user\.dst\.identity"):
        open_backend(f"file:{path}")


def test_volatile_identities_are_fresh() -> None:
    ids = set()
    for spec in ("memory:1M", "memory:1M", "null:1M", "null:1M"):
        b = open_backend(spec)
        ids.add(b.identity)
        b.close()
    assert len(ids) == 4


# ---------------------------------------------------------------- memory and null


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_is_lazy_and_trim_gives_pages_back() -> None:
    before = _rss()
    b = open_backend("memory:4G")
    try:
        assert _rss() - before < 64 * MIB, "memory:4G committed its memory at open"
        chunk = memoryview(b"\x01" * MIB)
        for i in range(128):
            b.pwrite(chunk, (1 + i) * MIB)
        grown = _rss()
        assert grown - before >= 120 * MIB
        b.trim(MIB, 128 * MIB)
        assert grown - _rss() >= 120 * MIB, "trim did not give the pages back"
        assert read(b, MIB, 4096) == bytes(4096)
    finally:
        b.close()


def test_memory_zero_edges() -> None:
    b = MemoryBackend("memory:1M", MIB)
    try:
        b.pwrite(memoryview(b"\x33" * 20000), 0)
        b.zero(100, 3 * 4096 + 5, may_trim=True)  # partial pages at both ends
        b.zero(15000, 10, may_trim=False)  # inside one page
        want = b"\x33" * 100 + bytes(3 * 4096 + 5) + b"\x33" * (15000 - 12393)
        want += bytes(10) + b"\x33" * (20000 - 15010)
        assert read(b, 0, 20000) == want
    finally:
        b.close()
    b.close()  # idempotent
    with pytest.raises(OSError):
        read(b, 0, 1)


def test_null_discards() -> None:
    b = open_backend("null:1M")
    b.pwrite(memoryview(b"x" * 100), 0)
    assert read(b, 0, 100) == bytes(100)
    b.close()


# ---------------------------------------------------------------- disk:


@pytest.mark.root
def test_disk(loop_device: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DST_STATE_DIR", str(tmp_path / "state"))
    spec = f"disk:{loop_device}"
    with pytest.raises(UsageError, match="a disk keeps its size: drop --size"):
        open_backend(spec, size=MIB)
    with pytest.raises(StorageError, match=f"is a block device; use disk:{loop_device}"):
        open_backend(f"file:{loop_device}")
    b = open_backend(spec, size=16 * MIB)
    try:
        assert isinstance(b, DiskBackend) and (b.kind, b.size) == ("disk", 16 * MIB)
        with pytest.raises(StorageError, match="already exported by another process"):
            open_backend(spec)
        b.pwrite(memoryview(b"\x42" * (3 * 4096)), 0, fua=True)
        b.zero(100, 5000, may_trim=False)  # unaligned edges are written, the middle zeroed
        b.zero(9000, 1000, may_trim=True)
        b.trim(6 * 4096, 4096)
        want = b"\x42" * 100 + bytes(5000) + b"\x42" * 3900 + bytes(1000)
        assert read(b, 0, 10000) == want
        assert b.statistics()["block_size"] in (512, 4096)
        first = b.identity
    finally:
        b.close()
    assert len(list((tmp_path / "state").iterdir())) == 1
    again = open_backend(spec, read_only=True)
    again.close()
    assert again.identity == first


# ---------------------------------------------------------------- the device framework


class Recorder(Backend):
    """A blocking backend without native FUA that records what the framework asks."""

    kind = "record"
    can_fua = False

    def __init__(self, delay: float = 0.0, fail: int | None = None) -> None:
        self.spec, self.size, self.identity = "record:1M", MIB, uuid.uuid4()
        self.calls: list[str] = []
        self.delay, self.fail = delay, fail
        self.threads: set[str] = set()

    def _note(self, what: str) -> None:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        self.calls.append(what)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self._note("read")
        buf[:] = b"r" * len(buf)

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        self._note(f"write fua={fua}")

    def flush(self) -> None:
        self._note("flush")

    def close(self) -> None:
        self.calls.append("close")


def test_flags_are_emulated_in_order() -> None:
    async def main() -> Recorder:
        r = Recorder()
        dev = BackendDevice(r)
        await dev.write(0, b"x", IoFlags.FUA | IoFlags.PREFLUSH)
        await dev.write_zeroes(0, 10, IoFlags.FUA)
        await dev.trim(0, 10)  # cannot trim: a hint, ignored
        await dev.aclose()
        await dev.aclose()
        assert not dev.capabilities.can_trim and dev.capabilities.can_fua
        return r

    r = asyncio.run(main())
    assert r.calls == ["flush", "write fua=False", "flush", "write fua=False", "flush", "close"]
    assert all(t.startswith("dst-backend") for t in r.threads)


def test_errors_name_the_request() -> None:
    async def main() -> None:
        dev = BackendDevice(Recorder(fail=errno.ENOSPC), name="rec")
        with pytest.raises(IoError) as e:
            await dev.write(4096, b"x" * 512)
        assert e.value.errno == errno.ENOSPC
        assert "rec: write of 512 bytes at offset 4096 failed" in str(e.value)
        with pytest.raises(IoError, match="EINVAL"):
            await dev.read(MIB, 1)
        assert dev.statistics()["errors"] == 2
        await dev.aclose()
        with pytest.raises(IoError, match="after the device was closed"):
            await dev.flush()

    asyncio.run(main())


def test_close_waits_and_cancel_keeps_the_buffer_owned() -> None:
    async def main() -> None:
        r = Recorder(delay=0.2)
        dev = BackendDevice(r)
        buf = bytearray(8)
        task = asyncio.create_task(dev.read_into(0, memoryview(buf)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert buf == b"r" * 8, "cancel returned while a worker still wrote the buffer"
        w = asyncio.create_task(dev.write(0, b"abc"))
        await asyncio.sleep(0.05)
        await dev.aclose()
        assert w.done() and r.calls[-2:] == ["write fua=False", "close"]

    asyncio.run(main())


def test_device_statistics_and_read_only(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "a.img"
        async with open_device(f"file:{path}", size=MIB) as dev:
            await dev.write(0, b"x" * 100)
            await dev.read(0, 50)
            s = dev.statistics()
            assert (s["writes"], s["bytes_written"], s["reads"], s["bytes_read"]) == (1, 100, 1, 50)
            assert s["backend"]["path"] == str(path)
        async with open_device(f"file:{path}", read_only=True) as ro:
            assert ro.capabilities.read_only and not ro.capabilities.can_trim
            with pytest.raises(IoError, match="EPERM") as e:
                await ro.write(0, b"y")
            assert "is read-only: write refused" in str(e.value)
            assert await ro.read(0, 3) == b"xxx"

    asyncio.run(main())


def test_write_taken_partly_by_the_page_cache_is_finished_on_the_pool(tmp_path: Path) -> None:
    """RWF_NOWAIT may take only part of a write; the rest goes to the pool, never blocks the
    loop, and the file holds the whole write."""
    b = open_backend(f"file:{tmp_path / 'd.img'}", size=1 << 20)
    taken: list[int] = []
    real = b.try_pwrite_nowait

    def half(buf: memoryview, offset: int) -> int:
        n = real(buf[: len(buf) // 2], offset)
        taken.append(n)
        return n

    b.try_pwrite_nowait = half  # type: ignore[method-assign]
    data = bytes(range(256)) * 256

    async def main() -> None:
        dev = BackendDevice(b)
        await dev.write(4096, data)
        assert await dev.read(4096, len(data)) == data
        await dev.aclose()

    asyncio.run(main())
    assert taken and taken[0] in (0, len(data) // 2)


def test_a_file_on_tmpfs_is_served_inline(where: Path) -> None:
    """tmpfs refuses RWF_NOWAIT, and nothing there blocks: its files skip the pool.  A
    file on a disk filesystem keeps the pool (and the page-cache fast path)."""
    b = open_backend(f"file:{where / 'd.img'}", size=1 << 20)
    assert isinstance(b, FileBackend)
    on_tmpfs = b.filesystem == "tmpfs"
    assert on_tmpfs == (where.name == "shm" or str(where).startswith("/dev/shm"))
    assert b.statistics()["inline"] is on_tmpfs and b.blocking is not on_tmpfs
    data = bytes(range(256)) * 64

    async def main() -> None:
        dev = BackendDevice(b)
        assert (dev._executor is None) is on_tmpfs
        await dev.write(8192, data, IoFlags.FUA)
        await dev.flush()
        assert await dev.read(8192, len(data)) == data
        await dev.trim(8192, 4096)
        assert await dev.read(8192, 4096) == bytes(4096)
        await dev.aclose()

    asyncio.run(main())


# ---------------------------------------------------------------- rbd: without a cluster


class _CephError(Exception):
    """What Ceph's binding raises: an errno, not an OSError."""

    def __init__(self, err: int, text: str) -> None:
        super().__init__(text)
        self.errno = err


def _opener(spec: str = "rbd:rbd/vm1?id=dst&conf=/etc/ceph/x.conf") -> Any:
    from dst.backends.rbd import RbdSpec
    from dst.backends.rbd_open import Opener

    where = RbdSpec.parse(spec, spec.partition(":")[2])
    return Opener(spec, where, None, None, None, False)


def test_rbd_spec_parts_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from dst.backends.rbd import RbdSpec

    monkeypatch.delenv("CEPH_CONF", raising=False)
    w = RbdSpec.parse("rbd:rbd/ns1/vm1", "rbd/ns1/vm1")
    assert (w.pool, w.namespace, w.image, w.path) == ("rbd", "ns1", "vm1", "rbd/ns1/vm1")
    assert (w.conf, w.client, w.timeout) == ("/etc/ceph/ceph.conf", "admin", 10)
    monkeypatch.setenv("CEPH_CONF", "/srv/c.conf")
    w = RbdSpec.parse("x", "p/i?id=client.dst&timeout=3")
    assert (w.conf, w.client, w.timeout, w.conf_given) == ("/srv/c.conf", "dst", 3, False)
    w = RbdSpec.parse("x", "p/i?conf=/a.conf")
    assert (w.conf, w.conf_given) == ("/a.conf", True)


@pytest.mark.parametrize(
    ("step", "err", "message"),
    [
        (
            "connect",
            errno.ETIMEDOUT,
            "cannot reach the Ceph cluster of /etc/ceph/x.conf within 10 s",
        ),
        ("connect", errno.EACCES, "refused client.dst: permission denied"),
        ("connect", errno.ENOENT, "no keyring found for it; add `keyring = PATH`"),
        (
            "connect",
            errno.EINVAL,
            "cannot connect to the Ceph cluster of /etc/ceph/x.conf as client.dst",
        ),
        ("pool", errno.ENOENT, "pool 'rbd' does not exist in the cluster FSID; create it"),
        (
            "pool",
            errno.EPERM,
            "client.dst may not use pool 'rbd': permission denied; give it rbd caps",
        ),
        ("image", errno.EACCES, "client.dst may not use image rbd/vm1: permission denied"),
    ],
)
def test_rbd_errors_say_what_to_do(step: str, err: int, message: str) -> None:
    o = _opener()
    e = _CephError(err, "boom")
    made = {
        "connect": lambda: o._connect_error(e),
        "pool": lambda: o._pool_error(e, "FSID"),
        "image": lambda: o._image_error(e, "FSID"),
    }[step]()
    assert isinstance(made, StorageError) and message in str(made)


def test_started_requests_the_page_cache_cannot_take_go_to_the_pool_without_a_task(
    tmp_path: Path,
) -> None:
    """On a disk filesystem, a read of pages not in the cache and a write the cache does not
    take whole go to the worker pool, ended by the pool's future (no task): the bytes and
    the counters are right, and a request past the end is refused before any I/O."""
    if tmp_path.stat().st_dev == Path("/dev/shm").stat().st_dev:
        pytest.skip("the temporary directory is on tmpfs")
    img = tmp_path / "pool.img"
    size = 8 << 20
    data = os.urandom(size)
    img.write_bytes(data)

    async def main() -> None:
        dev = BackendDevice(open_backend(f"file:{img}", size=size))
        with open(img, "rb") as f:
            os.fsync(f.fileno())  # clean pages can be dropped: cold reads
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        results: list[BaseException | None] = []
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def done(err: BaseException | None) -> None:
            results.append(err)
            if len(results) == 64 and not ended.done():
                ended.set_result(None)

        bufs = [memoryview(bytearray(4096)) for _ in range(32)]
        for i, b in enumerate(bufs):
            dev.start_read(i * 65536, b, IoFlags.NONE, done)
        new = [os.urandom(4096) for _ in range(32)]
        for i, d in enumerate(new):
            dev.start_write(4096 + i * 65536, memoryview(d), IoFlags.NONE, done)
        await asyncio.wait_for(ended, 30)
        assert results == [None] * 64
        for i, b in enumerate(bufs):
            assert bytes(b) == data[i * 65536 : i * 65536 + 4096]
        for i, d in enumerate(new):
            assert await dev.read(4096 + i * 65536, 4096) == d
        st = dev.statistics()
        assert st["reads"] >= 32 and st["writes"] == 32 and st["errors"] == 0
        refused: list[BaseException | None] = []
        dev.start_read(size - 4096, memoryview(bytearray(8192)), IoFlags.NONE, refused.append)
        dev.start_write(size, memoryview(b"x" * 4096), IoFlags.NONE, refused.append)
        assert [getattr(e, "errno", None) for e in refused] == [errno.EINVAL, errno.ENOSPC]
        await dev.aclose()

    asyncio.run(main())
