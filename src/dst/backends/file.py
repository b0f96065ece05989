"""``file:PATH`` (regular files, created sparse) and ``disk:/dev/X`` (block devices).

Both build on :class:`dst.backends.base.FdBackend`; what differs is how they
open, size, discard and zero: ``fallocate`` on files, ioctls on block devices.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from typing import Any

from dst.backends.base import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_ZERO_RANGE,
    PUNCH,
    UNSUPPORTED,
    FdBackend,
    fallocate,
    not_fast,
    open_error,
    write_zeroes,
)
from dst.backends.identity import disk_identity, file_identity
from dst.errors import StorageError, UsageError
from dst.units import format_size

BLKROGET = 0x125E
BLKSSZGET = 0x1268
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F


# Filesystems whose files live in memory: their reads and writes never wait for a disk.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})


def filesystem_of(fd: int) -> str:
    """The type of the filesystem holding ``fd`` (``ext4``, ``tmpfs``...), from the mount
    table entry with the same device number; '' when it cannot be told."""
    dev = os.fstat(fd).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                head, sep, tail = line.partition(" - ")
                fields = head.split()
                if sep and len(fields) > 2 and fields[2] == want:
                    return tail.split(maxsplit=1)[0]
    except OSError:
        pass
    return ""


class FileBackend(FdBackend):
    """``file:PATH``: a regular file, created sparse when missing.

    A file on a memory filesystem (tmpfs) is served inline on the event loop: there no
    call can block, and ``RWF_NOWAIT`` (the page-cache fast path elsewhere) is refused
    with EOPNOTSUPP by the kernel, so every request would otherwise pay a trip to the
    worker pool."""

    kind = "file"
    trim_reads_zeroes = True  # punched holes read back as zeroes

    def __init__(self, spec: str, path: str, fd: int, size: int, read_only: bool) -> None:
        super().__init__(spec, path, fd, size, read_only)
        self.filesystem = filesystem_of(fd)
        if self.filesystem in MEMORY_FILESYSTEMS:
            self.blocking = False
        self._zero_range = True
        if not read_only:
            self.can_trim = self._probe_punch()
            self.can_zero = self.can_trim

    @classmethod
    def open(cls, spec: str, path: str, *, size: int | None, read_only: bool) -> FileBackend:
        for _ in range(3):  # a file appearing or vanishing meanwhile: look again
            if os.path.lexists(path):
                if not os.path.exists(path):
                    raise StorageError(f"{spec} is a symbolic link to nothing; fix or remove it")
                fd = cls.open_fd(spec, path, os.O_RDONLY if read_only else os.O_RDWR, read_only)
                return cls._setup(spec, path, fd, size, read_only, created=False)
            if size is None:
                raise UsageError(f"{spec} does not exist; give --size SIZE to create it sparse")
            if read_only:
                raise UsageError(
                    f"{spec} does not exist and a read-only export cannot create it; "
                    "drop --read-only or create the file first"
                )
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                continue
            except FileNotFoundError:
                raise StorageError(
                    f"cannot create {spec}: the directory {os.path.dirname(path) or '.'} "
                    "does not exist; create it first"
                ) from None
            except OSError as e:
                raise open_error(spec, path, e, read_only) from None
            return cls._setup(spec, path, fd, size, read_only, created=True)
        raise StorageError(f"{spec} keeps appearing and disappearing; try again")

    @classmethod
    def _setup(
        cls, spec: str, path: str, fd: int, size: int | None, read_only: bool, created: bool
    ) -> FileBackend:
        """Check, lock and (when just created) size an open file; closes it on failure."""
        locked = False
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                raise StorageError(f"{spec} is a block device; use disk:{path}")
            if stat.S_ISDIR(st.st_mode):
                raise StorageError(
                    f"{spec} is a directory; give the path of an image file, "
                    f"e.g. file:{path}/disk.img"
                )
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(
                    f"{spec} is not a regular file (a FIFO, socket or character device); "
                    "give the path of an image file"
                )
            cls.lock(fd, spec, read_only)
            locked = True
            nbytes = cls._check_size(spec, path, fd, st.st_size, size, created)
            backend = cls(spec, path, fd, nbytes, read_only)
            try:
                backend.identity, backend.identity_store = file_identity(fd, path, spec)
            except OSError as e:
                raise StorageError(
                    f"cannot read or store the identity of {spec}: {e.strerror}; "
                    "check the file's permissions"
                ) from None
            return backend
        except BaseException:
            os.close(fd)
            if created and locked:  # ours alone: leave nothing half-made behind
                os.unlink(path)
            raise

    @staticmethod
    def _check_size(
        spec: str, path: str, fd: int, actual: int, size: int | None, created: bool
    ) -> int:
        if created:
            assert size is not None
            try:
                os.ftruncate(fd, size)  # sparse: no blocks are allocated
            except OSError as e:
                raise StorageError(
                    f"cannot create {spec} with {format_size(size)}: {e.strerror}; "
                    "give a smaller --size or another filesystem"
                ) from None
            return size
        if size is not None and size != actual:
            raise UsageError(
                f"{spec} is {actual} bytes ({format_size(actual)}) but --size asks for "
                f"{size} ({format_size(size)}); nothing is truncated or grown silently: drop "
                f"--size to export the file as it is, or resize it yourself "
                f"(truncate -s {size} {path})"
            )
        if actual == 0:
            raise UsageError(
                f"{spec} is empty (0 bytes); remove it and give --size SIZE to create it sparse, "
                f"or grow it yourself (truncate -s SIZE {path})"
            )
        return actual

    def _probe_punch(self) -> bool:
        """Can this filesystem punch holes? Probed past the end, where it changes nothing."""
        try:
            fallocate(self._fd, PUNCH, self.size, 1)
            return True
        except OSError:
            return False  # a capability, not a failure: trims become no-ops

    def trim(self, offset: int, length: int) -> None:
        if not self.can_trim:
            return  # a hint: keeping the data is a correct trim
        try:
            fallocate(self._fd, PUNCH, offset, length)
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            self.can_trim = False

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        """Punch when allowed, else ZERO_RANGE, else punch and re-allocate, else write.

        ``fast`` (FAST_ZERO) takes the first two, and the third except on a memory
        filesystem, where allocating a page means zeroing it: as slow as writing zeroes
        (tmpfs has no ZERO_RANGE, so NO_HOLE with FAST_ZERO is refused there). Writing
        zeroes is refused (EOPNOTSUPP) before anything changed."""
        fd = self._fd
        if may_trim and self.can_trim:
            try:
                fallocate(fd, PUNCH, offset, length)
                return
            except OSError as e:
                if e.errno not in UNSUPPORTED:
                    raise
                self.can_trim = False
        if self._zero_range:
            try:
                fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in UNSUPPORTED:
                    raise
                self._zero_range = False  # e.g. tmpfs
        in_memory = self.filesystem in MEMORY_FILESYSTEMS
        if self.can_trim and not (fast and in_memory):
            try:
                fallocate(fd, PUNCH, offset, length)
                fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)  # allocate again: no hole
                return
            except OSError as e:
                if e.errno not in UNSUPPORTED:
                    raise
        if fast:
            raise not_fast(
                self.spec,
                f"{self.filesystem} has no ZERO_RANGE, and allocating its pages costs as much "
                "as writing zeroes"
                if self.can_trim
                else f"the {self.filesystem or 'filesystem'} can neither punch holes nor "
                "zero ranges",
            )
        self.can_zero = False
        write_zeroes(self, offset, length)

    def statistics(self) -> dict[str, Any]:
        stats = super().statistics()
        stats.update(
            path=self.path,
            identity_store=self.identity_store,
            filesystem=self.filesystem,
            inline=not self.blocking,
        )
        if self._fd >= 0:
            st = os.fstat(self._fd)
            vfs = os.fstatvfs(self._fd)
            total = vfs.f_blocks * vfs.f_frsize
            stats.update(
                allocated_bytes=st.st_blocks * 512,
                fs_size_bytes=total,
                fs_free_bytes=vfs.f_bavail * vfs.f_frsize,
                fs_used_percent=round(100.0 * (vfs.f_blocks - vfs.f_bfree) / vfs.f_blocks, 1)
                if vfs.f_blocks
                else 0.0,
            )
        return stats


class DiskBackend(FdBackend):
    """``disk:/dev/X``: a block device, opened exclusively for writing."""

    kind = "disk"
    can_zero = True  # BLKZEROOUT: the kernel uses the device's own zeroing when it has one
    trim_reads_zeroes = False  # discard is a hint to most devices

    def __init__(self, spec: str, path: str, fd: int, size: int, read_only: bool) -> None:
        super().__init__(spec, path, fd, size, read_only)
        buf = bytearray(4)
        try:
            fcntl.ioctl(fd, BLKSSZGET, buf)
            self.block_size = struct.unpack("i", buf)[0] or 512
        except OSError:
            self.block_size = 512
        self.can_trim = not read_only and self._discard_supported(os.fstat(fd).st_rdev)

    @staticmethod
    def _discard_supported(rdev: int) -> bool:
        """Ask sysfs; a partition has no queue of its own, so look at its disk."""
        base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
        for queue in (f"{base}/queue", f"{base}/../queue"):
            try:
                with open(f"{queue}/discard_max_bytes") as f:
                    return int(f.read().strip() or 0) > 0
            except (OSError, ValueError):
                continue
        return True  # unknown: try, and learn from EOPNOTSUPP

    @classmethod
    def open(cls, spec: str, path: str, *, size: int | None, read_only: bool) -> DiskBackend:
        # O_EXCL on a block device fails with EBUSY while it is mounted or claimed
        flags = os.O_RDONLY if read_only else os.O_RDWR | os.O_EXCL
        fd = cls.open_fd(spec, path, flags, read_only)
        try:
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode):
                hint = f"use file:{path}" if stat.S_ISREG(st.st_mode) else "check the path"
                raise StorageError(f"{spec} is not a block device; {hint}")
            cls.lock(fd, spec, read_only)
            if not read_only and cls._device_read_only(fd):
                raise StorageError(f"{spec} is a read-only device; export it with --read-only")
            nbytes = cls._device_size(fd)
            if size is not None and size != nbytes:
                raise UsageError(
                    f"{spec} is {nbytes} bytes ({format_size(nbytes)}) but --size asks for "
                    f"{size} ({format_size(size)}); a disk keeps its size: drop --size"
                )
            backend = cls(spec, path, fd, nbytes, read_only)
            backend.identity, backend.identity_store = disk_identity(path, spec)
            return backend
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _device_read_only(fd: int) -> bool:
        buf = bytearray(4)
        try:
            fcntl.ioctl(fd, BLKROGET, buf)
        except OSError:
            return False
        return bool(struct.unpack("i", buf)[0])

    @staticmethod
    def _device_size(fd: int) -> int:
        buf = bytearray(8)
        try:
            fcntl.ioctl(fd, BLKGETSIZE64, buf)
            return int(struct.unpack("Q", buf)[0])
        except OSError:
            return os.lseek(fd, 0, os.SEEK_END)

    def _seek_end(self) -> int:
        return self.size  # fstat says 0 for a block device; the kernel calls it all data

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        """The largest block-aligned part of a range (the ioctls refuse anything else)."""
        bs = self.block_size
        start = -(-offset // bs) * bs
        end = (offset + length) // bs * bs
        return start, max(start, end)

    def trim(self, offset: int, length: int) -> None:
        start, end = self._aligned(offset, length)
        if not self.can_trim or end <= start:
            return
        try:
            fcntl.ioctl(self._fd, BLKDISCARD, struct.pack("QQ", start, end - start))
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            self.can_trim = False

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        """Unmap-zero (``fallocate(PUNCH_HOLE)``) when allowed, else BLKZEROOUT; the
        unaligned edges are written.

        On a block device ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` is the kernel's zero-out
        *without* fallback (the device's write-zeroes offload, or EOPNOTSUPP), while
        BLKZEROOUT and ZERO_RANGE fall back to writing zero pages. So ``fast`` (FAST_ZERO)
        takes only the first, on a block-aligned range: NO_HOLE, unaligned edges and a
        device without the offload are refused (EOPNOTSUPP) before anything is written."""
        start, end = self._aligned(offset, length)
        if fast:
            if not may_trim:
                raise not_fast(
                    self.spec,
                    "keeping the range allocated (NO_HOLE) needs BLKZEROOUT, which "
                    "may write zeroes",
                )
            if start != offset or end != offset + length or end <= start:
                raise not_fast(
                    self.spec, f"the range is not aligned to the {self.block_size}-byte blocks"
                )
            try:
                fallocate(self._fd, PUNCH, start, end - start)
            except OSError as e:
                if e.errno not in UNSUPPORTED:
                    raise
                raise not_fast(self.spec, "the device has no write-zeroes offload") from None
            return
        if end <= start:
            write_zeroes(self, offset, length)
            return
        if start > offset:
            write_zeroes(self, offset, start - offset)
        if offset + length > end:
            write_zeroes(self, end, offset + length - end)
        if may_trim:
            try:  # zeroes by unmapping, without the kernel falling back to writes
                fallocate(self._fd, PUNCH, start, end - start)
                return
            except OSError as e:
                if e.errno not in UNSUPPORTED:
                    raise
        fcntl.ioctl(self._fd, BLKZEROOUT, struct.pack("QQ", start, end - start))

    def statistics(self) -> dict[str, Any]:
        stats = super().statistics()
        stats.update(path=self.path, block_size=self.block_size, identity_store=self.identity_store)
        return stats
