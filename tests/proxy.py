"""A fault proxy for tests: sits between a client node and an export node.

It forwards bytes both ways and, on command, stalls, cuts, resets, blackholes
(half-open: swallows everything silently), delays, corrupts, or holds one DST
request frame and releases it later on the connection it came from.  It runs on
its own event loop in a thread, so tests drive it with plain method calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REQ = struct.Struct("<4sHHQIIQ")
HS = struct.Struct("<4sHHI")


@dataclass(eq=False)
class Link:
    """One proxied connection: client side and export-node side."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    c2s_bytes: int = 0
    s2c_bytes: int = 0
    blackholed: bool = False
    client_cut: bool = False
    held: list[bytes] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FrameSplitter:
    """Splits the client->export stream into DST frames (handshake and requests)."""

    def __init__(self, digest_size: int) -> None:
        self.digest = digest_size
        self.buf = bytearray()
        self.ready = False

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out = []
        while True:
            if len(self.buf) < 4:
                break
            magic = bytes(self.buf[:4])
            if magic == b"DSTH":
                if len(self.buf) < HS.size:
                    break
                n = HS.size + HS.unpack_from(self.buf)[3]
            elif magic == b"DSTQ":
                if len(self.buf) < REQ.size:
                    break
                _, cmd, _, _, _, length, _ = REQ.unpack_from(self.buf)
                n = REQ.size + (length if cmd == 2 else 0) + self.digest
            else:  # a sealed record: u32 length, then that many bytes
                n = 4 + int.from_bytes(self.buf[:4], "little")
            if len(self.buf) < n:
                break
            out.append(bytes(self.buf[:n]))
            del self.buf[:n]
        return out


class FaultProxy:
    """Listen on ``listen`` (a unix path or ("127.0.0.1", 0)), forward to ``target``."""

    def __init__(self, target: str | tuple[str, int], sockdir: Path, digest_size: int = 4) -> None:
        self.target = target
        self.path = str(sockdir / f"proxy-{id(self)}.sock")
        self.digest = digest_size
        self.links: list[Link] = []
        self.mode = "pass"  # pass | stall | blackhole | refuse
        self.delay = 0.0
        self.hold_write_at: int | None = None  # hold the next WRITE frame at this offset
        self.held_frames: list[tuple[Link, bytes]] = []
        self.corrupt_next: Callable[[bytes], bytes] | None = None
        self.corrupt_where = "c2s"
        self.corrupt_raw = False  # corrupt any large chunk (sealed records), not only WRITE frames
        self.replay_next_where: str | None = None  # send the next large chunk twice
        self.connections = 0
        # when the client side closes, keep the export-node side open (old packets may still
        # be on their way there): held frames can then be released onto it later
        self.keep_server_side = False
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._start())

    @property
    def uri(self) -> str:
        return f"dst+unix:///default?socket={self.path}"

    def _call(self, coro: object) -> object:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return fut.result(10)

    def _soon(self, fn: Callable[[], None]) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_unix_server(self._on_client, path=self.path)

    async def _open_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if isinstance(self.target, tuple):
            return await asyncio.open_connection(*self.target)
        return await asyncio.open_unix_connection(self.target)

    async def _on_client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            cw.close()
            return
        try:
            sr, sw = await self._open_target()
        except OSError:
            cw.close()
            return
        self.connections += 1
        link = Link(cw, sw)
        self.links.append(link)
        t1 = asyncio.create_task(self._pump(link, cr, sw, "c2s"))
        t2 = asyncio.create_task(self._pump(link, sr, cw, "s2c"))
        link.tasks = [t1, t2]
        await asyncio.gather(t1, t2, return_exceptions=True)

    async def _pump(
        self, link: Link, r: asyncio.StreamReader, w: asyncio.StreamWriter, way: str
    ) -> None:
        splitter = FrameSplitter(self.digest) if way == "c2s" else None
        try:
            while True:
                data = await r.read(1 << 16)
                if not data:
                    break
                while self.mode == "stall" and not link.blackholed:
                    await asyncio.sleep(0.01)
                if link.blackholed:
                    continue
                if self.delay:
                    await asyncio.sleep(self.delay)
                frames = splitter.feed(data) if splitter is not None else [data]
                for f in frames:
                    if way == "c2s" and self._should_hold(f):
                        self.held_frames.append((link, f))
                        continue
                    if (
                        self.corrupt_next is not None
                        and self.corrupt_where == way
                        and (self._corruptible(f, way) or (self.corrupt_raw and len(f) > 1024))
                    ):
                        f, self.corrupt_next = self.corrupt_next(f), None
                    if self.replay_next_where == way and len(f) > 1024:
                        self.replay_next_where = None
                        w.write(f)  # the same bytes again: a replayed record
                    if link.blackholed:
                        continue
                    w.write(f)
                    if way == "c2s":
                        link.c2s_bytes += len(f)
                    else:
                        link.s2c_bytes += len(f)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            keep = way == "c2s" and self.keep_server_side
            if not link.client_cut and not link.blackholed and not keep:
                with contextlib.suppress(Exception):
                    w.close()

    def _should_hold(self, frame: bytes) -> bool:
        if self.hold_write_at is None or frame[:4] != b"DSTQ":
            return False
        _, cmd, _, _, _, _, offset = REQ.unpack_from(frame)
        if cmd == 2 and offset == self.hold_write_at:
            self.hold_write_at = None
            return True
        return False

    @staticmethod
    def _corruptible(frame: bytes, way: str) -> bool:
        if way == "c2s":
            return frame[:4] == b"DSTQ" and REQ.unpack_from(frame)[1] == 2
        return len(frame) > 64

    # ---- commands (called from the test thread) ---------------------------------
    def set_mode(self, mode: str) -> None:
        self.mode = mode

    def blackhole_all(self) -> None:
        """Existing connections swallow everything silently (a half-open peer)."""

        def go() -> None:
            for link in self.links:
                link.blackholed = True

        self._soon(go)

    def cut_all(self) -> None:
        """Close both sides of every connection (a clean FIN)."""

        def go() -> None:
            for link in self.links:
                for w in (link.client, link.server):
                    with contextlib.suppress(Exception):
                        w.close()
            self.links.clear()

        self._soon(go)

    def reset_all(self) -> None:
        """Reset every connection (RST)."""

        def go() -> None:
            for link in self.links:
                for w in (link.client, link.server):
                    sock = w.get_extra_info("socket")
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                    with contextlib.suppress(Exception):
                        w.transport.abort()
            self.links.clear()

        self._soon(go)

    def cut_client_side(self) -> None:
        """Close only the client side; the export node keeps its old connection open."""

        def go() -> None:
            for link in self.links:
                link.client_cut = True
                with contextlib.suppress(Exception):
                    link.client.transport.abort()

        self._soon(go)

    def release_held(self) -> int:
        """Send every held frame on the export-node connection it came from."""
        result: list[int] = []

        def go() -> None:
            n = 0
            for link, frame in self.held_frames:
                with contextlib.suppress(Exception):
                    if not link.server.is_closing():
                        link.server.write(frame)
                        n += 1
            self.held_frames.clear()
            result.append(n)

        self._soon(go)
        return result[0] if result else 0

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for link in self.links:
                for t in link.tasks:
                    t.cancel()
                for w in (link.client, link.server):
                    with contextlib.suppress(Exception):
                        w.close()

        with contextlib.suppress(Exception):
            self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self._loop.close()
