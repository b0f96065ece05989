"""Listening and connecting sockets for every address form DST accepts."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Coroutine
from typing import Any

from dst.errors import DstError
from dst.units import Address

log = logging.getLogger("dst.listen")


def _unix_path_in_use(path: str) -> bool:
    """True if something answers on the unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_listener(addr: Address, what: str = "listen") -> socket.socket:
    """Bind and listen; a stale unix socket (nothing answers) is replaced, a live one is refused."""
    if addr.path is not None:
        path = addr.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise DstError(
                    f"cannot {what} on unix:{path}: the path exists and is not a socket; "
                    "choose another path or remove it"
                )
            if _unix_path_in_use(path):
                raise DstError(
                    f"cannot {what} on unix:{path}: address in use (another process answers "
                    "there); stop it or choose another path"
                )
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise DstError(
                f"cannot {what} on unix:{path}: {exc.strerror}; check the directory"
            ) from None
        sock.listen(256)
        sock.setblocking(False)
        return sock
    host = addr.host or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(
            host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise DstError(
            f"cannot {what} on {addr}: cannot resolve {host!r} ({exc.strerror})"
        ) from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DstError(
                f"cannot {what} on {addr}: address in use; stop the other process or choose "
                "another port (port 0 picks a free one)"
            ) from None
        raise DstError(f"cannot {what} on {addr}: {exc.strerror}") from None
    sock.listen(256)
    sock.setblocking(False)
    return sock


def bound_address(sock: socket.socket, requested: Address) -> Address:
    """The real address a listener is bound to (port 0 resolved)."""
    if requested.path is not None:
        return requested
    host, port = sock.getsockname()[:2]
    return Address(host=host, port=port)


async def serve(
    sock: socket.socket, on_client: Callable[[socket.socket], Coroutine[Any, Any, None]]
) -> None:
    """Accept forever; each client runs as its own task; cancelled by the owner."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            try:
                client, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed: %s; retrying in 0.1 s", exc.strerror)
                    await asyncio.sleep(0.1)
                    continue
                raise
            t: asyncio.Task[None] = asyncio.create_task(on_client(client))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    finally:
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def unlink_unix(addr: Address) -> None:
    if addr.path is not None:
        with contextlib.suppress(OSError):
            os.unlink(addr.path)


async def connect(addr: Address, timeout: float) -> socket.socket:
    """Connect a non-blocking socket to ``addr`` within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    if addr.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr.path), timeout)
        except BaseException:
            sock.close()
            raise
        return sock
    infos = await loop.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
    last: BaseException | None = None
    for family, _, _, _, sockaddr in infos:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, sockaddr), timeout)
            return sock
        except BaseException as exc:
            sock.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            last = exc
    assert last is not None
    raise last
