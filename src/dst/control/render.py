"""`dst status` for people: rich tables built from the status document.

Scripts use ``--json``; this view is for an operator at a terminal, so it
favours units a person reads at a glance, in the one style of
:mod:`dst.units` (``178.2 MiB/s``, ``4.1 ms``, ``3 min 20 s left``), and colour for
states that need attention.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dst.control.handlers import human_bytes
from dst.units import format_duration, format_rate

STATE_STYLE = {
    "connected": "green",
    "connecting": "yellow",
    "reconnecting": "yellow",
    "stalled": "yellow",
    "resyncing": "cyan",
    "degraded": "yellow",
    "failed": "bold red",
}


def human_seconds(s: Any) -> str:
    """Seconds in the common style (``4.1 ms``, ``3 min 20 s``); ``-`` when unknown."""
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        return "-"
    return format_duration(s)


def clock(t: Any, now: float | None = None) -> str:
    """A Unix time as ``12:03:04 (35.0 s ago)``; the date too when it is not today."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
        return "(time unknown)"
    now = time.time() if now is None else now
    local, today = time.localtime(t), time.localtime(now)
    fmt = "%H:%M:%S" if local[:3] == today[:3] else "%Y-%m-%d %H:%M:%S"
    return f"{time.strftime(fmt, local)} ({format_duration(max(0.0, now - t))} ago)"


def _state(state: Any) -> Text:
    s = str(state)
    return Text(s, style=STATE_STYLE.get(s, "magenta"))


def shown_state(m: dict[str, Any]) -> str:
    """A member's state for people: never plain ``connected`` while its link is not."""
    state, link = str(m.get("state")), str(m.get("link_state") or m.get("state"))
    return link if state == "connected" and link != "connected" else state


def link_text(m: dict[str, Any], now: float) -> Text:
    """The link of a member: ``connected``, ``stalled: 3 waiting 7.2 s``,
    ``reconnecting for 12.0 s``..."""
    link = str(m.get("link_state") or m.get("state"))
    if link == "stalled":
        detail = f": {m.get('waiting', '?')} waiting {human_seconds(m.get('waiting_seconds'))}"
    elif link in ("connecting", "reconnecting") and isinstance(m.get("state_since"), (int, float)):
        detail = f" for {format_duration(max(0.0, now - m['state_since']))}"
    else:
        detail = ""
    return Text(link + detail, style=STATE_STYLE.get(link, "magenta"))


def _session_state(ses: dict[str, Any]) -> Text:
    """An export node's session: connected, or lost and still holding its claim until when."""
    if ses.get("connected"):
        return _state("connected")
    left = ses.get("claim_expires_in")
    if isinstance(left, (int, float)):
        text = (
            f"lost, claim expires in {human_seconds(left)}" if left > 0 else "lost, claim expired"
        )
        return Text(text, style="yellow" if left > 0 else "")
    return Text("disconnected")


_COUNTS = ("in_flight", "completed", "resends", "failed", "checksum_errors")


def _progress(rs: Any) -> RenderableType:
    """A progress bar with percent, rate and time left, from a resync's or a verify's
    progress (``bytes_done``, ``bytes_total``, ``rate`` in bytes/s, ``eta`` in seconds)."""
    if not isinstance(rs, dict) or not rs.get("bytes_total"):
        return Text("-")
    done, total = float(rs.get("bytes_done") or 0), float(rs["bytes_total"])
    eta = rs.get("eta")
    rate = rs.get("rate")
    if eta is None and isinstance(rate, (int, float)) and rate > 0:
        eta = (total - done) / rate
    tail = f" {100 * done / total:.0f}% of {human_bytes(total)}"
    if isinstance(rate, (int, float)) and rate > 0:
        tail += f", {format_rate(rate)}"
    if isinstance(eta, (int, float)):
        tail += f", {human_seconds(eta)} left"
    t = Table.grid()
    t.add_row(ProgressBar(total=total, completed=done, width=16), Text(tail))
    return t


def _table(title: str, spec: str) -> Table:
    """A table from ``"name|name>|name!"``: ``>`` right-aligned numbers, ``!`` never wrapped.

    Other columns fold (URIs, paths), so nothing is cut off at any terminal width.
    """
    t = Table(title=title, title_justify="left")
    for col in spec.split("|"):
        name = col.rstrip(">!")
        t.add_column(
            name,
            justify="right" if col.endswith(">") else "left",
            overflow="fold",
            no_wrap=col.endswith((">", "!")),
        )
    return t


