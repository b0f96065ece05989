"""The control socket server: newline-delimited JSON requests on a unix socket.

A request is one JSON object on one line, ``{"cmd": NAME, ...arguments}``; an
optional ``"id"`` is echoed.  The answer is one line, ``{"ok": true, "result":
{...}}`` or ``{"ok": false, "error": MESSAGE}``.  The command that owns the node
registers one handler per name, so the same server serves an export node and a
client node.  The socket is created with mode 0600: whoever can connect can
detach mirror legs, so only the node's own user may.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from dst import trace
from dst.aio.listen import bind_listener
from dst.errors import DstError
from dst.units import Address

log = logging.getLogger("dst.control")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

MAX_LINE = 1 << 20  # bytes in one request line
MAX_CLIENTS = 32  # concurrent control connections; more are answered with an error


class RequestError(Exception):
    """A request the node refuses; the message goes back to the caller as ``error``."""


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as one line (compact JSON, non-JSON values as strings)."""
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


class ControlServer:
    """Serves ``handlers`` on the unix socket ``path`` until :meth:`aclose`."""

    def __init__(self, path: str, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = dict(handlers)
        self.handlers.setdefault("help", self._help)
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._inode: int | None = None

    def bind(self) -> None:
        """Create the socket (reusing a stale one left by a killed node), mode 0600 from
        birth; a node binds before it does anything else, :meth:`start` then serves it."""
        if self._sock is not None or self._server is not None:
            return
        old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            sock = bind_listener(Address(path=self.path), "serve the control socket")
        finally:
            os.umask(old)
        try:
            os.chmod(self.path, 0o600)
            self._inode = os.stat(self.path).st_ino
        except BaseException:
            sock.close()
            self._unlink()
            raise
        self._sock = sock

    async def start(self) -> None:
        """Serve (binding first if :meth:`bind` was not called)."""
        self.bind()
        sock, self._sock = self._sock, None
        assert sock is not None
        try:
            self._server = await asyncio.start_unix_server(
                self._on_client, sock=sock, limit=MAX_LINE
            )
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("control socket ready at unix:%s", self.path)

    def release(self) -> None:
        """Give up a socket that was bound but never served (the node did not start)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            self._unlink()

    async def _help(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"commands": sorted(self.handlers)}

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CLIENTS:
            writer.write(encode({"ok": False, "error": "too many control connections; retry"}))
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            return
        self._writers.add(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_LINE: answer, then drop the connection
                    writer.write(
                        encode({"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                    )
                    await writer.drain()
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                writer.write(encode(await self.answer(line)))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def answer(self, line: bytes) -> dict[str, Any]:
        """The response object for one request line (never raises)."""
        try:
            req = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return {"ok": False, "error": f"request is not JSON: {exc}"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'a request is a JSON object with a "cmd" string'}
        out: dict[str, Any] = {"id": req["id"]} if "id" in req else {}
        name = req["cmd"]
        handler = self.handlers.get(name)
        if handler is None:
            out.update(
                ok=False,
                error=f"unknown command {name!r}; this node knows: {', '.join(sorted(self.handlers))}",
            )
            return out
        try:
            result = await handler(req)
        except (RequestError, DstError) as exc:
            out.update(ok=False, error=str(exc))
        except Exception as exc:
            log.exception("control command %r failed", name)
            out.update(ok=False, error=f"internal error in {name!r}: {type(exc).__name__}: {exc}")
        else:
            out.update(ok=True, result=result)
        if trace.on.control:
            trace.emit("control", "request", cmd=name, ok=out["ok"], error=out.get("error"))
        return out

    def _unlink(self) -> None:
        """Remove the socket file if it is still ours (not one a newer node made)."""
        with contextlib.suppress(OSError):
            if self._inode is None or os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    async def aclose(self) -> None:
        """Stop accepting, close every connection, remove the socket file."""
        self.release()
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for w in list(self._writers):
            w.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2.0)
        self._unlink()
