"""A blocking control-socket client: `dst status` and `dst ctl` need no event loop."""

from __future__ import annotations

import json
import socket
from typing import Any

from dst.errors import DstError

DEFAULT_TIMEOUT = 10.0


class ControlError(DstError):
    """The node answered ``ok: false``; the message is the node's."""


class ControlClient:
    """One connection to a node's control socket; several requests may share it."""

    def __init__(self, path: str, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise DstError(self._unreachable(exc)) from None
        self._sock = sock
        return sock

    def _unreachable(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError) and self.timeout is not None:
            return (
                f"the node on the control socket {self.path} did not answer within "
                f"{self.timeout:g} s; it may be stopped or overloaded"
            )
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return (
            f"cannot reach the control socket {self.path}: {why}; check that the node runs "
            f"with --control {self.path} and that you may open it (it is mode 0600)"
        )

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request; return its ``result`` or raise ControlError with the node's reason."""
        sock = self._connect()
        try:
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            while b"\n" not in self._buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the node closed the connection without an answer")
                self._buf += chunk
        except (OSError, TimeoutError) as exc:
            self.close()
            raise DstError(self._unreachable(exc)) from None
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError:
            self.close()
            raise DstError(
                f"the control socket {self.path} answered something that is not JSON; is it a "
                "dst control socket?"
            ) from None
        if not isinstance(reply, dict):
            raise DstError(
                f"the control socket {self.path} answered {json.dumps(reply)}, not an object"
            )
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error") or "the node refused the request"))
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(
    path: str, cmd: str, timeout: float | None = DEFAULT_TIMEOUT, **args: Any
) -> dict[str, Any]:
    """One request on a fresh connection; ``timeout=None`` waits as long as the node works."""
    with ControlClient(path, timeout) as c:
        return c.call(cmd, **args)
