"""What each command runs with, as values: one frozen dataclass per command.

`dst export` and `dst attach` build an :class:`ExportConfig` or :class:`AttachConfig`
from the command line and the TOML file; the Python API builds :class:`MemberOptions`,
the part of a client node that reaches one member; the control socket shows
``settings()`` in the status document and opens `dst ctl add` legs with the node's
:class:`MemberOptions`; the demo builds both from its own values. So an option has one
name, one type and one default wherever it is used.

Each field is the option of the same name (dashes become underscores), already
converted: sizes in bytes, durations in seconds, addresses as :class:`Address`, members
as :class:`MemberUri`. Building a value checks it, and a wrong one raises UsageError
(exit 2) naming the option, so every caller gets the same checks. Nothing here touches
the network; ``create`` reads the key files it names.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dst.aio import workers
from dst.client.link import LinkOptions
from dst.client.nbd_member import NbdDevice
from dst.client.remote import RemoteDevice
from dst.crypto.aead import CIPHER_ORDER
from dst.crypto.checksums import CHECKSUM_ORDER
from dst.crypto.choice import client_algorithms, export_algorithms
from dst.crypto.keys import load_key_file, load_keys_file
from dst.errors import UsageError
from dst.proto.client import ClientConfig
from dst.proto.server import ServerConfig
from dst.units import DEFAULT_DST_PORT, Address, format_size
from dst.uri import MemberUri

Layout = Literal["single", "mirror", "stripe", "linear"]
LAYOUTS: tuple[Layout, ...] = ("single", "mirror", "stripe", "linear")

DEFAULT_METRICS_PORT = 9810
DEFAULT_LISTEN = Address(host="0.0.0.0", port=DEFAULT_DST_PORT)
MIN_STRIPE_CHUNK = 4096  # a chunk smaller than a page splits every 4 KiB request
DEFAULT_BITMAP_GRANULARITY = 64 << 10
DEFAULT_LEG_TIMEOUT = 5.0
DEFAULT_ASYNC_MAX_LAG = 64 << 20
CONGESTION_POLICIES = ("pull-ahead", "block")


def _positive(name: str, value: float, example: str) -> None:
    if not value > 0:
        raise UsageError(f"--{name} must be greater than 0, e.g. {example}")


def _text(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class MemberOptions:
    """How a client node reaches each of its members: identity, channel, transaction budget.

    A transaction fails (EIO) at the latest ``(resends + 1) * resend_timeout`` seconds after
    it was submitted; ``ping_interval``/``ping_timeout`` find a dead connection, which is
    re-established with a back-off from ``reconnect_min`` to ``reconnect_max``.
    ``takeover`` fences a live session of the same client id instead of being refused.
    """

    client_id: str = field(default_factory=socket.gethostname)
    read_only: bool = False
    key_file: str | None = None
    key: bytes | None = field(default=None, repr=False)
    ciphers: tuple[str, ...] = CIPHER_ORDER
    checksums: tuple[str, ...] = CHECKSUM_ORDER
    resends: int = 10
    resend_timeout: float = 5.0
    ping_interval: float = 5.0
    ping_timeout: float = 2.0
    connect_timeout: float = 10.0
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0
    takeover: bool = False

    def __post_init__(self) -> None:
        if not self.client_id:
            raise UsageError("--client-id must not be empty; give a name such as the host's")
        if self.resends < 0:
            raise UsageError(f"--resends {self.resends}: give a whole number, 0 or more")
        _positive("resend-timeout", self.resend_timeout, "5")
        _positive("ping-interval", self.ping_interval, "5")
        _positive("ping-timeout", self.ping_timeout, "2")
        _positive("connect-timeout", self.connect_timeout, "10")
        if self.reconnect_min <= 0 or self.reconnect_max < self.reconnect_min:
            raise UsageError("--reconnect-min must be > 0 and not above --reconnect-max")

    @classmethod
    def create(
        cls,
        *,
        key_file: str | None = None,
        ciphers: Sequence[str] | None = None,
        checksums: Sequence[str] | None = None,
        client_id: str | None = None,
        **knobs: Any,
    ) -> MemberOptions:
        """Read the key file and choose the algorithms (everything supported unless listed);
        ``knobs`` are the other fields, and what is not given keeps its default."""
        key = load_key_file(key_file) if key_file else None
        c, k = client_algorithms(
            list(ciphers) if ciphers else None,
            list(checksums) if checksums else None,
            key is not None,
        )
        if client_id is not None:
            knobs["client_id"] = client_id
        return cls(key_file=key_file, key=key, ciphers=c, checksums=k, **knobs)

    def client_config(self, export: str) -> ClientConfig:
        """The protocol core's configuration for one DST member (a new session each time)."""
        return ClientConfig(
            export=export,
            client_id=self.client_id,
            read_only=self.read_only,
            ciphers=self.ciphers,
            checksums=self.checksums,
            key=self.key,
            resends=self.resends,
            resend_timeout=self.resend_timeout,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            handshake_timeout=self.connect_timeout,
            offload=workers.enabled(),
            takeover=self.takeover,
        )

    def link_options(self) -> LinkOptions:
        return LinkOptions(
            connect_timeout=self.connect_timeout,
            reconnect_min=self.reconnect_min,
            reconnect_max=self.reconnect_max,
        )

    def device(self, uri: MemberUri) -> RemoteDevice | NbdDevice:
        """A DST member or an NBD server as a device, not connected yet."""
        if uri.protocol == "nbd":
            return NbdDevice(
                uri,
                self.link_options(),
                read_only=self.read_only,
                resends=self.resends,
                resend_timeout=self.resend_timeout,
            )
        return RemoteDevice(uri, self.client_config(uri.export), self.link_options())

    def settings(self) -> dict[str, Any]:
        """For the status document (never key material)."""
        return {
            "client_id": self.client_id,
            "read_only": self.read_only,
            "resends": self.resends,
            "resend_timeout": self.resend_timeout,
            "ping_interval": self.ping_interval,
            "ping_timeout": self.ping_timeout,
            "connect_timeout": self.connect_timeout,
            "reconnect_min": self.reconnect_min,
            "reconnect_max": self.reconnect_max,
            "key_file": self.key_file,
            "ciphers": list(self.ciphers),
            "checksums": list(self.checksums),
            "takeover": self.takeover,
        }


