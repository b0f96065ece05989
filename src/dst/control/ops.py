"""A node's operations endpoints (control socket, metrics) started and stopped together.

`dst export` and `dst attach` each hold one :class:`NodeOps`, so their own code
only says when the endpoints start and stop.  prometheus_client is imported only
when ``--metrics`` is given.
"""

from __future__ import annotations

import logging
from typing import Any

from dst.control.handlers import AttachControl, ExportControl, settings_of
from dst.control.server import ControlServer
from dst.device import BlockDevice
from dst.units import Address, parse_address

log = logging.getLogger("dst.control")

DEFAULT_METRICS_PORT = 9810

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


class NodeOps:
    """The optional ``--control`` socket and ``--metrics`` endpoint of one node."""

    def __init__(self, o: dict[str, Any], control: AttachControl | ExportControl) -> None:
        self.control = control
        self.control_path: str | None = o.get("control") or None
        self.metrics_addr = metrics_address(o)
        self._server: ControlServer | None = None
        self._metrics: Any = None

    @classmethod
    def for_export(cls, node: Any, o: dict[str, Any]) -> NodeOps:
        return cls(o, ExportControl(node, settings_of(o, EXPORT_SETTINGS)))

    @classmethod
    def for_attach(cls, o: dict[str, Any]) -> NodeOps:
        settings = settings_of({**o, "layout": layout_of(o)}, ATTACH_SETTINGS)
        return cls(o, AttachControl(settings))

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
        except BaseException:
            await self.aclose()
            raise

    def set_device(self, device: BlockDevice) -> None:
        """The client node's assembled device, once it is up."""
        if isinstance(self.control, AttachControl):
            self.control.device = device
            if self.control.on_status is not None:
                self.control.on_status(device)

    def add_frontend(self, front: Any) -> None:
        """A front end whose statistics the client node's status shows."""
        if isinstance(self.control, AttachControl):
            self.control.frontends.append(front)

    async def aclose(self) -> None:
        if self._metrics is not None:
            m, self._metrics = self._metrics, None
            await m.aclose()
        if self._server is not None:
            s, self._server = self._server, None
            await s.aclose()
