"""What a node answers on its control socket: status documents and live changes.

`dst export` and `dst attach` each build one of these objects and register its
handlers with :class:`dst.control.server.ControlServer`; the metrics endpoint
reads the same :meth:`status` document, so `dst status --json` and a Prometheus
scrape can never disagree.  The shapes are documented in docs/operations.md.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dst.control.server import Handler, RequestError
from dst.device import BlockDevice
from dst.errors import UsageError
from dst.units import format_bytes, parse_duration, parse_rate

log = logging.getLogger("dst.control")

STATES = ("connecting", "connected", "reconnecting", "degraded", "resyncing", "failed")
FS_WARN_PERCENT = 90.0

# live knobs: name -> (kind, what the value must be)
LINK_KNOBS = ("resends", "resend-timeout", "ping-interval", "ping-timeout")
KNOBS = (*LINK_KNOBS, "resync-rate", "leg-timeout")
MIRROR_KNOBS = {"resync-rate": "set_resync_rate", "leg-timeout": "set_leg_timeout"}

# every member entry has at least these keys, so scripts need no defaults
MEMBER_DEFAULTS: dict[str, Any] = {
    "state": "connecting",
    "generation": 0,
    "in_flight": 0,
    "completed": 0,
    "resends": 0,
    "failed": 0,
    "errors": 0,
    "checksum_errors": 0,
    "reconnects": 0,
    "bytes_read": 0,
    "bytes_written": 0,
    "requests": {},
    "latency": {},
}

_CHILD_ATTRS = ("members", "legs", "devices")


def json_safe(value: Any) -> Any:
    """Tuples to lists, sets sorted, bytes left out: what ``json.dumps`` takes as is."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items() if not isinstance(v, bytes)}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(json_safe(v) for v in value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def parse_knob(key: str, value: Any) -> float | int:
    """Check a knob's name and value; the message says what is allowed."""
    if key not in KNOBS:
        raise RequestError(f"unknown setting {key!r}; live settings are: {', '.join(KNOBS)}")
    text = str(value).strip()
    if key == "resends":
        if not text.isdigit():
            raise RequestError(f"invalid resends {value!r}: give a whole number, 0 or more")
        return int(text)
    try:
        if key == "resync-rate":
            return parse_rate(text, key)
        seconds = parse_duration(text, key)
    except UsageError as exc:
        raise RequestError(str(exc)) from None
    if seconds <= 0:
        raise RequestError(f"invalid {key} {value!r}: give seconds greater than 0, e.g. 1.5")
    return seconds


def children(dev: object) -> list[BlockDevice]:
    """The devices a layer is built on (none for a leaf such as a remote member).

    Layers keep them as ``members`` (stripe, linear) or as ``legs`` whose ``dev``
    is the device (mirror); either is accepted.
    """
    for attr in _CHILD_ATTRS:
        kids = getattr(dev, attr, None)
        if isinstance(kids, dict):
            kids = list(kids.values())
        if not isinstance(kids, (list, tuple)) or not kids:
            continue
        devs = [k if isinstance(k, BlockDevice) else getattr(k, "dev", None) for k in kids]
        if all(isinstance(d, BlockDevice) for d in devs):
            return devs  # type: ignore[return-value]
    return []


def leaves(dev: BlockDevice) -> list[BlockDevice]:
    """Every leaf device under ``dev`` (the remote members), depth first."""
    kids = children(dev)
    if not kids:
        return [dev]
    out: list[BlockDevice] = []
    for k in kids:
        out.extend(leaves(k))
    return out


def normalise_member(stats: dict[str, Any]) -> dict[str, Any]:
    m = dict(MEMBER_DEFAULTS)
    m.update(json_safe(stats))
    m.setdefault("uri", str(stats.get("name", "?")))
    m.setdefault("link_state", m["state"])
    return m


