"""`dst export` + `dst attach --nbd` as real processes, driven by real NBD peers."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tests.procs import Procs, dst_run, member_uri, nbdsh, need_tool, run

pytestmark = pytest.mark.integration

MiB = 1 << 20


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def start_pair(
    procs: Procs,
    tmp: Path,
    *export_args: str,
    listen: str | None = None,
    attach_args: tuple[str, ...] = (),
    nbd: str | None = None,
    size: str = "64M",
) -> tuple[Path, str]:
    img = tmp / "disk.img"
    _, addr = procs.export(f"file:{img}", "--size", size, *export_args, listen=listen)
    _, uri = procs.attach(member_uri(addr), "--client-id", "test-client", *attach_args, nbd=nbd)
    return img, uri


def qemu_io(uri: str, *cmds: str, check: bool = True) -> str:
    exe = need_tool("qemu-io")
    args = [exe, "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    cp = run([*args, uri], check=False)
    out = cp.stdout + cp.stderr
    if check:
        assert cp.returncode == 0, out
        assert "Pattern verification failed" not in out, out
        assert "failed" not in out.lower(), out
    return out


def read_file(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


TRANSPORTS = ["unix", "tcp4"] + (["tcp6"] if ipv6_loopback() else [])


def addresses(kind: str, tmp: Path) -> tuple[str, str]:
    if kind == "unix":
        return f"unix:{tmp}/e.sock", f"unix:{tmp}/n.sock"
    if kind == "tcp4":
        return "127.0.0.1:0", "127.0.0.1:0"
    return "[::1]:0", "[::1]:0"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_qemu_io_round_trip_lands_on_the_backing_file(
    procs: Procs, sockdir: Path, transport: str
) -> None:
    listen, nbd = addresses(transport, sockdir)
    img, uri = start_pair(procs, sockdir, listen=listen, nbd=nbd)
    qemu_io(
        uri,
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "aio_write -P 0xcd 2M 64k",
        "aio_write -P 0xce 3M 64k",
        "aio_flush",
        "flush",
        "write -P 0x77 4M 1M",
        "discard 4M 512k",
        "read -P 0 4M 512k",
        "read -P 0x77 4608k 512k",
        "write -P 0x66 5M 1M",
        "write -z 5M 1M",
        "read -P 0 5M 1M",
        "write -f -P 0x11 6M 4k",
        "read -P 0x11 6M 4k",
        "write -P 0x22 7M 3",
        "read -P 0x22 7M 3",
    )
    qemu_io(uri, "flush")
    assert read_file(img, 0, MiB) == b"\xab" * MiB
    assert read_file(img, 2 * MiB, 65536) == b"\xcd" * 65536
    assert read_file(img, 3 * MiB, 65536) == b"\xce" * 65536
    assert read_file(img, 4 * MiB, 512 << 10) == bytes(512 << 10)
    assert read_file(img, 5 * MiB, MiB) == bytes(MiB)
    assert read_file(img, 6 * MiB, 4096) == b"\x11" * 4096
    assert read_file(img, 7 * MiB, 4) == b"\x22\x22\x22\x00"
    assert os.path.getsize(img) == 64 * MiB


def test_nbdinfo_reports_truthful_flags_and_block_sizes(procs: Procs, sockdir: Path) -> None:
    exe = need_tool("nbdinfo")
    _, uri = start_pair(procs, sockdir)
    info = json.loads(run([exe, "--json", uri]).stdout)
    exp = info["exports"][0]
    assert exp["export-size"] == 64 * MiB
    assert exp["is_read_only"] is False
    assert exp["can_flush"] is True and exp["can_fua"] is True
    assert exp["can_trim"] is True and exp["can_zero"] is True
    assert exp["can_multi_conn"] is True
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 32 * MiB


def test_qemu_img_convert_and_compare_both_ways(procs: Procs, sockdir: Path) -> None:
    qemu_img = need_tool("qemu-img")
    src = sockdir / "src.img"
    src.write_bytes(os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(3 * MiB))
    _, uri = start_pair(procs, sockdir, size="8M")
    run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), uri])
    back = sockdir / "back.img"
    run([qemu_img, "convert", "-f", "raw", "-O", "raw", uri, str(back)])
    assert back.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("checksum", ["crc32c", "sha256", "none"])
def test_nbdcopy_both_ways(procs: Procs, sockdir: Path, checksum: str) -> None:
    """nbdcopy uses several connections and 64 requests in flight: replies whose checksums
    are computed on worker threads must never carry another request's bytes."""
    nbdcopy = need_tool("nbdcopy")
    src = sockdir / "src.img"
    data = os.urandom(6 * MiB) + bytes(2 * MiB)
    src.write_bytes(data)
    img, uri = start_pair(
        procs, sockdir, "--checksum", checksum, size="8M", attach_args=("--checksum", checksum)
    )
    run([nbdcopy, str(src), uri])
    qemu_io(uri, "flush")
    assert img.read_bytes() == data
    for i in range(4):
        out = sockdir / f"out{i}.img"
        out.write_bytes(b"")
        run([nbdcopy, uri, str(out)])
        assert out.read_bytes() == data, f"read-back {i} differs"


