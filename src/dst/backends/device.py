"""The framework around a backend plugin: a :class:`BlockDevice` over a :class:`Backend`.

Like nbdkit's server core, it checks every range before the plugin sees it,
refuses changes to read-only stores, runs blocking plugins on a bounded worker
pool (non-blocking ones inline on the loop, asynchronous ones - librbd - started
on the loop and finished by their completion callback), emulates what a plugin
lacks (FUA by a flush after the write; zeroes by writes, which FAST_ZERO refuses
instead) and turns ``OSError`` into ``IoError`` that names the request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from mypy_extensions import mypyc_attr

from dst.backends.base import AsyncBackend, Backend
from dst.device import (
    CACHE,
    EXTENTS,
    READ,
    TRIM,
    WRITE,
    ZERO,
    BlockDevice,
    Buffer,
    Capabilities,
    Done,
    Extent,
    IoCounters,
    IoFlags,
    Rule,
    checked_extents,
    fast_zero_refused,
    merge_extents,
)
from dst.errors import IoError

T = TypeVar("T")

DEFAULT_WORKERS = 8

_shared: concurrent.futures.ThreadPoolExecutor | None = None
_shared_lock = threading.Lock()


def shared_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide worker pool for blocking backends, made on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = concurrent.futures.ThreadPoolExecutor(
                max_workers=DEFAULT_WORKERS, thread_name_prefix="dst-backend"
            )
        return _shared


def _as_bytes_view(data: Buffer) -> memoryview:
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


async def _settle(fut: asyncio.Future[Any]) -> None:
    """Wait out a worker call whose caller was cancelled: it still owns the caller's buffer."""
    while not fut.done():
        try:
            await asyncio.wait([fut])
        except asyncio.CancelledError:
            continue
    if not fut.cancelled():
        fut.exception()  # retrieved: it goes nowhere, the caller is gone


Step = Callable[[Done], None]


def _nothing(done: Done) -> None:
    """An empty request: nothing for the plugin to do (PREFLUSH/FUA still apply)."""
    done(None)


