"""Option tables shared by argparse and the TOML config file.

Each subcommand's long options are declared once here; argparse is built from
the table and ``--config FILE`` is validated against the same table, so a file
accepts exactly the options the command line does, with the same types.  The
defaults live in the dataclasses of :mod:`dst.config`: an option that is given
neither on the command line nor in the file is None here and keeps its default there.
"""

from __future__ import annotations

import argparse
import difflib
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from dst.errors import ConfigError, UsageError
from dst.units import parse_duration, parse_rate, parse_size


@dataclass(frozen=True)
class Opt:
    name: str  # long option without dashes
    kind: str  # str | int | size | duration | rate | bool | list | debug
    help: str = ""
    metavar: str | None = None
    aliases: tuple[str, ...] = ()  # other names a config file may use

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


def _int(text: str, what: str) -> int:
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"invalid {what} {text!r}: give a whole number") from None
    if v < 0:
        raise UsageError(f"invalid {what} {text!r}: it must not be negative")
    return v


CONVERT: dict[str, Callable[[str, str], Any]] = {
    "str": lambda t, w: str(t),
    "int": _int,
    "size": parse_size,
    "duration": parse_duration,
    "rate": parse_rate,
}

KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "size": 'a size (a number of bytes, or a string like "64K")',
    "duration": "a number of seconds",
    "rate": 'a rate (a number of bytes per second, or a string like "100M")',
    "bool": "true or false",
    "list": "a list of strings",
    "debug": 'true, false or a string like "txn,proto"',
}


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one `dst: error:` line, exit 2) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}{suggestion(self, message)} (see `{self.prog} --help`)")


def _option_owners(p: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Every option name (without ``--``) of ``p`` and its commands -> the parsers' names."""
    out: dict[str, set[str]] = {}
    for action in p._actions:
        for s in action.option_strings:
            if s.startswith("--"):
                out.setdefault(s[2:], set()).add(p.prog)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for name, progs in _option_owners(sub).items():
                    out.setdefault(name, set()).update(progs)
    return out


def suggestion(p: argparse.ArgumentParser, message: str) -> str:
    """``; did you mean ...?`` for a misspelt command or option (or where an option of
    another command belongs), or nothing."""
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if m:
        choices = re.findall(r"'([^']*)'", m.group(2))
        close = difflib.get_close_matches(m.group(1), choices, 1, 0.75)
        return f"; did you mean '{close[0]}'?" if close else ""
    m = re.match(r"unrecognized arguments: (.*)", message)
    if m:
        owners = _option_owners(p)
        for token in m.group(1).split():
            if not token.startswith("--"):
                continue
            name = token[2:].split("=", 1)[0]
            if name in owners:  # right name, wrong command
                return f"; --{name} is an option of {', '.join(sorted(owners[name]))}"
            close = difflib.get_close_matches(name, sorted(owners), 1, 0.75)
            if close:
                return f"; did you mean --{close[0]}?"
    return ""


def add_options(p: argparse.ArgumentParser, opts: Sequence[Opt]) -> None:
    for o in opts:
        flag = f"--{o.name}"
        if o.kind == "bool":
            p.add_argument(
                flag, dest=o.dest, action="store_const", const=True, default=None, help=o.help
            )
        elif o.kind == "list":
            p.add_argument(
                flag,
                dest=o.dest,
                action="append",
                default=None,
                metavar=o.metavar or "VALUE",
                help=o.help,
            )
        elif o.kind == "debug":
            p.add_argument(
                flag, dest=o.dest, nargs="?", const=True, default=None, metavar="LIST", help=o.help
            )
        else:
            p.add_argument(
                flag, dest=o.dest, default=None, metavar=o.metavar or o.kind.upper(), help=o.help
            )


def load_config(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the --config path") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable; check its permissions") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _check_type(path: str, key: str, kind: str, value: Any) -> Any:
    bad = ConfigError(f"config file {path}: {key} must be {KIND_WORDS[kind]}, not {value!r}")
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if kind == "list":
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return value
    if kind == "debug":
        if not isinstance(value, (bool, str)):
            raise bad
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad
    if kind == "int" and not isinstance(value, int):
        raise bad
    if kind == "str" and not isinstance(value, str):
        raise bad
    try:
        CONVERT[kind](str(value), key)
    except UsageError as exc:
        raise ConfigError(f"config file {path}: {key}: {exc}") from None
    return str(value)


def merge(
    ns: argparse.Namespace,
    opts: Sequence[Opt],
    positional: str | None,
    positional_key: str | None,
) -> dict[str, Any]:
    """Command line over config file; converts every value to its type (None: not given)."""
    cfg: dict[str, Any] = {}
    path = getattr(ns, "config", None)
    if path:
        raw = load_config(path)
        known = {o.name: o for o in opts}
        known.update({a: o for o in opts for a in o.aliases})
        named: dict[str, str] = {}
        for key, value in raw.items():
            if positional_key is not None and key == positional_key:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"config file {path}: {key} must be a list of strings")
                cfg[positional_key] = value
                continue
            o = known.get(key)
            if o is None or o.name == "config":
                allowed = sorted([*known, *([positional_key] if positional_key else [])])
                allowed = [a for a in allowed if a != "config"]
                raise ConfigError(
                    f"config file {path}: unknown key {key!r}; allowed keys: {', '.join(allowed)}"
                )
            if o.name in named:
                raise ConfigError(
                    f"config file {path}: {named[o.name]} and {key} are the same option; "
                    "give one of them"
                )
            named[o.name] = key
            cfg[o.name] = _check_type(path, key, o.kind, value)
    out: dict[str, Any] = {}
    for o in opts:
        v = getattr(ns, o.dest, None)
        if v is None:
            v = cfg.get(o.name)
        if v is not None and o.kind in CONVERT:
            v = CONVERT[o.kind](str(v), f"--{o.name}")
        out[o.dest] = v
    if positional is not None:
        cli_pos = getattr(ns, positional, None) or []
        out[positional] = list(cli_pos) if cli_pos else list(cfg.get(positional_key or "", []))
    return out


