"""`dst demo`: a self-contained DST setup, for a first look and a self-check.

Two export nodes serve sparse temporary files on unix sockets; a client node
mirrors them over the DST node protocol and serves the mirror over NBD on another
unix socket.  The demo writes a pattern through the stack and checks it on both
backing files, then stops one export node: the next writes wait out that leg's
resend budget, the leg degrades and the mirror carries on; it restarts the node on
the same file, and the mirror resyncs only the regions written meanwhile.  Then it
prints how to attach other tools and runs until Ctrl-C; ``--check`` exits 0/1
after the self-check.  Everything lives in one temporary directory that is removed
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import filecmp
import hashlib
import logging
import os
import shutil
import tempfile
import time
from typing import Any

from dst.cli.attach_cmd import build_device
from dst.cli.export_cmd import open_exports
from dst.cli.runtime import Stopper, run
from dst.config import AttachConfig, ExportConfig, ExportSpec, MemberOptions
from dst.device import BlockDevice, IoFlags
from dst.server.node import ExportNode
from dst.units import Address, format_size, parse_size
from dst.uri import format_uri, parse_member

log = logging.getLogger("dst.demo")
BLOCK = 64 << 10


def run_demo(ns: argparse.Namespace) -> int:
    size = parse_size(ns.size, "--size")
    tmp = tempfile.mkdtemp(prefix="dst-demo-")
    try:
        return run(lambda: Demo(tmp, size).main(bool(ns.check)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def say(text: str = "") -> None:
    print(text, flush=True)


def pattern(i: int, n: int) -> bytes:
    seed = hashlib.sha256(f"dst demo block {i}".encode()).digest()
    return (seed * (n // len(seed) + 1))[:n]


class Demo:
    """Two export nodes, a mirroring client node, an NBD front end."""

    def __init__(self, tmp: str, size: int) -> None:
        self.tmp = tmp
        self.size = size
        self.files = [os.path.join(tmp, f"leg{i}.img") for i in (1, 2)]
        self.socks = [Address(path=os.path.join(tmp, f"export{i}.sock")) for i in (1, 2)]
        self.exports = [
            ExportConfig(
                (ExportSpec("default", f"file:{path}"),),
                listen=sock,
                size=size,
                checksums=("crc32c",),
            )
            for path, sock in zip(self.files, self.socks, strict=True)
        ]
        # short budgets, so that the leg that goes away degrades within seconds
        self.client = AttachConfig(
            members=tuple(parse_member(format_uri("dst", a, "default")) for a in self.socks),
            layout="mirror",
            nbd=Address(path=os.path.join(tmp, "nbd.sock")),
            member=MemberOptions(
                client_id="dst-demo",
                resends=1,
                resend_timeout=1.0,
                connect_timeout=5,
                reconnect_min=0.05,
                reconnect_max=0.3,
            ),
        )
        self.nodes: list[ExportNode | None] = [None, None]
        self.problems: list[str] = []

    async def start_node(self, i: int) -> None:
        cfg = self.exports[i]
        node = ExportNode(open_exports(cfg), cfg.server_config())
        await node.start(cfg.listen)
        self.nodes[i] = node

    async def stop_node(self, i: int) -> None:
        node, self.nodes[i] = self.nodes[i], None
        if node is not None:
            await node.aclose()

    def check(self, ok: bool, what: str) -> None:
        say(f"  {what}: {'OK' if ok else 'FAILED'}")
        if not ok:
            self.problems.append(what)

    async def wait_in_sync(self, dev: BlockDevice, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = dev.statistics()
            if st.get("sync") == "in-sync" and st.get("resync") is None:
                return st
            if time.monotonic() > deadline:
                raise TimeoutError("the mirror did not get back in sync")
            await asyncio.sleep(0.05)

    async def write_blocks(self, dev: BlockDevice, first: int, count: int) -> list[int]:
        step = max(BLOCK, (self.size // 2 // count) // BLOCK * BLOCK)
        offsets = [first * step + i * step for i in range(count)]
        await asyncio.gather(
            *(
                dev.write(off, pattern(off, BLOCK), IoFlags.FUA if i % 8 == 0 else IoFlags.NONE)
                for i, off in enumerate(offsets)
            )
        )
        await dev.flush()
        return offsets

    async def verify(self, dev: BlockDevice, offsets: list[int]) -> bool:
        for off in offsets:
            if await dev.read(off, BLOCK) != pattern(off, BLOCK):
                return False
        return True

    async def main(self, check: bool) -> int:
        from dst.frontends.nbd import NbdFrontend

        say(f"DST demo: two export nodes and a mirroring client node in {self.tmp}")
        # each transaction to the stopped node fails by design: the mirror's line says it
        logging.getLogger("dst.member").setLevel(logging.CRITICAL)
        stopper = Stopper()
        dev: BlockDevice | None = None
        front: NbdFrontend | None = None
        try:
            for i in range(2):
                await self.start_node(i)
                say(
                    f"  export node {i + 1}: {format_size(self.size)} sparse file, serving "
                    f"{format_uri('dst', self.socks[i], 'default')}"
                )
            dev = await build_device(self.client)
            st = await self.wait_in_sync(dev)
            say(
                f"  client node: mirrors both legs ({st['members'][0]['cipher'] or 'no'} cipher, "
                f"checksum {st['members'][0]['checksum']}); first resync done"
            )
            assert self.client.nbd is not None
            front = NbdFrontend(dev, self.client.nbd)
            await front.start()
            uri = front.uri
            say(f"  NBD front end: {uri}")
            say("")
            say("Self-check:")
            offsets = await self.write_blocks(dev, 0, 16)
            self.check(
                await self.verify(dev, offsets),
                f"wrote {len(offsets)} x 64 KiB blocks (some with FUA), read them back",
            )
            self.check(
                all(self.on_file(f, offsets) for f in self.files),
                "both export nodes' backing files hold them",
            )
            await self.qemu_io(uri)

            say("")
            say("A leg goes away:")
            await self.stop_node(1)
            say("  stopped export node 2")
            t0 = time.monotonic()
            more = await self.write_blocks(dev, 1, 8)
            st = dev.statistics()
            states = ", ".join(
                f"{m['uri'].rsplit('=', 1)[-1].rsplit('/', 1)[-1]} {m['state']}"
                for m in st["members"]
            )
            m = self.client.member
            budget = min((m.resends + 1) * m.resend_timeout, self.client.leg_timeout)
            say(
                f"  8 more blocks written in {time.monotonic() - t0:.1f} s (waited at most "
                f"{budget:g} s for the missing leg, no error): legs {states}"
            )
            self.check(
                st["members"][1]["state"] in ("degraded", "failed"),
                "export node 2's leg is degraded, node 1 carries on",
            )
            say(f"  dirty while degraded: {format_size(st['members'][1]['dirty_bytes'])}")
            await self.start_node(1)
            say("  restarted export node 2 on the same file")
            t0 = time.monotonic()
            await self.wait_in_sync(dev)
            say(
                f"  the mirror resynced only the dirty regions and is in sync again after "
                f"{time.monotonic() - t0:.1f} s"
            )
            self.check(await self.verify(dev, offsets + more), "all blocks read back")
            self.check(
                filecmp.cmp(self.files[0], self.files[1], shallow=False),
                "the two backing files are identical",
            )
            s = dev.statistics()
            say(
                f"  status: mirror {s['sync']}, {s['degrades']} degrade(s), members "
                + ", ".join(f"{m['state']}" for m in s["members"])
            )
            if check:
                say(
                    "self-check "
                    + ("passed" if not self.problems else "FAILED: " + "; ".join(self.problems))
                )
                return 0 if not self.problems else 1
            say("")
            say("Attach it from another shell while this runs:")
            say(f"  nbdinfo '{uri}'")
            say(f"  qemu-io -f raw -c 'read -v 0 512' '{uri}'")
            say(f"  qemu-img info '{uri}'")
            say(
                f"  nbd-client -unix {self.tmp}/nbd.sock /dev/nbd0 -b 4096 -t 120"
                "   # where the nbd module exists"
            )
            say("Press Ctrl-C to stop; the demo removes its files.")
            await stopper.wait()
            return 0 if not self.problems else 1
        finally:
            stopper.close()
            if front is not None:
                await front.aclose()
            if dev is not None:
                await dev.aclose()
            for i in range(2):
                await self.stop_node(i)

    def on_file(self, path: str, offsets: list[int]) -> bool:
        with open(path, "rb") as f:
            for off in offsets:
                f.seek(off)
                if f.read(BLOCK) != pattern(off, BLOCK):
                    return False
        return True

    async def qemu_io(self, uri: str) -> None:
        exe = shutil.which("qemu-io")
        if exe is None:
            say("  (qemu-io is not installed: skipped the check through the NBD socket)")
            return
        proc = await asyncio.create_subprocess_exec(
            exe,
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 40M 256k",
            "-c",
            "read -P 0x5a 40M 256k",
            uri,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        text = out.decode(errors="replace")
        self.check(
            proc.returncode == 0 and "verification failed" not in text.lower(),
            "qemu-io wrote and verified a pattern through the NBD socket",
        )
