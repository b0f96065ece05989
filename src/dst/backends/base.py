"""The backend plugin interface, the plumbing of descriptor-backed plugins, spec parsing.

A backend is a small synchronous plugin in the spirit of nbdkit plugins: it only
moves bytes. The framework (:class:`dst.backends.device.BackendDevice`) checks
ranges and permissions, runs blocking calls on a worker pool and emulates what a
backend lacks, so a plugin stays a few dozen lines of system calls.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from dst.device import HOLE_ZERO, Done, Extent
from dst.errors import StorageError, UsageError
from dst.units import format_size, parse_size

KINDS = ("file", "disk", "memory", "null", "rbd")
SPEC_HINT = "use file:PATH, disk:/dev/X, memory:SIZE, null:SIZE or rbd:POOL/IMAGE"

_ZERO_CHUNK = bytes(1 << 20)


class Backend(ABC):
    """Synchronous plugin; the framework checks ranges before calling it.

    Every method may raise :class:`OSError`; the framework turns it into an
    ``IoError`` with the same errno and a message naming the request.
    """

    kind: str
    spec: str
    size: int
    read_only: bool = False
    blocking: bool = True  # True: calls run on the worker pool; False: inline on the loop
    can_trim: bool = False
    can_zero: bool = False  # native zeroing, cheaper than writing zeroes
    can_fua: bool = True  # pwrite(fua=True) is durable on return
    can_flush: bool = True
    trim_reads_zeroes: bool = False
    identity: uuid.UUID

    def try_pread_nowait(self, buf: memoryview, offset: int) -> bool:
        """Serve a read without blocking if possible; False: run ``pread_into`` on the pool."""
        return False

    def try_pwrite_nowait(self, buf: memoryview, offset: int) -> int:
        """Write what can be written without blocking; the caller writes the rest (from the
        returned count on) with ``pwrite`` on the pool."""
        return 0

    @abstractmethod
    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill all of ``buf`` with the bytes at ``offset``."""

    @abstractmethod
    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        """Write all of ``buf`` at ``offset``; with ``fua`` it is durable on return."""

    def flush(self) -> None:
        """Make every completed write durable; nothing to do for volatile stores."""
        return None

    def trim(self, offset: int, length: int) -> None:
        """Discard a range; a hint, so doing nothing is correct."""
        return None

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        """Make a range read back as zeroes; the default writes zeroes.

        With ``fast`` (FAST_ZERO) a plugin zeroes only where that is cheaper than writing
        zeroes, and otherwise raises EOPNOTSUPP before changing anything (see
        :func:`not_fast`): the caller then writes the zeroes itself."""
        if fast:
            raise not_fast(self.spec, "it has no native zeroing")
        write_zeroes(self, offset, length)

    def cache(self, offset: int, length: int) -> None:
        """Prefetch a range (NBD_CMD_CACHE); a hint, so doing nothing is correct."""
        return None

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation status from ``offset`` on (``length`` > 0), as
        :meth:`dst.device.BlockDevice.extents` describes; the default is all data."""
        return [Extent(offset, length)]

    def close(self) -> None:
        """Release the store; idempotent."""
        return None

    def statistics(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "spec": self.spec,
            "size": self.size,
            "read_only": self.read_only,
            "identity": str(self.identity),
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec} {format_size(self.size)}>"


class AsyncBackend(Backend):
    """A plugin over a store with asynchronous calls of its own (librbd): the framework
    starts each request and is told when it ended, so no worker thread waits for it.

    ``start_*`` run on the event loop and must not block. Each calls ``done`` exactly
    once, on the event loop's thread (possibly before it returns), with None or the
    ``OSError`` the request failed with; none raises. The framework checks ranges and
    emulates PREFLUSH and, where ``can_fua`` is False, FUA with ``start_flush``. The
    synchronous methods remain for callers without an event loop.
    """

    blocking = False

    @abstractmethod
    def start_read(self, buf: memoryview, offset: int, done: Done) -> None:
        """Fill ``buf`` (owned by the request until ``done``) with the bytes at ``offset``."""

    @abstractmethod
    def start_write(self, buf: memoryview, offset: int, fua: bool, done: Done) -> None:
        """Write ``buf`` at ``offset``; with ``fua`` durable before ``done``."""

    @abstractmethod
    def start_flush(self, done: Done) -> None:
        """Make every write completed before this call durable."""

    @abstractmethod
    def start_trim(self, offset: int, length: int, done: Done) -> None:
        """Discard a range (a hint)."""

    @abstractmethod
    def start_zero(
        self, offset: int, length: int, may_trim: bool, done: Done, fast: bool = False
    ) -> None:
        """Make a range read back as zeroes; ``may_trim`` False: keep it allocated;
        ``fast``: as for :meth:`Backend.zero`, EOPNOTSUPP to ``done`` rather than a slow zero."""


def fill_zeroes(buf: memoryview) -> None:
    """Zero a caller's buffer in place without allocating one as large."""
    zero = memoryview(_ZERO_CHUNK)
    pos = 0
    while pos < len(buf):
        n = min(len(zero), len(buf) - pos)
        buf[pos : pos + n] = zero[:n]
        pos += n


