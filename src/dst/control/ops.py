"""A node's operations endpoints (control socket, metrics), bound, served and stopped together.

`dst export` and `dst attach` each hold one :class:`NodeOps`: :meth:`NodeOps.bind` takes
both addresses before the node does anything else (a path or port in use is found before a
member is contacted or a backend opened), :meth:`NodeOps.start` serves them once the node
has a status to show.  prometheus_client is imported only when ``--metrics`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

from dst.control.handlers import AttachControl, ExportControl
from dst.control.server import ControlServer
from dst.device import BlockDevice
from dst.units import Address

log = logging.getLogger("dst.control")

SPACE_CHECK_INTERVAL = 30.0  # seconds between looks at the space of file exports


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's notify socket if the service manager gave one.

    The protocol is one datagram on ``$NOTIFY_SOCKET`` (``@`` means the abstract
    namespace); doing it here avoids a dependency for four lines.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):
        target = "\0" + target[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(target)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager on %s: %s", target, exc.strerror)
        return False
    return True


class NodeOps:
    """The optional ``--control`` socket and ``--metrics`` endpoint of one node."""

    def __init__(self, control_path: str | None, metrics_addr: Address | None) -> None:
        self.control_path = control_path
        self.metrics_addr = metrics_addr
        self.control: AttachControl | ExportControl | None = None
        self._server: ControlServer | None = None
        self._metrics: Any = None
        self._watch: asyncio.Task[None] | None = None

    def bind(self) -> None:
        """Bind what was asked for, without serving yet (no event loop needed); raises
        DstError (exit 1) for a path or port in use, and then holds nothing."""
        try:
            if self.control_path is not None and self._server is None:
                self._server = ControlServer(self.control_path, {})
                self._server.bind()
            if self.metrics_addr is not None and self._metrics is None:
                from dst.metrics import MetricsServer

                self._metrics = MetricsServer(self.metrics_addr, self._status)
                self._metrics.bind()
        except BaseException:
            self.release()
            raise

    def _status(self) -> dict[str, Any]:
        return self.control.status() if self.control is not None else {}

    def release(self) -> None:
        """Give up what :meth:`bind` took when the node does not start."""
        server, self._server = self._server, None
        if server is not None:
            server.release()
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            metrics.release()

    async def start(self, control: AttachControl | ExportControl) -> None:
        """Serve ``control`` on what was bound (binding now what was not); a client node's
        status says `connecting` until :meth:`set_device`, so an operator can watch a slow
        start."""
        self.control = control
        try:
            self.bind()
            if self._server is not None:
                self._server.handlers.update(control.handlers())
                await self._server.start()
            if self._metrics is not None:
                from dst.metrics import instrument

                if isinstance(control, AttachControl):
                    control.on_status = instrument  # members added later get buckets too
                await self._metrics.start()
            if isinstance(control, ExportControl):
                self._watch = asyncio.create_task(self._watch_space(control))
        except BaseException:
            await self.aclose()
            raise

    @staticmethod
    async def _watch_space(control: ExportControl) -> None:
        """A filling filesystem is logged even when nobody looks at status or metrics."""
        while True:
            try:
                control.check_space()
            except Exception:
                log.exception("checking the space of the file exports failed")
            await asyncio.sleep(SPACE_CHECK_INTERVAL)

    def set_device(self, device: BlockDevice) -> None:
        """The client node's assembled device, once it is up."""
        if isinstance(self.control, AttachControl):
            self.control.device = device
            if self.control.on_status is not None:
                self.control.on_status(device)

    def ready(self, status: str) -> None:
        """Tell systemd (``Type=notify``) that the node serves; a no-op elsewhere."""
        sd_notify(f"READY=1\nSTATUS={status}")

    def add_frontend(self, front: Any) -> None:
        """A front end whose statistics the client node's status shows."""
        if isinstance(self.control, AttachControl):
            self.control.frontends.append(front)

    async def aclose(self) -> None:
        sd_notify("STOPPING=1")
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._metrics is not None:
            m, self._metrics = self._metrics, None
            await m.aclose()
        if self._server is not None:
            s, self._server = self._server, None
            await s.aclose()
