"""Serve a BlockDevice as one regular file, ``DIR/disk``, on a FUSE mount.

Why a file and not a block device: a FUSE file needs no kernel module beyond
``fuse`` and works in containers; ``losetup`` turns it into a real block device for
``mkfs`` and ``mount``.

The binding is mfusepy (ctypes over libfuse3's high-level API, a pure-Python
wheel that needs only the ``fuse3`` package at run time), always bound to
libfuse3 even where libfuse2 is installed too (:func:`_load_mfusepy`). ``fuse_main`` blocks, so it
runs in its own thread; libfuse's worker threads call the operations below, and each
one runs its device call on the asyncio loop that started the front end
(``run_coroutine_threadsafe``) and waits for it. Nothing on that loop may touch the
mount itself (that would wait for a worker that waits for the loop).

Cache choice (docs/fuse.md): every open of ``DIR/disk`` is ``direct_io``: the
kernel keeps no page cache for it, so every read and write reaches the device
whatever the user above does (``losetup --direct-io=on`` or ``off``, ``dd``, a VM);
the only cache is the one above the file (the filesystem's, or the loop device's).
The writeback cache stays off, so a write is on the device when it returns, and
``fsync``/``fdatasync`` is a FLUSH to the export nodes. Reads and writes go up to
the kernel's limit (``max_pages``, 1 MiB by default) per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from dst import trace
from dst.device import BlockDevice, IoFlags
from dst.errors import DstError, IoError, UsageError
from dst.frontends.mounts import (
    FILE_NAME,
    FSNAME,
    FUSECTL,
    check_mountpoint,
    clear_stale_mount,
    holders_of,
    mount_at,
    unmount,
)

log = logging.getLogger("dst.fuse")

T = TypeVar("T")

LIBFUSE3 = "libfuse3.so.3"  # the soname: dlopen finds it without ldconfig or a compiler
LIBFUSE3_DEB = "libfuse3-3"
MAX_IO = 1 << 20  # libfuse3 3.14 caps requests at 256 pages; the kernel's default limit too
MAX_THREADS = 64  # libfuse workers: each waits on one device request (queue depth)
COUNTERS: tuple[str, ...] = ("opens", "reads", "writes", "flushes", "trims", "zeroes")
COUNTERS += ("bytes_read", "bytes_written", "errors")
START_TIMEOUT = 15.0
CLOSE_TIMEOUT = 10.0

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def _load_mfusepy() -> Any:
    """Import mfusepy bound to libfuse3, whatever else is installed.

    mfusepy loads its library when imported, and left to itself it asks
    ``find_library("fuse")`` first, which finds libfuse.so.2 wherever libfuse2 is
    installed next to libfuse3 (common: many desktop tools need it); every mount then
    fails on libfuse3's options (``fuse: unknown option 'max_threads=64'``). So the
    library is named by its soname through ``FUSE_LIBRARY_PATH``, set only for the
    import, and checked to be version 3 afterwards.
    """
    loaded = sys.modules.get("mfusepy")
    if loaded is None:
        try:
            ctypes.CDLL(LIBFUSE3)
        except OSError as exc:
            raise DstError(
                f"--fuse needs libfuse3, which cannot be loaded ({exc}); install Debian's "
                f"{LIBFUSE3_DEB} package: apt-get install {LIBFUSE3_DEB} fuse3"
            ) from None
        previous = os.environ.get("FUSE_LIBRARY_PATH")
        os.environ["FUSE_LIBRARY_PATH"] = LIBFUSE3
        try:
            import mfusepy
        except ImportError:
            raise DstError(
                "--fuse needs the mfusepy package; install it with `pip install mfusepy`"
            ) from None
        except OSError as exc:
            raise DstError(
                f"--fuse: mfusepy cannot use {LIBFUSE3} ({exc}); reinstall Debian's "
                f"{LIBFUSE3_DEB} package"
            ) from None
        finally:
            if previous is None:
                del os.environ["FUSE_LIBRARY_PATH"]
            else:
                os.environ["FUSE_LIBRARY_PATH"] = previous
        loaded = mfusepy
    major = getattr(loaded, "fuse_version_major", None)
    if major != 3:
        raise DstError(
            f"--fuse needs libfuse3 but this process already loaded mfusepy with libfuse "
            f"{major}; start the FUSE front end before anything else imports mfusepy"
        )
    return loaded


def prepare_mount(mountpoint: str) -> None:
    """Everything a mount on ``mountpoint`` needs, checked before the device exists (so
    before any member is contacted): an empty directory (UsageError), no live mount there
    (a stale one is cleared), /dev/fuse and the FUSE library (DstError)."""
    check_mountpoint(mountpoint)
    clear_stale_mount(os.path.abspath(mountpoint))
    if not os.path.exists("/dev/fuse"):
        raise DstError("--fuse: /dev/fuse is missing; load the module with `modprobe fuse`")
    _load_mfusepy()


class _DiskOps:
    """The filesystem: a root directory holding one file, ``disk``, the device.

    Methods follow mfusepy's Operations protocol; ``read``/``write`` are called by
    :class:`_Fuse` with memoryviews of libfuse's own buffers (no copies here).
    """

    use_ns = True  # mfusepy: times in nanoseconds

    def __init__(self, front: FuseFrontend, fuse_error: type[OSError]) -> None:
        self.front = front
        self.dev = front.device
        self.size = front.device.size
        self.read_only = front.device.capabilities.read_only
        self.err = fuse_error
        self.now = time.time_ns()
        self.uid, self.gid = os.geteuid(), os.getegid()

    # -- bridge to the asyncio loop
    def call(self, op: str, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.front.loop).result()
        except IoError as exc:
            self.front.count(errors=1)
            log.warning("FUSE %s failed: %s", op, exc)
            raise self.err(exc.errno or errno.EIO) from None
        except Exception as exc:
            self.front.count(errors=1)
            log.error("FUSE %s failed unexpectedly: %r", op, exc)
            raise self.err(errno.EIO) from None

    # -- metadata
    def _is_disk(self, path: str | None) -> bool:
        return path in (None, "/" + FILE_NAME)

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            conn.max_write = MAX_IO
            conn.max_read = MAX_IO  # libfuse wants this equal to the max_read mount option
            conn.max_readahead = MAX_IO
        if config is not None:
            config.direct_io = 1  # no page cache for DIR/disk: every I/O reaches the device
            config.kernel_cache = 0
            config.auto_cache = 0
            config.entry_timeout = 3600.0  # the tree never changes
            config.attr_timeout = 3600.0
            config.negative_timeout = 3600.0
        self.front._initialized()

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        times = {"st_atime": self.now, "st_mtime": self.now, "st_ctime": self.now}
        ids = {"st_uid": self.uid, "st_gid": self.gid}
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **times, **ids}
        if self._is_disk(path):
            mode = 0o400 if self.read_only else 0o600
            return {
                "st_mode": stat.S_IFREG | mode,
                "st_nlink": 1,
                "st_size": self.size,
                "st_blocks": (self.size + 511) // 512,
                "st_blksize": MAX_IO,
                **times,
                **ids,
            }
        raise self.err(errno.ENOENT)

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != "/":
            raise self.err(errno.ENOTDIR)
        return [".", "..", FILE_NAME]

    def statfs(self, path: str) -> dict[str, int]:
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": self.size // 4096,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": 1,
            "f_ffree": 0,
            "f_namemax": 255,
        }

    def open(self, path: str, flags: int) -> int:
        if not self._is_disk(path):
            raise self.err(errno.EISDIR if path == "/" else errno.ENOENT)
        if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise self.err(errno.EROFS)
        # O_TRUNC is ignored, as on a block device: the size is the device's.
        self.front.count(opens=1)
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if length == self.size:
            return 0
        raise self.err(errno.EINVAL)  # a block device's size is fixed

    def utimens(self, path: str, times: Any = None) -> int:
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0  # close(2) is not a durability point; fsync is

    def release(self, path: str, fh: int) -> int:
        return 0

    # -- data
    # mfusepy registers an operation only if its name exists here; _Fuse routes
    # both to read_into / write_from with libfuse's buffers.
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        buf = bytearray(size)
        return bytes(buf[: self.read_into(offset, memoryview(buf))])

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self.write_from(offset, memoryview(data))

    def read_into(self, offset: int, buf: memoryview) -> int:
        n = max(0, min(len(buf), self.size - offset))
        if n == 0:
            return 0
        if trace.on.fuse:
            trace.emit("fuse", "read", offset=offset, length=n)
        self.call("read", self.dev.read_into(offset, buf[:n]))
        self.front.count(reads=1, bytes_read=n)
        return n

    def write_from(self, offset: int, data: memoryview) -> int:
        n = max(0, min(len(data), self.size - offset))
        if n == 0 and len(data):
            raise self.err(errno.ENOSPC)  # past the end of the device
        if trace.on.fuse:
            trace.emit("fuse", "write", offset=offset, length=n)
        self.call("write", self.dev.write(offset, data[:n]))
        self.front.count(writes=1, bytes_written=n)
        return n

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        if trace.on.fuse:
            trace.emit("fuse", "fsync", datasync=datasync)
        if not self.read_only and self.dev.capabilities.can_flush:
            self.call("fsync", self.dev.flush())
        self.front.count(flushes=1)
        return 0

    def fallocate(self, path: str, mode: int, offset: int, length: int, fh: int) -> int:
        if trace.on.fuse:
            trace.emit("fuse", "fallocate", mode=mode, offset=offset, length=length)
        if offset < 0 or length <= 0:
            raise self.err(errno.EINVAL)
        if offset + length > self.size:
            raise self.err(errno.ENOSPC if not mode & FALLOC_FL_KEEP_SIZE else errno.EINVAL)
        if self.read_only:
            raise self.err(errno.EROFS)
        caps = self.dev.capabilities
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise self.err(errno.EOPNOTSUPP)
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise self.err(errno.EOPNOTSUPP)  # the kernel's rule for punch-hole
            # A punched hole must read back as zeroes: TRIM only where the export
            # promises that (trim_zeroes), else WRITE_ZEROES (which may punch there).
            if caps.can_trim and getattr(self.dev, "trim_zeroes", False):
                self._ranged("trim", self.dev.trim, offset, length)
                self.front.count(trims=1)
            else:
                self._ranged("zero", self.dev.write_zeroes, offset, length)
                self.front.count(zeroes=1)
        elif mode & FALLOC_FL_ZERO_RANGE:
            self._ranged("zero", self.dev.write_zeroes, offset, length)
            self.front.count(zeroes=1)
        # plain allocation: every byte of the device already exists
        return 0

    def _ranged(
        self, op: str, fn: Callable[[int, int, IoFlags], Coroutine[Any, Any, None]], o: int, n: int
    ) -> None:
        step = max(self.dev.capabilities.max_request, 1)
        end = o + n
        while o < end:
            k = min(step, end - o)
            self.call(op, fn(o, k, IoFlags.NONE))
            o += k

    def destroy(self, path: str) -> None:
        return None


def _fuse_class(mfusepy: Any) -> Any:
    """mfusepy's FUSE with read/write handing the C buffers over as memoryviews."""

    class _Fuse(mfusepy.FUSE):  # type: ignore[misc]
        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            if size == 0:
                return 0
            mv = memoryview((ctypes.c_char * size).from_address(ctypes.addressof(buf.contents)))
            n: int = self.operations.read_into(offset, mv.cast("B"))
            return n

        def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            if size == 0:
                return 0
            mv = memoryview((ctypes.c_char * size).from_address(ctypes.addressof(buf.contents)))
            n: int = self.operations.write_from(offset, mv.cast("B"))
            return n

    return _Fuse


