"""`dst status` for people: rich tables built from the status document.

Scripts use ``--json``; this view is for an operator at a terminal, so it
favours units a person reads at a glance (KiB, ms, "3m20s left") and colour
for states that need attention.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dst.control.handlers import human_bytes

STATE_STYLE = {
    "connected": "green",
    "connecting": "yellow",
    "reconnecting": "yellow",
    "resyncing": "cyan",
    "degraded": "yellow",
    "failed": "bold red",
}


def human_seconds(s: Any) -> str:
    """Latency-sized (µs, ms) or duration-sized (3m20s) seconds."""
    if not isinstance(s, (int, float)):
        return "-"
    if s < 0.001:
        return f"{s * 1e6:.0f}µs"
    if s < 1:
        return f"{s * 1e3:.1f}ms"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _state(state: Any) -> Text:
    s = str(state)
    return Text(s, style=STATE_STYLE.get(s, "magenta"))


_COUNTS = ("in_flight", "completed", "resends", "failed", "checksum_errors")


def _resync(rs: Any) -> RenderableType:
    """A progress bar with percent and time left, from the mirror's resync progress
    (``bytes_done``, ``bytes_total``, ``rate`` in bytes/s, ``eta`` in seconds)."""
    if not isinstance(rs, dict) or not rs.get("bytes_total"):
        return Text("-")
    done, total = float(rs.get("bytes_done") or 0), float(rs["bytes_total"])
    eta = rs.get("eta")
    rate = rs.get("rate")
    if eta is None and isinstance(rate, (int, float)) and rate > 0:
        eta = (total - done) / rate
    tail = f" {100 * done / total:.0f}%"
    if isinstance(rate, (int, float)) and rate > 0:
        tail += f" {human_bytes(rate)}/s"
    if isinstance(eta, (int, float)):
        tail += f" {human_seconds(eta)} left"
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


def render_attach(st: dict[str, Any]) -> RenderableType:
    dev = st.get("device") or {}
    cfg = st.get("settings") or {}
    head = Text.assemble(
        ("client node", "bold"),
        f" (pid {st.get('pid')}, up {_uptime(st)}): ",
        f"{dev.get('layout', 'single')} device of {human_bytes(dev.get('size'))}",
        ", read-only" if dev.get("read_only") else "",
        ", state ",
        _state(dev.get("state", "?")),
    )
    knobs = Text(
        f"resends {cfg.get('resends')}, resend-timeout {cfg.get('resend_timeout')} s, "
        f"ping {cfg.get('ping_interval')}/{cfg.get('ping_timeout')} s"
        + (f", resync-rate {human_bytes(cfg['resync_rate'])}/s" if cfg.get("resync_rate") else ""),
        style="dim",
    )
    parts: list[RenderableType] = [head, knobs]
    if isinstance(dev.get("resync"), dict):
        grid = Table.grid()
        grid.add_row(Text("device resync "), _resync(dev["resync"]))
        parts.append(grid)
    members = st.get("members", [])
    resyncing = any(isinstance(m.get("resync"), dict) for m in members)
    who = _table("members", "#!|member|state!|gen>" + ("|resync!" if resyncing else ""))
    counts = _table(
        "requests",
        "#!|in flight>|completed>|resent>|failed>|csum err>|read>|written>",
    )
    lat = _table("latency", "#!|op!|requests>|p50>|p99>")
    for i, m in enumerate(members, 1):
        row: list[RenderableType] = [
            str(i),
            str(m.get("uri")),
            _state(m.get("state")),
            str(m.get("generation", "-")),
        ]
        if resyncing:
            row.append(_resync(m.get("resync")))
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
    parts += [who, counts]
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
        if m.get("state") != "connected" and m.get("last_error"):
            parts.append(Text(f"member {i}: {m.get('last_error')}", style="yellow"))
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
            _state("connected" if ses.get("connected") else "disconnected"),
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
