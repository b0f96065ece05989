"""`dst demo`: a self-contained DST setup, for a first look and a self-check.

An export node serves a sparse temporary file on a unix socket; a client node
attaches it over the DST node protocol and serves the device over NBD on
another unix socket.  The demo writes a pattern through the stack, reads it
back, checks the backing file, prints how to attach other tools, and runs until
Ctrl-C.  ``--check`` exits 0/1 right after the self-check.  Everything lives in
one temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
from typing import Any

from dst.backends import open_backend
from dst.backends.device import BackendDevice
from dst.cli.runtime import Stopper, run
from dst.client.remote import LinkOptions, RemoteDevice
from dst.device import BlockDevice, IoFlags
from dst.proto.client import ClientConfig
from dst.proto.server import ServerConfig
from dst.server.node import Export, ExportNode
from dst.units import Address, format_size, parse_size
from dst.uri import format_uri, parse_member

log = logging.getLogger("dst.demo")


def run_demo(ns: argparse.Namespace) -> int:
    size = parse_size(ns.size, "--size")
    tmp = tempfile.mkdtemp(prefix="dst-demo-")
    try:
        return run(lambda: _demo(tmp, size, bool(ns.check)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def say(text: str = "") -> None:
    print(text, flush=True)


def pattern(i: int, n: int) -> bytes:
    seed = hashlib.sha256(f"dst demo block {i}".encode()).digest()
    return (seed * (n // len(seed) + 1))[:n]


async def self_check(dev: BlockDevice, backing: str) -> list[str]:
    """Write, flush and read back a pattern; compare with the backing file."""
    problems: list[str] = []
    block = 64 << 10
    count = min(32, dev.size // block)
    offsets = [i * (dev.size // count) // block * block for i in range(count)]
    await asyncio.gather(
        *(
            dev.write(off, pattern(i, block), IoFlags.FUA if i % 8 == 0 else IoFlags.NONE)
            for i, off in enumerate(offsets)
        )
    )
    await dev.flush()
    for i, off in enumerate(offsets):
        got = await dev.read(off, block)
        if got != pattern(i, block):
            problems.append(f"block at offset {off} read back wrong through the client node")
    with open(backing, "rb") as f:
        for i, off in enumerate(offsets):
            f.seek(off)
            if f.read(block) != pattern(i, block):
                problems.append(f"block at offset {off} differs in the export node's backing file")
    await dev.write_zeroes(offsets[0], block)
    if await dev.read(offsets[0], block) != bytes(block):
        problems.append("write_zeroes did not read back as zeroes")
    say(
        f"  wrote {count} x {block // 1024} KiB blocks (some with FUA), flushed, read them back: "
        f"{'OK' if not problems else 'FAILED'}"
    )
    say(
        f"  backing file on the export node holds the same bytes: {'OK' if not problems else 'FAILED'}"
    )
    return problems


async def _qemu_io_check(uri: str) -> str | None:
    exe = shutil.which("qemu-io")
    if exe is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        exe,
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 1M 256k",
        "-c",
        "read -P 0x5a 1M 256k",
        uri,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    if proc.returncode != 0 or "Pattern verification failed" in text:
        return f"qemu-io through NBD failed: {text.strip()}"
    say("  qemu-io wrote and verified a pattern through the NBD socket: OK")
    return ""


async def _demo(tmp: str, size: int, check: bool) -> int:
    from dst.frontends.nbd import NbdFrontend

    backing = os.path.join(tmp, "export.img")
    export_sock = Address(path=os.path.join(tmp, "export.sock"))
    nbd_sock = Address(path=os.path.join(tmp, "nbd.sock"))
    say(f"DST demo: an export node and a client node in {tmp}")
    backend = open_backend(f"file:{backing}", size=size)
    export = Export(
        name="default",
        device=BackendDevice(backend),
        identity=backend.identity,
        spec=f"file:{backing}",
        trim_zeroes=backend.trim_reads_zeroes,
    )
    node = ExportNode({"default": export}, ServerConfig(checksums=("crc32c",)))
    dev: RemoteDevice | None = None
    front: Any = None
    stopper = Stopper()
    failed: list[str] = []
    try:
        await node.start(export_sock)
        member = format_uri("dst", export_sock, "default")
        say(f"  export node: {format_size(size)} sparse file, serving {member}")
        dev = RemoteDevice(
            parse_member(member), ClientConfig(client_id="dst-demo"), LinkOptions(connect_timeout=5)
        )
        await dev.connect()
        st = dev.statistics()
        say(f"  client node: attached it (cipher {st['cipher']}, checksum {st['checksum']})")
        front = NbdFrontend(dev, nbd_sock)
        await front.start()
        uri = front.uri
        say(f"  NBD front end: {uri}")
        failed += await self_check(dev, backing)
        q = await _qemu_io_check(uri)
        if q:
            failed.append(q)
        s = dev.statistics()
        say(
            f"  status: member {s['uri']} {s['state']}, {s['completed']} transactions acked, "
            f"{s['resends']} resent, {s['failed']} failed"
        )
        if check:
            say("self-check " + ("passed" if not failed else "FAILED: " + "; ".join(failed)))
            return 0 if not failed else 1
        say("")
        say("Attach it from another shell while this runs:")
        say(f"  nbdinfo '{uri}'")
        say(f"  qemu-io -f raw -c 'read -v 0 512' '{uri}'")
        say(f"  qemu-img info '{uri}'")
        say(f"  nbd-client -unix {nbd_sock.path} /dev/nbd0 -b 4096   # where the nbd module exists")
        say("Press Ctrl-C to stop; the demo removes its files.")
        await stopper.wait()
        return 0 if not failed else 1
    finally:
        stopper.close()
        if front is not None:
            await front.aclose()
        if dev is not None:
            await dev.aclose()
        await node.aclose()
