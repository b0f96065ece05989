"""`dst status` and `dst ctl`: talk to a running node over its control socket.

Exit codes are for monitoring: `dst status` exits 0 when every member is
`connected`, 1 when one is not or the socket does not answer; both commands
exit 2 for a wrong command line, checked before the node is contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from dst.control.client import ControlClient, request
from dst.control.handlers import KNOBS, parse_knob, unhealthy
from dst.control.server import RequestError
from dst.errors import DstError, UsageError

CTL_COMMANDS = "set KEY=VALUE, verify [--rate RATE] [--repair], detach URI or add [--async] URI"


def run_control(ns: argparse.Namespace) -> int:
    try:
        if ns.command == "status":
            return run_status(ns.control, bool(ns.json), ns.watch)
        return run_ctl(ns.control, list(ns.words))
    except BrokenPipeError:  # `dst status | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# ---- dst status -------------------------------------------------------------------------
def run_status(path: str, as_json: bool, watch: float | None) -> int:
    if watch is not None and not watch > 0:
        raise UsageError(f"--watch {watch:g}: give seconds greater than 0, e.g. --watch=2")
    if watch is None:
        st = request(path, "status")
        show(st, as_json)
        return 1 if unhealthy(st) else 0
    return _watch(path, as_json, watch)


def show(st: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return
    from dst.control.render import render

    _console().print(render(st))


def _console() -> Any:
    """A terminal's own width; a pipe or file gets wide lines rather than folded cells."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def _watch(path: str, as_json: bool, every: float) -> int:
    """Refresh until Ctrl-C; a node that stops answering is shown, not fatal."""
    code = 1
    client = ControlClient(path)
    try:
        if as_json:
            while True:
                st, code = _poll(client)
                print(json.dumps(st, sort_keys=True), flush=True)
                time.sleep(every)
        from rich.live import Live

        from dst.control.render import render

        with Live(console=_console(), auto_refresh=False, screen=False) as live:
            while True:
                st, code = _poll(client)
                live.update(render(st) if "error" not in st else _error_view(st), refresh=True)
                time.sleep(every)
    except KeyboardInterrupt:
        return code
    finally:
        client.close()


def _poll(client: ControlClient) -> tuple[dict[str, Any], int]:
    try:
        st = client.call("status")
    except DstError as exc:
        client.close()
        return {"error": str(exc), "time": time.time()}, 1
    return st, 1 if unhealthy(st) else 0


def _error_view(st: dict[str, Any]) -> Any:
    from rich.text import Text

    return Text(f"{time.strftime('%H:%M:%S')} {st['error']}; retrying", style="bold red")


# ---- dst ctl ------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def run_ctl(path: str, words: list[str]) -> int:
    if not words:
        raise UsageError(f"no ctl command given: use {CTL_COMMANDS}")
    cmd, rest = words[0], words[1:]
    if cmd == "set":
        return _set(path, rest)
    if cmd == "verify":
        p = _Parser(prog="dst ctl verify", add_help=False)
        p.add_argument("--rate", default=None)
        p.add_argument("--repair", action="store_true")
        a = p.parse_args(rest)
        if a.rate is not None:
            _check(lambda: parse_knob("resync-rate", a.rate), "--rate")
        result = request(path, "verify", timeout=None, rate=a.rate, repair=a.repair)
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    if cmd in ("detach", "add"):
        extra = {"async": True} if cmd == "add" and "--async" in rest else {}
        if extra:
            rest = [w for w in rest if w != "--async"]
        if len(rest) != 1:
            raise UsageError(
                f"`dst ctl {cmd}` takes one member URI, e.g. dst://node2:10810/default"
                + (" (and --async for an asynchronous leg)" if cmd == "add" else "")
            )
        from dst.uri import parse_member

        parse_member(rest[0])
        result = request(path, cmd, timeout=None, uri=rest[0], **extra)
        print(f"{cmd}: {rest[0]}" + (f": {json.dumps(result, sort_keys=True)}" if result else ""))
        return 0
    raise UsageError(f"unknown ctl command {cmd!r}: use {CTL_COMMANDS}")


def _check(fn: Any, what: str) -> Any:
    try:
        return fn()
    except RequestError as exc:
        raise UsageError(f"{what}: {exc}") from None


def _set(path: str, items: list[str]) -> int:
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
    with ControlClient(path) as client:
        for key, value in pairs:
            r = client.call("set", key=key, value=value)
            applied = r.get("applied_to") or []
            print(f"{key} = {r.get('value')} (applied to {', '.join(applied)})", file=sys.stdout)
    return 0
