"""Socket set-up of the asyncio stream: send buffers on unix sockets."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from dst.aio import stream


def wmem_max() -> int:
    return int(Path("/proc/sys/net/core/wmem_max").read_text())


def test_unix_sockets_get_the_large_send_buffer_or_one_hint_naming_the_sysctl(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = socket.socketpair()
    try:
        monkeypatch.setattr(stream, "_capped_logged", False)
        stream._ask_send_buffer(a)
        got = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
        assert got == min(stream.UNIX_SEND_BUFFER, wmem_max())
        # ask for more than the kernel allows: one hint, not one per connection
        monkeypatch.setattr(stream, "UNIX_SEND_BUFFER", wmem_max() * 4)
        monkeypatch.setattr(stream, "_capped_logged", False)
        with caplog.at_level(logging.INFO, logger="dst.net"):
            stream._ask_send_buffer(a)
            stream._ask_send_buffer(b)
        hints = [r.getMessage() for r in caplog.records if "wmem_max" in r.getMessage()]
        assert len(hints) == 1 and "sysctl -w net.core.wmem_max=" in hints[0]
    finally:
        a.close()
        b.close()
