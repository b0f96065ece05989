"""Wide layouts and many clients on real processes: a stripe and a linear device over 32
export nodes, and 64 NBD clients at once on one `dst attach --nbd` socket."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Proc, Procs, dst_run, member_uri, nbdsh, need_tool, run
from tests.proxy import FaultProxy

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


PIB = 1 << 50


def wait_json(ctl: Path, pred: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        cp = dst_run("status", "--control", str(ctl), "--json", timeout=20)
        st = json.loads(cp.stdout) if cp.stdout.strip() else {}
        if st and pred(st):
            return st
        assert time.monotonic() < deadline, f"status never matched: {st}"
        time.sleep(0.1)


def test_a_petabyte_mirror_starts_at_once_and_resyncs_only_what_changed(
    procs: Procs, sockdir: Path
) -> None:
    """Two null:1P legs, a new bitmap file, --assume-clean: serving within seconds, small
    RSS and a small bitmap file; leg b cut off, three writes at the start, the middle and
    the last block, b back: only those three regions are copied."""
    qemu_io = need_tool("qemu-io")
    _, a = procs.export("null:1P", listen=f"unix:{sockdir}/a.sock")
    _, b = procs.export("null:1P", listen=f"unix:{sockdir}/b.sock")
    proxy = FaultProxy(b[5:], sockdir)
    try:
        ctl = sockdir / "ctl.sock"
        bm = sockdir / "bm"
        t0 = time.monotonic()
        att, uri = procs.attach(
            member_uri(a),
            proxy.uri,
            "--mirror",
            "--bitmap",
            str(bm),
            "--assume-clean",
            "--control",
            str(ctl),
            "--leg-timeout",
            "1",
            "--reconnect-min",
            "0.05",
            "--reconnect-max",
            "0.3",
        )
        started = time.monotonic() - t0
        assert started < 5, f"serving after {started:.1f} s"
        proxy.set_mode("refuse")
        proxy.reset_all()
        wait_json(ctl, lambda st: st["members"][1]["state"] != "connected")
        for off in (0, PIB // 2, PIB - 4096):
            run([qemu_io, "-f", "raw", "-c", f"write -P 0x3c {off} 4k", uri], timeout=60)
        st = wait_json(ctl, lambda st: st["members"][1]["state"] == "degraded")
        assert st["members"][1]["dirty_bytes"] == 3 * (64 << 10), st["members"][1]
        rss = rss_kib(att.popen.pid)
        t1 = time.monotonic()
        proxy.set_mode("pass")
        att.wait_for(r"resync finished: (\S+ \S+) copied", timeout=60)
        resynced = time.monotonic() - t1
        found = re.findall(r"resync finished: (\S+) (\S+) copied, (\S+) (\S+) zeroed", att.output)
        units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20}
        c, cu, z, zu = found[-1]
        done = float(c) * units[cu] + float(z) * units[zu]  # null legs read zeroes: zeroed
        assert done == 3 * (64 << 10), f"resync did {c} {cu} + {z} {zu}: only 3 regions changed"
        on_disk = os.stat(bm).st_blocks * 512
        assert rss < 200 * 1024, f"client node RSS {rss} KiB"
        assert on_disk < 64 * MiB, f"bitmap file allocates {on_disk} bytes"
        print(
            f"1 PiB mirror: serving after {started:.2f} s, RSS {rss // 1024} MiB, bitmap "
            f"file {on_disk // 1024} KiB allocated, resync of 3 regions in {resynced:.2f} s"
        )
    finally:
        proxy.close()


def test_a_new_petabyte_mirror_serves_during_its_first_full_sync(
    procs: Procs, sockdir: Path
) -> None:
    """Without --assume-clean the first full sync runs in the background; the device
    serves meanwhile and status gives an ETA."""
    qemu_io = need_tool("qemu-io")
    _, a = procs.export("null:1P", listen=f"unix:{sockdir}/a.sock")
    _, b = procs.export("null:1P", listen=f"unix:{sockdir}/b.sock")
    ctl = sockdir / "ctl.sock"
    att, uri = procs.attach(
        member_uri(a),
        member_uri(b),
        "--mirror",
        "--bitmap",
        str(sockdir / "bm"),
        "--control",
        str(ctl),
    )
    st = wait_json(ctl, lambda st: (st["device"].get("resync") or {}).get("eta") is not None)
    resync = st["device"]["resync"]
    assert resync["bytes_total"] == PIB and resync["eta"] > 0
    run([qemu_io, "-f", "raw", "-c", "write -P 0x11 1G 64k", "-c", "read 1G 64k", uri], timeout=60)
    assert att.popen.poll() is None
    rss = rss_kib(att.popen.pid)
    assert rss < 200 * 1024, f"client node RSS {rss} KiB"
    print(f"first full sync of 1 PiB: ETA {resync['eta']:.0f} s at {resync['rate']:.0f} B/s")
