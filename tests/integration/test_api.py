"""The Python API against a real export node: sync and asyncio flavours."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

import dst
from dst.config import MemberOptions
from dst.errors import DstError, IoError, UsageError
from tests.procs import Procs, member_uri

pytestmark = pytest.mark.integration


def test_sync_device_round_trip(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "d.img"
    _, addr = procs.export(f"file:{img}", "--size", "4M")
    with dst.open_device(member_uri(addr), client_id="api-sync") as dev:
        assert dev.size == 4 << 20 and not dev.read_only
        dev.write(4096, b"hello world", fua=True)
        assert dev.read(4096, 11) == b"hello world"
        buf = bytearray(5)
        dev.read_into(4096, buf)
        assert buf == b"hello"
        dev.write_zeroes(4096, 4096)
        assert dev.read(4096, 11) == bytes(11)
        dev.write(8192, b"x" * 8192)
        dev.trim(8192, 8192)
        assert dev.read(8192, 8192) == bytes(8192)
        dev.flush()
        st = dev.statistics()
        assert st["state"] == "connected" and st["completed"] >= 8
        with pytest.raises(IoError) as exc:
            dev.read(4 << 20, 1)
        assert exc.value.errno == errno.EINVAL
    with open(img, "rb") as f:
        f.seek(4096)
        assert f.read(11) == bytes(11)


def test_async_device_and_read_only(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "ro.img"
    img.write_bytes(b"\x42" * 65536)
    _, addr = procs.export(f"file:{img}", "--read-only")

    async def main() -> None:
        async with await dst.open_device_async(member_uri(addr), client_id="api-async") as dev:
            assert dev.read_only
            assert await dev.read(0, 4) == b"\x42" * 4
            with pytest.raises(IoError) as exc:
                await dev.write(0, b"no")
            assert exc.value.errno == errno.EPERM

    asyncio.run(main())
    assert img.read_bytes() == b"\x42" * 65536


def test_unknown_export_raises_a_clear_error(procs: Procs, sockdir: Path) -> None:
    _, addr = procs.export("memory:1M")
    with pytest.raises(DstError, match="unknown export 'nope'"):
        dst.open_device(member_uri(addr, "nope"), connect_timeout=5)


def test_member_options_are_the_attach_options(procs: Procs, sockdir: Path) -> None:
    """One MemberOptions value opens devices; wrong values are refused before connecting."""
    (sockdir / "o.img").write_bytes(bytes(1 << 20))
    exp, addr = procs.export(f"file:{sockdir / 'o.img'}", "--read-only")
    opts = MemberOptions.create(client_id="api-options", resends=2, resend_timeout=1.5)
    assert (opts.resends, opts.resend_timeout, opts.connect_timeout) == (2, 1.5, 10.0)
    with dst.open_device(member_uri(addr), opts) as dev:
        assert dev.read_only and dev.size == 1 << 20
    assert "client 'api-options'" in exp.output
    with pytest.raises(UsageError, match="not both"):
        dst.open_device(member_uri(addr), opts, client_id="x")
    bads: list[tuple[dict[str, Any], str]] = [
        ({"resend_timeout": 0}, "--resend-timeout must be greater than 0"),
        ({"ciphers": ["rot13"]}, "unknown cipher 'rot13'"),
        ({"key_file": str(sockdir / "nokey")}, "does not exist"),
    ]
    for bad, needle in bads:
        with pytest.raises(UsageError, match=needle):
            dst.open_device(member_uri(addr), client_id="api-bad", **bad)
    assert "client 'api-bad'" not in exp.output