def _uptime(st: dict[str, Any]) -> str:
    since = st.get("since")
    return human_seconds(time.time() - since) if isinstance(since, (int, float)) else "?"


def _seconds(v: Any) -> str:
    return f"{v:g} s" if isinstance(v, (int, float)) and not isinstance(v, bool) else "?"


def _redundancy(dev: dict[str, Any]) -> Text | None:
    """How many copies a mirror has right now; None for other layouts."""
    legs, in_sync = dev.get("legs"), dev.get("legs_in_sync")
    if dev.get("layout") != "mirror" or not isinstance(legs, int) or not isinstance(in_sync, int):
        return None
    if legs == 1:
        return Text(
            "no redundancy: a one-leg mirror (add a leg with `dst ctl add URI`)", "bold yellow"
        )
    if in_sync <= 1:
        return Text(
            f"no redundancy: {in_sync} of {legs} legs in sync; the mirror runs on one copy",
            "bold yellow",
        )
    return Text(f"redundancy: {in_sync} of {legs} legs in sync", "green")


def _member_notes(members: list[dict[str, Any]], now: float) -> list[RenderableType]:
    """Why each member is degraded (and since when), and its last error with its time."""
    out: list[RenderableType] = []
    for i, m in enumerate(members, 1):
        state = shown_state(m)
        healthy = state == "connected"
        if m.get("refused"):
            out.append(Text(f"member {i} cannot rejoin: {m['refused']}", "bold red"))
        if m.get("reason") and m.get("state") in ("degraded", "resyncing", "failed"):
            out.append(
                Text(
                    f"member {i} {m.get('state')} since {clock(m.get('sync_since'), now)}: "
                    f"{m['reason']}",
                    STATE_STYLE.get(str(m.get("state")), "yellow"),
                )
            )
        if m.get("last_error"):
            out.append(
                Text(
                    f"member {i} last error at {clock(m.get('last_error_at'), now)}: "
                    f"{m['last_error']}",
                    "dim" if healthy else "yellow",
                )
            )
    return out


def render_attach(st: dict[str, Any]) -> RenderableType:
    now = time.time()
    dev = st.get("device") or {}
    cfg = st.get("settings") or {}
    head = Text.assemble(
        ("client node", "bold"),
        f" (pid {st.get('pid')}, up {_uptime(st)}"
        + (f", control {cfg['control']}" if cfg.get("control") else "")
        + "): ",
        f"{dev.get('layout', 'single')} device of {human_bytes(dev.get('size'))}",
        ", read-only" if dev.get("read_only") else "",
        ", state ",
        _state(dev.get("state", "?")),
    )
    knobs = Text(
        f"resends {cfg.get('resends')}, resend-timeout {_seconds(cfg.get('resend_timeout'))}, "
        f"ping-interval {_seconds(cfg.get('ping_interval'))}, "
        f"ping-timeout {_seconds(cfg.get('ping_timeout'))}"
        + (
            f", leg-timeout {_seconds(cfg['leg_timeout'])}"
            if cfg.get("leg_timeout") is not None and dev.get("layout") == "mirror"
            else ""
        )
        + (f", resync-rate {format_rate(cfg['resync_rate'])}" if cfg.get("resync_rate") else ""),
        style="dim",
    )
    parts: list[RenderableType] = [head, knobs]
    redundancy = _redundancy(dev)
    if redundancy is not None:
        parts.append(redundancy)
    for what in ("resync", "verify"):
        if isinstance(dev.get(what), dict):
            grid = Table.grid()
            grid.add_row(Text(f"device {what} "), _progress(dev[what]))
            parts.append(grid)
    members = st.get("members", [])
    mirror = any("dirty_bytes" in m for m in members)
    resyncing = any(isinstance(m.get("resync"), dict) for m in members)
    who = _table(
        "members",
        "#!|member|state!|link!|gen>"
        + ("|dirty>" if mirror else "")
        + ("|resync!" if resyncing else ""),
    )
    counts = _table(
        "requests",
        "#!|in flight>|completed>|resent>|failed>|csum err>|read>|written>",
    )
    lat = _table("latency", "#!|op!|requests>|p50>|p99>")
    for i, m in enumerate(members, 1):
        row: list[RenderableType] = [
            str(i),
            str(m.get("uri")),
            _state(shown_state(m)),
            link_text(m, now),
            str(m.get("generation", "-")),
        ]
        if mirror:
            row.append(human_bytes(m.get("dirty_bytes")))
        if resyncing:
            row.append(_progress(m.get("resync")))
        who.add_row(*row)
        counts.add_row(
            str(i),
            *(str(m.get(k, "-")) for k in _COUNTS),
            human_bytes(m.get("bytes_read")),
            human_bytes(m.get("bytes_written")),
        )
        for op, v in sorted((m.get("latency") or {}).items()):
            if isinstance(v, dict):
                lat.add_row(
                    str(i),
                    op,
                    str(v.get("count", "-")),
                    human_seconds(v.get("p50")),
                    human_seconds(v.get("p99")),
                )
    parts.append(who)
    parts += _member_notes(members, now)
    parts.append(counts)
    if lat.row_count:
        parts.append(lat)
    fronts = st.get("frontends") or []
    if fronts:
        f = _table("front ends", "kind!|address|connections>|requests>|read>|written>|errors>")
        for fe in fronts:
            reqs = fe.get("requests") or {}
            f.add_row(
                str(fe.get("kind")),
                str(fe.get("uri", "-")),
                str(fe.get("connections_open", "-")),
                str(sum(v for v in reqs.values() if isinstance(v, int))),
                human_bytes(fe.get("bytes_read")),
                human_bytes(fe.get("bytes_written")),
                str(fe.get("errors", "-")),
            )
        parts.append(f)
    for i, m in enumerate(members, 1):
        if m.get("mode") == "async":
            ok = "consistent" if m.get("consistent") else "not consistent until it caught up"
            lag = f"lag {human_bytes(m.get('lag_bytes'))}, {human_seconds(m.get('lag_seconds'))}"
            parts.append(Text(f"member {i}: asynchronous, {lag}, {ok}", style="dim"))
    return Group(*parts)