@dataclass(frozen=True)
class AttachConfig:
    """A client node (`dst attach`): its members, how they combine, and its front ends.

    ``layout`` is ``single`` (one member served as it is), ``mirror``, ``stripe`` (in
    chunks of ``stripe`` bytes, a power of two of at least 4 KiB) or ``linear``. ``nbd``
    and ``fuse`` (an absolute directory) are the front ends; at least one is needed.
    ``bitmap`` (the persistent record: a mirror's dirty bitmap and activity log, and the
    changed-block checkpoints of any layout) and ``bitmap_granularity`` apply to every
    layout; ``resync_rate`` and ``assume_clean`` to a mirror; ``leg_timeout`` is how long a
    mirror write waits for a leg that has not acked it before it completes on the others
    and degrades that leg.
    ``async_legs`` are a mirror's asynchronous legs (written in the background, in order,
    FLUSH and FUA as barriers); ``async_max_lag`` bounds the bytes they may lag behind and
    ``async_on_congestion`` says what happens at that bound: ``pull-ahead`` (stop shipping,
    record in the bitmap, resync later) or ``block`` (the writers wait).
    """

    members: tuple[MemberUri, ...]
    nbd: Address | None = None
    fuse: str | None = None
    layout: Layout = "single"
    stripe: int | None = None
    member: MemberOptions = field(default_factory=MemberOptions)
    bitmap: str | None = None
    bitmap_granularity: int = DEFAULT_BITMAP_GRANULARITY
    resync_rate: int | None = None
    leg_timeout: float = DEFAULT_LEG_TIMEOUT
    assume_clean: bool = False
    async_legs: tuple[MemberUri, ...] = ()
    async_max_lag: int = DEFAULT_ASYNC_MAX_LAG
    async_on_congestion: str = "pull-ahead"
    control: str | None = None
    metrics: Address | None = None
    crypto_workers: int | None = None

    def __post_init__(self) -> None:
        if not self.members:
            raise UsageError(
                "no member given: name at least one, e.g. `dst attach dst://node1/default "
                "--nbd unix:/run/dst.sock`"
            )
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        if len(self.members) > 1 and self.layout == "single":
            raise UsageError(
                f"{len(self.members)} members need --mirror, --stripe CHUNK or --linear to say "
                "how to combine them"
            )
        every = [u.text for u in (*self.members, *self.async_legs)]
        if len(set(every)) != len(every):
            raise UsageError("the same member is named twice; give each member once")
        if self.layout == "stripe":
            check_stripe_chunk(self.stripe)
        elif self.stripe is not None:
            raise UsageError("a stripe chunk applies to --stripe only")
        if self.layout != "mirror":
            given = {
                "resync-rate": self.resync_rate,
                "assume-clean": self.assume_clean or None,
                "async-leg": self.async_legs or None,
            }
            for name, value in given.items():
                if value is not None:
                    raise UsageError(f"--{name} applies to --mirror only")
        if self.nbd is None and self.fuse is None:
            raise UsageError(
                "no front end: give --nbd ADDR (and/or --fuse DIR) to expose the device"
            )
        _positive("leg-timeout", self.leg_timeout, "5")
        _positive("async-max-lag", self.async_max_lag, "64M")
        if self.async_on_congestion not in CONGESTION_POLICIES:
            raise UsageError(
                f"invalid --async-on-congestion {self.async_on_congestion!r}: use pull-ahead "
                "(stop shipping and resync later) or block (the writers wait)"
            )
        if self.bitmap_granularity <= 0:
            raise UsageError("--bitmap-granularity must be greater than 0, e.g. 64K")

    @property
    def stack_mode(self) -> str | None:
        """The mode :func:`dst.layers.stack.build_stack` takes (None: one member as it is)."""
        return None if self.layout == "single" else self.layout

    def settings(self) -> dict[str, Any]:
        """What the node runs with, for the status document (never key material)."""
        return {
            "members": [u.text for u in self.members],
            "layout": self.layout,
            "stripe": self.stripe,
            "nbd": _text(self.nbd),
            "fuse": self.fuse,
            **self.member.settings(),
            "bitmap": self.bitmap,
            "bitmap_granularity": self.bitmap_granularity,
            "resync_rate": self.resync_rate,
            "leg_timeout": self.leg_timeout,
            "assume_clean": self.assume_clean,
            "async_legs": [u.text for u in self.async_legs],
            "async_max_lag": self.async_max_lag,
            "async_on_congestion": self.async_on_congestion,
            "crypto_workers": self.crypto_workers,
            "control": self.control,
            "metrics": _text(self.metrics),
        }


