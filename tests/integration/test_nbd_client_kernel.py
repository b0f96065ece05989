"""The kernel's NBD client on `dst attach --nbd`: nbd-client, mkfs.ext4, mount, fsck.

Skips (also under CI=true) when the kernel has no `nbd` module: many kernels, this
project's CI machines included, are built without it. A missing nbd-client tool is a
skip locally and a failure under CI=true, like every other tool.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Procs, member_uri, need_tool, run

pytestmark = [pytest.mark.integration, pytest.mark.root]


def free_nbd_device() -> str:
    """Load the nbd module if needed and return an unused /dev/nbdN, or skip saying why."""
    if os.geteuid() != 0:
        pytest.skip("needs root: modprobe, nbd-client and mount")
    if not os.path.exists("/dev/nbd0"):
        modprobe = shutil.which("modprobe")
        why = "modprobe is not installed"
        if modprobe is not None:
            cp = run([modprobe, "nbd"], check=False)
            why = (cp.stderr or cp.stdout).strip() or f"modprobe nbd exited {cp.returncode}"
            if cp.returncode != 0:
                pytest.skip(f"the kernel has no nbd module (modprobe nbd: {why})")
        for _ in range(20):  # udev may create the nodes a moment later
            if os.path.exists("/dev/nbd0"):
                break
            time.sleep(0.1)
        else:
            pytest.skip(f"the kernel has no nbd module (modprobe nbd: {why})")
    for i in range(64):
        dev = f"/dev/nbd{i}"
        if not os.path.exists(dev):
            break
        if not os.path.exists(f"/sys/block/nbd{i}/pid"):  # not connected
            return dev
    pytest.skip("every /dev/nbdN is in use")


@pytest.fixture
def nbd_device() -> Iterator[str]:
    dev = free_nbd_device()
    need_tool("nbd-client")
    need_tool("mkfs.ext4")
    need_tool("e2fsck")
    try:
        yield dev
    finally:
        run(["nbd-client", "-d", dev], check=False)


def test_nbd_client_mkfs_mount_write_fsck(procs: Procs, sockdir: Path, nbd_device: str) -> None:
    _, addr = procs.export(f"file:{sockdir / 'd.img'}", "--size", "256M")
    sock = sockdir / "nbd.sock"
    procs.attach(member_uri(addr), "--client-id", "kernel-nbd", nbd=f"unix:{sock}")
    dev = nbd_device
    run(["nbd-client", "-unix", str(sock), dev, "-b", "4096", "-N", "default", "-t", "120"])
    for _ in range(50):  # the size shows up once the kernel finished the handshake
        if Path(f"/sys/block/{os.path.basename(dev)}/size").read_text().strip() != "0":
            break
        time.sleep(0.1)
    fs = sockdir / "fs"
    fs.mkdir()
    run(["mkfs.ext4", "-q", "-F", dev])
    mounted = False
    try:
        run(["mount", dev, str(fs)])
        mounted = True
        rnd = random.Random(7)
        sums = {}
        for i in range(50):
            data = rnd.randbytes(rnd.randint(0, 300_000))
            (fs / f"f{i}").write_bytes(data)
            sums[f"f{i}"] = hashlib.sha256(data).hexdigest()
        run(["sync", "-f", str(fs)])
        run(["umount", str(fs)])
        mounted = False
        cp = run(["e2fsck", "-fn", dev], check=False)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        run(["mount", dev, str(fs)])
        mounted = True
        for name, digest in sums.items():
            assert hashlib.sha256((fs / name).read_bytes()).hexdigest() == digest, name
    finally:
        if mounted:
            with contextlib.suppress(AssertionError):
                run(["umount", str(fs)])