async def _wait(start: Step) -> None:
    """Start a request and wait for its ``done``; a cancelled caller still waits it out,
    since the plugin owns the caller's buffer until then."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def done(err: BaseException | None) -> None:
        if fut.done():
            return
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)

    start(done)
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError as exc:
        await _settle(fut)
        raise exc  # named, not bare: see dst.compiled


# Larger requests go to the pool anyway: copying them inline would stall the loop.
FAST_PATH_MAX = 256 << 10

# Flags tested as plain ints on the fast paths: int & IntFlag still runs Flag.__and__.
_FUA = int(IoFlags.FUA)
_PREFLUSH = int(IoFlags.PREFLUSH)


@mypyc_attr(allow_interpreted_subclasses=True)
class BackendDevice(BlockDevice):
    """Serve a backend as an asynchronous block device."""

    def __init__(
        self,
        backend: Backend,
        *,
        executor: concurrent.futures.Executor | None = None,
        name: str | None = None,
    ) -> None:
        self.backend = backend
        self.name = name or backend.spec
        self.size = backend.size
        self.identity = backend.identity
        self.trim_reads_zeroes = backend.trim_reads_zeroes
        self.capabilities = Capabilities(
            read_only=backend.read_only,
            can_flush=True,
            can_fua=True,  # native, or emulated by a flush after the write
            can_trim=backend.can_trim and not backend.read_only,
            can_zero=not backend.read_only,  # native, or emulated by writing zeroes
            # FAST_ZERO: the plugin's own zeroing, never the emulation (refused instead)
            can_fast_zero=backend.can_zero and not backend.read_only,
        )
        self.io_counters = IoCounters()  # typed: never None here
        self.counters = self.io_counters
        self._executor = (
            executor if executor is not None else (shared_executor() if backend.blocking else None)
        )
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._aio = backend if isinstance(backend, AsyncBackend) else None

    async def _call(self, op: str, offset: int, length: int, fn: Callable[[], T]) -> T:
        """Run one request on the backend, inline or on the pool, mapping its errors."""
        if self._closed:
            self.io_counters.errors += 1
            raise IoError(errno.EIO, f"{self.name}: {op} after the device was closed")
        self._inflight += 1
        self._idle.clear()
        try:
            if self._executor is None:
                return fn()
            fut = asyncio.get_running_loop().run_in_executor(self._executor, fn)
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError as exc:
                await _settle(fut)
                raise exc  # named, not bare: see dst.compiled
        except OSError as e:
            err = self._mapped(op, offset, length, e)
            if err is e:
                raise
            raise err from e
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    def _mapped(self, op: str, offset: int, length: int, e: OSError) -> IoError:
        """The error a failed backend call reaches the caller with, counted: an IoError as
        it is, any other OSError as the IoError that names the request."""
        if isinstance(e, IoError):
            self.io_counters.errors += 1
            return e
        return self._failed(op, offset, length, e)

    def _start_pooled(
        self,
        op: str,
        offset: int,
        length: int,
        fn: Callable[[], object],
        done: Done,
        ok: Callable[[], None],
    ) -> None:
        """Run ``fn`` on the pool without a task: the future's callback ends the request
        (``ok`` counts it, then ``done``), with the errors :meth:`_call` would raise."""
        executor = self._executor
        assert executor is not None
        self._inflight += 1
        self._idle.clear()
        fut = asyncio.get_running_loop().run_in_executor(executor, fn)

        def ended(f: asyncio.Future[object]) -> None:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
            if f.cancelled():
                done(asyncio.CancelledError())
                return
            exc = f.exception()
            if exc is None:
                ok()
                done(None)
            else:
                done(self._mapped(op, offset, length, exc) if isinstance(exc, OSError) else exc)

        fut.add_done_callback(ended)

    def _failed(self, op: str, offset: int, length: int, e: OSError) -> IoError:
        """A backend's OSError as the IoError callers see, counted."""
        self.io_counters.errors += 1
        return IoError(
            e.errno or errno.EIO,
            f"{self.name}: {op} of {length} bytes at offset {offset} failed: {e.strerror or e}",
        )

    def _fast(self, op: str, offset: int, length: int, fn: Callable[[], T]) -> T | None:
        """Try a non-blocking call inline on the loop (None: not tried); errors as ``_call``."""
        if self._closed or length > FAST_PATH_MAX or self._executor is None:
            return None
        try:
            return fn()
        except OSError as e:
            raise self._failed(op, offset, length, e) from e

    def _wrap(
        self, flags: IoFlags, fn: Callable[[], None], emulate_fua: bool
    ) -> Callable[[], None]:
        """PREFLUSH before, FUA by a flush after: one trip to the pool for the lot."""
        backend = self.backend
        preflush = bool(flags & IoFlags.PREFLUSH)
        postflush = emulate_fua and bool(flags & IoFlags.FUA)

        def run() -> None:
            if preflush:
                backend.flush()
            fn()
            if postflush:
                backend.flush()

        return run

    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        view = _as_bytes_view(buf)
        if self._aio is not None:
            await _wait(lambda done: self._aio_read(offset, view, flags, done))
            return
        self.check(READ, offset, len(view))
        backend = self.backend
        if not (flags & IoFlags.PREFLUSH) and self._fast(
            "read", offset, len(view), lambda: backend.try_pread_nowait(view, offset)
        ):
            self.io_counters.reads += 1  # served from the page cache without a trip to the pool
            self.io_counters.bytes_read += len(view)
            return
        await self._pooled_read(offset, view, flags)

    async def _pooled_read(self, offset: int, view: memoryview, flags: IoFlags) -> None:
        """A checked read that the page cache could not serve (or that has PREFLUSH)."""
        backend = self.backend
        if len(view) or flags & IoFlags.PREFLUSH:
            run = self._wrap(flags, lambda: backend.pread_into(view, offset), False)
            await self._call("read", offset, len(view), run)
        self.io_counters.reads += 1
        self.io_counters.bytes_read += len(view)

    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        view = _as_bytes_view(data)
        if self._aio is not None:
            await _wait(lambda done: self._aio_write(offset, view, flags, done))
            return
        self.check(WRITE, offset, len(view))
        backend = self.backend
        native_fua = backend.can_fua and bool(flags & IoFlags.FUA)
        done = 0
        if not (flags & (IoFlags.PREFLUSH | IoFlags.FUA)):
            # the page cache takes what it can without blocking; the pool writes the rest
            done = (
                self._fast(
                    "write", offset, len(view), lambda: backend.try_pwrite_nowait(view, offset)
                )
                or 0
            )
        if done < len(view) or not view:
            rest, at = view[done:], offset + done
            run = self._wrap(
                flags, lambda: backend.pwrite(rest, at, native_fua), not backend.can_fua
            )
            await self._call("write", at, len(rest), run)
        self.io_counters.writes += 1
        self.io_counters.bytes_written += len(view)

    def start_read(self, offset: int, buf: memoryview, flags: IoFlags, done: Done) -> None:
        """Inline when the backend never blocks or the page cache has the data; a task for
        the pool otherwise."""
        view = _as_bytes_view(buf)
        n = len(view)
        if self._aio is not None:
            self._aio_read(offset, view, flags, done)
            return
        if int(flags) & _PREFLUSH or n > FAST_PATH_MAX or self._closed:
            super().start_read(offset, buf, flags, done)
            return
        backend = self.backend
        try:
            if offset < 0 or offset + n > self.size:  # n <= FAST_PATH_MAX <= max_request
                self.check(READ, offset, n)
            if self._executor is not None:
                if not self._fast(
                    "read", offset, n, lambda: backend.try_pread_nowait(view, offset)
                ):
                    # not cached: the pool (checked, and the page cache asked, already),
                    # ended by the future's callback: no task
                    counters = self.io_counters

                    def counted() -> None:
                        counters.reads += 1
                        counters.bytes_read += n

                    self._start_pooled(
                        "read", offset, n, lambda: backend.pread_into(view, offset), done, counted
                    )
                    return
            else:
                try:
                    backend.pread_into(view, offset)
                except OSError as e:
                    raise self._failed("read", offset, n, e) from e
        except IoError as e:
            done(e)
            return
        self.io_counters.reads += 1
        self.io_counters.bytes_read += n
        done(None)

    def start_write(self, offset: int, data: memoryview, flags: IoFlags, done: Done) -> None:
        """Inline when the backend never blocks (tmpfs, memory) or the page cache takes the
        whole write; the rest on the pool, ended by its future's callback (no task)."""
        view = _as_bytes_view(data)
        n = len(view)
        if self._aio is not None:
            self._aio_write(offset, view, flags, done)
            return
        if n > FAST_PATH_MAX or self._closed or not n:
            super().start_write(offset, data, flags, done)
            return
        backend = self.backend
        f = int(flags)
        if offset < 0 or offset + n > self.size or backend.read_only:
            try:
                self.check(WRITE, offset, n)
            except IoError as e:
                done(e)
                return
        if self._executor is not None:
            if f & (_FUA | _PREFLUSH):
                super().start_write(offset, data, flags, done)
                return
            try:
                took = self._fast(
                    "write", offset, n, lambda: backend.try_pwrite_nowait(view, offset)
                )
            except IoError as e:
                done(e)
                return
            counters = self.io_counters

            def counted() -> None:
                counters.writes += 1
                counters.bytes_written += n

            if took == n:
                counted()
                done(None)
                return
            rest, at = view[took or 0 :], offset + (took or 0)
            self._start_pooled(
                "write", at, len(rest), lambda: backend.pwrite(rest, at, False), done, counted
            )
            return
        try:
            if not f & (_FUA | _PREFLUSH):
                backend.pwrite(view, offset, False)
            else:
                fua = backend.can_fua and bool(f & _FUA)
                self._wrap(flags, lambda: backend.pwrite(view, offset, fua), not backend.can_fua)()
        except OSError as e:
            done(self._failed("write", offset, n, e))
            return
        self.io_counters.writes += 1
        self.io_counters.bytes_written += n
        done(None)

    async def flush(self) -> None:
        if self._aio is not None:
            await _wait(lambda done: self._aio_flush(done))
            return
        await self._call("flush", 0, 0, self.backend.flush)
        self.io_counters.flushes += 1

    async def trim(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        if self._aio is not None:
            await _wait(lambda done: self._aio_trim(offset, length, flags, done))
            return
        self.check(TRIM, offset, length)
        backend = self.backend
        run = self._wrap(flags, lambda: backend.trim(offset, length), True)
        await self._call("trim", offset, length, run)
        self.io_counters.trims += 1

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        if self._aio is not None:
            await _wait(lambda done: self._aio_zero(offset, length, flags, done))
            return
        self.check(ZERO, offset, length)
        backend = self.backend
        may_trim = not flags & IoFlags.NO_HOLE
        fast = self._fast_zero(flags)
        run = self._wrap(flags, lambda: backend.zero(offset, length, may_trim, fast), True)
        await self._call("write_zeroes", offset, length, run)
        self.io_counters.zeroes += 1

    def _fast_zero(self, flags: IoFlags) -> bool:
        """Whether a zero is FAST_ZERO; refused here at once when the plugin has no
        zeroing of its own (the framework's would write zeroes)."""
        if not flags & IoFlags.FAST_ZERO:
            return False
        if not self.backend.can_zero:
            self.io_counters.errors += 1
            raise fast_zero_refused(self.name, "the store has no native zeroing")
        return True

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch (the plugin's ``cache``: POSIX_FADV_WILLNEED on files and disks)."""
        self.check(CACHE, offset, length)
        if length:
            backend = self.backend  # on the pool when it may block, like a read
            await self._call("cache", offset, length, lambda: backend.cache(offset, length))
        self.io_counters.caches += 1

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """The backend's view of allocation (SEEK_DATA/SEEK_HOLE, its own map, ...)."""
        self.check(EXTENTS, offset, length)
        if not length:
            return []
        backend = self.backend
        got = await self._call("extents", offset, length, lambda: backend.extents(offset, length))
        return merge_extents(checked_extents(self.name, offset, length, got))

    # ---- asynchronous plugins: started here, ended by the plugin's completion -------------
    def _aio_read(self, offset: int, view: memoryview, flags: IoFlags, done: Done) -> None:
        aio, n = self._aio, len(view)
        assert aio is not None

        def counted(err: BaseException | None) -> None:
            if err is None:
                self.io_counters.reads += 1
                self.io_counters.bytes_read += n
            done(err)

        if self._refused(READ, offset, n, done):
            return
        start: Step = (lambda d: aio.start_read(view, offset, d)) if n else _nothing
        self._begin("read", offset, n, flags, start, False, counted)

    def _aio_write(self, offset: int, view: memoryview, flags: IoFlags, done: Done) -> None:
        aio, n = self._aio, len(view)
        assert aio is not None
        fua = aio.can_fua and bool(flags & IoFlags.FUA)

        def counted(err: BaseException | None) -> None:
            if err is None:
                self.io_counters.writes += 1
                self.io_counters.bytes_written += n
            done(err)

        if self._refused(WRITE, offset, n, done):
            return
        start: Step = (lambda d: aio.start_write(view, offset, fua, d)) if n else _nothing
        self._begin("write", offset, n, flags, start, not aio.can_fua, counted)

    def _aio_flush(self, done: Done) -> None:
        aio = self._aio
        assert aio is not None

        def counted(err: BaseException | None) -> None:
            if err is None:
                self.io_counters.flushes += 1
            done(err)

        self._begin("flush", 0, 0, IoFlags.NONE, aio.start_flush, False, counted)

    def _aio_trim(self, offset: int, length: int, flags: IoFlags, done: Done) -> None:
        aio = self._aio
        assert aio is not None

        def counted(err: BaseException | None) -> None:
            if err is None:
                self.io_counters.trims += 1
            done(err)

        if self._refused(TRIM, offset, length, done):
            return
        start: Step = (lambda d: aio.start_trim(offset, length, d)) if length else _nothing
        self._begin("trim", offset, length, flags, start, True, counted)

    def _aio_zero(self, offset: int, length: int, flags: IoFlags, done: Done) -> None:
        aio = self._aio
        assert aio is not None
        may_trim = not flags & IoFlags.NO_HOLE

        def counted(err: BaseException | None) -> None:
            if err is None:
                self.io_counters.zeroes += 1
            done(err)

        if self._refused(ZERO, offset, length, done):
            return
        try:
            fast = self._fast_zero(flags)
        except IoError as e:
            done(e)
            return
        start: Step = (
            (lambda d: aio.start_zero(offset, length, may_trim, d, fast)) if length else _nothing
        )
        self._begin("write_zeroes", offset, length, flags, start, True, counted)

    def _refused(self, rule: Rule, offset: int, length: int, done: Done) -> bool:
        """:meth:`check` for a started request: True (and ``done`` told) when refused."""
        try:
            self.check(rule, offset, length)
        except IoError as e:
            done(e)
            return True
        return False

    def _begin(
        self,
        op: str,
        offset: int,
        length: int,
        flags: IoFlags,
        start: Step,
        emulate_fua: bool,
        done: Done,
    ) -> None:
        """Run ``start`` on the plugin, after a flush for PREFLUSH and before one for an
        emulated FUA; ``done`` gets None or the IoError that names the request."""
        if self._closed:
            self.io_counters.errors += 1
            done(IoError(errno.EIO, f"{self.name}: {op} after the device was closed"))
            return
        aio = self._aio
        assert aio is not None
        steps: list[Step] = []
        if flags & IoFlags.PREFLUSH:
            steps.append(aio.start_flush)
        steps.append(start)
        if emulate_fua and flags & IoFlags.FUA:
            steps.append(aio.start_flush)
        self._inflight += 1
        self._idle.clear()
        single = len(steps) == 1  # the common case: one call, no chain to walk

        def end(err: BaseException | None) -> None:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
            if isinstance(err, IoError):
                self.io_counters.errors += 1
            elif isinstance(err, OSError):
                err = self._failed(op, offset, length, err)
            elif err is not None:
                self.io_counters.errors += 1
            done(err)

        def run(i: int) -> None:
            def next_step(err: BaseException | None) -> None:
                if err is not None or i + 1 == len(steps):
                    end(err)
                else:
                    run(i + 1)

            try:
                steps[i](end if single else next_step)
            except OSError as e:  # a plugin must not raise; if it does, the request failed
                end(e)

        run(0)

    def statistics(self) -> dict[str, Any]:
        stats = self.io_counters.as_dict()
        stats["inflight"] = self._inflight
        try:
            stats["backend"] = self.backend.statistics()
        except OSError as e:
            stats["backend"] = {"kind": self.backend.kind, "error": str(e)}
        return stats

    async def aclose(self) -> None:
        """Wait for in-flight calls (a closed descriptor number may be reused), then close."""
        if self._closed:
            return
        self._closed = True
        await self._idle.wait()
        self.backend.close()

    def __repr__(self) -> str:
        return f"<BackendDevice {self.name} size={self.size}>"
