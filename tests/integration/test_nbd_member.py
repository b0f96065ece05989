"""NbdDevice against real NBD servers: nbdkit (memory, file, read-only) and qemu-nbd.

Round trips with FUA, trim, zeroes and flush; the conformance suite; a killed and
restarted nbdkit survived within the resend budget; a server gone for good fails
requests with EIO after the budget; refusals and unreachable servers are clear errors.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from dst.client.nbd_member import NbdDevice, nbd_identity
from dst.client.remote import LinkOptions
from dst.device import BlockDevice, IoFlags
from dst.errors import DstError, IoError
from dst.uri import MemberUri, parse_member
from tests import conformance
from tests.conformance import Expect
from tests.procs import Proc, Procs, need_tool

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 64 * MiB
FAST = LinkOptions(connect_timeout=5.0, reconnect_min=0.05, reconnect_max=0.5)


def wait_socket(path: Path, proc: Proc, timeout: float = 15.0) -> None:
    """Wait until something accepts on the unix socket ``path``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited early:\n{proc.output}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                time.sleep(0.02)
    raise AssertionError(f"nothing listens on {path}:\n{proc.output}")


def nbdkit(procs: Procs, sock: Path, *args: str) -> Proc:
    with_socket_gone(sock)
    p = procs.start([need_tool("nbdkit"), "-f", "-v", "-U", str(sock), *args])
    wait_socket(sock, p)
    return p


def qemu_nbd(procs: Procs, sock: Path, image: Path, *args: str) -> Proc:
    with_socket_gone(sock)
    exe = need_tool("qemu-nbd")
    p = procs.start([exe, "-k", str(sock), "-f", "raw", "--persistent", *args, str(image)])
    wait_socket(sock, p)
    return p


def with_socket_gone(sock: Path) -> None:
    """A socket left by a killed server would make the next one fail to bind."""
    if sock.exists():
        sock.unlink()


def uri(sock: Path, export: str = "") -> MemberUri:
    return parse_member(f"nbd+unix:///{export}?socket={sock}")


