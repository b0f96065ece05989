"""`dst export`: run an export node.

The command line is checked first (exit 2); then the node takes its addresses (the
listening socket, the control socket, metrics), so a busy port is found before any
backing file is created or opened; then it opens the backends and serves.
"""

from __future__ import annotations

import argparse
import logging
import socket

from dst.aio import workers
from dst.aio.listen import bind_listener, unlink_unix
from dst.backends import open_backend
from dst.backends.device import BackendDevice
from dst.cli.options import EXPORT_OPTS, given, merge
from dst.cli.runtime import Stopper, run
from dst.config import DEFAULT_LISTEN, DEFAULT_METRICS_PORT, ExportConfig
from dst.control.handlers import ExportControl
from dst.control.ops import NodeOps
from dst.control.runtime import control_socket
from dst.errors import UsageError
from dst.server.node import Export, ExportNode
from dst.units import parse_address

log = logging.getLogger("dst.export")


def prepare(ns: argparse.Namespace) -> ExportConfig:
    """The whole command line and config file, checked without touching anything."""
    o = merge(ns, EXPORT_OPTS, "exports", "exports")
    listen = parse_address(o["listen"], what="--listen address") if o["listen"] else DEFAULT_LISTEN
    if not o["exports"]:
        where = f" (or as `exports = [...]` in the config file {ns.config})" if ns.config else ""
        raise UsageError(
            "no export given: name at least one BACKEND, e.g. `dst export --listen "
            f"0.0.0.0:10810 file:/srv/disk.img --size 10G`{where}"
        )
    metrics = (
        parse_address(o["metrics"], default_port=DEFAULT_METRICS_PORT, what="--metrics address")
        if o["metrics"]
        else None
    )
    return ExportConfig.create(
        o["exports"],
        key_file=o["key_file"],
        keys=o["keys"],
        ciphers=o["cipher"],
        checksums=o["checksum"],
        listen=listen,
        metrics=metrics,
        allow=tuple(o["allow"]) if o["allow"] else None,
        **given(o, ("size", "read_only", "shared", "crypto_workers", "control")),
    )


def open_exports(cfg: ExportConfig) -> dict[str, Export]:
    """Open (creating sparse files where needed) every backend; all or none."""
    exports: dict[str, Export] = {}
    opened = []
    try:
        for spec in cfg.exports:
            b = open_backend(spec.backend, size=cfg.size, read_only=cfg.read_only)
            opened.append(b)
            exports[spec.name] = Export(
                name=spec.name,
                device=BackendDevice(b, name=f"{spec.name}={spec.backend}"),
                identity=b.identity,
                spec=spec.backend,
                read_only=cfg.read_only or b.read_only,
                shared=cfg.shared,
                trim_zeroes=b.trim_reads_zeroes,
            )
    except BaseException:
        for b in opened:
            b.close()
        raise
    return exports


def run_export(ns: argparse.Namespace) -> int:
    cfg = prepare(ns)
    workers.configure(cfg.crypto_workers)
    listener = bind_listener(cfg.listen, "listen")
    ops = NodeOps(control_socket(cfg.control, "export", cfg.listen), cfg.metrics)
    try:
        ops.bind()
        exports = open_exports(cfg)
    except BaseException:
        ops.release()
        listener.close()
        unlink_unix(cfg.listen)
        raise
    return run(lambda: _serve(cfg, exports, listener, ops))


async def _serve(
    cfg: ExportConfig, exports: dict[str, Export], listener: socket.socket, ops: NodeOps
) -> int:
    node = ExportNode(exports, cfg.server_config(), allow=set(cfg.allow) if cfg.allow else None)
    stopper = Stopper()
    try:
        await ops.start(ExportControl(node, cfg.settings()))
        addr = await node.start(cfg.listen, sock=listener)
        for e in exports.values():
            log.info(
                "export %r: %s, %d bytes, %s, identity %s",
                e.name,
                e.spec,
                e.device.size,
                "read-only" if e.read_only else "read-write",
                e.identity,
            )
        log.info("listening on %s", addr)
        ops.ready(f"listening on {addr}")
        await stopper.wait()
        log.info("stopping: finishing in-flight requests")
    finally:
        stopper.close()
        await ops.aclose()
        await node.aclose()
        if node.address is None:  # never served: the listener is still ours
            listener.close()
            unlink_unix(cfg.listen)
    log.info("stopped")
    return 0
