"""A remote member's extents over real sockets: from an export node that offers EXTENTS,
and from an older one that does not (then the member reports data and sends nothing)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from dst.backends import open_backend
from dst.backends.device import BackendDevice
from dst.client.remote import LinkOptions, RemoteDevice
from dst.device import HOLE_ZERO, Extent, ExtentFlags, all_extents
from dst.proto.client import ClientConfig
from dst.proto.server import ExportTerms, ServerConfig
from dst.proto.wire import Command
from dst.server.node import Export, ExportNode
from dst.units import Address
from dst.uri import format_uri, parse_member

MiB = 1 << 20


class OlderExport(Export):
    """An export as a node from before EXTENTS offers it: the command is not in COMMANDS."""

    def terms(self, read_only: bool) -> ExportTerms:
        t = super().terms(read_only)
        return replace(t, commands=t.commands - {Command.EXTENTS})


async def node_and_member(
    img: Path, sock: Address, kind: type[Export] = Export
) -> tuple[ExportNode, RemoteDevice]:
    b = open_backend(f"file:{img}", size=16 * MiB)
    e = kind("default", BackendDevice(b), b.identity, f"file:{img}")
    node = ExportNode({"default": e}, ServerConfig())
    await node.start(sock)
    dev = RemoteDevice(
        parse_member(format_uri("dst", sock, "default")),
        ClientConfig(checksums=("crc32c",)),
        LinkOptions(connect_timeout=5, reconnect_min=0.05, reconnect_max=0.2),
    )
    await dev.connect()
    return node, dev


def test_a_member_reports_the_export_nodes_holes(sockdir: Path) -> None:
    async def main() -> None:
        node, dev = await node_and_member(sockdir / "d.img", Address(path=str(sockdir / "e.sock")))
        await dev.write(2 * MiB, b"x" * MiB)
        want = [
            Extent(0, 2 * MiB, HOLE_ZERO),
            Extent(2 * MiB, MiB),
            Extent(3 * MiB, 13 * MiB, HOLE_ZERO),
        ]
        assert await all_extents(dev, 0, dev.size) == want
        assert await dev.extents(2 * MiB + 5, 10) == [Extent(2 * MiB + 5, 10)]
        await dev.trim(2 * MiB, MiB)
        assert await dev.extents(0, dev.size) == [Extent(0, 16 * MiB, HOLE_ZERO)]
        assert dev.statistics()["requests"]["extents"] == 3
        s = node.status()["sessions"][0]
        assert s["requests"] >= 5  # the queries are ordinary requests of the session
        await dev.aclose()
        await node.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_an_older_export_node_gives_all_data_without_a_request(sockdir: Path) -> None:
    async def main() -> None:
        img, sock = sockdir / "o.img", Address(path=str(sockdir / "o.sock"))
        node, dev = await node_and_member(img, sock, OlderExport)
        await dev.write(0, b"y" * 4096)
        assert await dev.extents(0, dev.size) == [Extent(0, 16 * MiB, ExtentFlags.DATA)]
        assert dev.statistics()["requests"]["extents"] == 0
        assert await dev.read(0, 4) == b"yyyy"
        await dev.aclose()
        await node.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))
