"""Wide layouts and many clients on real processes: a stripe and a linear device over 32
export nodes, and 64 NBD clients at once on one `dst attach --nbd` socket."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.procs import Proc, Procs, member_uri, nbdsh, need_tool, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1 << 20
NODES = 32
PER_NODE = "8M"  # 32 x 8 MiB = 256 MiB


def start_nodes(procs: Procs, sockdir: Path, n: int) -> list[str]:
    """``n`` export nodes, each on its own file and socket (started together, then awaited)."""
    started: list[tuple[Proc, Path]] = []
    for i in range(n):
        sock = sockdir / f"e{i}.sock"
        p = procs.dst(
            "export", "--listen", f"unix:{sock}", f"file:{sockdir}/e{i}.img", "--size", PER_NODE
        )
        started.append((p, sock))
    uris = []
    for p, sock in started:
        p.wait_for(r"listening on ", timeout=60)
        uris.append(member_uri(f"unix:{sock}"))
    return uris


def source_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("layout", [("--stripe", "64K"), ("--linear",)])
def test_32_export_nodes_take_an_image_and_give_it_back(
    procs: Procs, sockdir: Path, layout: tuple[str, ...]
) -> None:
    """qemu-img writes 256 MiB into the device and compares it back; for the stripe every
    member holds its 64 KiB chunks in order (chunk u on member u % 32)."""
    img = need_tool("qemu-img")
    uris = start_nodes(procs, sockdir, NODES)
    att, uri = procs.attach(*uris, *layout, "--connect-timeout", "60")
    size = NODES * 8 * MiB
    src = sockdir / "src.raw"
    source_image(src, size)
    run([img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri], timeout=120)
    run([img, "compare", "-f", "raw", "-F", "raw", str(src), uri], timeout=120)
    data = src.read_bytes()
    chunk = 64 << 10
    for i in (0, 7, 31):
        member = (sockdir / f"e{i}.img").read_bytes()
        if layout[0] == "--stripe":
            for k in (0, 1, 127):  # member chunk k is device chunk k * 32 + i
                u = k * NODES + i
                assert member[k * chunk : (k + 1) * chunk] == data[u * chunk : (u + 1) * chunk]
        else:
            assert member == data[i * 8 * MiB : (i + 1) * 8 * MiB]
    assert att.popen.poll() is None


CLIENTS = 64
REGION = 1 * MiB

CLIENT_SCRIPT = """
import sys, threading, nbd
uri, n, region = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
handles = []
for i in range(n):  # every connection is open before any writes: 64 at once
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
errors = []
def work(i):
    try:
        h = handles[i]
        block = bytes([i + 1]) * 65536
        for off in range(0, region, len(block)):
            h.pwrite(block, i * region + off)
        h.flush()
        for off in range(0, region, len(block)):
            if h.pread(len(block), i * region + off) != block:
                errors.append(f"client {i}: wrong data at {off}")
                return
    except Exception as e:
        errors.append(f"client {i}: {e}")
threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join(60)
for h in handles: h.shutdown()
print("\\n".join(errors) or "ok")
sys.exit(1 if errors else 0)
"""


def test_64_nbd_clients_at_once_on_one_socket(procs: Procs, sockdir: Path) -> None:
    """Each client writes and verifies its own 1 MiB region, all connected at once; the
    client node stays small."""
    nbdsh()  # Debian's python3 with libnbd, or a skip/failure saying what to install
    _, addr = procs.export(f"file:{sockdir}/d.img", "--size", "128M")
    att, uri = procs.attach(member_uri(addr))
    script = sockdir / "clients.py"
    script.write_text(CLIENT_SCRIPT)
    t0 = time.monotonic()
    cp = subprocess.run(
        ["/usr/bin/python3", str(script), uri, str(CLIENTS), str(REGION)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - t0
    assert cp.returncode == 0 and cp.stdout.strip() == "ok", cp.stdout + cp.stderr
    assert att.popen.poll() is None
    rss = rss_kib(att.popen.pid)
    assert rss < 200 * 1024, f"client node RSS {rss} KiB with {CLIENTS} clients"
    data = (sockdir / "d.img").read_bytes()
    for i in (0, 33, 63):
        assert data[i * REGION : (i + 1) * REGION] == bytes([i + 1]) * REGION
    print(f"{CLIENTS} clients verified in {took:.1f} s, client node RSS {rss // 1024} MiB")