def given(values: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The options among ``names`` that were given (the others keep their defaults)."""
    return {n: values[n] for n in names if values[n] is not None}


COMMON_NET = [
    Opt("key-file", "str", "shared 256-bit key file (see `dst keygen`)", "FILE"),
    Opt("cipher", "list", "channel cipher in order of preference (repeat)", "NAME"),
    Opt("checksum", "list", "payload checksum in order of preference (repeat)", "NAME"),
    Opt("crypto-workers", "int", "threads for checksums and ciphers on large buffers", "N"),
    Opt("control", "str", "unix socket for `dst status` and `dst ctl`", "SOCK"),
    Opt("metrics", "str", "serve Prometheus metrics on HOST:PORT", "HOST:PORT"),
    Opt("config", "str", "TOML file with any of these options", "FILE"),
    Opt("debug", "debug", "JSON trace lines: --debug or --debug=proto,txn,crypto,nbd,mirror"),
]

EXPORT_OPTS = [
    Opt("listen", "str", "address to listen on: HOST:PORT, [IPv6]:PORT or unix:PATH", "ADDR"),
    Opt("size", "size", "size of file exports that must be created", "SIZE"),
    Opt("read-only", "bool", "export read-only"),
    Opt("shared", "bool", "allow several read-write client ids at once"),
    Opt("keys", "str", "file of `CLIENT_ID HEXKEY` lines, one key per client", "FILE"),
    Opt("allow", "list", "client id allowed to attach (repeat)", "CLIENT_ID"),
    *COMMON_NET,
]

ATTACH_OPTS = [
    Opt("mirror", "bool", "RAID1 over the members"),
    Opt(
        "stripe",
        "size",
        "RAID0 over the members in chunks of CHUNK (a power of two, 4K or more)",
        "CHUNK",
    ),
    Opt("linear", "bool", "concatenate the members"),
    Opt("nbd", "str", "serve the device over NBD on ADDR (HOST:PORT or unix:PATH)", "ADDR"),
    Opt("fuse", "str", "mount DIR with one file DIR/disk", "DIR"),
    Opt("read-only", "bool", "serve a read-only device"),
    Opt("client-id", "str", "identity of this client node (default: the host name)", "ID"),
    Opt("resends", "int", "resends of an unacked transaction before it fails", "N"),
    Opt("resend-timeout", "duration", "seconds each attempt waits for its ack", "S"),
    Opt("ping-interval", "duration", "ping after this many idle seconds", "S"),
    Opt("ping-timeout", "duration", "declare the connection dead without a ping answer", "S"),
    Opt("connect-timeout", "duration", "give up connecting at start after S seconds", "S"),
    Opt("reconnect-min", "duration", "first reconnect delay", "S"),
    Opt("reconnect-max", "duration", "longest reconnect delay", "S"),
    Opt(
        "bitmap",
        "str",
        "persistent record: the mirror's dirty bitmap and the checkpoints (any layout)",
        "FILE",
    ),
    Opt("bitmap-granularity", "size", "bytes per bitmap bit", "SIZE"),
    Opt("resync-rate", "rate", "limit background resync (e.g. 100M)", "RATE"),
    Opt(
        "leg-timeout",
        "duration",
        "a mirror write waits at most S seconds for a leg that has not acked it, then "
        "degrades that leg",
        "S",
    ),
    Opt(
        "assume-clean",
        "bool",
        "with a new --bitmap, take the legs as identical and skip the first full sync",
    ),
    Opt(
        "async-leg",
        "list",
        "an asynchronous mirror leg: gets the writes in order in the background (repeat)",
        "MEMBER",
        aliases=("async-legs",),
    ),
    Opt(
        "async-max-lag",
        "size",
        "bytes an asynchronous leg may lag behind, and the memory for them (default 64M)",
        "SIZE",
    ),
    Opt(
        "async-on-congestion",
        "str",
        "at --async-max-lag: pull-ahead (default: record in the bitmap, resync later) or block",
        "POLICY",
    ),
    Opt(
        "takeover",
        "bool",
        "take the export over from a live session of the same client id (fences it)",
    ),
    *COMMON_NET,
]
