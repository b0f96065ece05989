"""A WAN in a process: forwards a unix socket to another with delay and bandwidth.

Each direction is a link of its own: bytes are serialised at ``rate`` bytes per second
(unlimited when not given) and delivered ``delay`` seconds after they were sent, many
chunks in flight at once, as on a long fat pipe; when more than a bandwidth-delay
product (plus a small router buffer) is on its way, the sender is not read from until
there is room, so the far side sees back-pressure as TCP would give it.  A connection
to the target that fails (the export node is down) closes the client's connection.

    python tests/wan.py --listen PATH --target PATH [--delay S] [--rate R]
                        [--delay-back S] [--rate-back R] [--reorder S]

``--delay``/``--rate`` apply to the way client -> target, ``--delay-back``/``--rate-back``
to the way back (defaulting to the same). ``--reorder S`` holds each DST request frame
on its way to the target for a random extra 0..S seconds, so requests in flight together
arrive in any order, as an export node that runs them concurrently may apply them (only
for plain frames: ``--cipher none``, checksum crc32c). Rates take K/M/G suffixes (bytes). It logs
``listening on unix:PATH`` when ready and stops on SIGTERM/SIGINT. Standard library only,
so a benchmark can run it too (bench/async_bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import os
import random
import signal
import struct
import sys
from itertools import count

CHUNK = 1 << 16
ROUTER_BUFFER = 256 << 10
REQ = struct.Struct("<4sHHQIIQ")  # a DST request header (docs/protocol.md)
HS = struct.Struct("<4sHHI")  # a handshake frame header
WRITE = 2
DIGEST = 4  # crc32c


def parse_rate(text: str | None) -> float | None:
    if text is None or text in ("", "0", "none"):
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("/S").removesuffix("B")
    factor = units.get(t[-1:], 1)
    return float(t[:-1] if t[-1:] in units else t) * factor


def frames(buf: bytearray) -> list[bytes]:
    """Whole frames cut from the front of ``buf`` (the rest stays for more bytes)."""
    out = []
    while len(buf) >= 4:
        magic = bytes(buf[:4])
        if magic == b"DSTH":
            if len(buf) < HS.size:
                break
            n = HS.size + HS.unpack_from(buf)[3]
        elif magic == b"DSTQ":
            if len(buf) < REQ.size:
                break
            _, cmd, _, _, _, length, _ = REQ.unpack_from(buf)
            n = REQ.size + (length if cmd == WRITE else 0) + DIGEST
        else:
            n = 4 + int.from_bytes(buf[:4], "little")  # a sealed record
        if len(buf) < n:
            break
        out.append(bytes(buf[:n]))
        del buf[:n]
    return out


class Way:
    """One direction of the link."""

    def __init__(self, delay: float, rate: float | None, reorder: float = 0.0) -> None:
        self.delay = delay
        self.rate = rate
        self.reorder = reorder
        bdp = (rate or 0) * delay
        self.limit = int(bdp + ROUTER_BUFFER) if rate else max(8 << 20, ROUTER_BUFFER)
        self.queue: list[tuple[float, int, bytes]] = []  # a heap by delivery time
        self.order = count()
        self.pending = bytearray()
        self.queued = 0
        self.busy_until = 0.0
        self.room = asyncio.Event()
        self.ready = asyncio.Event()

    async def take(self, r: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.queued >= self.limit:
                self.room.clear()
                await self.room.wait()
            data = await r.read(CHUNK)
            now = loop.time()
            start = max(now, self.busy_until)
            end = start + len(data) / self.rate if self.rate else start
            self.busy_until = end
            if self.reorder and data:
                self.pending += data
                for f in frames(self.pending):
                    extra = random.uniform(0, self.reorder) if f[:4] == b"DSTQ" else 0.0
                    self._put(end + self.delay + extra, f)
            else:  # (the end of the stream comes after everything held back)
                self._put(end + self.delay + (self.reorder if not data else 0.0), data)
            self.ready.set()
            if not data:
                return

    def _put(self, at: float, data: bytes) -> None:
        heapq.heappush(self.queue, (at, next(self.order), data))
        self.queued += len(data)

    async def give(self, w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.ready.clear()
                await self.ready.wait()
            at, _, data = self.queue[0]
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # something due earlier may have come meanwhile
            heapq.heappop(self.queue)
            self.queued -= len(data)
            self.room.set()
            if not data:
                with contextlib.suppress(OSError):
                    w.write_eof()
                return
            w.write(data)
            await w.drain()


class Wan:
    def __init__(
        self,
        target: str,
        up: tuple[float, float | None, float],
        down: tuple[float, float | None],
    ) -> None:
        self.target = target
        self.up = up
        self.down = down
        self.connections = 0

    async def handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_unix_connection(self.target)
        except OSError:
            cw.close()
            return
        self.connections += 1
        up, down = Way(*self.up), Way(*self.down)
        tasks = [
            asyncio.create_task(up.take(cr)),
            asyncio.create_task(up.give(sw)),
            asyncio.create_task(down.take(sr)),
            asyncio.create_task(down.give(cw)),
        ]
        try:
            # either side gone for good (reset, or both directions ended): close both
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if not any(t.exception() for t in done if not t.cancelled()):
                await asyncio.wait(tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (cw, sw):
                w.close()


async def main(args: argparse.Namespace) -> None:
    back_delay = args.delay if args.delay_back is None else args.delay_back
    back_rate = args.rate if args.rate_back is None else args.rate_back
    wan = Wan(
        args.target,
        (args.delay, parse_rate(args.rate), args.reorder),
        (back_delay, parse_rate(back_rate)),
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.listen)
    server = await asyncio.start_unix_server(wan.handle, path=args.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"wan: listening on unix:{args.listen}", file=sys.stderr, flush=True)
    await stop.wait()
    server.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.listen)


def cli() -> None:
    p = argparse.ArgumentParser(prog="wan.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, help="unix socket path to listen on")
    p.add_argument("--target", required=True, help="unix socket path to forward to")
    p.add_argument("--delay", type=float, default=0.0, help="one-way delay, seconds")
    p.add_argument("--rate", default=None, help="bytes per second (K/M/G), client -> target")
    p.add_argument("--delay-back", type=float, default=None)
    p.add_argument("--rate-back", default=None)
    p.add_argument("--reorder", type=float, default=0.0, help="extra 0..S s per request frame")
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()
