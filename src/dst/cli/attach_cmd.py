"""`dst attach`: run a client node over one or more members and serve the device.

Three steps, in this order, so that a wrong command line or a busy address never
reaches a member (an export node would otherwise see, and record, a session):

1. :func:`prepare` checks the whole command line and config file (exit 2);
2. :func:`bind` takes every address the node serves (NBD, control socket, metrics) and
   checks the FUSE directory and library (exit 1 for a port in use, a live mount...);
3. :func:`_serve` connects the members, assembles the device and serves it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from dst.aio import workers
from dst.aio.listen import bind_listener, unlink_unix
from dst.cli.options import ATTACH_OPTS, given, merge
from dst.cli.runtime import Stopper, run
from dst.config import DEFAULT_METRICS_PORT, AttachConfig, Layout, MemberOptions
from dst.control.handlers import AttachControl
from dst.control.ops import NodeOps
from dst.control.runtime import control_socket
from dst.device import BlockDevice
from dst.errors import UsageError
from dst.layers.stack import build_stack
from dst.units import DEFAULT_NBD_PORT, Address, format_size, parse_address
from dst.uri import parse_member

log = logging.getLogger("dst.attach")

MEMBER_KNOBS = (
    "read_only",
    "resends",
    "resend_timeout",
    "ping_interval",
    "ping_timeout",
    "connect_timeout",
    "reconnect_min",
    "reconnect_max",
    "takeover",
)
NODE_KNOBS = (
    "bitmap",
    "bitmap_granularity",
    "resync_rate",
    "leg_timeout",
    "assume_clean",
    "async_max_lag",
    "async_on_congestion",
    "control",
    "crypto_workers",
)


def prepare(ns: argparse.Namespace) -> AttachConfig:
    """The whole command line and config file, checked without touching anything."""
    o = merge(ns, ATTACH_OPTS, "members", "members")
    in_file = f" in the config file {ns.config}" if ns.config else ""
    if not o["members"]:
        raise UsageError(
            "no member given: name at least one, e.g. `dst attach dst://node1/default --nbd "
            "unix:/run/dst.sock`" + (f" (or as `members = [...]`{in_file})" if in_file else "")
        )
    members = tuple(parse_member(m) for m in o["members"])
    async_legs = tuple(parse_member(m) for m in o["async_leg"] or [])
    modes: list[Layout] = []
    if o["mirror"]:
        modes.append("mirror")
    if o["stripe"] is not None:
        modes.append("stripe")
    if o["linear"]:
        modes.append("linear")
    if len(modes) > 1:
        raise UsageError(
            f"choose one of --mirror, --stripe and --linear, not {' and '.join('--' + m for m in modes)}"
        )
    if not o["nbd"] and not o["fuse"]:
        raise UsageError(
            "no front end: give --nbd ADDR (and/or --fuse DIR) to expose the device"
            + (f' (or nbd = "ADDR" / fuse = "DIR"{in_file})' if in_file else "")
        )
    nbd = (
        parse_address(o["nbd"], default_port=DEFAULT_NBD_PORT, what="--nbd address")
        if o["nbd"]
        else None
    )
    metrics = (
        parse_address(o["metrics"], default_port=DEFAULT_METRICS_PORT, what="--metrics address")
        if o["metrics"]
        else None
    )
    fuse = None
    if o["fuse"]:
        from dst.frontends.mounts import check_mountpoint

        fuse = check_mountpoint(o["fuse"])
    if o["bitmap"] and not os.path.isdir(os.path.dirname(os.path.abspath(o["bitmap"]))):
        raise UsageError(f"--bitmap {o['bitmap']}: the directory does not exist; create it first")
    member = MemberOptions.create(
        key_file=o["key_file"],
        ciphers=o["cipher"],
        checksums=o["checksum"],
        client_id=o["client_id"],
        **given(o, MEMBER_KNOBS),
    )
    return AttachConfig(
        members=members,
        nbd=nbd,
        fuse=fuse,
        layout=modes[0] if modes else "single",
        stripe=o["stripe"],
        member=member,
        metrics=metrics,
        async_legs=async_legs,
        **given(o, NODE_KNOBS),
    )


@dataclass
class Bound:
    """What the node took before contacting any member; given up if it does not start."""

    ops: NodeOps
    nbd_addr: Address | None = None
    nbd: socket.socket | None = None

    def take_nbd(self) -> socket.socket | None:
        """The NBD listener, now owned by the front end that serves it."""
        sock, self.nbd = self.nbd, None
        return sock

    def release(self) -> None:
        """Close (and unlink) what was bound but never served: no "stopped serving" for it."""
        sock, self.nbd = self.nbd, None
        if sock is not None:
            sock.close()
            if self.nbd_addr is not None:
                unlink_unix(self.nbd_addr)
        self.ops.release()


def bind(cfg: AttachConfig) -> Bound:
    """Take the NBD, control and metrics addresses and check the FUSE mount point and
    libfuse3, before any member is contacted; raises DstError (exit 1) when one is taken."""
    control = control_socket(cfg.control, "attach", cfg.nbd or cfg.fuse)
    bound = Bound(NodeOps(control, cfg.metrics), cfg.nbd)
    try:
        if cfg.nbd is not None:
            bound.nbd = bind_listener(cfg.nbd, "serve NBD")
        bound.ops.bind()
        if cfg.fuse is not None:
            from dst.frontends.fuse import prepare_mount

            prepare_mount(cfg.fuse)
    except BaseException:
        bound.release()
        raise
    return bound


async def build_device(cfg: AttachConfig) -> BlockDevice:
    """Connect the members and assemble them.

    A single member, a stripe or a linear device needs every member at start (exit 1
    otherwise).  A mirror starts when at least one leg is reachable within
    --connect-timeout and serves degraded until the others come (they keep trying in the
    background); a leg that refuses us for good (wrong key, unknown export...) is an error.
    """
    timeout = cfg.member.connect_timeout
    legs = [cfg.member.device(u) for u in (*cfg.members, *cfg.async_legs)]
    n = len(cfg.members)
    try:
        if cfg.layout == "mirror":
            for leg in legs:
                leg.launch()
            results = await asyncio.gather(
                *(leg.wait_ready(timeout) for leg in legs), return_exceptions=True
            )
            for leg, r in zip(legs, results, strict=True):
                if isinstance(r, BaseException):
                    raise r
                if r is False:
                    log.warning(
                        "%s: not reachable within --connect-timeout %g s (%s); the mirror "
                        "starts without it and resyncs it when it comes",
                        leg.name,
                        timeout,
                        leg.last_error or "no answer",
                    )
        else:
            await asyncio.gather(*(leg.connect() for leg in legs))
        return await build_stack(
            cfg.stack_mode,
            list(legs[:n]),
            chunk=cfg.stripe,
            bitmap=cfg.bitmap,
            granularity=cfg.bitmap_granularity,
            resync_rate=cfg.resync_rate,
            leg_timeout=cfg.leg_timeout,
            assume_clean=cfg.assume_clean,
            async_legs=list(legs[n:]),
            async_max_lag=cfg.async_max_lag,
            async_on_congestion=cfg.async_on_congestion,
        )
    except BaseException:
        for leg in legs:
            await leg.aclose()
        raise


def member_opener(options: MemberOptions) -> Callable[[str], Awaitable[BlockDevice]]:
    """`dst ctl add URI`: a new leg, any member URI, connected with this node's options."""

    async def open_member(text: str) -> BlockDevice:
        dev = options.device(parse_member(text))
        await dev.connect()  # raises with the reason when refused or unreachable
        return dev

    return open_member


