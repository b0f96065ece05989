"""`dst status` and `dst ctl`: talk to running nodes over their control sockets.

Exit codes are for monitoring: `dst status` exits 0 when every member is
`connected` (and answers in time), 1 when one is not or no node answers; `dst ctl
verify` exits 1 when the legs differ or could not be compared; every command exits
2 for a wrong command line, checked before a node is contacted.  Without
``--control`` both look in the runtime directory (:mod:`dst.control.runtime`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dst.control.client import ControlClient, request
from dst.control.handlers import KNOBS, parse_knob, unhealthy
from dst.control.runtime import answers, name_of, node_sockets, runtime_dir
from dst.control.server import RequestError
from dst.errors import DstError, UsageError
from dst.units import format_bytes, format_duration, format_rate

CTL_COMMANDS = (
    "set KEY=VALUE, verify [--rate RATE] [--repair] [--json], detach URI, add [--async] URI or "
    "checkpoint add NAME | list [--json] | remove NAME"
)
NODE_TIMEOUT = 3.0  # seconds a node listed by `dst status` has to answer
SHOWN_REGIONS = 10  # differing regions a verify summary lists


def run_control(ns: argparse.Namespace) -> int:
    try:
        if ns.command == "status":
            return run_status(ns.control, bool(ns.json), ns.watch)
        return run_ctl(ns.control, list(ns.words))
    except BrokenPipeError:  # `dst status | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _console(stderr: bool = False) -> Any:
    """A terminal's own width; a pipe or file gets wide lines rather than folded cells."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=160)


# ---- finding nodes --------------------------------------------------------------------
@dataclass
class Node:
    """One node found in the runtime directory, with its status or why it did not answer."""

    name: str
    control: str
    status: dict[str, Any] | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "control": self.control}
        if self.status is not None:
            d["status"] = self.status
        if self.error is not None:
            d["error"] = self.error
        return d


def _none_running() -> str:
    return (
        f"no dst node is running here: no control socket in {runtime_dir()} answers; start "
        "`dst export` or `dst attach`, or give --control SOCK for a node whose socket is "
        "elsewhere"
    )


def _ask(path: Path) -> Node | None:
    if not answers(path):
        return None  # left by a killed node: nothing accepts on it
    node = Node(name_of(path), str(path))
    try:
        node.status = request(str(path), "status", timeout=NODE_TIMEOUT)
    except DstError as exc:
        node.error = str(exc)
    return node


def find_nodes() -> list[Node]:
    """Every node whose socket in the runtime directory accepts connections, asked all at
    once (a stopped node costs NODE_TIMEOUT once, not per node); sockets left by killed
    nodes are skipped."""
    paths = node_sockets()
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        found = list(pool.map(_ask, paths))
    return [n for n in found if n is not None]


def pick_node(role: str = "attach") -> str:
    """The one node a `dst ctl` without --control means: the only ``role`` node running
    (or the only node of any kind)."""
    live = [p for p in node_sockets() if answers(p)]
    if not live:
        raise DstError(_none_running())
    mine = [p for p in live if p.name.startswith(f"{role}-")] or live
    if len(mine) > 1:
        raise UsageError(
            f"{len(mine)} nodes run ({', '.join(name_of(p) for p in mine)}); choose one "
            f"with --control SOCK, e.g. --control {mine[0]}"
        )
    return str(mine[0])


# ---- dst status -------------------------------------------------------------------------
def run_status(path: str | None, as_json: bool, watch: float | None) -> int:
    if watch is not None and not watch > 0:
        raise UsageError(f"--watch {watch:g}: give seconds greater than 0, e.g. --watch=2")
    if watch is not None:
        return _watch(path, as_json, watch)
    if path is not None:
        st = request(path, "status")
        show(st, as_json)
        return 1 if unhealthy(st) else 0
    nodes = find_nodes()
    if not nodes:
        raise DstError(_none_running())
    show_nodes(nodes, as_json)
    return _nodes_code(nodes)


