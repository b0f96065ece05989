"""An NBD member: any NBD server (nbdkit, qemu-nbd, ...) as a BlockDevice.

This is how existing storage joins a mirror or stripe through ``nbd://HOST[:PORT]/NAME``
and ``nbd+unix:///NAME?socket=PATH`` members. It is
:class:`dst.nbd.client.NbdClientCore` in the link shell shared with
:class:`~dst.client.remote.RemoteDevice` (``client/link.py``: connect, reconnect with
back-off, one timer), resolving one future per request. I/O issued while disconnected waits inside its budget.

What NBD cannot give, and what this device does instead:

- **Identity**: an NBD export has none. ``identity`` is a UUID derived from the
  canonical URI and the export size, so a different export at the same address is
  only noticed when its size differs (then the member is marked failed).
- **Resend is at-least-once**: NBD has no transaction ids across connections, so a
  request without a reply when the connection broke is simply sent again after the
  reconnect; a write may be applied twice, and nothing fences a write the server
  still runs late from the broken connection.
- **Liveness**: NBD has no pings; a connection with requests in flight that receives
  nothing for ``resend_timeout`` is closed and re-established.
- **Allocation**: ``extents`` passes the server's own ``base:allocation`` through
  (NBD_CMD_BLOCK_STATUS) when it offers that context, and reports all data otherwise.
- **FAST_ZERO and CACHE** go to the server when it advertises SEND_FAST_ZERO and
  SEND_CACHE; otherwise a fast zero is refused (ENOTSUP) and a cache is a no-op here.

A request fails with EIO at the latest ``(resends + 1) * resend_timeout`` after it
was submitted; an error reply from the server (EIO, ENOSPC, EPERM) goes to the
caller at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
import uuid
from typing import Any

from dst.client.link import LinkedDevice, LinkOptions
from dst.device import (
    CACHE,
    EXTENTS,
    MAX_REQUEST,
    READ,
    TRIM,
    WRITE,
    ZERO,
    Buffer,
    Capabilities,
    Extent,
    IoFlags,
    Rule,
    checked_extents,
    fast_zero_refused,
    pieces,
)
from dst.errors import DstError, IoError
from dst.nbd.client import (
    Completed,
    Connected,
    ConnectionDead,
    ExportRefused,
    NbdClientConfig,
    NbdClientCore,
)
from dst.nbd.constants import Command, CommandFlags
from dst.nbd.constants import TransmissionFlags as TF
from dst.nbd.meta import BASE_ALLOCATION
from dst.uri import MemberUri, format_uri

log = logging.getLogger("dst.member")

OPS = {
    Command.READ: "read",
    Command.WRITE: "write",
    Command.FLUSH: "flush",
    Command.TRIM: "trim",
    Command.WRITE_ZEROES: "zero",
    Command.BLOCK_STATUS: "extents",
    Command.CACHE: "cache",
}
_RANGE_STEP = 1 << 31  # TRIM and WRITE_ZEROES lengths are 32-bit on the wire
_STATUS_MAX = 0xFFFFFFFF  # so is a BLOCK_STATUS length


def nbd_identity(uri: MemberUri, size: int) -> uuid.UUID:
    """The stand-in identity of an NBD export: the same URI and size give the same UUID."""
    canonical = format_uri("nbd", uri.address, uri.export)
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{canonical}#size={size}")


class NbdDevice(LinkedDevice):
    """One export of one NBD server, as a block device.

    NBD has no export identity, so ``identity`` is derived from the URI and the size;
    resends after a reconnect are at-least-once (see the module docstring).
    """

    what = "NBD server"
    op_names = tuple(OPS.values())

    def __init__(
        self,
        uri: MemberUri,
        options: LinkOptions | None = None,
        *,
        read_only: bool = False,
        resends: int = 10,
        resend_timeout: float = 5.0,
        queue_depth: int = 128,
    ) -> None:
        self.read_only = read_only
        self.core: NbdClientCore = NbdClientCore(
            NbdClientConfig(
                export=uri.export,
                resends=resends,
                resend_timeout=resend_timeout,
                handshake_timeout=(options or LinkOptions()).connect_timeout,
                queue_depth=queue_depth,
                contexts=(BASE_ALLOCATION,),
            )
        )
        super().__init__(uri, options, self.core)
        self._flags = TF(0)
        self._pending: dict[int, tuple[asyncio.Future[None], int, int, int, float]] = {}
        self._extents: dict[int, tuple[Extent, ...]] = {}  # answers of finished BLOCK_STATUS

    @property
    def _ever_connected(self) -> bool:
        return self.core.export is not None

    def _on_event(self, ev: object) -> None:
        if isinstance(ev, Completed):
            self._complete(ev)
        elif isinstance(ev, Connected):
            self._on_connected(ev)
        elif isinstance(ev, ConnectionDead):
            self.last_error = ev.reason
            log.warning("%s: closing the connection: %s", self.name, ev.reason)
            self._close_stream()
        elif isinstance(ev, ExportRefused):
            self._on_refused(ev)

    def _on_connected(self, ev: Connected) -> None:
        x = ev.export
        self._flags = x.flags
        ro = self.read_only or bool(x.flags & TF.READ_ONLY)
        step = max(x.min_block, min(x.max_block, MAX_REQUEST) // x.min_block * x.min_block)
        self.capabilities = Capabilities(
            read_only=ro,
            can_flush=bool(x.flags & TF.SEND_FLUSH),
            can_fua=not ro,  # SEND_FUA, or emulated with a flush
            can_trim=not ro and bool(x.flags & TF.SEND_TRIM),
            can_zero=not ro,  # SEND_WRITE_ZEROES, or emulated with writes
            can_fast_zero=not ro
            and bool(x.flags & TF.SEND_WRITE_ZEROES)
            and bool(x.flags & TF.SEND_FAST_ZERO),
            can_multi_conn=bool(x.flags & TF.CAN_MULTI_CONN),
            min_block=x.min_block,
            preferred_block=max(x.preferred_block, x.min_block),
            max_request=step,
        )
        self.size = x.size
        self.identity = nbd_identity(self.uri, x.size)
        self.set_state("connected")
        if ev.reconnect:
            self.reconnects += 1
            log.info("%s: reconnected (%d requests pending)", self.name, self.core.in_flight)
        else:
            log.info(
                "%s: connected: %d bytes, %s, %s replies, identity %s (derived from URI and size)",
                self.name,
                x.size,
                "read-only" if ro else "read-write",
                "structured" if x.structured else "simple",
                self.identity,
            )
        self._ready_now()

    def _on_refused(self, ev: ExportRefused) -> None:
        msg = f"{self.uri}: {ev.message}"
        self.last_error = ev.message
        if ev.permanent:
            if not self._refused_at_start(DstError(msg)):
                log.error("%s; the member is marked failed", msg)
                self.core.shutdown(errno.EIO, f"member failed: {ev.message}")
            self.set_state("failed")
        else:
            log.warning("%s; retrying", msg)
        self._close_stream()

    def _complete(self, ev: Completed) -> None:
        entry = self._pending.pop(ev.handle, None)
        if entry is None:
            return
        fut, cmd, offset, length, started = entry
        op = OPS.get(Command(cmd), "other")
        if ev.error == 0:
            self.latency[op].add(time.monotonic() - started)
            if not fut.done():
                if cmd == Command.BLOCK_STATUS:
                    self._extents[ev.handle] = ev.extents
                fut.set_result(None)
            return
        if ev.timed_out:
            log.error("%s: %s at %d+%d failed: %s", self.name, op, offset, length, ev.message)
        if not fut.done():
            fut.set_exception(
                IoError(ev.error, f"{self.name}: {op} at {offset}+{length}: {ev.message}")
            )

    # ---- I/O ---------------------------------------------------------------------------
    async def _txn(
        self,
        cmd: Command,
        offset: int,
        length: int,
        flags: int = 0,
        payload: memoryview | None = None,
        into: memoryview | None = None,
    ) -> int:
        """Run one request to its end; returns its handle."""
        if self.state == "failed" or self.core.closed:
            raise IoError(errno.EIO, f"{self.name} has failed: {self.last_error}")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        handle = self.core.submit(cmd, offset, length, flags, now, payload, into)
        self._pending[handle] = (fut, cmd, offset, length, now)
        self.counts[OPS[cmd]] += 1
        self.driver.pump()
        await fut
        return handle

    async def _ranged(self, cmd: Command, offset: int, length: int, flags: int) -> None:
        """TRIM or WRITE_ZEROES, in parallel pieces when the length exceeds 32 bits."""
        await asyncio.gather(
            *(self._txn(cmd, pos, n, flags) for pos, n, _ in pieces(offset, length, _RANGE_STEP))
        )

    def check(self, rule: Rule, offset: int, length: int, *, split: bool = False) -> None:
        """The one check, then the server's alignment: a range not aligned to its minimum
        block size would be refused by the server (EINVAL), so it is refused here."""
        super().check(rule, offset, length, split=split)
        if (offset | length) % self.capabilities.min_block:
            raise IoError(
                errno.EINVAL,
                f"{self.name}: [{offset}, +{length}) is not aligned to the server's "
                f"minimum block size {self.capabilities.min_block}",
            )

    async def _write_flags(self, flags: IoFlags) -> int:
        """Wire flags for a write-type request; PREFLUSH becomes a FLUSH sent first."""
        if flags & IoFlags.PREFLUSH:
            await self.flush()
        return CommandFlags.FUA if flags & IoFlags.FUA and self._flags & TF.SEND_FUA else 0

    async def _after_write(self, flags: IoFlags) -> None:
        """FUA on a server without SEND_FUA: a FLUSH after the write."""
        if flags & IoFlags.FUA and not self._flags & TF.SEND_FUA:
            await self.flush()

    async def read_into(self, offset: int, buf: memoryview, flags: IoFlags = IoFlags.NONE) -> None:
        n = buf.nbytes
        self.check(READ, offset, n)
        if flags & IoFlags.PREFLUSH:
            await self.flush()
        if n:
            await self._txn(Command.READ, offset, n, into=buf.cast("B"))
        self.bytes["read"] += n

    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        mv = (data if isinstance(data, memoryview) else memoryview(data)).cast("B")
        n = mv.nbytes
        self.check(WRITE, offset, n)
        wflags = await self._write_flags(flags)
        if n:
            await self._txn(Command.WRITE, offset, n, wflags, payload=mv)
        await self._after_write(flags)
        self.bytes["write"] += n

    async def flush(self) -> None:
        if self._flags & TF.SEND_FLUSH:
            await self._txn(Command.FLUSH, 0, 0)

    async def trim(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        self.check(TRIM, offset, length)
        if not self.capabilities.can_trim:
            raise IoError(errno.EOPNOTSUPP, f"{self.name} does not support trim")
        wflags = await self._write_flags(flags)
        if length:
            await self._ranged(Command.TRIM, offset, length, wflags)
        await self._after_write(flags)

    async def write_zeroes(self, offset: int, length: int, flags: IoFlags = IoFlags.NONE) -> None:
        self.check(ZERO, offset, length)
        fast = bool(flags & IoFlags.FAST_ZERO)
        if fast and not self._flags & TF.SEND_FAST_ZERO:
            # the server cannot be asked to refuse rather than write: refuse here
            raise fast_zero_refused(self.name, "the NBD server does not offer SEND_FAST_ZERO")
        if not self._flags & TF.SEND_WRITE_ZEROES:
            await super().write_zeroes(offset, length, flags)  # refuses FAST_ZERO too
            return
        wflags = await self._write_flags(flags)
        if flags & IoFlags.NO_HOLE:
            wflags |= CommandFlags.NO_HOLE
        if fast:
            wflags |= CommandFlags.FAST_ZERO
        if length:
            await self._ranged(Command.WRITE_ZEROES, offset, length, wflags)
        await self._after_write(flags)

    async def cache(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE when the server offers SEND_CACHE; nothing otherwise (a hint)."""
        self.check(CACHE, offset, length)
        if length and self._flags & TF.SEND_CACHE:
            await self._ranged(Command.CACHE, offset, length, 0)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """The server's ``base:allocation`` (BLOCK_STATUS), or all data from a server that
        does not offer it; a request longer than 32 bits asks for its first part."""
        self.check(EXTENTS, offset, length)
        x = self.core.export
        if not length or x is None or x.context_id(BASE_ALLOCATION) is None:
            return await super().extents(offset, length)
        block = max(self.capabilities.min_block, 1)
        n = min(length, _STATUS_MAX // block * block)
        try:
            handle = await self._txn(Command.BLOCK_STATUS, offset, n)
        except IoError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            return await super().extents(offset, length)  # the server stopped offering it
        got = list(self._extents.pop(handle, ()))
        return checked_extents(self.name, offset, length, got)

    # ---- status and knobs --------------------------------------------------------------
    def set_knob(self, key: str, value: float) -> None:
        """resends and resend-timeout apply; NBD has no pings, so ping knobs are accepted
        and have no effect."""
        cfg = self.core.config
        if key == "resends":
            cfg.resends = int(value)
        elif key == "resend-timeout":
            cfg.resend_timeout = float(value)
        elif key not in ("ping-interval", "ping-timeout"):
            raise KeyError(key)
        self.driver.pump()

    def statistics(self) -> dict[str, Any]:
        st = self.core.stats
        x = self.core.export
        return {
            **self._link_statistics(),
            "protocol": "nbd",
            "structured_replies": x.structured if x else None,
            "submitted": st.submitted,
            "completed": st.completed,
            "resends": st.resends,
            "timeouts": st.timeouts,
            "failed": st.failed,
            "errors": st.errors,
            "protocol_errors": st.violations,
            "connections": st.connections,
        }

    async def aclose(self) -> None:
        """Send NBD_CMD_DISC (the server answers what is in flight first), then close."""
        if self._closing:
            return
        self._closing = True
        if self._connected and self.core.ready:
            self.core.close()
            self.driver.pump()
            assert self._lost is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), 2.0)
        self.core.shutdown()
        while (ev := self.core.next_event()) is not None:
            if isinstance(ev, Completed):
                self._complete(ev)
        await self._stop_link()
