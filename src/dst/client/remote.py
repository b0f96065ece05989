"""A remote member: a BlockDevice backed by one export node over the DST node protocol.

The asyncio shell around :class:`dst.proto.client.ClientCore`: it connects,
reconnects with back-off, feeds the core, keeps one timer armed and resolves a
future per transaction.  I/O issued while disconnected simply waits inside its
transaction budget; the caller sees latency, not errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from dataclasses import dataclass
from typing import Any

from dst import trace
from dst.aio import workers
from dst.aio.listen import connect
from dst.aio.stream import SocketStream
from dst.buffers import BufferPool
from dst.client.latency import Latency
from dst.device import BlockDevice, Buffer, Capabilities, IoFlags, check_range
from dst.errors import DstError, IoError
from dst.proto.client import ClientConfig, ClientCore, State
from dst.proto.events import (
    ChecksumMismatch,
    Completed,
    ConnectionDead,
    Ready,
    Refused,
    Resent,
)
from dst.proto.jobs import Job
from dst.proto.wire import Command, Status
from dst.uri import MemberUri

log = logging.getLogger("dst.member")

OPS = {
    Command.READ: "read",
    Command.WRITE: "write",
    Command.FLUSH: "flush",
    Command.TRIM: "trim",
    Command.WRITE_ZEROES: "zero",
    Command.DISCONNECT: "disconnect",
}


@dataclass
class LinkOptions:
    connect_timeout: float = 10.0
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0


class RemoteDevice(BlockDevice):
    """One export on one export node, as a block device."""

    def __init__(
        self,
        uri: MemberUri,
        config: ClientConfig,
        options: LinkOptions | None = None,
        pool: BufferPool | None = None,
    ) -> None:
        self.uri = uri
        self.name = uri.text
        self.options = options or LinkOptions()
        self.pool = pool or BufferPool()
        self.core = ClientCore(config, self.pool)
        self.state = "connecting"
        self.size = 0
        self.capabilities = Capabilities()
        self.last_error = ""
        self.reconnects = 0
        self._pending: dict[int, tuple[asyncio.Future[None], int, int, int, float]] = {}
        self._stream: SocketStream | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lost: asyncio.Event | None = None
        self._ready: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._kick: asyncio.Event | None = None
        self.latency = {op: Latency() for op in OPS.values()}
        self.counts = {op: 0 for op in OPS.values()}
        self.bytes = {"read": 0, "write": 0}

    # ---- lifecycle -----------------------------------------------------------------
    def launch(self) -> None:
        """Start connecting in the background and return at once (a mirror leg that may be
        down at start); ``connect`` waits for the first handshake instead."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._lost = asyncio.Event()
        self._kick = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"link {self.uri}")
        self._ready.add_done_callback(_retrieve)

    async def wait_ready(self, timeout: float) -> bool:
        """True once connected; False if not within ``timeout``; DstError if refused."""
        assert self._ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            return False
        return True

    async def connect(self) -> None:
        """Connect and handshake, retrying within --connect-timeout; raise DstError if refused
        or unreachable."""
        self.launch()
        assert self._ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.options.connect_timeout)
        except TimeoutError:
            why = self.last_error or "no answer"
            await self.aclose()
            raise DstError(
                f"cannot reach {self.uri} within --connect-timeout "
                f"{self.options.connect_timeout:g} s: {why}; check that the export node is "
                "running and the address is right"
            ) from None
        except BaseException:
            await self.aclose()
            raise

    async def _run(self) -> None:
        delay = self.options.reconnect_min
        addr = self.uri.address
        while not self._closing:
            try:
                sock = await connect(addr, self.options.connect_timeout)
            except (OSError, TimeoutError) as exc:
                self.last_error = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                if trace.on.proto:
                    trace.emit("proto", "connect-failed", member=self.name, error=self.last_error)
                await self._sleep(delay)
                delay = min(delay * 2, self.options.reconnect_max)
                continue
            assert self._lost is not None
            self._lost.clear()
            self._stream = SocketStream(sock, self)
            self.core.connection_made(time.monotonic())
            self._stream.start()
            self._pump()
            await self._lost.wait()
            self._stream = None
            self.core.connection_lost(time.monotonic())
            self._pump()
            if self._closing or self.state == "failed":
                break
            if self.core.first_welcome is not None and self.state != "failed":
                if self.state == "connected":
                    log.warning("%s: connection lost; reconnecting", self.name)
                self.set_state("reconnecting")
            if self.core.welcome is not None and self.core.generation > 0 and self._was_ready:
                delay = self.options.reconnect_min
            self._was_ready = False
            await self._sleep(delay)
            delay = min(delay * 2, self.options.reconnect_max)

    _was_ready = False

    async def _sleep(self, delay: float) -> None:
        assert self._kick is not None
        self._kick.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._kick.wait(), delay)

    # Receiver protocol for SocketStream
    def get_buffer(self) -> memoryview:
        return self.core.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.core.buffer_updated(nbytes, time.monotonic())
        self._pump()

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None:
            self.last_error = str(exc)
        if self._lost is not None:
            self._lost.set()

    # ---- the pump ------------------------------------------------------------------
    def _pump(self) -> None:
        core = self.core
        while (ev := core.next_event()) is not None:
            if isinstance(ev, Completed):
                self._complete(ev)
            elif isinstance(ev, Ready):
                self._on_ready(ev)
            elif isinstance(ev, Resent):
                if trace.on.txn:
                    trace.emit(
                        "txn",
                        "resend",
                        member=self.name,
                        txn=ev.txn,
                        attempt=ev.attempt,
                        why=ev.why,
                    )
            elif isinstance(ev, ChecksumMismatch):
                log.warning(
                    "%s: checksum mismatch (%s) in transaction %d; resent",
                    self.name,
                    ev.where,
                    ev.txn,
                )
            elif isinstance(ev, ConnectionDead):
                self.last_error = ev.reason
                if ev.reason != "disconnected":
                    log.warning("%s: closing the connection: %s", self.name, ev.reason)
                if trace.on.proto:
                    trace.emit("proto", "connection-dead", member=self.name, reason=ev.reason)
                self._close_stream()
            elif isinstance(ev, Refused):
                self._on_refused(ev)
        jobs = core.take_jobs()
        if jobs:
            workers.run_jobs(jobs, self._job_done)
        stream = self._stream
        if stream is not None:
            out = core.data_to_send()
            if out:
                stream.write(out)
        self._arm_timer()

    def _job_done(self, job: Job) -> None:
        self.core.job_done(job, time.monotonic())
        self._pump()

    def _close_stream(self) -> None:
        if self._stream is not None:
            out = self.core.data_to_send()
            if out:
                self._stream.write(out)
            self._stream.close()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.core.get_timer()
        if when is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(
                loop.time() + max(0.0, when - time.monotonic()), self._on_timer
            )

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(time.monotonic())
        self._pump()

    def _on_ready(self, ev: Ready) -> None:
        w = ev.welcome
        self._was_ready = True
        self.size = w.size
        self.capabilities = Capabilities(
            read_only=w.read_only,
            can_flush=bool(w.commands & (1 << Command.FLUSH)),
            can_fua=True,
            can_trim=bool(w.commands & (1 << Command.TRIM)),
            can_zero=bool(w.commands & (1 << Command.WRITE_ZEROES)),
            can_multi_conn=True,
            min_block=w.min_block,
            preferred_block=w.preferred_block,
            max_request=w.max_request,
        )
        self.trim_zeroes = w.trim_zeroes
        self.identity = w.identity
        self.set_state("connected")
        if ev.reconnect:
            self.reconnects += 1
            log.info(
                "%s: reconnected (generation %d, %d transactions pending)",
                self.name,
                ev.generation,
                self.core.in_flight,
            )
        else:
            log.info(
                "%s: connected: %d bytes, %s, identity %s, cipher %s, checksum %s",
                self.name,
                w.size,
                "read-only" if w.read_only else "read-write",
                w.identity,
                w.cipher,
                w.checksum,
            )
        if trace.on.proto:
            trace.emit(
                "proto",
                "ready",
                member=self.name,
                generation=ev.generation,
                reconnect=ev.reconnect,
                cipher=w.cipher,
                checksum=w.checksum,
            )
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    def _on_refused(self, ev: Refused) -> None:
        who = "the export node refused" if ev.by_peer else "refused the export node"
        msg = f"{self.uri}: {who}: {ev.message}"
        self.last_error = ev.message
        if self._ready is not None and not self._ready.done():
            if ev.permanent:
                self.set_state("failed")
                self._ready.set_exception(DstError(msg))
            else:
                log.warning("%s; retrying", msg)
            self._close_stream()
            return
        if ev.permanent:
            log.error("%s; the member is marked failed", msg)
            self.set_state("failed")
            self.core.shutdown(Status.EIO, f"member failed: {ev.message}")
        else:
            log.warning("%s; retrying", msg)
        self._close_stream()

    def _complete(self, ev: Completed) -> None:
        entry = self._pending.pop(ev.txn, None)
        if entry is None:
            return
        fut, cmd, offset, length, started = entry
        op = OPS.get(Command(cmd), "other")
        elapsed = time.monotonic() - started
        if ev.status == 0:
            self.latency[op].add(elapsed)
            if trace.on.txn:
                trace.emit(
                    "txn",
                    "ack",
                    member=self.name,
                    txn=ev.txn,
                    op=op,
                    offset=offset,
                    length=length,
                    attempts=ev.attempts,
                    seconds=round(elapsed, 6),
                )
            if not fut.done():
                fut.set_result(None)
            return
        if ev.timed_out:
            log.error(
                "%s: %s at offset %d length %d failed: %s",
                self.name,
                op,
                offset,
                length,
                ev.message,
            )
        if trace.on.txn:
            trace.emit(
                "txn",
                "fail",
                member=self.name,
                txn=ev.txn,
                op=op,
                offset=offset,
                length=length,
                attempts=ev.attempts,
                status=ev.status,
                message=ev.message,
            )
        if not fut.done():
            err = ev.status if ev.status < 0x1000 else errno.EIO
            fut.set_exception(IoError(err, f"{self.name}: {op} at {offset}+{length}: {ev.message}"))

    # ---- I/O -------------------------------------------------------------------------
    async def _txn(
        self,
        cmd: Command,
        offset: int,
        length: int,
        flags: IoFlags,
        payload: memoryview | None = None,
        into: memoryview | None = None,
    ) -> None:
        if self.state == "failed" or self.core.state == State.CLOSED:
            raise IoError(errno.EIO, f"{self.name} has failed: {self.last_error}")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        now = time.monotonic()
        tid = self.core.submit(cmd, offset, length, int(flags), now, payload, into)
        self._pending[tid] = (fut, cmd, offset, length, now)
        op = OPS.get(cmd, "other")
        self.counts[op] += 1
        if trace.on.txn:
            trace.emit(
                "txn",
                "submit",
                member=self.name,
                txn=tid,
                op=op,
                offset=offset,
                length=length,
                flags=int(flags),
            )
        self._pump()
        await fut

    def _check(self, offset: int, length: int, write: bool) -> None:
        check_range(self.size, offset, length)
        if write and self.capabilities.read_only:
            raise IoError(errno.EPERM, f"{self.name} is read-only")

    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        n = len(buf)
        self._check(offset, n, False)
        step = self.capabilities.max_request
        pre = flags & IoFlags.PREFLUSH  # a barrier before the read; FUA means nothing here
        if n <= step:
            await self._txn(Command.READ, offset, n, pre, into=buf)
        else:
            await asyncio.gather(
                *(
                    self._txn(
                        Command.READ,
                        offset + p,
                        min(step, n - p),
                        pre,
                        into=buf[p : p + step],
                    )
                    for p in range(0, n, step)
                )
            )
        self.bytes["read"] += n

    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        mv = data if isinstance(data, memoryview) else memoryview(data)
        n = len(mv)
        self._check(offset, n, True)
        step = self.capabilities.max_request
        if n <= step:
            await self._txn(Command.WRITE, offset, n, flags, payload=mv)
        else:
            await asyncio.gather(
                *(
                    self._txn(
                        Command.WRITE, offset + p, min(step, n - p), flags, payload=mv[p : p + step]
                    )
                    for p in range(0, n, step)
                )
            )
        self.bytes["write"] += n

    async def flush(self) -> None:
        await self._txn(Command.FLUSH, 0, 0, IoFlags.NONE)

    async def trim(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        self._check(offset, length, True)
        if not self.capabilities.can_trim:
            raise IoError(errno.EOPNOTSUPP, f"{self.name} does not support trim")
        await self._ranged(Command.TRIM, offset, length, flags)

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        self._check(offset, length, True)
        await self._ranged(Command.WRITE_ZEROES, offset, length, flags)

    async def _ranged(self, cmd: Command, offset: int, length: int, flags: IoFlags) -> None:
        step = 1 << 31
        if length <= step:
            await self._txn(cmd, offset, length, flags)
            return
        await asyncio.gather(
            *(
                self._txn(cmd, offset + p, min(step, length - p), flags)
                for p in range(0, length, step)
            )
        )

    # ---- status and knobs ------------------------------------------------------------
    def set_knob(self, key: str, value: float) -> None:
        cfg = self.core.config
        if key == "resends":
            cfg.resends = int(value)
        elif key == "resend-timeout":
            cfg.resend_timeout = float(value)
        elif key == "ping-interval":
            cfg.ping_interval = float(value)
        elif key == "ping-timeout":
            cfg.ping_timeout = float(value)
        else:
            raise KeyError(key)
        self._arm_timer()

    def statistics(self) -> dict[str, Any]:
        st = self.core.stats
        w = self.core.welcome
        return {
            "uri": self.uri.text,
            "state": self.state,
            "generation": self.core.generation,
            "identity": str(getattr(self, "identity", "")),
            "size": self.size,
            "in_flight": self.core.in_flight,
            "completed": st.completed,
            "submitted": st.submitted,
            "resends": st.resends,
            "timeouts": st.timeouts,
            "failed": st.failed,
            "errors": st.errors,
            "checksum_errors": st.checksum_errors,
            "reconnects": self.reconnects,
            "connections": st.connections,
            "pings": st.pings,
            "requests": dict(self.counts),
            "bytes_read": self.bytes["read"],
            "bytes_written": self.bytes["write"],
            "latency": {op: lat.summary() for op, lat in self.latency.items() if lat.count},
            "cipher": w.cipher if w else None,
            "checksum": w.checksum if w else None,
            "last_error": self.last_error,
        }

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._stream is not None and self.core.connected:
            self.core.close()
            self._pump()
            with contextlib.suppress(TimeoutError):
                assert self._lost is not None
                await asyncio.wait_for(self._lost.wait(), 2.0)
        self.core.shutdown()
        self._pump_completions()
        if self._stream is not None:
            self._stream.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._kick is not None:
            self._kick.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _pump_completions(self) -> None:
        while (ev := self.core.next_event()) is not None:
            if isinstance(ev, Completed):
                self._complete(ev)


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Mark a background start's refusal as seen (the state and the log report it)."""
    if not fut.cancelled():
        fut.exception()
