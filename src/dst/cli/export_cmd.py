"""`dst export`: run an export node."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from dst.aio import workers
from dst.backends import open_backend
from dst.backends.device import BackendDevice
from dst.cli.algorithms import export_algorithms
from dst.cli.options import EXPORT_OPTS, merge
from dst.cli.runtime import Stopper, run
from dst.control.ops import NodeOps, metrics_address
from dst.control.runtime import control_socket
from dst.crypto.keys import load_key_file, load_keys_file
from dst.errors import UsageError
from dst.proto.server import ServerConfig
from dst.server.node import Export, ExportNode
from dst.units import parse_address

log = logging.getLogger("dst.export")


def parse_export_specs(items: list[str], config: str | None = None) -> list[tuple[str, str]]:
    if not items:
        where = f" (or as `exports = [...]` in the config file {config})" if config else ""
        raise UsageError(
            "no export given: name at least one BACKEND, e.g. `dst export --listen :10810 "
            f"file:/srv/disk.img --size 10G`{where}"
        )
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in items:
        head, sep, rest = item.partition("=")
        if sep and ":" not in head:
            name, spec = head, rest
            if not name:
                raise UsageError(f"invalid export {item!r}: the name before '=' is empty")
        else:
            name, spec = "default", item
        if name in seen:
            raise UsageError(f"export name {name!r} is used twice; give each export its own NAME=")
        seen.add(name)
        out.append((name, spec))
    return out


def prepare(ns: argparse.Namespace) -> dict[str, Any]:
    o = merge(ns, EXPORT_OPTS, "exports", "exports")
    o["listen_addr"] = parse_address(o["listen"], what="--listen address")
    o["specs"] = parse_export_specs(o["exports"], ns.config)
    key = load_key_file(o["key_file"]) if o["key_file"] else None
    keys = load_keys_file(o["keys"]) if o["keys"] else None
    if key is not None and keys is not None:
        raise UsageError("give either --key-file (one key for all clients) or --keys, not both")
    o["key"] = key
    o["keys_map"] = keys
    o["ciphers"], o["checksums"] = export_algorithms(
        o["cipher"], o["checksum"], key is not None or keys is not None
    )
    o["metrics_addr"] = metrics_address(o)
    o["control"] = control_socket(o["control"], "export", o["listen_addr"])
    return o


def run_export(ns: argparse.Namespace) -> int:
    o = prepare(ns)
    backends = []
    try:
        for name, spec in o["specs"]:
            b = open_backend(spec, size=o["size"], read_only=bool(o["read_only"]))
            backends.append((name, spec, b))
    except BaseException:
        for _, _, b in backends:
            b.close()
        raise
    return run(lambda: _serve(o, backends))


async def _serve(o: dict[str, Any], backends: list[Any]) -> int:
    exports = {}
    for name, spec, b in backends:
        dev = BackendDevice(b, name=f"{name}={spec}")
        exports[name] = Export(
            name=name,
            device=dev,
            identity=b.identity,
            spec=spec,
            read_only=bool(o["read_only"]) or b.read_only,
            shared=bool(o["shared"]),
            trim_zeroes=b.trim_reads_zeroes,
        )
    workers.configure(o["crypto_workers"])
    cfg = ServerConfig(
        ciphers=o["ciphers"],
        checksums=o["checksums"],
        key=o["key"],
        keys=o["keys_map"],
        offload=workers.enabled(),
    )
    node = ExportNode(exports, cfg, allow=set(o["allow"]) if o["allow"] else None)
    stopper = Stopper()
    ops = NodeOps.for_export(node, o)
    try:
        addr = await node.start(o["listen_addr"])
        await ops.start()
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
    log.info("stopped")
    return 0
