"""`dst attach`: run a client node over one or more members and serve the device."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from typing import Any

from dst.aio import workers
from dst.cli.algorithms import client_algorithms
from dst.cli.options import ATTACH_OPTS, merge
from dst.cli.runtime import Stopper, run
from dst.client.nbd_member import NbdDevice
from dst.client.remote import LinkOptions, RemoteDevice
from dst.control.ops import NodeOps, metrics_address
from dst.control.runtime import control_socket
from dst.crypto.keys import load_key_file
from dst.device import BlockDevice
from dst.errors import UsageError
from dst.layers.stack import build_stack
from dst.proto.client import ClientConfig
from dst.units import format_size, parse_address
from dst.uri import MemberUri, parse_member

log = logging.getLogger("dst.attach")


def prepare(ns: argparse.Namespace) -> dict[str, Any]:
    o = merge(ns, ATTACH_OPTS, "members", "members")
    cfg = f" (or as `members = [...]` in the config file {ns.config})" if ns.config else ""
    if not o["members"]:
        raise UsageError(
            "no member given: name at least one, e.g. `dst attach dst://node1/default --nbd "
            f"unix:/run/dst.sock`{cfg}"
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
    o["mode"] = modes[0] if modes else None
    if len({u.text for u in o["uris"]}) != len(o["uris"]):
        raise UsageError("the same member is named twice; give each member once")
    if o["mode"] != "mirror":
        for opt in ("bitmap", "resync_rate", "assume_clean"):
            if o[opt]:
                raise UsageError(f"--{opt.replace('_', '-')} applies to --mirror only")
    if o["bitmap"] and not os.path.isdir(os.path.dirname(os.path.abspath(o["bitmap"]))):
        raise UsageError(f"--bitmap {o['bitmap']}: the directory does not exist; create it first")
    if not o["nbd"] and not o["fuse"]:
        where = (
            f' (or nbd = "ADDR" / fuse = "DIR" in the config file {ns.config})' if ns.config else ""
        )
        raise UsageError(
            f"no front end: give --nbd ADDR (and/or --fuse DIR) to expose the device{where}"
        )
    if o["fuse"]:
        from dst.frontends.mounts import check_mountpoint

        o["fuse"] = check_mountpoint(o["fuse"])
    o["nbd_addr"] = (
        parse_address(o["nbd"], default_port=10809, what="--nbd address") if o["nbd"] else None
    )
    o["metrics_addr"] = metrics_address(o)
    key = load_key_file(o["key_file"]) if o["key_file"] else None
    o["key"] = key
    o["ciphers"], o["checksums"] = client_algorithms(o["cipher"], o["checksum"], key is not None)
    if o["leg_timeout"] <= 0:
        raise UsageError("--leg-timeout must be greater than 0, e.g. 5")
    if o["resend_timeout"] <= 0:
        raise UsageError("--resend-timeout must be greater than 0")
    if o["reconnect_min"] <= 0 or o["reconnect_max"] < o["reconnect_min"]:
        raise UsageError("--reconnect-min must be > 0 and not above --reconnect-max")
    o["client_id"] = o["client_id"] or socket.gethostname()
    workers.configure(o["crypto_workers"])
    o["control"] = control_socket(o["control"], "attach", o["nbd_addr"] or o["fuse"])
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
        takeover=bool(o["takeover"]),
    )


def link_options(o: dict[str, Any]) -> LinkOptions:
    return LinkOptions(
        connect_timeout=o["connect_timeout"],
        reconnect_min=o["reconnect_min"],
        reconnect_max=o["reconnect_max"],
    )


def member_device(o: dict[str, Any], uri: MemberUri) -> RemoteDevice | NbdDevice:
    """A DST member or an NBD server as a device (not connected yet)."""
    if uri.protocol == "nbd":
        return NbdDevice(
            uri,
            link_options(o),
            read_only=bool(o["read_only"]),
            resends=o["resends"],
            resend_timeout=o["resend_timeout"],
        )
    return RemoteDevice(uri, client_config(o, uri), link_options(o))


async def build_device(o: dict[str, Any]) -> BlockDevice:
    """Connect the members and assemble them.

    A single member, a stripe or a linear device needs every member at start (exit 1
    otherwise).  A mirror starts when at least one leg is reachable within
    --connect-timeout and serves degraded until the others come (they keep trying in the
    background); a leg that refuses us for good (wrong key, unknown export...) is an error.
    """
    uris: list[MemberUri] = o["uris"]
    legs = [member_device(o, u) for u in uris]
    try:
        if o["mode"] == "mirror":
            for leg in legs:
                leg.launch()
            results = await asyncio.gather(
                *(leg.wait_ready(o["connect_timeout"]) for leg in legs), return_exceptions=True
            )
            for leg, r in zip(legs, results, strict=True):
                if isinstance(r, BaseException):
                    raise r
                if r is False:
                    log.warning(
                        "%s: not reachable within --connect-timeout %g s (%s); the mirror "
                        "starts without it and resyncs it when it comes",
                        leg.name,
                        o["connect_timeout"],
                        leg.last_error or "no answer",
                    )
        else:
            await asyncio.gather(*(leg.connect() for leg in legs))
        return await build_stack(
            o["mode"],
            list(legs),
            chunk=o["stripe"],
            bitmap=o["bitmap"],
            granularity=o["bitmap_granularity"],
            resync_rate=o["resync_rate"],
            leg_timeout=o["leg_timeout"],
            assume_clean=bool(o["assume_clean"]),
        )
    except BaseException:
        for leg in legs:
            await leg.aclose()
        raise


async def _open_member(o: dict[str, Any], text: str) -> BlockDevice:
    """A new leg for `dst ctl add`: any member URI, connected with this node's options."""
    dev = member_device(o, parse_member(text))
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
    ops = NodeOps.for_attach(o, make_member=lambda uri: _open_member(o, uri))
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
