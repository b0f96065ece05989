"""The framework's path for asynchronous plugins (librbd's kind), with a fake plugin whose
completions arrive from another thread, as librbd's do; and the hand-off that brings
such completions back to the event loop. No Ceph needed."""

from __future__ import annotations

import asyncio
import errno
import queue
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest

from dst.backends.base import AsyncBackend
from dst.backends.device import BackendDevice
from dst.backends.rbd import Handoff
from dst.device import Done, IoFlags
from dst.errors import IoError
from tests import conformance
from tests.conformance import Expect

SIZE = 16 << 20


class Completer:
    """One thread that runs completions, like librbd's: each is posted to the loop."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            job()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(5)


class FakeAio(AsyncBackend):
    """Bytes in memory, every request finished on the completer thread."""

    kind = "fake"
    can_trim = True
    can_zero = True
    can_fua = False

    def __init__(self, completer: Completer, *, read_only: bool = False) -> None:
        self.spec = "fake:"
        self.size = SIZE
        self.read_only = read_only
        self.identity = uuid.uuid4()
        self.data = bytearray(SIZE)
        self.ops: list[str] = []
        self.completer = completer
        self.fail: dict[str, int] = {}  # op -> errno to answer with
        self.gate: threading.Event | None = None  # hold completions until set
        self.threads: set[str] = set()

    def _finish(self, op: str, work: Callable[[], None], done: Done) -> None:
        loop = asyncio.get_running_loop()
        self.ops.append(op)

        def job() -> None:
            if self.gate is not None:
                self.gate.wait(10)
            self.threads.add(threading.current_thread().name)
            err: OSError | None = None
            if op in self.fail:
                err = OSError(self.fail[op], f"fake {op} failed")
            else:
                work()
            loop.call_soon_threadsafe(done, err)

        self.completer.jobs.put(job)

    def start_read(self, buf: memoryview, offset: int, done: Done) -> None:
        def work() -> None:
            buf[:] = self.data[offset : offset + len(buf)]

        self._finish("read", work, done)

    def start_write(self, buf: memoryview, offset: int, fua: bool, done: Done) -> None:
        data = bytes(buf)

        def work() -> None:
            self.data[offset : offset + len(data)] = data

        self._finish("write", work, done)

    def start_flush(self, done: Done) -> None:
        self._finish("flush", lambda: None, done)

    def start_trim(self, offset: int, length: int, done: Done) -> None:
        self._finish("trim", lambda: None, done)

    def start_zero(
        self, offset: int, length: int, may_trim: bool, done: Done, fast: bool = False
    ) -> None:
        if fast and not may_trim:  # as librbd's thick provisioning: refused for FAST_ZERO
            done(OSError(errno.EOPNOTSUPP, "no fast zeroing with NO_HOLE"))
            return

        def work() -> None:
            self.data[offset : offset + length] = bytes(length)

        self._finish("zero" if may_trim else "zero-thick", work, done)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        raise AssertionError("the framework must use start_read")

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        raise AssertionError("the framework must use start_write")


@pytest.fixture
def completer() -> Iterator[Completer]:
    c = Completer()
    yield c
    c.close()


def run(coro: object) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await coro  # type: ignore[misc]

    asyncio.run(bounded())


def test_conformance_through_the_asynchronous_path(completer: Completer) -> None:
    async def make() -> BackendDevice:
        return BackendDevice(FakeAio(completer))

    run(conformance.run_conformance(make, Expect(size=SIZE)))


def test_no_worker_thread_and_completions_on_the_loop(completer: Completer) -> None:
    fake = FakeAio(completer)
    dev = BackendDevice(fake)

    async def main() -> None:
        loop_thread = threading.current_thread()
        await dev.write(4096, b"a" * 4096)
        assert await dev.read(4096, 4096) == b"a" * 4096
        seen: list[tuple[BaseException | None, threading.Thread]] = []
        ended = asyncio.Event()

        def done(err: BaseException | None) -> None:
            seen.append((err, threading.current_thread()))
            ended.set()

        buf = bytearray(4096)
        dev.start_read(4096, memoryview(buf), IoFlags.NONE, done)
        assert not seen  # not inline: the plugin's thread finishes it
        await ended.wait()
        assert seen == [(None, loop_thread)] and buf == b"a" * 4096
        await dev.aclose()

    run(main())
    assert dev._executor is None and fake.threads == {completer.thread.name}
    assert dev.counters.reads == 2 and dev.counters.writes == 1


def test_preflush_before_and_emulated_fua_after(completer: Completer) -> None:
    fake = FakeAio(completer)
    dev = BackendDevice(fake)

    async def main() -> None:
        await dev.write(0, b"x" * 512, IoFlags.PREFLUSH | IoFlags.FUA)
        assert fake.ops == ["flush", "write", "flush"]
        fake.ops.clear()
        await dev.read(0, 512, IoFlags.PREFLUSH)
        assert fake.ops == ["flush", "read"]
        fake.ops.clear()
        await dev.write_zeroes(0, 8192, IoFlags.NO_HOLE | IoFlags.FUA)
        await dev.trim(0, 8192, IoFlags.FUA)
        assert fake.ops == ["zero-thick", "flush", "trim", "flush"]
        fake.ops.clear()
        await dev.write(0, b"", IoFlags.FUA)  # empty: nothing to write, the flush still runs
        assert fake.ops == ["flush"]
        await dev.aclose()

    run(main())
    st = dev.counters
    assert (st.writes, st.zeroes, st.trims, st.errors) == (2, 1, 1, 0)


def test_errors_name_the_request_and_are_counted(completer: Completer) -> None:
    fake = FakeAio(completer, read_only=False)
    fake.fail["write"] = errno.ENOSPC
    dev = BackendDevice(fake)

    async def main() -> None:
        with pytest.raises(IoError) as info:
            await dev.write(8192, b"y" * 4096)
        assert info.value.errno == errno.ENOSPC
        assert "write of 4096 bytes at offset 8192 failed: fake write failed" in str(info.value)
        fake.fail["flush"] = errno.EIO
        with pytest.raises(IoError) as info:  # the PREFLUSH fails: the read never starts
            await dev.read(0, 512, IoFlags.PREFLUSH)
        assert fake.ops[-1] == "flush" and info.value.errno == errno.EIO
        with pytest.raises(IoError) as info:  # refused before the plugin sees it
            await dev.read(SIZE - 512, 1024)
        assert info.value.errno == errno.EINVAL and fake.ops[-1] == "flush"
        await dev.aclose()
        with pytest.raises(IoError, match="after the device was closed"):
            await dev.read(0, 512)

    run(main())
    assert dev.counters.errors == 4 and dev.counters.writes == 0


def test_read_only_store_refuses_changes_before_the_plugin(completer: Completer) -> None:
    fake = FakeAio(completer, read_only=True)
    dev = BackendDevice(fake)

    async def main() -> None:
        for aw in (dev.write(0, b"z"), dev.trim(0, 4096), dev.write_zeroes(0, 4096)):
            with pytest.raises(IoError) as info:
                await aw
            assert info.value.errno == errno.EPERM
        assert fake.ops == []

    run(main())


def test_a_cancelled_caller_waits_until_the_plugin_let_go_of_its_buffer(
    completer: Completer,
) -> None:
    """The plugin writes into the caller's buffer on its own thread: cancelling the caller
    must not hand the buffer back (to a pool, to the next request) before that is over."""
    fake = FakeAio(completer)
    fake.data[:4] = b"late"
    fake.gate = threading.Event()
    dev = BackendDevice(fake)

    async def main() -> None:
        buf = bytearray(4)
        task = asyncio.create_task(dev.read_into(0, memoryview(buf)))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # still owned by the plugin
        assert dev._inflight == 1
        fake.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert buf == b"late" and dev._inflight == 0
        await dev.aclose()

    run(main())


def test_close_waits_for_requests_in_flight(completer: Completer) -> None:
    fake = FakeAio(completer)
    fake.gate = threading.Event()
    dev = BackendDevice(fake)

    async def main() -> None:
        write = asyncio.create_task(dev.write(0, b"w" * 4096))
        await asyncio.sleep(0.02)
        closing = asyncio.create_task(dev.aclose())
        await asyncio.sleep(0.05)
        assert not closing.done()
        fake.gate.set()
        await write
        await closing

    run(main())
    assert fake.data[:4096] == b"w" * 4096


def test_handoff_brings_completions_from_many_threads_to_the_loop_in_batches() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(cb: Callable[..., object], *args: object) -> asyncio.Handle:
            nonlocal wakeups
            wakeups += 1
            return real(cb, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        handoff = Handoff(loop)
        got: list[tuple[int, int]] = []
        wrong_thread: list[str] = []
        all_in = asyncio.Event()
        per, threads = 500, 4

        def done_for(t: int, i: int) -> Done:
            def done(err: BaseException | None) -> None:
                if threading.current_thread() is not threading.main_thread():
                    wrong_thread.append(threading.current_thread().name)
                got.append((t, i))
                if len(got) == per * threads:
                    all_in.set()

            return done

        def poster(t: int) -> None:
            for i in range(per):
                handoff.post(done_for(t, i), None)

        workers = [threading.Thread(target=poster, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        await asyncio.wait_for(all_in.wait(), 10)
        for w in workers:
            w.join(5)
        assert not wrong_thread
        for t in range(threads):  # each thread's completions in the order they were posted
            assert [i for tt, i in got if tt == t] == list(range(per))
        assert sorted(got) == sorted((t, i) for t in range(threads) for i in range(per))

        # completions that arrive while the loop is busy wake it once, as one batch
        got.clear()
        wakeups = 0
        posted = threading.Event()

        def burst() -> None:
            for i in range(100):
                handoff.post(done_for(9, i), None)
            posted.set()

        threading.Thread(target=burst).start()
        assert posted.wait(10)  # blocks the loop on purpose, as a busy loop would be
        for _ in range(10):
            await asyncio.sleep(0)
        assert got == [(9, i) for i in range(100)] and wakeups == 1

    run(main())
