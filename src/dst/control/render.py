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

STATE_STYLE = {
    "connected": "green",
    "connecting": "yellow",
    "reconnecting": "yellow",
    "resyncing": "cyan",
    "degraded": "yellow",
    "failed": "bold red",
}


def human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} TiB"


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


def _latency(member: dict[str, Any], key: str) -> str:
    lat = member.get("latency") or {}
    parts = [
        f"{op} {human_seconds(v.get(key))}"
        for op, v in sorted(lat.items())
        if isinstance(v, dict) and v.get(key) is not None
    ]
    return "\n".join(parts) or "-"


def _resync(rs: Any) -> RenderableType:
    """A progress bar with percent and time left, from ``{"done", "total", "rate"|"eta"}``."""
    if not isinstance(rs, dict) or not rs.get("total"):
        return Text("-")
    done, total = float(rs.get("done") or 0), float(rs["total"])
    eta = rs.get("eta")
    rate = rs.get("rate")
    if eta is None and isinstance(rate, (int, float)) and rate > 0:
        eta = (total - done) / rate
    tail = f" {100 * done / total:.0f}%"
    if isinstance(eta, (int, float)):
        tail += f" {human_seconds(eta)} left"
    t = Table.grid()
    t.add_row(ProgressBar(total=total, completed=done, width=16), Text(tail))
    return t


def render_attach(st: dict[str, Any]) -> RenderableType:
    dev = st.get("device") or {}
    cfg = st.get("settings") or {}
    up = human_seconds(time.time() - st["since"]) if isinstance(st.get("since"), float) else "?"
    head = Text.assemble(
        ("client node", "bold"),
        f" (pid {st.get('pid')}, up {up}): ",
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
    t = Table(title="members", title_justify="left", expand=False)
    for col in ("member", "state", "gen", "in flight", "completed", "resent", "failed"):
        t.add_column(col, justify="left" if col in ("member", "state") else "right")
    for col in ("csum err", "read", "written", "p50", "p99", "resync"):
        t.add_column(col, justify="right" if col not in ("resync",) else "left")
    for m in st.get("members", []):
        t.add_row(
            str(m.get("uri")),
            _state(m.get("state")),
            str(m.get("generation", "-")),
            str(m.get("in_flight", "-")),
            str(m.get("completed", "-")),
            str(m.get("resends", "-")),
            str(m.get("failed", "-")),
            str(m.get("checksum_errors", "-")),
            human_bytes(m.get("bytes_read")),
            human_bytes(m.get("bytes_written")),
            _latency(m, "p50"),
            _latency(m, "p99"),
            _resync(m.get("resync")),
        )
    parts.append(t)
    fronts = st.get("frontends") or []
    if fronts:
        f = Table(title="front ends", title_justify="left")
        for col in ("front end", "address", "connections", "requests", "read", "written", "errors"):
            f.add_column(col, justify="left" if col in ("front end", "address") else "right")
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
    for m in st.get("members", []):
        if m.get("state") != "connected" and m.get("last_error"):
            parts.append(Text(f"{m.get('uri')}: {m.get('last_error')}", style="yellow"))
    return Group(*parts)


def render_export(st: dict[str, Any]) -> RenderableType:
    up = human_seconds(time.time() - st["since"]) if isinstance(st.get("since"), float) else "?"
    head = Text.assemble(
        ("export node", "bold"),
        f" (pid {st.get('pid')}, up {up}) listening on {st.get('address')}: ",
        f"{st.get('connections', 0)} connection(s), ",
        (f"{st.get('enospc', 0)} ENOSPC", "red" if st.get("enospc") else ""),
    )
    t = Table(title="exports", title_justify="left")
    for col in ("name", "backend", "size", "identity", "mode", "allocated", "fs free", "fs used"):
        t.add_column(col, justify="right" if col in ("size", "allocated", "fs free", "fs used") else "left")
    for e in st.get("exports", []):
        fs = e.get("filesystem") or {}
        used = fs.get("used_percent")
        used_text = (
            Text(f"{used:g}%", style="bold red" if used >= 90 else "")
            if isinstance(used, (int, float))
            else Text("-")
        )
        mode = "read-only" if e.get("read_only") else "read-write"
        if e.get("shared"):
            mode += ", shared"
        t.add_row(
            str(e.get("name")),
            str(e.get("backend")),
            human_bytes(e.get("size")),
            str(e.get("identity")),
            mode,
            human_bytes(fs.get("allocated")) if fs else "-",
            human_bytes(fs.get("free")) if fs else "-",
            used_text,
        )
    s = Table(title="sessions", title_justify="left")
    for col in ("client", "export", "address", "since", "gen", "state", "requests", "read", "written"):
        s.add_column(col, justify="right" if col in ("gen", "requests", "read", "written") else "left")
    now = time.time()
    for ses in st.get("sessions", []):
        since = ses.get("since")
        s.add_row(
            str(ses.get("client_id")),
            str(ses.get("export")),
            str(ses.get("address") or "-"),
            f"{human_seconds(now - since)} ago" if isinstance(since, (int, float)) else "-",
            str(ses.get("generation", "-")),
            _state("connected" if ses.get("connected") else "disconnected"),
            str(ses.get("requests", 0)),
            human_bytes(ses.get("bytes_read")),
            human_bytes(ses.get("bytes_written")),
        )
    parts: list[RenderableType] = [head, t, s]
    parts += [Text(f"warning: {w}", style="bold yellow") for w in st.get("warnings", [])]
    return Group(*parts)


def render(st: dict[str, Any]) -> RenderableType:
    """The table view of either node kind's status document."""
    return render_export(st) if st.get("role") == "export" else render_attach(st)