def _nodes_code(nodes: list[Node]) -> int:
    bad = [n for n in nodes if n.status is None or unhealthy(n.status)]
    return 1 if bad or not nodes else 0


def show(st: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return
    from dst.control.render import render

    _console().print(render(st))


def _nodes_view(nodes: list[Node]) -> Any:
    from rich.console import Group
    from rich.rule import Rule
    from rich.text import Text

    from dst.control.render import render

    if not nodes:
        return Text(_none_running(), style="bold red")
    parts: list[Any] = []
    for n in nodes:
        parts.append(Rule(Text(f"{n.name}  {n.control}", style="bold"), align="left"))
        if n.status is not None:
            parts.append(render(n.status))
        else:
            parts.append(Text(f"does not answer: {n.error}", style="bold red"))
    return Group(*parts)


def show_nodes(nodes: list[Node], as_json: bool) -> None:
    if as_json:
        doc = {"runtime_dir": str(runtime_dir()), "nodes": [n.as_dict() for n in nodes]}
        print(json.dumps(doc, indent=2, sort_keys=True))
        return
    _console().print(_nodes_view(nodes))


def _watch(path: str | None, as_json: bool, every: float) -> int:
    """Refresh until Ctrl-C; a node that stops answering is shown, not fatal.  On a
    terminal the view is redrawn in place; into a pipe or file each interval prints one
    whole snapshot (one JSON document per line with --json)."""
    code = 1
    client = ControlClient(path) if path is not None else None
    console = _console()
    try:
        if as_json or not console.is_terminal:
            while True:
                view, doc, code = _poll(client)
                if as_json:
                    print(json.dumps(doc, sort_keys=True), flush=True)
                else:
                    console.rule(time.strftime("%H:%M:%S"), align="left")
                    console.print(view)
                    console.file.flush()
                time.sleep(every)
        from rich.live import Live

        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                view, _, code = _poll(client)
                live.update(view, refresh=True)
                time.sleep(every)
    except KeyboardInterrupt:
        return code
    finally:
        if client is not None:
            client.close()


def _poll(client: ControlClient | None) -> tuple[Any, dict[str, Any], int]:
    """One snapshot: the view for people, the document for --json, the exit code."""
    from dst.control.render import render

    if client is None:
        nodes = find_nodes()
        doc: dict[str, Any] = {
            "runtime_dir": str(runtime_dir()),
            "nodes": [n.as_dict() for n in nodes],
        }
        return _nodes_view(nodes), doc, _nodes_code(nodes)
    try:
        st = client.call("status")
    except DstError as exc:
        client.close()
        err: dict[str, Any] = {"error": str(exc), "time": time.time()}
        return _error_view(err), err, 1
    return render(st), st, 1 if unhealthy(st) else 0


def _error_view(st: dict[str, Any]) -> Any:
    from rich.text import Text

    return Text(f"{time.strftime('%H:%M:%S')} {st['error']}; retrying", style="bold red")


# ---- dst ctl ------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _parser(cmd: str, usage_help: str) -> _Parser:
    return _Parser(
        prog=f"dst ctl {cmd}",
        description=usage_help,
        formatter_class=argparse.HelpFormatter,
    )


def _verify_parser() -> _Parser:
    p = _parser(
        "verify",
        "Compare the mirror's in-sync legs online, region by region, showing progress; "
        "print a summary (exit 0 when they are identical, 1 when they differ or when fewer "
        "than two in-sync legs can be compared).",
    )
    p.add_argument(
        "--rate",
        default=None,
        metavar="RATE",
        help="read at most RATE per leg, e.g. 100M (default: unlimited; a verify still "
        "gives way to foreground I/O)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="resync the regions that differ from the first in-sync leg (the reference)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _member_parser(cmd: str) -> _Parser:
    what = {
        "detach": "Remove a leg from the mirror for good (its bitmap slot is freed).",
        "add": "Add a leg to the mirror (connected first); it is fully synced in the background.",
    }[cmd]
    p = _parser(cmd, what)
    p.add_argument("uri", nargs="*", metavar="URI", help="the member, e.g. dst://node2/default")
    if cmd == "add":
        p.add_argument(
            "--async",
            dest="asynchronous",
            action="store_true",
            help="add it as an asynchronous leg (written in the background, in order)",
        )
    else:
        p.set_defaults(asynchronous=False)
    return p


def _set_parser() -> _Parser:
    p = _parser("set", f"Change live settings: {', '.join(KNOBS)}.")
    p.add_argument("items", nargs="*", metavar="KEY=VALUE", help="e.g. resend-timeout=1.5")
    return p


def _checkpoint_parser() -> _Parser:
    p = _parser(
        "checkpoint",
        "Changed-block tracking for incremental backups: `add NAME` starts recording what "
        "is written, trimmed or zeroed from now on (NBD metadata context "
        "x-dst:changed:NAME), `list` shows the checkpoints and how much changed since "
        "each, `remove NAME` stops recording. Checkpoints live in the --bitmap file.",
    )
    p.add_argument("action", nargs="?", metavar="add|list|remove", help="what to do")
    p.add_argument("name", nargs="?", metavar="NAME", help="the checkpoint, e.g. backup-1")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    return p


def run_ctl(path: str | None, words: list[str]) -> int:
    if not words:
        raise UsageError(f"no ctl command given: use {CTL_COMMANDS} (see `dst ctl --help`)")
    cmd, rest = words[0], words[1:]
    if cmd == "set":
        pairs = _set_pairs(_set_parser().parse_args(rest).items)
        return _set(path or pick_node(), pairs)
    if cmd == "verify":
        a = _verify_parser().parse_args(rest)
        if a.rate is not None:
            _check(lambda: parse_knob("resync-rate", a.rate), "--rate")
        return run_verify(path or pick_node(), a.rate, a.repair, a.json)
    if cmd in ("detach", "add"):
        args = _member_parser(cmd).parse_args(rest)
        uris = args.uri
        extra = {"async": True} if cmd == "add" and args.asynchronous else {}
        if len(uris) != 1:
            raise UsageError(
                f"`dst ctl {cmd}` takes one member URI, e.g. dst://node2:10810/default"
                + (" (and --async for an asynchronous leg)" if cmd == "add" else "")
            )
        from dst.uri import parse_member

        parse_member(uris[0])
        result = request(path or pick_node(), cmd, timeout=None, uri=uris[0], **extra)
        print(_member_change(cmd, uris[0], result))
        return 0
    if cmd == "checkpoint":
        a = _checkpoint_parser().parse_args(rest)
        return run_checkpoint(path, a.action, a.name, a.json)
    raise UsageError(f"unknown ctl command {cmd!r}: use {CTL_COMMANDS}")


# ---- dst ctl checkpoint ----------------------------------------------------------------
CHECKPOINT_USAGE = (
    "`dst ctl checkpoint add NAME`, `dst ctl checkpoint list` or `dst ctl checkpoint remove NAME`"
)


def run_checkpoint(path: str | None, action: str | None, name: str | None, as_json: bool) -> int:
    """Checked here first (exit 2), then done by the node (exit 1 when it refuses)."""
    from dst.layers.checkpoints import check_name

    if action not in ("add", "list", "remove"):
        what = f"unknown checkpoint action {action!r}" if action else "no checkpoint action"
        raise UsageError(f"{what}: use {CHECKPOINT_USAGE}")
    if action == "list":
        if name is not None:
            raise UsageError(f"`dst ctl checkpoint list` takes no name (got {name!r})")
        r = request(path or pick_node(), "checkpoint", action="list")
        print(json.dumps(r, indent=2, sort_keys=True) if as_json else checkpoints_text(r))
        return 0
    if name is None:
        raise UsageError(f"`dst ctl checkpoint {action}` needs a NAME, e.g. backup-1")
    check_name(name)
    r = request(path or pick_node(), "checkpoint", timeout=None, action=action, name=name)
    if as_json:
        print(json.dumps(r, indent=2, sort_keys=True))
    elif action == "add":
        print(
            f"checkpoint {r.get('name', name)} added: what changes from now on is NBD "
            f"metadata context {r.get('context')}"
        )
    else:
        left = ", ".join(str(x) for x in r.get("checkpoints") or []) or "none"
        print(f"checkpoint {name} removed; checkpoints left: {left}")
    return 0


def checkpoints_text(r: dict[str, Any]) -> str:
    """The checkpoints as a table for people, oldest first."""
    from dst.control.render import clock

    items = r.get("checkpoints") or []
    if r.get("bitmap") is None:
        return "no checkpoints: this client node runs without --bitmap, which keeps them"
    if not items:
        return f"no checkpoints in {r['bitmap']}; add one with `dst ctl checkpoint add NAME`"
    rows = [("NAME", "CREATED", "CHANGED", "NBD CONTEXT")]
    for c in items:
        changed = c.get("changed_bytes")
        rows.append(
            (
                str(c.get("name")),
                clock(c.get("created")),
                format_bytes(changed) if isinstance(changed, int) else "-",
                str(c.get("context")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    ]
    lines.append(
        f"{len(items)} of {r.get('limit')} checkpoints in {r['bitmap']}, granularity "
        f"{format_bytes(r.get('granularity') or 0)}"
    )
    return "\n".join(lines)


def _member_change(cmd: str, uri: str, r: dict[str, Any]) -> str:
    legs = ", ".join(str(x) for x in r.get("members") or []) or "none"
    if cmd == "detach":
        return f"detached {r.get('detached', uri)}; the mirror's legs now: {legs}"
    size = r.get("resync_bytes")
    sync = f"; a full resync of {format_bytes(size)} follows" if isinstance(size, int) else ""
    how = " as an asynchronous leg" if r.get("mode") == "async" else ""
    return f"added {r.get('added', uri)}{how}{sync}; the mirror's legs now: {legs}"


def _check(fn: Any, what: str) -> Any:
    try:
        return fn()
    except RequestError as exc:
        raise UsageError(f"{what}: {exc}") from None


def _set_pairs(items: list[str]) -> list[tuple[str, str]]:
    if not items:
        raise UsageError(f"`dst ctl set` needs KEY=VALUE; live settings are: {', '.join(KNOBS)}")
    pairs: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise UsageError(f"`dst ctl set {item}`: write KEY=VALUE, e.g. resend-timeout=1.5")
        try:
            parse_knob(key, value)
        except RequestError as exc:
            raise UsageError(str(exc)) from None
        pairs.append((key, value))
    return pairs


def _set(path: str, pairs: list[tuple[str, str]]) -> int:
    with ControlClient(path) as client:
        for key, value in pairs:
            r = client.call("set", key=key, value=value)
            applied = ", ".join(str(x) for x in r.get("applied_to") or [])
            shown = r.get("value")
            if key == "resync-rate" and isinstance(shown, int):
                shown = f"{shown} ({format_rate(shown) if shown else 'unlimited'})"
            print(f"{key} = {shown} (applied to {applied})")
    return 0


# ---- dst ctl verify --------------------------------------------------------------------
def run_verify(path: str, rate: str | None, repair: bool, as_json: bool) -> int:
    """Run the verify on one connection while another follows its progress."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["report"] = request(path, "verify", timeout=None, rate=rate, repair=repair)
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=work, name="verify", daemon=True)
    worker.start()
    _follow(path, worker)
    worker.join()
    if "error" in box:
        raise box["error"]
    report: dict[str, Any] = box["report"]
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(verify_summary(report))
    return verify_code(report)


def _verify_progress(client: ControlClient) -> dict[str, Any] | None:
    try:
        v = (client.call("status").get("device") or {}).get("verify")
    except DstError:
        client.close()
        return None
    return v if isinstance(v, dict) else None


def _follow(path: str, worker: threading.Thread, every: float = 0.25) -> None:
    """A rich progress bar on a terminal's stderr; elsewhere a plain line every 5 s."""
    console = _console(stderr=True)
    with ControlClient(path, timeout=NODE_TIMEOUT) as client:
        if not console.is_terminal:
            last = time.monotonic()
            while worker.is_alive():
                worker.join(every)
                if worker.is_alive() and time.monotonic() - last >= 5.0:
                    last = time.monotonic()
                    p = _verify_progress(client)
                    if p is not None:
                        print(f"verify: {_progress_line(p)}", file=sys.stderr, flush=True)
            return
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        columns = (
            TextColumn("verify"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
        )
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("verify", total=None, detail="starting")
            while worker.is_alive():
                p = _verify_progress(client)
                if p is not None:
                    bar.update(
                        task,
                        total=p.get("bytes_total") or None,
                        completed=p.get("bytes_done") or 0,
                        detail=_progress_detail(p),
                    )
                worker.join(every)
            if bar.tasks[0].total:
                bar.update(task, completed=bar.tasks[0].total, detail="done")


def _progress_detail(p: dict[str, Any]) -> str:
    done, total = p.get("bytes_done") or 0, p.get("bytes_total") or 0
    text = f"{format_bytes(done)} of {format_bytes(total)}"
    if p.get("rate"):
        text += f", {format_rate(p['rate'])}"
    if isinstance(p.get("eta"), (int, float)):
        text += f", {format_duration(p['eta'])} left"
    return text


def _progress_line(p: dict[str, Any]) -> str:
    return f"{p.get('percent', 0):.1f}% ({_progress_detail(p)})"


def verify_code(report: dict[str, Any]) -> int:
    """0 only when at least two legs were compared, all of it, and nothing differs."""
    legs = report.get("legs") or []
    differ = (report.get("differing_bytes") or 0) > 0
    return 1 if len(legs) < 2 or differ or report.get("errors") else 0


def verify_summary(report: dict[str, Any]) -> str:
    """What a verify found, for people."""
    legs = [str(x) for x in report.get("legs") or []]
    if len(legs) < 2:
        which = f" ({legs[0]})" if legs else ""
        return (
            f"verify: nothing compared: the mirror has {len(legs)} in-sync leg{which}, and a "
            "verify needs two; wait for a resync to finish or add a leg"
        )
    seconds = report.get("seconds") or 0.0
    checked = report.get("bytes_checked") or 0
    speed = f", {format_rate(checked / seconds)}" if seconds > 0 else ""
    lines = [
        f"verify: compared {format_bytes(checked)} of {len(legs)} legs in "
        f"{format_duration(seconds)}{speed}",
        *(f"  leg {i}: {x}" for i, x in enumerate(legs, 1)),
    ]
    errors = [str(e) for e in report.get("errors") or []]
    differing = report.get("differing_bytes") or 0
    regions = report.get("regions") or []
    if differing:
        more = "+" if report.get("regions_truncated") else ""
        lines.append(
            f"the legs DIFFER: {format_bytes(differing)} in {len(regions)}{more} region(s); "
            f"reference: {report.get('reference')}"
        )
        for r in regions[:SHOWN_REGIONS]:
            lines.append(
                f"  at {format_bytes(r['offset'])} ({r['offset']}), {format_bytes(r['length'])}: "
                f"{', '.join(r.get('legs') or [])}"
            )
        if len(regions) > SHOWN_REGIONS or report.get("regions_truncated"):
            lines.append("  ... and more (see `dst ctl verify --json`)")
        marked = report.get("marked_for_resync") or []
        if report.get("repair"):
            lines.append(
                "repair: resyncing "
                + (", ".join(marked) if marked else "nothing (no leg could be marked)")
                + " from the reference"
            )
        else:
            lines.append("run `dst ctl verify --repair` to resync them from the reference leg")
    if errors:
        lines.append(f"{len(errors)} read error(s): the regions they hit were not compared")
        lines += [f"  {e}" for e in errors[:SHOWN_REGIONS]]
    if not differing and not errors:
        lines.append("the legs are identical")
    return "\n".join(lines)