def image(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


async def opened(u: MemberUri, **kw: object) -> NbdDevice:
    dev = NbdDevice(u, kw.pop("options", FAST), **kw)  # type: ignore[arg-type]
    await dev.connect()
    return dev


def run(coro: Awaitable[None], timeout: float = 60.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await coro

    asyncio.run(bounded())


@pytest.fixture
def memory_sock(procs: Procs, sockdir: Path) -> Iterator[tuple[Path, Proc]]:
    sock = sockdir / "mem.sock"
    yield sock, nbdkit(procs, sock, "memory", str(SIZE))


# ---- round trips -----------------------------------------------------------------------
async def round_trip(dev: BlockDevice) -> None:
    data = os.urandom(3 * MiB + 17)
    await dev.write(4096, data, IoFlags.FUA)
    assert await dev.read(4096, len(data)) == data
    await dev.write(MiB, b"x" * 512, IoFlags.PREFLUSH)
    await dev.write_zeroes(2 * MiB, MiB, IoFlags.NO_HOLE | IoFlags.FUA)
    await dev.write_zeroes(3 * MiB, 4096)
    want = bytearray(data)
    want[MiB - 4096 : MiB - 4096 + 512] = b"x" * 512
    want[2 * MiB - 4096 : 3 * MiB - 4096] = bytes(MiB)
    want[3 * MiB - 4096 : 3 * MiB] = bytes(4096)
    await dev.flush()
    assert await dev.read(4096, len(data)) == want
    if dev.capabilities.can_trim:
        await dev.trim(0, 8192, IoFlags.FUA)
    blobs = [os.urandom(65536 + i) for i in range(64)]  # many requests in flight at once
    await asyncio.gather(*(dev.write(8 * MiB + i * 131072, b) for i, b in enumerate(blobs)))
    back = await asyncio.gather(
        *(dev.read(8 * MiB + i * 131072, len(b)) for i, b in enumerate(blobs))
    )
    assert back == blobs


def test_nbdkit_memory_round_trip_and_clean_disconnect(
    memory_sock: tuple[Path, Proc],
) -> None:
    sock, server = memory_sock

    async def main() -> None:
        dev = await opened(uri(sock))
        assert dev.state == "connected" and dev.size == SIZE
        caps = dev.capabilities
        assert not caps.read_only and caps.can_flush and caps.can_fua and caps.can_trim
        assert dev.identity == nbd_identity(uri(sock), SIZE)
        await round_trip(dev)
        st = dev.statistics()
        assert st["uri"] == dev.uri.text and st["state"] == "connected"
        assert st["structured_replies"] is True and st["errors"] == 0
        assert st["requests"]["write"] >= 65 and st["completed"] == st["submitted"]
        await dev.aclose()
        await dev.aclose()

    run(main())
    server.wait_for("client sent NBD_CMD_DISC")


def test_nbdkit_file_round_trip_reaches_the_file(procs: Procs, sockdir: Path) -> None:
    img = image(sockdir / "disk.img", 16 * MiB)
    sock = sockdir / "file.sock"
    nbdkit(procs, sock, "file", str(img))
    data = os.urandom(MiB)

    async def main() -> None:
        dev = await opened(uri(sock))
        await dev.write(5 * MiB + 3, data, IoFlags.FUA)
        await dev.flush()
        await dev.aclose()

    run(main())
    with open(img, "rb") as f:
        f.seek(5 * MiB + 3)
        assert f.read(len(data)) == data


def test_qemu_nbd_round_trip_with_an_export_name(procs: Procs, sockdir: Path) -> None:
    img = image(sockdir / "q.img")
    sock = sockdir / "q.sock"
    qemu_nbd(procs, sock, img, "-x", "vol1", "--discard=unmap")

    async def main() -> None:
        dev = await opened(uri(sock, "vol1"))
        assert dev.size == SIZE and not dev.capabilities.read_only
        await round_trip(dev)
        await dev.aclose()
        with pytest.raises(DstError, match="no export 'nope'"):
            await opened(uri(sock, "nope"))

    run(main())


def test_nbd_over_tcp(procs: Procs, sockdir: Path) -> None:
    with socket.socket() as s:  # a free port; nbdkit binds it a moment later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = need_tool("nbdkit")
    procs.start([exe, "-f", "-i", "127.0.0.1", "-p", str(port), "memory", str(SIZE)])

    async def main() -> None:
        dev = await opened(parse_member(f"nbd://127.0.0.1:{port}"))  # retried until it listens
        await round_trip(dev)
        await dev.aclose()

    run(main())


def test_server_emulations_and_block_size_constraints(procs: Procs, sockdir: Path) -> None:
    """No FUA, no WRITE_ZEROES, block sizes 512/4096/1M: emulated and respected."""
    sock = sockdir / "plain.sock"
    nbdkit(
        procs,
        sock,
        "--filter=blocksize-policy",
        "--filter=nozero",
        "--filter=fua",
        "memory",
        str(SIZE),
        "blocksize-minimum=512",
        "blocksize-preferred=4096",
        "blocksize-maximum=1M",
        "blocksize-error-policy=error",
    )

    async def main() -> None:
        dev = await opened(uri(sock))
        caps = dev.capabilities
        assert (caps.min_block, caps.preferred_block, caps.max_request) == (512, 4096, MiB)
        assert caps.can_fua and caps.can_zero  # both emulated
        data = os.urandom(MiB)
        await dev.write(MiB, data, IoFlags.FUA)
        await dev.write_zeroes(MiB + 4096, 8192, IoFlags.FUA)
        want = data[:4096] + bytes(8192) + data[4096 + 8192 :]
        assert await dev.read(MiB, MiB) == want
        st = dev.statistics()["requests"]
        assert st["zero"] == 0 and st["flush"] >= 2 and st["write"] == 2
        for bad in (dev.read(1, 512), dev.write(0, b"x" * 100), dev.read(0, 2 * MiB)):
            with pytest.raises(IoError) as info:
                await bad
            assert info.value.errno == errno.EINVAL
        await dev.aclose()

    run(main())


def test_error_replies_go_to_the_caller_and_are_not_resent(procs: Procs, sockdir: Path) -> None:
    sock = sockdir / "err.sock"
    nbdkit(procs, sock, "--filter=protect", "memory", str(SIZE), "protect=0-1048575")

    async def main() -> None:
        dev = await opened(uri(sock))
        with pytest.raises(IoError) as info:
            await dev.write(4096, b"x" * 4096)
        assert info.value.errno == errno.EPERM and "NBD server answered EPERM" in str(
            info.value.strerror
        )
        await dev.write(2 * MiB, b"y" * 4096)  # outside the protected range
        st = dev.statistics()
        assert st["errors"] == 1 and st["resends"] == 0 and st["state"] == "connected"
        await dev.aclose()

    run(main())


# ---- the conformance suite ---------------------------------------------------------------
NBDKIT_MEMORY = Expect(size=SIZE, trim_reads_zeroes=True, knows_holes=True)


@pytest.mark.parametrize("check", conformance.names(NBDKIT_MEMORY))
def test_conformance_over_nbdkit_memory(check: str, memory_sock: tuple[Path, Proc]) -> None:
    sock, _ = memory_sock
    run(conformance.run_check(check, lambda: opened(uri(sock)), NBDKIT_MEMORY))


def test_conformance_over_qemu_nbd(procs: Procs, sockdir: Path) -> None:
    sock = sockdir / "q.sock"
    qemu_nbd(procs, sock, image(sockdir / "q.img"))
    run(conformance.run_conformance(lambda: opened(uri(sock)), Expect(size=SIZE)), 120)


# ---- read-only ---------------------------------------------------------------------------
def read_only_checks(factory: Callable[[], Awaitable[BlockDevice]]) -> None:
    run(conformance.run_conformance(factory, Expect(size=SIZE, read_only=True)))


def test_read_only_nbdkit_export_gives_a_read_only_device(procs: Procs, sockdir: Path) -> None:
    sock = sockdir / "ro.sock"
    nbdkit(procs, sock, "-r", "memory", str(SIZE))
    read_only_checks(lambda: opened(uri(sock)))


def test_read_only_qemu_nbd_export_and_read_only_option(procs: Procs, sockdir: Path) -> None:
    sock = sockdir / "qro.sock"
    qemu_nbd(procs, sock, image(sockdir / "ro.img"), "-r")
    read_only_checks(lambda: opened(uri(sock)))
    wsock = sockdir / "qrw.sock"
    qemu_nbd(procs, wsock, image(sockdir / "rw.img"))
    read_only_checks(lambda: opened(uri(wsock), read_only=True))


# ---- resilience ----------------------------------------------------------------------------
def test_killed_and_restarted_nbdkit_is_survived(procs: Procs, sockdir: Path) -> None:
    """SIGKILL the server mid-I/O, restart it 0.5 s later: every request completes."""
    img = image(sockdir / "r.img")
    sock = sockdir / "r.sock"
    server = nbdkit(procs, sock, "file", str(img))
    blobs = [os.urandom(64 * 1024) for _ in range(800)]
    states: list[str] = []

    async def main() -> None:
        dev = await opened(uri(sock), resends=4, resend_timeout=2.0)
        dev.subscribe(lambda _d, s: states.append(s))
        loop = asyncio.get_running_loop()

        async def writer(i: int) -> None:
            await asyncio.sleep(i // 4 * 0.01)  # four at a time, for two seconds
            await dev.write(i * 65536, blobs[i], IoFlags.FUA if i % 7 == 0 else IoFlags.NONE)

        def restart() -> None:
            nonlocal server
            server = nbdkit(procs, sock, "file", str(img))

        writes = asyncio.gather(*(writer(i) for i in range(len(blobs))))
        await asyncio.sleep(0.5)
        server.kill()
        await asyncio.sleep(0.5)
        await loop.run_in_executor(None, restart)
        started = time.monotonic()
        await writes
        assert time.monotonic() - started < 5 * 2.0
        await dev.flush()
        total = len(blobs) * 65536
        step = 8 * MiB
        back = await asyncio.gather(
            *(dev.read(p, min(step, total - p)) for p in range(0, total, step))
        )
        assert b"".join(back) == b"".join(blobs), "data lost across the restart"
        st = dev.statistics()
        assert st["reconnects"] == 1 and st["connections"] == 2 and st["failed"] == 0
        await dev.aclose()

    run(main())
    assert states[:2] == ["reconnecting", "connected"]
    with open(img, "rb") as f:
        assert f.read(len(blobs) * 65536) == b"".join(blobs)


def test_a_server_gone_for_good_fails_requests_after_the_budget(
    memory_sock: tuple[Path, Proc],
) -> None:
    sock, server = memory_sock

    async def main() -> None:
        dev = await opened(uri(sock), resends=1, resend_timeout=0.5)
        await dev.write(0, b"before")
        server.kill()
        started = time.monotonic()
        with pytest.raises(IoError) as info:
            await dev.write(0, b"after")
        took = time.monotonic() - started
        assert info.value.errno == errno.EIO and "--resends 1" in str(info.value.strerror)
        assert 0.9 <= took < 3.0, took
        assert dev.state == "reconnecting"
        await dev.aclose()

    run(main())


def test_a_different_export_after_restart_fails_the_member(
    memory_sock: tuple[Path, Proc], procs: Procs
) -> None:
    sock, server = memory_sock

    async def main() -> None:
        dev = await opened(uri(sock), resend_timeout=2.0)
        server.kill()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: nbdkit(procs, sock, "memory", str(SIZE // 2))
        )
        with pytest.raises(IoError) as info:
            await dev.write(0, b"must not land on another export")
        assert info.value.errno == errno.EIO and "size changed" in str(info.value.strerror)
        assert dev.state == "failed"
        await dev.aclose()

    run(main())


def test_unreachable_server_is_a_clear_error_within_connect_timeout(sockdir: Path) -> None:
    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(DstError, match=r"cannot reach NBD server .* within --connect-timeout"):
            await opened(uri(sockdir / "nobody.sock"), options=LinkOptions(connect_timeout=0.5))
        assert time.monotonic() - started < 3.0
        with socket.socket() as s:  # a TCP port where nothing listens
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tcp = parse_member(f"nbd://127.0.0.1:{port}/")
        with pytest.raises(DstError, match="Connection refused"):
            await opened(tcp, options=LinkOptions(connect_timeout=0.5))

    run(main())
