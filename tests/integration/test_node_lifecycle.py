"""An export node stopped in-process closes its client connections (none lingers on a
closed device answering EIO), and a node started again on the same file is picked up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from dst.backends import open_backend
from dst.backends.device import BackendDevice
from dst.client.remote import LinkOptions, RemoteDevice
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