def check_stripe_chunk(chunk: int | None) -> int:
    """A stripe chunk is a power of two of at least 4 KiB (so requests split on page
    boundaries and the device's size is a whole number of pages)."""
    if chunk is None:
        raise UsageError("--stripe needs a chunk size, e.g. --stripe 64K")
    if chunk < MIN_STRIPE_CHUNK or chunk & (chunk - 1):
        raise UsageError(
            f"invalid --stripe {format_size(chunk)}: the chunk must be a power of two of at "
            f"least {format_size(MIN_STRIPE_CHUNK)}, e.g. 64K"
        )
    return chunk


@dataclass(frozen=True)
class ExportSpec:
    """One ``[NAME=]BACKEND`` positional of `dst export`; NAME defaults to ``default``."""

    name: str
    backend: str
    text: str = ""

    @classmethod
    def parse(cls, item: str) -> ExportSpec:
        head, sep, rest = item.partition("=")
        if sep and ":" not in head:
            if not head:
                raise UsageError(f"invalid export {item!r}: the name before '=' is empty")
            return cls(head, rest, item)
        return cls("default", item, item)


@dataclass(frozen=True)
class ExportConfig:
    """An export node (`dst export`): the exports it serves and how it lets clients in.

    ``size`` is used for file exports that must be created; ``allow`` (None: any) lists
    the client ids that may attach; ``key``/``key_file`` is one key for all clients,
    ``client_keys``/``keys`` one per client id (not both). ``ciphers`` and ``checksums``
    are offered in this order of preference.
    """

    exports: tuple[ExportSpec, ...]
    listen: Address = DEFAULT_LISTEN
    size: int | None = None
    read_only: bool = False
    shared: bool = False
    allow: tuple[str, ...] | None = None
    key_file: str | None = None
    key: bytes | None = field(default=None, repr=False)
    keys: str | None = None
    client_keys: Mapping[str, bytes] | None = field(default=None, repr=False)
    ciphers: tuple[str, ...] = ("none",)
    checksums: tuple[str, ...] = ("crc32c",)
    crypto_workers: int | None = None
    control: str | None = None
    metrics: Address | None = None

    def __post_init__(self) -> None:
        if not self.exports:
            raise UsageError(
                "no export given: name at least one BACKEND, e.g. `dst export --listen "
                "0.0.0.0:10810 file:/srv/disk.img --size 10G`"
            )
        seen: set[str] = set()
        for e in self.exports:
            if e.name in seen:
                raise UsageError(
                    f"export name {e.name!r} is used twice; give each export its own NAME="
                )
            seen.add(e.name)
        if self.key is not None and self.client_keys is not None:
            raise UsageError("give either --key-file (one key for all clients) or --keys, not both")

    @classmethod
    def create(
        cls,
        exports: Sequence[str],
        *,
        key_file: str | None = None,
        keys: str | None = None,
        ciphers: Sequence[str] | None = None,
        checksums: Sequence[str] | None = None,
        **rest: Any,
    ) -> ExportConfig:
        """Parse the ``[NAME=]BACKEND`` items, read the key files and choose the algorithms
        (aes-256-gcm with a key, else none; crc32c without a cipher)."""
        specs = tuple(ExportSpec.parse(item) for item in exports)
        if key_file and keys:
            raise UsageError("give either --key-file (one key for all clients) or --keys, not both")
        key = load_key_file(key_file) if key_file else None
        client_keys = load_keys_file(keys) if keys else None
        c, k = export_algorithms(
            list(ciphers) if ciphers else None,
            list(checksums) if checksums else None,
            key is not None or client_keys is not None,
        )
        return cls(
            specs,
            key_file=key_file,
            key=key,
            keys=keys,
            client_keys=client_keys,
            ciphers=c,
            checksums=k,
            **rest,
        )

    def server_config(self) -> ServerConfig:
        return ServerConfig(
            ciphers=self.ciphers,
            checksums=self.checksums,
            key=self.key,
            keys=self.client_keys,
            offload=workers.enabled(),
        )

    def settings(self) -> dict[str, Any]:
        """What the node runs with, for the status document (never key material)."""
        return {
            "listen": str(self.listen),
            "exports": [e.text or f"{e.name}={e.backend}" for e in self.exports],
            "size": self.size,
            "read_only": self.read_only,
            "shared": self.shared,
            "allow": list(self.allow) if self.allow is not None else None,
            "key_file": self.key_file,
            "keys": self.keys,
            "ciphers": list(self.ciphers),
            "checksums": list(self.checksums),
            "crypto_workers": self.crypto_workers,
            "control": self.control,
            "metrics": _text(self.metrics),
        }