# ---- the front end -------------------------------------------------------------------


class FuseFrontend:
    """Mounts DIR with one file, ``DIR/disk``, that reads and writes ``device``.

    ``start()`` mounts and logs ``serving FUSE on DIR/disk``; ``aclose()`` unmounts.
    While the file is held (a loop device, an open descriptor), stopping waits:
    :meth:`on_stop_signal` implements "first SIGTERM: say who holds it and keep
    serving; second: lazy unmount, serve the holders until they let go; third:
    abort the FUSE connection".
    """

    def __init__(
        self,
        device: BlockDevice,
        mountpoint: str,
        *,
        max_threads: int = MAX_THREADS,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        self.device = device
        self.mountpoint = os.path.abspath(mountpoint)
        self.path = os.path.join(self.mountpoint, FILE_NAME)
        self.max_threads = max_threads
        self.close_timeout = close_timeout
        self.on_unmounted: Callable[[], None] | None = None
        self.stats: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._stats_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready: asyncio.Future[None] | None = None
        self._ended = asyncio.Event()
        self._error: BaseException | None = None
        self._conn: int | None = None
        self._closing = False
        self._lazy = False
        self._warned_busy = False
        self._stop_cb: Callable[[], None] | None = None

    def count(self, **deltas: int) -> None:
        """Add to the counters; called from libfuse's worker threads."""
        with self._stats_lock:
            for k, v in deltas.items():
                self.stats[k] += v

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the FUSE front end is not started"
        return self._loop

    @property
    def mounted(self) -> bool:
        """True from a successful start until the FUSE session ends."""
        return self._thread is not None and not self._ended.is_set()

    def holders(self) -> list[str]:
        """Who holds ``DIR/disk`` now (processes, working directories, loop devices)."""
        return holders_of(self.path)

    async def start(self) -> None:
        """Mount, wait until the kernel talks to us, check DIR/disk, log ``serving``."""
        if self._thread is not None:
            raise RuntimeError("this FUSE front end is already started")
        prepare_mount(self.mountpoint)
        if os.listdir(self.mountpoint):
            raise UsageError(f"--fuse {self.mountpoint}: the directory is not empty")
        mfusepy = _load_mfusepy()
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        ops = _DiskOps(self, mfusepy.FuseOSError)
        fuse_cls = _fuse_class(mfusepy)
        self._thread = threading.Thread(
            target=self._run, args=(fuse_cls, ops), name="dst-fuse", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
            st = await asyncio.to_thread(os.stat, self.path)
        except BaseException as exc:
            await self._abort_start(exc)
            raise
        self._conn = os.minor(st.st_dev)
        log.info(
            "serving FUSE on %s (%d bytes%s, direct_io, max I/O %d KiB)",
            self.path,
            st.st_size,
            ", read-only" if self.device.capabilities.read_only else "",
            MAX_IO >> 10,
        )

    def _options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "foreground": True,
            "fsname": FSNAME,
            "subtype": FSNAME,
            "max_read": MAX_IO,
            "max_threads": self.max_threads,
            "max_idle_threads": self.max_threads,
            "default_permissions": True,
        }
        if self.device.capabilities.read_only:
            opts["ro"] = True
        return opts

    def _run(self, fuse_cls: Any, ops: _DiskOps) -> None:
        """The FUSE thread: fuse_main until the mount goes away."""
        err: BaseException | None = None
        try:
            fuse_cls(ops, self.mountpoint, **self._options())
        except BaseException as exc:
            err = exc
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self.loop.call_soon_threadsafe(self._ended_in_loop, err)

    def _initialized(self) -> None:
        """Called by the init operation (FUSE thread) once the kernel connected."""
        self.loop.call_soon_threadsafe(self._set_ready)

    def _set_ready(self) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def _ended_in_loop(self, err: BaseException | None) -> None:
        self._error = err
        self._ended.set()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(DstError(self._mount_failure(err)))
            return
        if self._closing:
            return
        if self._lazy:
            log.info("the last holder of %s let go; the FUSE session ended", self.path)
            if self._stop_cb is not None:
                self._stop_cb()
            return
        log.warning(
            "%s was unmounted from outside%s; the FUSE front end stopped",
            self.mountpoint,
            f" ({err})" if err else "",
        )
        if self.on_unmounted is not None:
            self.on_unmounted()

    def _mount_failure(self, err: BaseException | None) -> str:
        """One line for a mount that did not come up (mfusepy reports fuse_main's bare
        return code; libfuse has printed its own reason just before)."""
        msg = f"mounting FUSE on {self.mountpoint} failed"
        if isinstance(err, RuntimeError) and err.args and isinstance(err.args[0], int):
            return (
                f"{msg}: libfuse could not mount it (fuse_main returned {err.args[0]}; its "
                "reason, if it gave one, is on the line above)"
            )
        return f"{msg}: {err}" if err else msg

    async def _abort_start(self, exc: BaseException) -> None:
        """A start that failed half-way: take the mount down again if it came up."""
        self._closing = True
        if mount_at(self.mountpoint) is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(unmount, self.mountpoint, lazy=True)
        await self._wait_ended(self.close_timeout)

    async def _wait_ended(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except TimeoutError:
            return False
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        return True

    def abort_connection(self) -> bool:
        """End the FUSE session at once (holders then get ENOTCONN); via fusectl."""
        if self._conn is None:
            return False
        if not os.path.isdir(f"{FUSECTL}/{self._conn}") and os.geteuid() == 0:
            with contextlib.suppress(OSError):  # fusectl is not always mounted
                subprocess.run(
                    ["mount", "-t", "fusectl", "fusectl", FUSECTL],
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
        try:
            with open(f"{FUSECTL}/{self._conn}/abort", "w") as f:
                f.write("1")
        except OSError as exc:
            log.error(
                "cannot abort FUSE connection %d: %s (is fusectl mounted on %s?)",
                self._conn,
                exc,
                FUSECTL,
            )
            return False
        log.warning("aborted the FUSE connection of %s", self.mountpoint)
        return True

    def on_stop_signal(self, stop: Callable[[], None]) -> None:
        """A stop was asked for (SIGINT/SIGTERM): call ``stop`` once unmounting is safe.

        Not held: stop now. Held, first time: log the holders, keep serving. Held
        again: lazy unmount; ``stop`` runs when the last holder lets go. Once more:
        abort the FUSE connection.
        """
        if not self.mounted:
            stop()
            return
        if self._lazy:
            log.warning("%s is still held; aborting the FUSE connection", self.path)
            self.abort_connection()
            return
        held = self.holders()
        if not held:
            stop()
            return
        if not self._warned_busy:
            self._warned_busy = True
            log.warning(
                "not unmounting %s: in use by %s; still serving. Release it, or send "
                "SIGTERM again to force a lazy unmount",
                self.path,
                "; ".join(held),
            )
            return
        try:
            unmount(self.mountpoint, lazy=True)
        except OSError as exc:
            log.error("lazy unmount of %s failed: %s", self.mountpoint, exc)
            return
        self._lazy = True
        self._stop_cb = stop
        log.warning(
            "forced a lazy unmount of %s; still serving %s until released "
            "(a further SIGTERM aborts the FUSE connection: the holders get I/O errors)",
            self.mountpoint,
            "; ".join(held),
        )

    def statistics(self) -> dict[str, Any]:
        """Counters since start, shaped like the NBD front end's for `dst status`."""
        with self._stats_lock:
            st = dict(self.stats)
        ops = {"read": "reads", "write": "writes", "flush": "flushes"}
        ops.update({"trim": "trims", "zero": "zeroes"})
        return {
            "requests": {op: st[key] for op, key in ops.items()},
            "bytes_read": st["bytes_read"],
            "bytes_written": st["bytes_written"],
            "errors": st["errors"],
            "opens": st["opens"],
            "mounted": self.mounted,
            "path": self.path,
        }

    async def aclose(self) -> None:
        """Unmount (lazily if still held), wait for the FUSE thread; bounded in time."""
        if self._thread is None or self._closing:
            return
        self._closing = True
        if not self._ended.is_set() and not self._lazy:
            try:
                await asyncio.to_thread(unmount, self.mountpoint)
            except OSError as exc:
                held = self.holders()
                log.warning(
                    "unmounting %s failed (%s)%s; detaching it lazily",
                    self.mountpoint,
                    exc.strerror,
                    f": held by {'; '.join(held)}" if held else "",
                )
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(unmount, self.mountpoint, lazy=True)
        if not await self._wait_ended(self.close_timeout):
            log.warning(
                "the FUSE session of %s did not end in %.0f s", self.mountpoint, self.close_timeout
            )
            if self.abort_connection():
                await self._wait_ended(self.close_timeout)
        st = self.stats
        log.info(
            "stopped serving FUSE on %s: %d reads (%d KiB average), %d writes (%d KiB "
            "average), %d fsyncs, %d trims, %d zeroes, %d errors",
            self.path,
            st["reads"],
            st["bytes_read"] // max(st["reads"], 1) >> 10,
            st["writes"],
            st["bytes_written"] // max(st["writes"], 1) >> 10,
            st["flushes"],
            st["trims"],
            st["zeroes"],
            st["errors"],
        )

    async def __aenter__(self) -> FuseFrontend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