def not_fast(spec: str, why: str) -> OSError:
    """What a plugin raises for a FAST_ZERO request it could only serve slowly."""
    return OSError(errno.EOPNOTSUPP, f"no fast zeroing on {spec}: {why}")


def write_zeroes(backend: Backend, offset: int, length: int) -> None:
    """Zero a range with plain writes, for stores that have nothing better."""
    zero = memoryview(_ZERO_CHUNK)
    end = offset + length
    while offset < end:
        n = min(len(zero), end - offset)
        backend.pwrite(zero[:n], offset)
        offset += n


# ---------------------------------------------------------------- shared by file: and disk:

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE

MAX_SEEK_EXTENTS = 4096  # one extents call walks at most this many data/hole pairs

RWF_DSYNC: int = getattr(os, "RWF_DSYNC", 0)
RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """libc ``fallocate`` (Python's ``os.posix_fallocate`` cannot punch or zero)."""
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def open_error(spec: str, path: str, e: OSError, read_only: bool) -> StorageError:
    """Say why a store could not be opened and what to do about it."""
    access = "read" if read_only else "read and write"
    if e.errno in (errno.EACCES, errno.EPERM):
        hint = "" if read_only else ", or export it with --read-only"
        msg = f"cannot open {spec}: permission denied; run as a user that may {access} {path}{hint}"
    elif e.errno == errno.EROFS:
        msg = f"cannot open {spec} for writing: it is on a read-only filesystem; use --read-only"
    elif e.errno == errno.EISDIR:
        msg = f"{spec} is a directory; give the path of an image file, e.g. file:{path}/disk.img"
    elif e.errno == errno.ENOTDIR:
        msg = f"cannot open {spec}: a component of {path} is not a directory; check the path"
    elif e.errno == errno.ENOENT:
        hint = " (lsblk lists block devices)" if spec.startswith("disk:") else ""
        msg = f"{spec} does not exist; check the path{hint}"
    elif e.errno == errno.EBUSY:
        msg = f"{spec} is in use (mounted, or held by another program); unmount or release it first"
    else:
        msg = f"cannot open {spec}: {e.strerror}; check the path and that you may {access} it"
    return StorageError(msg)


