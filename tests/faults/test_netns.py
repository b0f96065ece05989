"""Export node and client node in two network namespaces joined by a veth pair.

The test creates and removes its own namespace; it cuts the link for 3 s, and
drops 20% of packets with iptables' statistic match, during verified writes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.test_resilience import fio_result, fio_writer
from tests.procs import DST, Procs

pytestmark = [pytest.mark.integration, pytest.mark.root]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Netns:
    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str

    def exec(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def link(self, up: bool) -> None:
        sh("ip", "link", "set", self.host_if, "up" if up else "down")


def _probe() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command is missing (apt-get install iproute2)"
    cp = sh("ip", "netns", "add", f"dstprobe{os.getpid()}", check=False)
    if cp.returncode != 0:
        return f"cannot create a network namespace here: {cp.stderr.strip()}"
    sh("ip", "netns", "del", f"dstprobe{os.getpid()}", check=False)
    return None


@pytest.fixture
def netns() -> Iterator[Netns]:
    why = _probe()
    if why:
        pytest.skip(why)
    pid = os.getpid() % 10000
    n = Netns(f"dstt{pid}", f"dsth{pid}", f"dstn{pid}", "10.213.77.1", "10.213.77.2")
    try:
        sh("ip", "netns", "add", n.name)
        sh("ip", "link", "add", n.host_if, "type", "veth", "peer", "name", n.ns_if)
        sh("ip", "link", "set", n.ns_if, "netns", n.name)
        sh("ip", "addr", "add", f"{n.host_ip}/30", "dev", n.host_if)
        sh("ip", "link", "set", n.host_if, "up")
        sh(*n.exec(), "ip", "addr", "add", f"{n.ns_ip}/30", "dev", n.ns_if)
        sh(*n.exec(), "ip", "link", "set", n.ns_if, "up")
        sh(*n.exec(), "ip", "link", "set", "lo", "up")
        yield n
    finally:
        sh("ip", "netns", "del", n.name, check=False)
        sh("ip", "link", "del", n.host_if, check=False)


def start_remote_export(procs: Procs, n: Netns, img: Path) -> str:
    p = procs.start(
        [*n.exec(), *DST, "export", "--listen", f"{n.ns_ip}:0", f"file:{img}", "--size", "64M"]
    )
    m = p.wait_for(r"listening on (\S+)")
    return m.group(1)


def test_link_down_for_3s_during_writes(procs: Procs, sockdir: Path, netns: Netns) -> None:
    addr = start_remote_export(procs, netns, sockdir / "d.img")
    att, uri = procs.attach(f"dst://{addr}/default")
    fio = subprocess.Popen(
        fio_writer(uri, size="32M"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(0.7)
    netns.link(False)
    time.sleep(3.0)
    netns.link(True)
    job = fio_result(fio)
    assert job["write"]["clat_ns"]["max"] > 2e9  # type: ignore[index]
    assert "failed:" not in att.output


def test_20_percent_packet_loss_verified_writes(procs: Procs, sockdir: Path, netns: Netns) -> None:
    if shutil.which("iptables") is None:
        pytest.skip("iptables is missing (apt-get install iptables)")
    addr = start_remote_export(procs, netns, sockdir / "d.img")
    for chain in ("INPUT", "OUTPUT"):
        cp = sh(
            *netns.exec(),
            "iptables",
            "-A",
            chain,
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.2",
            "-j",
            "DROP",
            check=False,
        )
        if cp.returncode != 0:
            pytest.skip(f"iptables statistic match unavailable: {cp.stderr.strip()}")
    att, uri = procs.attach(
        f"dst://{addr}/default",
        "--ping-interval",
        "5",
        "--ping-timeout",
        "5",
        "--resend-timeout",
        "10",
    )
    t0 = time.monotonic()
    fio = subprocess.Popen(
        fio_writer(uri, size="8M", rate="0", bs="64k"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job = fio_result(fio, timeout=240)
    elapsed = time.monotonic() - t0
    assert job["write"]["io_bytes"] >= 8 << 20  # type: ignore[index]
    assert "failed:" not in att.output
    print(
        f"8 MiB written and verified over a 20%-loss link in {elapsed:.1f} s; "
        f"reconnects: {att.output.count('reconnected')}"
    )
