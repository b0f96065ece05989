"""A node's operations endpoints (control socket, metrics) started and stopped together.

`dst export` and `dst attach` each hold one :class:`NodeOps`, so their own code
only says when the endpoints start and stop.  prometheus_client is imported only
when ``--metrics`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from dst.control.handlers import AttachControl, ExportControl, settings_of
from dst.control.server import ControlServer, RequestError
from dst.device import BlockDevice
from dst.units import Address, parse_address

log = logging.getLogger("dst.control")

DEFAULT_METRICS_PORT = 9810
SPACE_CHECK_INTERVAL = 30.0  # seconds between looks at the space of file exports

EXPORT_SETTINGS = (
    "listen",
    "exports",
    "size",
    "read_only",
    "shared",
    "allow",
    "key_file",
    "keys",
    "ciphers",
    "checksums",
    "crypto_workers",
    "control",
    "metrics",
)
ATTACH_SETTINGS = (
    "members",
    "layout",
    "stripe",
    "client_id",
    "read_only",
    "nbd",
    "fuse",
    "resends",
    "resend_timeout",
    "ping_interval",
    "ping_timeout",
    "connect_timeout",
    "reconnect_min",
    "reconnect_max",
    "bitmap",
    "bitmap_granularity",
    "resync_rate",
    "key_file",
    "ciphers",
    "checksums",
    "crypto_workers",
    "control",
    "metrics",
)


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


def metrics_address(o: dict[str, Any]) -> Address | None:
    """``--metrics HOST:PORT`` checked at start (exit 2 when wrong); HOST alone means port 9810."""
    text = o.get("metrics")
    if not text:
        return None
    return parse_address(text, default_port=DEFAULT_METRICS_PORT, what="--metrics address")


def layout_of(o: dict[str, Any]) -> str:
    for mode in ("mirror", "stripe", "linear"):
        if o.get(mode):
            return mode
    return "single"


def _member_opener(o: dict[str, Any]) -> Callable[[str], Awaitable[BlockDevice]]:
    async def open_member(text: str) -> BlockDevice:
        from dst.cli.attach_cmd import client_config, link_options
        from dst.client.remote import RemoteDevice
        from dst.uri import parse_member

        uri = parse_member(text)
        if uri.protocol != "dst":
            raise RequestError(f"{text}: only dst:// members can be added to a running mirror")
        dev = RemoteDevice(uri, client_config(o, uri), link_options(o))
        await dev.connect()  # raises with the reason when refused or unreachable
        return dev

    return open_member


class NodeOps:
    """The optional ``--control`` socket and ``--metrics`` endpoint of one node."""

    def __init__(self, o: dict[str, Any], control: AttachControl | ExportControl) -> None:
        self.control = control
        self.control_path: str | None = o.get("control") or None
        self.metrics_addr = metrics_address(o)
        self._server: ControlServer | None = None
        self._metrics: Any = None
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    def for_export(cls, node: Any, o: dict[str, Any]) -> NodeOps:
        return cls(o, ExportControl(node, settings_of(o, EXPORT_SETTINGS)))

    @classmethod
    def for_attach(
        cls,
        o: dict[str, Any],
        make_member: Callable[[str], Awaitable[BlockDevice]] | None = None,
    ) -> NodeOps:
        """``make_member(uri)`` opens a leg for `dst ctl add`; the default opens a connected
        dst:// member with the node's options."""
        settings = settings_of({**o, "layout": layout_of(o)}, ATTACH_SETTINGS)
        return cls(o, AttachControl(settings, make_member or _member_opener(o)))

    async def start(self) -> None:
        """Start what was asked for; a client node's status says `connecting` until
        :meth:`set_device`, so an operator can watch a slow start."""
        try:
            if self.control_path is not None:
                self._server = ControlServer(self.control_path, self.control.handlers())
                await self._server.start()
            if self.metrics_addr is not None:
                from dst.metrics import MetricsServer, instrument

                if isinstance(self.control, AttachControl):
                    self.control.on_status = instrument  # members added later get buckets too
                self._metrics = MetricsServer(self.metrics_addr, self.control.status)
                await self._metrics.start()
            if isinstance(self.control, ExportControl):
                self._watch = asyncio.create_task(self._watch_space(self.control))
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