def render_export(st: dict[str, Any]) -> RenderableType:
    head = Text.assemble(
        ("export node", "bold"),
        f" (pid {st.get('pid')}, up {_uptime(st)}) listening on {st.get('address')}: ",
        f"{st.get('connections', 0)} connection(s), ",
        (f"{st.get('enospc', 0)} ENOSPC", "red" if st.get("enospc") else ""),
    )
    exports = _table("exports", "name!|backend|size>|mode!|identity")
    space = _table("space", "name!|allocated>|fs size>|fs free>|fs used>")
    for e in st.get("exports", []):
        mode = "read-only" if e.get("read_only") else "read-write"
        if e.get("shared"):
            mode += ", shared"
        exports.add_row(
            str(e.get("name")),
            str(e.get("backend")),
            human_bytes(e.get("size")),
            mode,
            str(e.get("identity")),
        )
        fs = e.get("filesystem")
        if isinstance(fs, dict):
            used = fs.get("used_percent")
            space.add_row(
                str(e.get("name")),
                human_bytes(fs.get("allocated")),
                human_bytes(fs.get("size")),
                human_bytes(fs.get("free")),
                Text(f"{used:g}%", style="bold red" if used >= 90 else "")
                if isinstance(used, (int, float))
                else Text("-"),
            )
    sessions = _table("sessions", "#!|client|export|address|since!|gen>|state!")
    served = _table("requests served", "#!|requests>|read>|written>")
    now = time.time()
    for i, ses in enumerate(st.get("sessions", []), 1):
        since = ses.get("since")
        sessions.add_row(
            str(i),
            str(ses.get("client_id")),
            str(ses.get("export")),
            str(ses.get("address") or "-"),
            f"{human_seconds(now - since)} ago" if isinstance(since, (int, float)) else "-",
            str(ses.get("generation", "-")),
            _session_state(ses),
        )
        served.add_row(
            str(i),
            str(ses.get("requests", 0)),
            human_bytes(ses.get("bytes_read")),
            human_bytes(ses.get("bytes_written")),
        )
    parts: list[RenderableType] = [head, exports]
    if space.row_count:
        parts.append(space)
    parts += [sessions, served]
    parts += [Text(f"warning: {w}", style="bold yellow") for w in st.get("warnings", [])]
    return Group(*parts)


def render(st: dict[str, Any]) -> RenderableType:
    """The table view of either node kind's status document."""
    return render_export(st) if st.get("role") == "export" else render_attach(st)
