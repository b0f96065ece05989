"""A remote member: a BlockDevice backed by one export node over the DST node protocol.

:class:`dst.proto.client.ClientCore` in the shared link shell (``client/link.py``:
connect, reconnect with back-off, one timer), resolving a future per transaction.  I/O issued while disconnected simply waits inside its
transaction budget; the caller sees latency, not errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from typing import Any

from dst import trace
from dst.buffers import BufferPool
from dst.client.link import LinkedDevice, LinkOptions
from dst.device import (
    CACHE,
    EXTENTS,
    READ,
    TRIM,
    WRITE,
    ZERO,
    Buffer,
    Capabilities,
    Done,
    Extent,
    IoFlags,
    checked_extents,
    pieces,
)
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
from dst.proto.wire import MAX_EXTENTS_LENGTH, Command, ReqFlags, Status
from dst.uri import MemberUri

log = logging.getLogger("dst.member")

__all__ = ["LinkOptions", "RemoteDevice"]

_NO_FLAGS = IoFlags.NONE
_PREFLUSH = IoFlags.PREFLUSH
_PREFLUSH_BIT = int(IoFlags.PREFLUSH)  # int & IntFlag would run Flag.__and__

OPS: dict[int, str] = {
    Command.READ: "read",
    Command.WRITE: "write",
    Command.FLUSH: "flush",
    Command.TRIM: "trim",
    Command.WRITE_ZEROES: "zero",
    Command.EXTENTS: "extents",
    Command.CACHE: "cache",
    Command.DISCONNECT: "disconnect",
}


class RemoteDevice(LinkedDevice):
    """One export on one export node, as a block device."""

    what = "export"
    op_names = tuple(OPS.values())

    def __init__(
        self,
        uri: MemberUri,
        config: ClientConfig,
        options: LinkOptions | None = None,
        pool: BufferPool | None = None,
    ) -> None:
        self.pool = pool or BufferPool()
        # the DST core itself (``core``, of the link, is the same object seen as any LinkCore)
        self.client_core = ClientCore(config, self.pool)
        super().__init__(uri, options, self.client_core)
        # transaction id -> (what to call when it ends, command, offset, length, start time)
        self._pending: dict[int, tuple[Done, int, int, int, float]] = {}
        self._extents: dict[int, tuple[Extent, ...]] = {}  # answers of finished EXTENTS

    @property
    def _ever_connected(self) -> bool:
        return self.client_core.first_welcome is not None

    # ---- events of the core -----------------------------------------------------------
    def _on_event(self, ev: object) -> None:
        if isinstance(ev, Completed):
            self._complete(ev)
        elif isinstance(ev, Ready):
            self._on_ready(ev)
        elif isinstance(ev, Resent):
            if trace.on.txn:
                trace.emit(
                    "txn", "resend", member=self.name, txn=ev.txn, attempt=ev.attempt, why=ev.why
                )
        elif isinstance(ev, ChecksumMismatch):
            log.warning(
                "%s: checksum mismatch (%s) in transaction %d; resent", self.name, ev.where, ev.txn
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

    def _on_ready(self, ev: Ready) -> None:
        w = ev.welcome
        self.size = w.size
        self.capabilities = Capabilities(
            read_only=w.read_only,
            can_flush=bool(w.commands & (1 << Command.FLUSH)),
            can_fua=True,
            can_trim=bool(w.commands & (1 << Command.TRIM)),
            can_zero=bool(w.commands & (1 << Command.WRITE_ZEROES)),
            # without FAST_ZERO in FLAGS (an older export node) the core refuses it here
            can_fast_zero=not w.read_only
            and bool(w.commands & (1 << Command.WRITE_ZEROES))
            and bool(w.flags & ReqFlags.FAST_ZERO),
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
                self.client_core.in_flight,
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
        self._ready_now()

    def _on_refused(self, ev: Refused) -> None:
        who = "the export node refused" if ev.by_peer else "refused the export node"
        msg = f"{self.uri}: {who}: {ev.message}"
        self.last_error = ev.message
        if not self._ever_connected:
            if ev.permanent:
                self.set_state("failed")
                self._refused_at_start(DstError(msg))
            else:
                log.warning("%s; retrying", msg)
            self._close_stream()
            return
        if ev.permanent:
            log.error("%s; the member is marked failed", msg)
            self.set_state("failed")
            self.client_core.shutdown(Status.EIO, f"member failed: {ev.message}")
        else:
            log.warning("%s; retrying", msg)
        self._close_stream()

    def _complete(self, ev: Completed) -> None:
        entry = self._pending.pop(ev.txn, None)
        if entry is None:
            return
        done, cmd, offset, length, started = entry
        op = OPS.get(cmd, "other")
        elapsed = time.monotonic() - started
        if ev.status == 0:
            if cmd == Command.EXTENTS:  # taken by the caller (dropped if it was cancelled)
                self._extents[ev.txn] = ev.extents
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
            done(None)
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
        err = ev.status if ev.status < 0x1000 else errno.EIO
        done(IoError(err, f"{self.name}: {op} at {offset}+{length}: {ev.message}"))

    # ---- I/O -------------------------------------------------------------------------
    async def _txn(
        self,
        cmd: Command,
        offset: int,
        length: int,
        flags: IoFlags,
        payload: memoryview | None = None,
        into: memoryview | None = None,
    ) -> int:
        """Run one transaction to its end; returns its id."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        tid = 0

        def done(err: BaseException | None) -> None:
            if fut.done():  # the caller was cancelled: nobody takes an EXTENTS answer
                self._extents.pop(tid, None)
            elif err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)

        tid = self._start(cmd, offset, length, flags, done, payload, into)
        await fut
        return tid

    def _start(
        self,
        cmd: Command,
        offset: int,
        length: int,
        flags: IoFlags,
        done: Done,
        payload: memoryview | None = None,
        into: memoryview | None = None,
    ) -> int:
        """Submit one transaction; ``done`` runs from the pump that sees its reply."""
        if self.state == "failed" or self.client_core.state == State.CLOSED:
            raise IoError(errno.EIO, f"{self.name} has failed: {self.last_error}")
        now = time.monotonic()
        tid = self.client_core.submit(cmd, offset, length, int(flags), now, payload, into)
        self._pending[tid] = (done, cmd, offset, length, now)
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
        # one pump for every request submitted in this loop iteration (a front end's
        # batch): its end sends them together
        self.driver.wake()
        return tid

    def start_read(self, offset: int, buf: memoryview, flags: IoFlags, done: Done) -> None:
        n = len(buf)
        if n > self.capabilities.max_request:
            super().start_read(offset, buf, flags, done)  # split: several transactions
            return
        try:
            self.check(READ, offset, n)
            pre = _PREFLUSH if int(flags) & _PREFLUSH_BIT else _NO_FLAGS  # no Flag arithmetic
            self._start(Command.READ, offset, n, pre, done, into=buf)
        except IoError as e:
            done(e)
            return
        self.bytes["read"] += n

    def start_write(self, offset: int, data: memoryview, flags: IoFlags, done: Done) -> None:
        n = len(data)
        if n > self.capabilities.max_request:
            super().start_write(offset, data, flags, done)
            return
        try:
            self.check(WRITE, offset, n)
            self._start(Command.WRITE, offset, n, flags, done, payload=data)
        except IoError as e:
            done(e)
            return
        self.bytes["write"] += n

    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        n = len(buf)
        self.check(READ, offset, n, split=True)
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
        self.check(WRITE, offset, n, split=True)
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
        self.check(TRIM, offset, length)
        if not self.capabilities.can_trim:
            raise IoError(errno.EOPNOTSUPP, f"{self.name} does not support trim")
        await self._ranged(Command.TRIM, offset, length, flags)

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        self.check(ZERO, offset, length)
        await self._ranged(Command.WRITE_ZEROES, offset, length, flags)

    async def _ranged(self, cmd: Command, offset: int, length: int, flags: IoFlags) -> None:
        step = 1 << 31
        if length <= step:
            await self._txn(cmd, offset, length, flags)
            return
        await asyncio.gather(
            *(self._txn(cmd, pos, n, flags) for pos, n, _ in pieces(offset, length, step))
        )

    async def cache(self, offset: int, length: int) -> None:
        """CACHE on the export node, which prefetches; nothing against an export node that
        does not offer it (the core answers it as done, even after a reconnect)."""
        self.check(CACHE, offset, length)
        w = self.client_core.welcome
        if not length or w is None or not w.commands & (1 << Command.CACHE):
            return
        try:
            await self._ranged(Command.CACHE, offset, length, IoFlags.NONE)
        except IoError as exc:
            if exc.errno != errno.EOPNOTSUPP:  # an older export node: a hint not taken
                raise

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """The export node's allocation status (EXTENTS), or all data from an export node
        that does not offer the command (an older version): always a correct answer."""
        self.check(EXTENTS, offset, length)
        w = self.client_core.welcome
        if not length or w is None or not w.commands & (1 << Command.EXTENTS):
            return await super().extents(offset, length)
        block = max(self.capabilities.min_block, 1)
        n = min(length, MAX_EXTENTS_LENGTH // block * block)
        try:
            tid = await self._txn(Command.EXTENTS, offset, n, IoFlags.NONE)
        except IoError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            return await super().extents(offset, length)  # replaced by an older export node
        got = list(self._extents.pop(tid, ()))
        return checked_extents(self.name, offset, length, got)

    # ---- status and knobs ------------------------------------------------------------
    def set_knob(self, key: str, value: float) -> None:
        cfg = self.client_core.config
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
        self.driver.pump()

    def statistics(self) -> dict[str, Any]:
        st = self.client_core.stats
        w = self.client_core.welcome
        return {
            **self._link_statistics(),
            "completed": st.completed,
            "submitted": st.submitted,
            "resends": st.resends,
            "timeouts": st.timeouts,
            "failed": st.failed,
            "errors": st.errors,
            "checksum_errors": st.checksum_errors,
            "connections": st.connections,
            "pings": st.pings,
            "cipher": w.cipher if w else None,
            "checksum": w.checksum if w else None,
        }

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._connected and self.client_core.connected:
            self.client_core.close()
            self.driver.pump()
            with contextlib.suppress(TimeoutError):
                assert self._lost is not None
                await asyncio.wait_for(self._lost.wait(), 2.0)
        self.client_core.shutdown()
        self._pump_completions()
        await self._stop_link()

    def _pump_completions(self) -> None:
        while (ev := self.client_core.next_event()) is not None:
            if isinstance(ev, Completed):
                self._complete(ev)
