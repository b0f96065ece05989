"""Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh, fio) against NbdFrontend.

The front end serves a RamDevice from a background thread (tests/integration/
ramdev.py); each test drives one or more client processes against it and checks
what the device holds, what the clients saw and what the server logged.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dst.device import Capabilities
from dst.units import Address
from tests.integration.ramdev import RamDevice, Served, serve_in_thread
from tests.procs import IN_CI, need_tool

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 64 * MiB
WAIT = 60.0  # seconds any one client process may take
# nbdsh runs `python3 -m nbd`: libnbd's module lives in Debian's own python3
TOOL_ENV = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    need_tool(args[0])
    r = subprocess.run(args, capture_output=True, text=True, timeout=WAIT, env=TOOL_ENV)
    if check:
        assert r.returncode == 0, f"{args[0]} failed ({r.returncode}): {r.stdout}{r.stderr}"
        assert "failed" not in r.stdout.lower() + r.stderr.lower(), r.stdout + r.stderr
    return r


def qemu_io(uri: str, *commands: str, extra: tuple[str, ...] = ()) -> str:
    args = ["qemu-io", "-f", "raw", *extra]
    for c in commands:
        args += ["-c", c]
    return run(*args, uri).stdout


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def address_for(kind: str, sockdir: Path) -> Address:
    if kind == "unix":
        return Address(path=str(sockdir / "nbd.sock"))
    if kind == "tcp4":
        return Address(host="127.0.0.1", port=0)
    if not ipv6_loopback():
        pytest.skip("IPv6 loopback (::1) is not available here")
    return Address(host="::1", port=0)


@pytest.fixture
def served(sockdir: Path) -> Iterator[Served]:
    with serve_in_thread(
        RamDevice(SIZE, Capabilities(can_trim=True)), address_for("unix", sockdir)
    ) as s:
        yield s


class RawClient:
    """A minimal blocking NBD client for what real clients refuse to send."""

    def __init__(self, addr: Address) -> None:
        if addr.path is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(WAIT)
            self.sock.connect(addr.path)
        else:
            self.sock = socket.create_connection((addr.host, addr.port), timeout=WAIT)

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"connection closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def handshake(self) -> None:
        assert self.recv_exact(18)[:16] == b"NBDMAGICIHAVEOPT"
        name = b"default"
        go = struct.pack(">I", len(name)) + name + b"\x00\x00"
        self.sock.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 7, len(go)) + go)
        while True:
            _, _, kind, length = struct.unpack(">QIII", self.recv_exact(20))
            self.recv_exact(length)
            if kind == 1:
                return
            assert kind == 3, f"unexpected option reply {kind:#x}"

    def request(
        self, cmd: int, handle: int, offset: int, length: int, payload: bytes = b""
    ) -> None:
        self.sock.sendall(
            struct.pack(">IHHQQI", 0x25609513, 0, cmd, handle, offset, length) + payload
        )

    def reply(self) -> tuple[int, int]:
        magic, error, handle = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == 0x67446698
        return error, handle


# ---- data paths ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["unix", "tcp4", "tcp6"])
def test_qemu_io_round_trip(kind: str, sockdir: Path) -> None:
    dev = RamDevice(SIZE, Capabilities(can_trim=True))
    with serve_in_thread(dev, address_for(kind, sockdir)) as s:
        qemu_io(
            s.uri,
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "aio_write -P 0x11 2M 64k",
            "aio_write -P 0x22 3M 64k",
            "aio_flush",
            "flush",
            "read -P 0x11 2M 64k",
            "read -P 0x22 3M 64k",
            "write -P 0x33 4M 1M",
            "discard 4M 512k",
            "write -z 5M 1M",
            "read -P 0 5M 1M",
            "write -f -P 0x44 6M 4k",
            extra=("-t", "writeback"),
        )
        assert dev.data[:MiB] == b"\xab" * MiB
        assert dev.data[2 * MiB : 2 * MiB + 65536] == b"\x11" * 65536
        assert dev.data[4 * MiB : 4 * MiB + 512 * 1024] == bytes(512 * 1024)  # the RAM trim zeroes
        assert dev.data[6 * MiB : 6 * MiB + 4096] == b"\x44" * 4096
        assert dev.fua_writes == 1  # only `write -f` asked for FUA (writeback cache)
        stats = s.statistics()
        assert dev.calls["trim"] == 1 and dev.calls["zero"] >= 1 and dev.calls["flush"] >= 1
    assert stats["requests"]["write"] >= 5 and stats["bytes_written"] == 2 * MiB + 2 * 65536 + 4096
    assert stats["connections_total"] == 1 and stats["errors"] == 0


def test_qemu_img_convert_and_compare(served: Served, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    rng = random.Random(7)
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for i in range(0, SIZE, 4 * MiB):  # data with holes between
            f.seek(i)
            f.write(rng.randbytes(MiB))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), served.uri)
    assert served.device.data == src.read_bytes()
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), served.uri)
    back = tmp_path / "back.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, str(back))
    assert back.read_bytes() == src.read_bytes()


def test_nbdcopy_both_ways_with_backpressure(sockdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(3).randbytes(16 * MiB))
    dev = RamDevice(16 * MiB, Capabilities(can_trim=True))
    addr = address_for("unix", sockdir)
    # tiny limits, so reading pauses and resumes all the time
    with serve_in_thread(dev, addr, max_inflight=2, max_inflight_bytes=MiB) as s:
        run("nbdcopy", "--request-size=262144", str(src), s.uri)
        assert bytes(dev.data) == src.read_bytes()
        dst = tmp_path / "dst.img"
        run("nbdcopy", s.uri, str(dst))
        assert dst.read_bytes() == src.read_bytes()
        stats = s.statistics()
    assert stats["connections_total"] >= 2  # nbdcopy uses several connections (multi-conn)
    assert stats["read_pauses"] > 0


def test_fio_verify_at_queue_depth(served: Served) -> None:
    need_tool("fio")
    r = run(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={served.uri}", "--rw=randwrite",
        "--bs=4k", "--size=8M", "--iodepth=32", "--verify=crc32c", "--do_verify=1",
        "--numjobs=1", "--verify_state_save=0", check=False,
    )  # fmt: skip
    if "engine nbd not loadable" in r.stderr or "engine nbd not found" in r.stderr:
        msg = "fio was built without the nbd engine; install it with: apt-get install fio"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify:" not in r.stderr


def test_two_qemu_io_clients_at_once(served: Served) -> None:
    need_tool("qemu-io")
    procs = []
    for i, pattern in enumerate((0x5A, 0xA5)):
        base = i * 32 * MiB
        cmds = [f"aio_write -P {pattern:#x} {base + k * 256 * 1024} 256k" for k in range(64)]
        cmds += ["aio_flush", f"read -P {pattern:#x} {base} 16M"]
        args = ["qemu-io", "-f", "raw"] + [a for c in cmds for a in ("-c", c)] + [served.uri]
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        output, _ = p.communicate(timeout=WAIT)
        assert p.returncode == 0 and b"fail" not in output.lower(), output.decode()
    data = served.device.data
    assert data[: 16 * MiB] == b"\x5a" * (16 * MiB)
    assert data[32 * MiB : 48 * MiB] == b"\xa5" * (16 * MiB)
    assert served.statistics()["connections_total"] == 2


# ---- what clients see --------------------------------------------------------
def test_nbdinfo_json_shows_the_advertised_flags(served: Served) -> None:
    info = json.loads(run("nbdinfo", "--json", served.uri).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    (export,) = info["exports"]
    assert export["export-name"] == "default"
    assert export["export-size"] == SIZE
    expected = {
        "is_read_only": False,
        "can_flush": True,
        "can_fua": True,
        "can_trim": True,
        "can_zero": True,
        "can_multi_conn": True,
        "can_df": True,
        "can_fast_zero": False,
        "can_cache": True,  # a hint every device takes
        "block_size_minimum": 1,
        "block_size_preferred": 4096,
        "block_size_maximum": 32 * MiB,
    }
    assert {k: export[k] for k in expected} == expected
    assert "default" in run("nbdinfo", "--list", served.uri).stdout


def test_nbdsh_checks_and_errors_in_both_reply_modes(served: Served) -> None:
    script = f"""
