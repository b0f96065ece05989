"""`dst attach`: run a client node over one or more members and serve the device."""

from __future__ import annotations

import argparse
import logging
import socket
from typing import Any

from dst.aio import workers
from dst.cli.algorithms import client_algorithms
from dst.cli.options import ATTACH_OPTS, merge
from dst.cli.runtime import Stopper, run
from dst.client.remote import LinkOptions, RemoteDevice
from dst.control.ops import NodeOps, metrics_address
from dst.crypto.keys import load_key_file
from dst.device import BlockDevice
from dst.errors import UsageError
from dst.proto.client import ClientConfig
from dst.units import format_size, parse_address
from dst.uri import MemberUri, parse_member

log = logging.getLogger("dst.attach")


def prepare(ns: argparse.Namespace) -> dict[str, Any]:
    o = merge(ns, ATTACH_OPTS, "members", "members")
    if not o["members"]:
        raise UsageError(
            "no member given: name at least one, e.g. `dst attach dst://node1/default --nbd unix:/run/dst.sock`"
        )
    o["uris"] = [parse_member(m) for m in o["members"]]
    modes = [m for m in ("mirror", "stripe", "linear") if o[m]]
    if len(modes) > 1:
        raise UsageError(
            f"choose one of --mirror, --stripe and --linear, not {' and '.join('--' + m for m in modes)}"
        )
    if len(o["uris"]) > 1 and not modes:
        raise UsageError(
            f"{len(o['uris'])} members need --mirror, --stripe CHUNK or --linear to say how to combine them"
        )
    if modes:
        raise UsageError(
            f"--{modes[0]} is not available in this version of dst attach; attach a single member"
        )
    for u in o["uris"]:
        if u.protocol != "dst":
            raise UsageError(
                f"member {u.text}: NBD members are not available in this version; use a dst:// member"
            )
    if not o["nbd"] and not o["fuse"]:
        raise UsageError("no front end: give --nbd ADDR (and/or --fuse DIR) to expose the device")
    if o["fuse"]:
        from dst.frontends.fuse import check_mountpoint

        o["fuse"] = check_mountpoint(o["fuse"])
    o["nbd_addr"] = (
        parse_address(o["nbd"], default_port=10809, what="--nbd address") if o["nbd"] else None
    )
    o["metrics_addr"] = metrics_address(o)
    key = load_key_file(o["key_file"]) if o["key_file"] else None
    o["key"] = key
    o["ciphers"], o["checksums"] = client_algorithms(o["cipher"], o["checksum"], key is not None)
    if o["resend_timeout"] <= 0:
        raise UsageError("--resend-timeout must be greater than 0")
    if o["reconnect_min"] <= 0 or o["reconnect_max"] < o["reconnect_min"]:
        raise UsageError("--reconnect-min must be > 0 and not above --reconnect-max")
    o["client_id"] = o["client_id"] or socket.gethostname()
    workers.configure(o["crypto_workers"])
    return o


def client_config(o: dict[str, Any], uri: MemberUri) -> ClientConfig:
    return ClientConfig(
        export=uri.export,
        client_id=o["client_id"],
        read_only=bool(o["read_only"]),
        ciphers=o["ciphers"],
        checksums=o["checksums"],
        key=o["key"],
        resends=o["resends"],
        resend_timeout=o["resend_timeout"],
        ping_interval=o["ping_interval"],
        ping_timeout=o["ping_timeout"],
        handshake_timeout=o["connect_timeout"],
        offload=workers.enabled(),
    )


def link_options(o: dict[str, Any]) -> LinkOptions:
    return LinkOptions(
        connect_timeout=o["connect_timeout"],
        reconnect_min=o["reconnect_min"],
        reconnect_max=o["reconnect_max"],
    )


async def build_device(o: dict[str, Any]) -> BlockDevice:
    uri: MemberUri = o["uris"][0]
    dev = RemoteDevice(uri, client_config(o, uri), link_options(o))
    await dev.connect()
    return dev


def run_attach(ns: argparse.Namespace) -> int:
    o = prepare(ns)
    return run(lambda: _serve(o))


async def _serve(o: dict[str, Any]) -> int:
    from dst.frontends.fuse import FuseFrontend
    from dst.frontends.nbd import NbdFrontend

    stopper = Stopper()
    dev: BlockDevice | None = None
    front: NbdFrontend | None = None
    fuse: FuseFrontend | None = None
    ops = NodeOps.for_attach(o)
    try:
        await ops.start()
        dev = await build_device(o)
        ops.set_device(dev)
        log.info(
            "device: %s (%d bytes)%s",
            format_size(dev.size),
            dev.size,
            ", read-only" if dev.capabilities.read_only else "",
        )
        if o["nbd_addr"] is not None:
            front = NbdFrontend(dev, o["nbd_addr"])
            await front.start()
            ops.add_frontend(front)
        if o["fuse"]:
            fuse = FuseFrontend(dev, o["fuse"])
            await fuse.start()
            ops.add_frontend(fuse)
            # a busy DIR/disk is not unmounted on the first SIGTERM (FuseFrontend.on_stop_signal)
            stopper.on_signal = lambda _n, f=fuse: f.on_stop_signal(stopper.event.set)
            if front is None:
                fuse.on_unmounted = stopper.event.set
        ops.ready(f"serving {dev.size} bytes")
        await stopper.wait()
        log.info("stopping: finishing in-flight requests")
    finally:
        stopper.close()
        await ops.aclose()
        if fuse is not None:
            await fuse.aclose()
        if front is not None:
            await front.aclose()
        if dev is not None:
            try:
                if not dev.capabilities.read_only:
                    await dev.flush()
            except Exception as exc:
                log.warning("final flush failed: %s", exc)
            await dev.aclose()
    log.info("stopped")
    return 0
