"""Keys, authentication, channel encryption, checksums and hostile input, on real processes."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.faults.test_resilience import fio_result, fio_writer
from tests.procs import Procs, dst_run, member_uri, need_tool, run
from tests.proxy import FaultProxy

pytestmark = pytest.mark.integration

CIPHERS = ["aes-256-gcm", "chacha20-poly1305", "none"]
CHECKSUMS = ["crc32c", "xxh3", "blake2b", "sha256", "none"]


def keygen(path: Path) -> Path:
    cp = dst_run("keygen", str(path))
    assert cp.returncode == 0, cp.stderr
    return path


def qemu_io(uri: str, *cmds: str) -> str:
    exe = need_tool("qemu-io")
    args = [exe, "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    cp = run([*args, uri], check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0 and "failed" not in out.lower(), out
    return out


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("dst: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("cipher", CIPHERS)
def test_every_cipher_and_checksum_round_trip(procs: Procs, sockdir: Path, cipher: str) -> None:
    key = keygen(sockdir / "k")
    img = sockdir / "d.img"
    args = [f"file:{img}", "--size", "16M", "--key-file", str(key), "--cipher", cipher]
    for c in CHECKSUMS:
        args += ["--checksum", c]
    _, addr = procs.export(*args)
    for i, checksum in enumerate(CHECKSUMS):
        att, uri = procs.attach(
            member_uri(addr), "--key-file", str(key), "--checksum", checksum, "--client-id", "one"
        )
        att.wait_for(rf"cipher {cipher}, checksum {checksum}")
        pattern = 0x30 + i
        qemu_io(uri, f"write -P {pattern} {i}M 256k", f"read -P {pattern} {i}M 256k", "flush")
        assert att.stop() == 0
        with open(img, "rb") as f:
            f.seek(i << 20)
            assert f.read(256 << 10) == bytes([pattern]) * (256 << 10)


def refused(sockdir: Path, addr: str, *args: str) -> str:
    cp = dst_run(
        "attach",
        member_uri(addr),
        "--nbd",
        f"unix:{sockdir}/n-refused.sock",
        "--connect-timeout",
        "5",
        *args,
    )
    assert cp.returncode == 1, cp.stderr
    return error_line(cp.stderr)


def test_refusals_have_exact_messages_and_write_nothing(procs: Procs, sockdir: Path) -> None:
    k1, k2 = keygen(sockdir / "k1"), keygen(sockdir / "k2")
    img = sockdir / "d.img"
    exp, addr = procs.export(
        f"file:{img}",
        "--size",
        "4M",
        "--key-file",
        str(k1),
        "--cipher",
        "chacha20-poly1305",
        "--allow",
        "alpha",
    )
    line = refused(sockdir, addr, "--key-file", str(k2), "--client-id", "alpha")
    assert "authentication failed: the client's key differs from the export node's key" in line
    assert "use the same key file on both sides" in line
    line = refused(sockdir, addr, "--client-id", "alpha")
    assert "requires authentication; give the client the same --key-file" in line
    line = refused(
        sockdir, addr, "--key-file", str(k1), "--client-id", "alpha", "--cipher", "aes-256-gcm"
    )
    assert (
        "no common cipher: the export node offers chacha20-poly1305, the client accepts aes-256-gcm"
        in line
    )
    line = refused(sockdir, addr, "--key-file", str(k1), "--client-id", "beta")
    assert "client id 'beta' is not allowed on this export node; add --allow beta" in line
    exp.wait_for(r"refused .*client's key differs")
    assert os.path.getsize(img) == 4 << 20 and img.read_bytes() == bytes(4 << 20)
    # the export node has no key but the client has one
    _, plain = procs.export(f"file:{sockdir}/p.img", "--size", "4M")
    line = refused(sockdir, plain, "--key-file", str(k1))
    assert "the client holds a key but this export node has none" in line


def test_per_client_keys_file(procs: Procs, sockdir: Path) -> None:
    ka, kb = keygen(sockdir / "ka"), keygen(sockdir / "kb")
    keys = sockdir / "keys"
    keys.write_text(
        f"# client keys\nalpha {ka.read_text().strip()}\nbeta {kb.read_text().strip()}\n"
    )
    keys.chmod(0o600)
    _, addr = procs.export(f"file:{sockdir}/d.img", "--size", "4M", "--keys", str(keys), "--shared")
    _, uri = procs.attach(member_uri(addr), "--key-file", str(ka), "--client-id", "alpha")
    qemu_io(uri, "write -P 7 0 4k")
    line = refused(sockdir, addr, "--key-file", str(ka), "--client-id", "beta")
    assert "key differs" in line
    line = refused(sockdir, addr, "--key-file", str(ka), "--client-id", "gamma")
    assert "client id 'gamma' has no key on this export node" in line


def flip(offset: int) -> object:
    def go(frame: bytes) -> bytes:
        b = bytearray(frame)
        b[min(offset, len(b) - 1)] ^= 0x5A
        return bytes(b)

    return go


def test_checksums_catch_corruption_without_a_key(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "d.img"
    exp, addr = procs.export(f"file:{img}", "--size", "8M")
    proxy = FaultProxy(addr[5:], sockdir, digest_size=4)
    try:
        att, uri = procs.attach(proxy.uri, "--checksum", "crc32c")
        proxy.corrupt_next = flip(32 + 1000)  # a payload byte of the next WRITE
        qemu_io(uri, "write -P 0x61 0 64k", "flush")
        exp.wait_for(r"checksum mismatch in transaction")
        proxy.corrupt_next = flip(9)  # a header byte (the transaction id) of the next WRITE
        qemu_io(uri, "write -P 0x62 64k 64k", "flush")
        proxy.corrupt_where = "s2c"
        proxy.corrupt_next = flip(24 + 500)  # a data byte of the next READ reply
        qemu_io(uri, "read -P 0x61 0 64k")
        att.wait_for(r"checksum mismatch \(reply\)")
        with open(img, "rb") as f:
            assert f.read(128 << 10) == b"\x61" * 65536 + b"\x62" * 65536
    finally:
        proxy.close()


def test_aead_rejects_tampered_and_replayed_records(procs: Procs, sockdir: Path) -> None:
    key = keygen(sockdir / "k")
    img = sockdir / "d.img"
    exp, addr = procs.export(f"file:{img}", "--size", "8M", "--key-file", str(key))
    proxy = FaultProxy(addr[5:], sockdir)
    try:
        att, uri = procs.attach(proxy.uri, "--key-file", str(key), "--reconnect-min", "0.05")
        att.wait_for("cipher aes-256-gcm")
        proxy.corrupt_raw = True
        proxy.corrupt_next = flip(2000)
        qemu_io(uri, "write -P 0x71 0 64k", "flush")
        exp.wait_for(r"AEAD tag check failed")
        att.wait_for(r"reconnected")
        proxy.replay_next_where = "c2s"
        qemu_io(uri, "write -P 0x72 64k 64k", "flush")
        time.sleep(0.3)
        assert exp.output.count("AEAD tag check failed") >= 2, exp.output  # the replayed record
        qemu_io(uri, "read -P 0x71 0 64k", "read -P 0x72 64k 64k")
        with open(img, "rb") as f:
            assert f.read(128 << 10) == b"\x71" * 65536 + b"\x72" * 65536
    finally:
        proxy.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_flood_of_garbage_and_half_open_connections(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "d.img"
    exp, addr = procs.export(f"file:{img}", "--size", "64M", listen="127.0.0.1:0")
    host, port = addr.rsplit(":", 1)
    att, uri = procs.attach(f"dst://{addr}/default")
    rss_before = rss_kib(exp.pid)
    fio = subprocess.Popen(
        fio_writer(uri, size="32M", rate="12m"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    socks: list[socket.socket] = []
    stop = threading.Event()

    def flood() -> None:
        for i in range(300):
            if stop.is_set():
                return
            try:
                s = socket.create_connection((host, int(port)), timeout=2)
            except OSError:
                continue
            socks.append(s)
            if i % 2:
                with contextlib.suppress(OSError):
                    s.sendall(
                        os.urandom(2048) if i % 4 == 1 else b"DSTH\x01\x00\x00\x00\xff\xff\xff\x7f"
                    )
            time.sleep(0.005)

    t = threading.Thread(target=flood)
    t.start()
    try:
        job = fio_result(fio, timeout=120)
    finally:
        stop.set()
        t.join(10)
        rss_after = rss_kib(exp.pid)
        for s in socks:
            s.close()
    assert job["write"]["io_bytes"] >= 32 << 20  # type: ignore[index]
    assert len(socks) >= 250
    assert rss_after - rss_before < 64 << 10, f"RSS grew from {rss_before} to {rss_after} KiB"
    assert "failed:" not in att.output
    assert exp.popen.poll() is None