import errno
def expect(err, fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        assert e.errno == errno.errorcode[err], (e.errno, e.string)
        return
    raise AssertionError("no error")
for structured in (True, False):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri({served.uri!r})
    assert h.get_structured_replies_negotiated() == structured
    assert h.get_size() == {SIZE}
    assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == {32 * MiB}
    h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 0) == b"x" * 4096
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(4096, 0) == bytes(4096)
    h.trim(8192, 8192)
    h.flush()
    h.set_strict_mode(0)  # let the server, not libnbd, refuse what follows
    expect(errno.EINVAL, h.pread, 4096, {SIZE} - 512)
    expect(errno.ENOSPC, h.pwrite, b"y" * 4096, {SIZE} - 512)
    expect(errno.EINVAL, h.pread, {32 * MiB + 4096}, 0)
    h.shutdown()
print("ok")
"""
    assert run("nbdsh", "-c", script).stdout.strip().endswith("ok")


def test_read_only_device(sockdir: Path) -> None:
    dev = RamDevice(SIZE, Capabilities(read_only=True, can_trim=True))
    dev.data[:4096] = b"\x77" * 4096
    with serve_in_thread(dev, address_for("unix", sockdir)) as s:
        qemu_io(s.uri, "read -P 0x77 0 4k", extra=("-r",))
        r = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", s.uri, check=False)
        assert r.returncode != 0 and "Permission denied" in r.stderr
        info = json.loads(run("nbdinfo", "--json", s.uri).stdout)["exports"][0]
        assert info["is_read_only"] and not info["can_trim"] and not info["can_zero"]
        c = RawClient(s.frontend.address)
        try:
            c.handshake()
            c.request(1, 1, 0, 4096, b"\x01" * 4096)  # a write the server must refuse
            c.request(0, 2, 0, 512)
            assert c.reply() == (1, 1)  # EPERM
            assert c.reply() == (0, 2)
            assert c.recv_exact(512) == b"\x77" * 512
        finally:
            c.close()
    assert dev.data[:4096] == b"\x77" * 4096


def test_device_errors_reach_the_client(served: Served) -> None:
    served.device.fail_reads_at = MiB
    r = run("qemu-io", "-f", "raw", "-c", "read 1M 4k", served.uri, check=False)
    assert "Input/output error" in r.stdout + r.stderr
    qemu_io(served.uri, "read 0 4k")  # other reads still work
    assert served.statistics()["errors"] >= 1


def test_garbage_client_is_dropped_while_another_works(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dst.nbd")
    good = RawClient(served.frontend.address)
    bad = RawClient(served.frontend.address)
    try:
        good.handshake()
        bad.handshake()
        bad.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
        bad.sock.settimeout(WAIT)
        assert bad.sock.recv(1) == b""  # the server hung up
        good.request(1, 7, 0, 512, b"\x42" * 512)
        assert good.reply() == (0, 7)
        qemu_io(served.uri, "read -P 0x42 0 512")
    finally:
        good.close()
        bad.close()
    assert any("closing NBD connection" in r.getMessage() for r in caplog.records)
    assert served.statistics()["protocol_errors"] == 1


def test_log_line_uri_and_socket_cleanup(sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dst.nbd")
    path = sockdir / "nbd.sock"
    with serve_in_thread(RamDevice(MiB), Address(path=str(path))) as s:
        assert s.uri == f"nbd+unix:///?socket={path}"
        assert path.exists()
    assert not path.exists()
    with serve_in_thread(RamDevice(MiB), Address(host="127.0.0.1", port=0)) as s:
        port = s.frontend.address.port
        assert port != 0 and s.uri == f"nbd://127.0.0.1:{port}/"
        run("nbdinfo", s.uri)
    messages = [r.getMessage() for r in caplog.records]
    assert f"serving NBD on nbd+unix:///?socket={path}" in messages
    assert f"serving NBD on nbd://127.0.0.1:{port}/" in messages
    assert not any("no authentication" in m for m in messages)


def test_close_finishes_requests_in_flight(sockdir: Path) -> None:
    dev = RamDevice(MiB)
    dev.data[:512] = b"\x99" * 512
    dev.read_delay = 0.5
    c = None
    with serve_in_thread(dev, address_for("unix", sockdir)) as s:
        c = RawClient(s.frontend.address)
        c.handshake()
        c.request(0, 1, 0, 512)
        deadline = time.monotonic() + WAIT
        while s.statistics()["inflight"] == 0:
            assert time.monotonic() < deadline, "the read never started"
            time.sleep(0.01)
    try:  # the server stopped only after answering the read
        assert c.reply() == (0, 1)
        assert c.recv_exact(512) == b"\x99" * 512
        assert c.sock.recv(1) == b""
    finally:
        c.close()


def test_non_loopback_address_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dst.nbd")
    with serve_in_thread(RamDevice(MiB), Address(host="0.0.0.0", port=0)):
        pass
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no authentication" in r.getMessage() for r in warnings)