class FdBackend(Backend):
    """What regular files and block devices share: positional I/O, locks, durability."""

    blocking = True
    can_fua = True
    can_flush = True

    def __init__(self, spec: str, path: str, fd: int, size: int, read_only: bool) -> None:
        self.spec = spec
        self.path = path
        self.size = size
        self.read_only = read_only
        self._fd = fd
        self._rwf_dsync = RWF_DSYNC != 0
        self._nowait_read = RWF_NOWAIT != 0
        self._nowait_write = RWF_NOWAIT != 0
        self._seek_holes = True  # until the filesystem says it has no SEEK_DATA/SEEK_HOLE
        self.identity_store = "none"
        self.identity = uuid.UUID(int=0)

    @classmethod
    def open_fd(cls, spec: str, path: str, flags: int, read_only: bool) -> int:
        """Open without blocking on a FIFO, then switch back to blocking I/O."""
        try:
            fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.EBUSY:
                cls.held_by_export(spec, path)  # "exported" says more than "in use"
            raise open_error(spec, path, e, read_only) from None
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd

    @classmethod
    def held_by_export(cls, spec: str, path: str) -> None:
        """Raise the lock error if another export node holds the store."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        try:
            cls.lock(fd, spec, read_only=True)
        finally:
            os.close(fd)

    @staticmethod
    def lock(fd: int, spec: str, read_only: bool) -> None:
        """Take the export lock: shared for read-only, exclusive for read-write."""
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(
                f"{spec} is already exported by another process (locked); "
                "stop the other export node or use another file"
            ) from None

    def _nowait(
        self, call: Callable[..., int], buf: memoryview, offset: int, kind: str
    ) -> int | None:
        """Bytes moved by one RWF_NOWAIT ``preadv``/``pwritev``, or None when the kernel
        would block or cannot do it (then it is not tried again for that ``kind``)."""
        flag = f"_nowait_{kind}"
        if not getattr(self, flag):
            return None
        try:
            return call(self._fd, [buf], offset, RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in UNSUPPORTED:
                setattr(self, flag, False)
                return None
            raise

    def try_pread_nowait(self, buf: memoryview, offset: int) -> bool:
        """Read only if the data is in the page cache (RWF_NOWAIT); False means "use the pool".

        A cached 4 KiB read costs a few microseconds inline but tens when handed to a
        worker thread, so the event loop tries this first and never blocks on a disk.
        """
        got = self._nowait(os.preadv, buf, offset, "read")
        if got == len(buf):
            return True
        if got == 0 and offset >= self._file_size():
            fill_zeroes(buf)
            return True
        return False  # not cached (or only partly): the pool reads it all

    def try_pwrite_nowait(self, buf: memoryview, offset: int) -> int:
        """Write into the page cache without blocking (RWF_NOWAIT); returns the bytes taken."""
        return self._nowait(os.pwritev, buf, offset, "write") or 0

    def _file_size(self) -> int:
        return os.fstat(self._fd).st_size

    def pread_into(self, buf: memoryview, offset: int) -> None:
        pos, n = 0, len(buf)
        while pos < n:
            got = os.preadv(self._fd, [buf[pos:]], offset + pos)
            if got == 0:  # past the end of a file someone shortened: holes read as zeroes
                fill_zeroes(buf[pos:])
                return
            pos += got

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        flags = RWF_DSYNC if fua and self._rwf_dsync else 0
        pos, n = 0, len(buf)
        while pos < n:
            try:
                done = os.pwritev(self._fd, [buf[pos:]], offset + pos, flags)
            except OSError as e:
                if flags and e.errno in UNSUPPORTED:  # old kernel: fdatasync below instead
                    self._rwf_dsync = False
                    flags = 0
                    continue
                raise
            if done == 0:
                raise OSError(errno.EIO, "the write made no progress")
            pos += done
        if fua and not flags:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def cache(self, offset: int, length: int) -> None:
        """Start reading the range into the page cache (POSIX_FADV_WILLNEED); the kernel
        reads ahead in the background, so this returns before the data is there."""
        if length > 0:  # a length of 0 would mean "to the end of the file"
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def _seek_end(self) -> int:
        """Where SEEK_DATA/SEEK_HOLE answers end: the file's current end (a file someone
        shortened reads zeroes beyond it, like a hole)."""
        return self._file_size()

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Data and holes from ``lseek(SEEK_DATA/SEEK_HOLE)``; a hole reads back as zeroes.

        A filesystem without them (or a block device, where the kernel calls everything
        data) answers all data, which is always correct."""
        if not self._seek_holes:
            return [Extent(offset, length)]
        fd, end = self._fd, offset + length
        stop = min(end, self._seek_end())
        out: list[Extent] = []
        pos = offset
        while pos < stop and len(out) < MAX_SEEK_EXTENTS:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # nothing but hole from pos to the end of the file
                    data = stop
                elif e.errno in UNSUPPORTED:
                    self._seek_holes = False
                    out.append(Extent(pos, end - pos))
                    return out
                else:
                    raise
            data = min(data, stop)
            if data > pos:
                out.append(Extent(pos, data - pos, HOLE_ZERO))
                pos = data
            if pos >= stop or len(out) >= MAX_SEEK_EXTENTS:
                break
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: the file shrank meanwhile
                    raise
                hole = stop
            hole = min(max(hole, pos + 1), end)  # always progress, never past the range
            out.append(Extent(pos, hole - pos))
            pos = hole
        if pos < end and len(out) < MAX_SEEK_EXTENTS:
            out.append(Extent(pos, end - pos, HOLE_ZERO))  # beyond the end of a shorter file
        return out

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # also drops the flock

    def fileno(self) -> int:
        return self._fd


