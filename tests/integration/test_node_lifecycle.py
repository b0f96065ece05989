"""An export node stopped in-process closes its client connections (none lingers on a
closed device answering EIO), and a node started again on the same file is picked up; a
reconnect is served only once every request of the old connection has ended."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from dst.backends import open_backend
from dst.backends.device import BackendDevice
from dst.client.remote import LinkOptions, RemoteDevice
from dst.device import BlockDevice, Buffer, IoFlags, Layer
from dst.proto.client import ClientConfig
from dst.proto.server import ServerConfig
from dst.server.node import Export, ExportNode
from dst.units import Address
from dst.uri import format_uri, parse_member


async def start_node(img: Path, sock: Address) -> ExportNode:
    b = open_backend(f"file:{img}", size=1 << 20)
    e = Export("default", BackendDevice(b), b.identity, f"file:{img}")
    node = ExportNode({"default": e}, ServerConfig())
    await node.start(sock)
    return node


def test_stopping_a_node_closes_its_connections_and_a_restart_is_picked_up(sockdir: Path) -> None:
    async def main() -> None:
        sock = Address(path=str(sockdir / "e.sock"))
        img = sockdir / "d.img"
        node = await start_node(img, sock)
        dev = RemoteDevice(
            parse_member(format_uri("dst", sock, "default")),
            ClientConfig(checksums=("crc32c",)),
            LinkOptions(connect_timeout=5, reconnect_min=0.05, reconnect_max=0.2),
        )
        await dev.connect()
        await dev.write(0, b"before")
        await node.aclose()
        deadline = time.monotonic() + 5
        while dev.state != "reconnecting":
            assert time.monotonic() < deadline, "the client never saw its connection close"
            await asyncio.sleep(0.02)
        pending = asyncio.create_task(dev.write(4096, b"during"))
        await asyncio.sleep(0.3)
        node = await start_node(img, sock)
        await asyncio.wait_for(pending, 10)  # resent to the restarted node, no error
        assert await dev.read(0, 6) == b"before"
        assert await dev.read(4096, 6) == b"during"
        await dev.aclose()
        await node.aclose()

    asyncio.run(main())


class HeldWrites(Layer):
    """Writes wait at a gate: a request the export node started and the device has not
    finished (on the pool, say) when the client's connection is replaced."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.applied: list[bytes] = []

    async def write(self, offset: int, data: Buffer, flags: IoFlags = IoFlags.NONE) -> None:
        self.entered.set()
        await self.gate.wait()
        await self.inner.write(offset, data, flags)
        self.applied.append(bytes(memoryview(data)[:1]))


def test_a_reconnect_waits_for_every_request_the_old_connection_started(sockdir: Path) -> None:
    async def main() -> None:
        sock = Address(path=str(sockdir / "e.sock"))
        img = sockdir / "d.img"
        b = open_backend(f"file:{img}", size=1 << 20)
        held = HeldWrites(BackendDevice(b))
        export = Export("default", held, b.identity, f"file:{img}")
        node = ExportNode({"default": export}, ServerConfig())
        await node.start(sock)
        dev = RemoteDevice(
            parse_member(format_uri("dst", sock, "default")),
            ClientConfig(checksums=("crc32c",)),
            LinkOptions(connect_timeout=5, reconnect_min=0.05, reconnect_max=0.2),
        )
        await dev.connect()
        first = asyncio.create_task(dev.write(0, b"\x11" * 4096))
        await asyncio.wait_for(held.entered.wait(), 5)
        assert dev.driver.stream is not None
        dev.driver.stream.abort()  # the connection breaks while the export node holds the write
        deadline = time.monotonic() + 5
        # until the reconnect's handshake is fencing the old connection (or, wrongly, served)
        while not export.lock.locked() and dev.state != "connected":
            assert time.monotonic() < deadline, "the client never reconnected"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # room for a wrong early answer
        assert dev.state == "reconnecting", "the new connection was served before the old drained"
        assert held.applied == []
        held.gate.set()
        await asyncio.wait_for(first, 10)  # resent on the new connection, acked from the cache
        assert held.applied == [b"\x11"], "the resent write was applied again"
        assert dev.state == "connected"
        await dev.write(0, b"\x22" * 4096)
        assert await dev.read(0, 4096) == b"\x22" * 4096
        await dev.aclose()
        await node.aclose()

    asyncio.run(main())