def run_attach(ns: argparse.Namespace) -> int:
    cfg = prepare(ns)
    workers.configure(cfg.crypto_workers)
    bound = bind(cfg)
    try:
        return run(lambda: _serve(cfg, bound))
    finally:
        bound.release()


async def _serve(cfg: AttachConfig, bound: Bound) -> int:
    from dst.frontends.fuse import FuseFrontend
    from dst.frontends.nbd import NbdFrontend

    stopper = Stopper()
    dev: BlockDevice | None = None
    front: NbdFrontend | None = None
    fuse: FuseFrontend | None = None
    ops = bound.ops
    try:
        await ops.start(AttachControl(cfg.settings(), member_opener(cfg.member)))
        dev = await build_device(cfg)
        ops.set_device(dev)
        log.info(
            "device: %s (%d bytes)%s",
            format_size(dev.size),
            dev.size,
            ", read-only" if dev.capabilities.read_only else "",
        )
        listener = bound.take_nbd()
        if cfg.nbd is not None and listener is not None:
            front = NbdFrontend(dev, cfg.nbd, listener=listener)
            await front.start()
            ops.add_frontend(front)
        if cfg.fuse is not None:
            fuse = FuseFrontend(dev, cfg.fuse)
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
        bound.release()
        if dev is not None:
            try:
                if not dev.capabilities.read_only:
                    await dev.flush()
            except Exception as exc:
                log.warning("final flush failed: %s", exc)
            await dev.aclose()
    log.info("stopped")
    return 0