# ---------------------------------------------------------------- specs


def split_spec(spec: str) -> tuple[str, str]:
    """``"file:/srv/a.img"`` -> ``("file", "/srv/a.img")``, or a UsageError that helps."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        if spec.startswith(("/", ".")):
            raise UsageError(
                f"invalid backend {spec!r}: say which kind it is, e.g. file:{spec} or disk:{spec}"
            )
        raise UsageError(f"invalid backend {spec!r}: {SPEC_HINT}")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise UsageError(f"invalid backend {spec!r}: unknown kind {kind!r}; {SPEC_HINT}")
    return kind, rest


def parse_backend_size(spec: str, text: str) -> int:
    """The SIZE of ``memory:SIZE`` / ``null:SIZE``; it must be positive."""
    if not text.strip():
        raise UsageError(f"invalid backend {spec!r}: the size is missing; e.g. {spec}64M")
    size = parse_size(text, f"size in backend {spec!r}")
    if size <= 0:
        raise UsageError(f"invalid backend {spec!r}: the size must be greater than 0, e.g. 64M")
    return size


def open_backend(spec: str, *, size: int | None = None, read_only: bool = False) -> Backend:
    """Open the store a spec names.

    ``size`` is ``--size``: it creates a missing file sparse (or RBD image) and must
    match an existing file, disk or image; ``memory:``/``null:`` carry their own size, so it does
    not apply to them. Bad specs raise UsageError, run-time failures StorageError.
    """
    kind, rest = split_spec(spec)
    if size is not None and size <= 0:
        raise UsageError(f"invalid --size {size}: it must be greater than 0, e.g. --size 1G")
    if kind in ("file", "disk"):
        if not rest:
            example = "/srv/a.img" if kind == "file" else "/dev/sdb"
            raise UsageError(f"invalid backend {spec!r}: the path is empty; e.g. {kind}:{example}")
        from dst.backends.file import DiskBackend, FileBackend

        path = os.path.expanduser(rest)  # "file:~/a.img": no shell expands that tilde
        if kind == "file":
            return FileBackend.open(spec, path, size=size, read_only=read_only)
        return DiskBackend.open(spec, path, size=size, read_only=read_only)
    if kind == "rbd":
        from dst.backends.rbd import RbdBackend

        return RbdBackend.open(spec, rest, size=size, read_only=read_only)
    nbytes = parse_backend_size(spec, rest)
    if kind == "memory":
        from dst.backends.memory import MemoryBackend

        return MemoryBackend(spec, nbytes, read_only=read_only)
    from dst.backends.null import NullBackend

    return NullBackend(spec, nbytes, read_only=read_only)