def test_two_nbd_clients_write_different_regions_at_once(procs: Procs, sockdir: Path) -> None:
    exe = need_tool("qemu-io")
    import subprocess

    img, uri = start_pair(procs, sockdir)
    ps = [
        subprocess.Popen(
            [
                exe,
                "-f",
                "raw",
                "-c",
                f"write -P {0x30 + i} {i * 8}M 8M",
                "-c",
                f"read -P {0x30 + i} {i * 8}M 8M",
                uri,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    for p in ps:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "failed" not in out.lower(), out
    qemu_io(uri, "flush")
    for i in range(3):
        assert read_file(img, i * 8 * MiB, 8 * MiB) == bytes([0x30 + i]) * 8 * MiB


def test_garbage_nbd_client_is_dropped_others_carry_on(procs: Procs, sockdir: Path) -> None:
    _, uri = start_pair(procs, sockdir)
    path = uri.split("socket=")[1]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.recv(18)
        s.sendall(os.urandom(4096))
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    qemu_io(uri, "write -P 0x42 0 64k", "read -P 0x42 0 64k")


def test_read_only_export_refuses_writes_reads_work(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "ro.img"
    img.write_bytes(b"\x5a" * MiB)
    _, addr = procs.export(f"file:{img}", "--read-only")
    _, uri = procs.attach(member_uri(addr))
    exe = need_tool("qemu-io")
    cp = run([exe, "-r", "-f", "raw", "-c", "read -P 0x5a 0 1M", uri])
    assert "verification failed" not in cp.stdout
    # a writer is refused by the NBD export itself (READ_ONLY flag, EPERM on writes)
    out = qemu_io(uri, "write -P 1 0 4k", check=False)
    assert "Permission denied" in out or "Operation not permitted" in out, out
    cp = run([*nbdsh(), "-u", uri, "-c", "print(h.is_read_only())"])
    assert cp.stdout.strip() == "True"
    assert img.read_bytes() == b"\x5a" * MiB


def test_second_client_id_is_refused_while_a_writer_is_attached(
    procs: Procs, sockdir: Path
) -> None:
    img = sockdir / "d.img"
    _, addr = procs.export(f"file:{img}", "--size", "8M")
    procs.attach(member_uri(addr), "--client-id", "alpha")
    cp = dst_run(
        "attach", member_uri(addr), "--client-id", "beta", "--nbd", f"unix:{sockdir}/n2.sock"
    )
    assert cp.returncode == 1, cp.stderr
    assert "dst: error:" in cp.stderr and "busy" in cp.stderr and "'alpha'" in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr


def test_two_export_nodes_on_one_backing_file(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "d.img"
    procs.export(f"file:{img}", "--size", "8M")
    cp = dst_run("export", "--listen", f"unix:{sockdir}/other.sock", f"file:{img}")
    assert cp.returncode == 1
    assert cp.stderr.startswith("dst: error:") or "\ndst: error:" in cp.stderr
    assert "already exported" in cp.stderr, cp.stderr


def test_several_named_exports_on_one_port(procs: Procs, sockdir: Path) -> None:
    a, b = sockdir / "a.img", sockdir / "b.img"
    _, addr = procs.export(f"alpha=file:{a}", f"beta=file:{b}", "mem=memory:4M", "--size", "8M")
    _, ua = procs.attach(member_uri(addr, "alpha"), "--client-id", "c1")
    _, ub = procs.attach(member_uri(addr, "beta"), "--client-id", "c2")
    _, um = procs.attach(member_uri(addr, "mem"), "--client-id", "c3")
    qemu_io(ua, "write -P 0xa1 0 4k", "flush")
    qemu_io(ub, "write -P 0xb1 0 4k", "flush")
    qemu_io(um, "write -P 0xc1 0 4k", "read -P 0xc1 0 4k")
    assert read_file(a, 0, 4096) == b"\xa1" * 4096
    assert read_file(b, 0, 4096) == b"\xb1" * 4096
    cp = dst_run("attach", member_uri(addr, "nope"), "--nbd", f"unix:{sockdir}/x.sock")
    assert cp.returncode == 1 and "unknown export 'nope'" in cp.stderr and "alpha" in cp.stderr