def member_healthy(m: dict[str, Any]) -> bool:
    """Connected, and its link answers in time (no request waits past a resend timeout)."""
    return m.get("state") == "connected" and m.get("link_state", "connected") == "connected"


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _result(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return json_safe(value)  # type: ignore[no-any-return]
    return {} if value is None else {"result": json_safe(value)}


class AttachControl:
    """Status and live changes of a client node (`dst attach`)."""

    def __init__(
        self,
        settings: dict[str, Any],
        make_member: Callable[[str], Awaitable[BlockDevice]] | None = None,
    ) -> None:
        self.device: BlockDevice | None = None
        self.make_member = make_member
        self.frontends: list[Any] = []
        self.settings = json_safe(settings)
        self.started = time.time()
        self.on_status: Callable[[BlockDevice], None] | None = None

    def status(self) -> dict[str, Any]:
        dev = self.device
        out: dict[str, Any] = {
            "role": "attach",
            "pid": os.getpid(),
            "since": self.started,
            "settings": self.settings,
        }
        if dev is None:
            out["device"] = {"state": "connecting"}
            out["members"] = [
                normalise_member({"uri": u}) for u in self.settings.get("members", [])
            ]
            return out
        if self.on_status is not None:
            self.on_status(dev)
        stats = dev.statistics()
        if isinstance(stats.get("members"), list):
            members = [normalise_member(m) for m in stats["members"]]
            extra = {k: v for k, v in stats.items() if k != "members"}
        else:
            members = [normalise_member(stats)]
            extra = {}
        device = json_safe(extra)
        device.update(
            name=dev.name,
            size=dev.size,
            read_only=dev.capabilities.read_only,
            layout=self.settings.get("layout", "single"),
            state=extra.get("state", dev.state),
        )
        from dst.layers.checkpoints import checkpoint_status

        checkpoints = checkpoint_status(dev)
        if checkpoints is not None:
            device["checkpoints"] = json_safe(checkpoints)
        out["device"] = device
        out["members"] = members
        out["frontends"] = [json_safe(self._frontend(f)) for f in self.frontends]
        return out

    @staticmethod
    def _frontend(front: Any) -> dict[str, Any]:
        kind = getattr(front, "kind", None) or type(front).__name__.removesuffix("Frontend").lower()
        d: dict[str, Any] = {"kind": kind}
        uri = getattr(front, "uri", None) or getattr(front, "path", None)
        if uri is not None:
            d["uri"] = uri
        stats = getattr(front, "statistics", None)
        if callable(stats):
            d.update(stats())
        return d

    # ---- handlers ------------------------------------------------------------------
    def handlers(self) -> dict[str, Handler]:
        return {
            "status": self._status,
            "set": self._set,
            "verify": self._verify,
            "detach": self._detach,
            "add": self._add,
            "checkpoint": self._checkpoint,
        }

    def _need_device(self) -> BlockDevice:
        if self.device is None:
            raise RequestError("the device is not up yet; retry in a moment")
        return self.device

    def _mirror_method(self, name: str, what: str) -> Callable[..., Any]:
        dev = self._need_device()
        fn = getattr(dev, name, None)
        if not callable(fn):
            raise RequestError(
                f"{what} needs a mirror; this client node serves a "
                f"{self.settings.get('layout', 'single')} device, not a mirror"
            )
        return fn  # type: ignore[no-any-return]

    async def _status(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def _set(self, req: dict[str, Any]) -> dict[str, Any]:
        key = str(req.get("key", ""))
        value = parse_knob(key, req.get("value"))
        dev = self._need_device()
        if key in MIRROR_KNOBS:
            fn = self._mirror_method(MIRROR_KNOBS[key], key)
            await _maybe_await(fn(value))
            applied = [dev.name]
        else:
            applied = []
            for leaf in leaves(dev):
                set_knob = getattr(leaf, "set_knob", None)
                if callable(set_knob):
                    set_knob(key, value)
                    applied.append(leaf.name)
            if not applied:
                raise RequestError(f"{key} applies to dst:// members; this device has none")
        self.settings[key.replace("-", "_")] = value
        return {"key": key, "value": value, "applied_to": applied}

    async def _verify(self, req: dict[str, Any]) -> dict[str, Any]:
        fn = self._mirror_method("verify", "verify")
        rate = req.get("rate")
        rate_value = None if rate in (None, "") else parse_knob("resync-rate", rate)
        return _result(await _maybe_await(fn(rate_value, bool(req.get("repair", False)))))

    async def _detach(self, req: dict[str, Any]) -> dict[str, Any]:
        fn = self._mirror_method("detach", "detach")
        return _result(await _maybe_await(fn(self._uri(req))))

    async def _add(self, req: dict[str, Any]) -> dict[str, Any]:
        """Connect the new leg (refused or unreachable: an error, nothing changes), give it
        the live knobs, then hand it to the mirror, which resyncs it fully."""
        fn = self._mirror_method("add", "add")
        if self.make_member is None:
            raise RequestError("this client node cannot open new members")
        member = await self.make_member(self._uri(req))
        try:
            for key in LINK_KNOBS:
                value = self.settings.get(key.replace("-", "_"))
                set_knob = getattr(member, "set_knob", None)
                if value is not None and callable(set_knob):
                    set_knob(key, value)
            extra = {"asynchronous": True} if req.get("async") else {}
            return _result(await _maybe_await(fn(member, **extra)))
        except BaseException:
            await member.aclose()
            raise

    async def _checkpoint(self, req: dict[str, Any]) -> dict[str, Any]:
        """``action`` add, remove (both with ``name``) or list."""
        from dst.layers.checkpoints import add_checkpoint, list_checkpoints, remove_checkpoint

        action = req.get("action")
        if action == "list":
            return _result(list_checkpoints(self.device))
        name = req.get("name")
        if action not in ("add", "remove"):
            raise RequestError('give "action": one of "add", "remove" or "list"')
        if not isinstance(name, str) or not name:
            raise RequestError(f'checkpoint {action} needs a "name", e.g. backup-1')
        dev = self._need_device()
        if action == "add":
            return _result(await add_checkpoint(dev, name))
        return _result(await remove_checkpoint(dev, name))

    @staticmethod
    def _uri(req: dict[str, Any]) -> str:
        uri = req.get("uri")
        if not isinstance(uri, str) or not uri:
            raise RequestError('give the member as "uri", e.g. dst://node2:10810/default')
        return uri


class ExportControl:
    """Status of an export node (`dst export`): exports, sessions, filesystem space."""

    def __init__(self, node: Any, settings: dict[str, Any]) -> None:
        self.node = node
        self.settings = json_safe(settings)
        self._full: set[str] = set()  # exports whose filesystem was last seen >= 90% used

    def status(self) -> dict[str, Any]:
        st: dict[str, Any] = json_safe(self.node.status())
        st["pid"] = os.getpid()
        st["settings"] = self.settings
        warnings: list[str] = []
        for e in st.get("exports", []):
            backend = e.get("statistics", {}).get("backend", {})
            if "fs_size_bytes" in backend:
                e["filesystem"] = {
                    "path": backend.get("path"),
                    "size": backend.get("fs_size_bytes"),
                    "free": backend.get("fs_free_bytes"),
                    "used_percent": backend.get("fs_used_percent"),
                    "allocated": backend.get("allocated_bytes"),
                }
                warning = space_warning(e)
                if warning:
                    warnings.append(warning)
        st["warnings"] = warnings
        return st

    def check_space(self) -> None:
        """Log once when a file export's filesystem reaches 90% used, and when it drops back."""
        for e in self.status().get("exports", []):
            name, warning = str(e.get("name")), space_warning(e)
            if warning and name not in self._full:
                self._full.add(name)
                log.warning("%s", warning)
            elif not warning and name in self._full and "filesystem" in e:
                self._full.discard(name)
                log.info(
                    "export %r: the filesystem under %s is below %g%% used again",
                    name,
                    e["filesystem"].get("path"),
                    FS_WARN_PERCENT,
                )

    def handlers(self) -> dict[str, Handler]:
        async def status(req: dict[str, Any]) -> dict[str, Any]:
            return self.status()

        async def not_here(req: dict[str, Any]) -> dict[str, Any]:
            raise RequestError(
                f"{req.get('cmd')!r} is for a client node (`dst attach --control`); this is an "
                "export node, which has no live settings"
            )

        return {
            "status": status,
            **dict.fromkeys(("set", "verify", "detach", "add", "checkpoint"), not_here),
        }


def human_bytes(n: Any) -> str:
    """1536 -> ``1.5 KiB`` (the style of :func:`dst.units.format_bytes`); ``-`` when unknown."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return "-"
    return format_bytes(n)


def space_warning(export: dict[str, Any]) -> str | None:
    """The warning for a file export whose filesystem is 90% used or more."""
    fs = export.get("filesystem")
    if not isinstance(fs, dict) or (fs.get("used_percent") or 0.0) < FS_WARN_PERCENT:
        return None
    return (
        f"export {export.get('name')!r}: the filesystem under {fs.get('path')} is "
        f"{fs['used_percent']:g}% full ({human_bytes(fs.get('free'))} free); a sparse file "
        "export fails writes with ENOSPC when it fills: free space or grow the filesystem"
    )


def unhealthy(status: dict[str, Any]) -> list[str]:
    """Why a status document is not healthy (empty when it is)."""
    out = []
    for m in status.get("members", []):
        if m.get("state") != "connected":
            out.append(f"member {m.get('uri')} is {m.get('state')}")
        elif not member_healthy(m):
            out.append(
                f"member {m.get('uri')} is {m.get('link_state')}: {m.get('waiting', 0)} "
                f"request(s) unanswered past the resend timeout"
            )
    return out
