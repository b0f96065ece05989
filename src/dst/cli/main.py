"""`dst` entry point: parse, dispatch, and turn every error into one `dst: error:` line."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from dst import trace
from dst.cli.helptext import documented
from dst.cli.options import ATTACH_OPTS, EXPORT_OPTS, Parser, add_options
from dst.control.runtime import runtime_dir
from dst.errors import DstError, UsageError

log = logging.getLogger("dst")

CTL_EPILOG = """\
commands:
  set KEY=VALUE ...        change live settings: resends, resend-timeout, ping-interval,
                           ping-timeout, resync-rate
  verify [--rate RATE] [--repair] [--json]
                           compare the mirror's legs online, with progress; exit 1 when
                           they differ or fewer than two in-sync legs can be compared
  detach URI               remove a leg from the mirror
  add URI                  add a leg to the mirror; it is fully synced in the background
  checkpoint add NAME      track what is written from now on (NBD context
                           x-dst:changed:NAME), kept in the --bitmap file
  checkpoint list [--json] the checkpoints, when added, how much changed since
  checkpoint remove NAME   stop tracking NAME

`dst ctl COMMAND --help` describes one command."""


class _Version(argparse.Action):
    """``--version``: the release, and whether the request path runs compiled (it is
    read only when asked: it imports those modules)."""

    def __call__(self, parser: argparse.ArgumentParser, *_args: object, **_kw: object) -> None:
        from dst import __version__, compiled

        print(f"dst {__version__} ({compiled.summary()})")
        parser.exit()


def build_parser() -> Parser:
    p = Parser(prog="dst", description="DST: distributed network block storage.")
    p.add_argument(
        "--version", action=_Version, nargs=0, help="show the version and whether it is compiled"
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    e = sub.add_parser(
        "export", help="run an export node", description="Serve storage over the DST node protocol."
    )
    e.add_argument(
        "exports",
        nargs="*",
        metavar="[NAME=]BACKEND",
        help="file:PATH, disk:/dev/X, memory:SIZE, null:SIZE or rbd:POOL/IMAGE; NAME defaults to 'default'",
    )
    add_options(e, documented(EXPORT_OPTS, "export"))

    a = sub.add_parser(
        "attach",
        help="run a client node",
        description="Assemble members into one device and serve it.",
    )
    a.add_argument(
        "members",
        nargs="*",
        metavar="MEMBER",
        help="dst://HOST[:PORT][/NAME], dst+unix:///NAME?socket=PATH or an NBD URI",
    )
    add_options(a, documented(ATTACH_OPTS, "attach"))

    d = sub.add_parser(
        "demo",
        help="run a self-contained demo (export nodes + client node)",
        description="Two export nodes on temporary files, a client node mirroring them, "
        "served over NBD; writes and verifies data, takes a leg away and back, then runs "
        "until Ctrl-C.",
    )
    d.add_argument("--check", action="store_true", help="run the self-check, then exit 0/1")
    d.add_argument("--size", default="64M", help="size of the demo device (default: 64M)")
    d.add_argument(
        "--debug",
        nargs="?",
        const=True,
        default=None,
        metavar="LIST",
        help="log everything and print JSON trace lines: --debug or "
        "--debug=proto,txn,crypto,nbd,mirror (default: quiet)",
    )

    k = sub.add_parser(
        "keygen",
        help="write a new random key file",
        description="Write a new random 256-bit key as 64 hex characters, mode 0600.",
    )
    k.add_argument("file", metavar="FILE", help="where to write the key")
    k.add_argument(
        "--force", action="store_true", help="overwrite an existing file (default: refuse)"
    )

    where = runtime_dir()
    s = sub.add_parser(
        "status",
        help="show the state of running nodes",
        description="Show a running node's state; without --control, every node whose "
        f"control socket is in {where}. Exit 0 when every member is connected and "
        "answers in time, 1 otherwise or when no node answers.",
    )
    s.add_argument(
        "--control",
        default=None,
        metavar="SOCK",
        help=f"the node's control socket (default: every node in {where})",
    )
    s.add_argument("--json", action="store_true", help="print the status document as JSON")
    s.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=float,
        default=None,
        metavar="S",
        help="refresh every S seconds until Ctrl-C (default: 2 when S is not given); "
        "into a pipe, one snapshot per interval",
    )

    c = sub.add_parser(
        "ctl",
        help="change a running node",
        description="Change a running client node through its control socket.",
        epilog=CTL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument(
        "--control",
        default=None,
        metavar="SOCK",
        help=f"the node's control socket (default: the one client node in {where})",
    )
    c.add_argument(
        "words", nargs=argparse.REMAINDER, metavar="COMMAND ...", help="one of the commands below"
    )

    b = sub.add_parser("bench", help="benchmark dst side by side with nbdkit and qemu-nbd")
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _setup_logging(debug: object, quiet: bool = False) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        trace.enable(trace.parse_categories(debug if debug is not None else None))  # type: ignore[arg-type]
    except ValueError as exc:
        raise UsageError(f"--debug: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = any(a == "--debug" or a.startswith("--debug=") for a in args)
    try:
        return _main(args)
    except DstError as exc:
        if debug and not isinstance(exc, UsageError):
            traceback.print_exc()
        print(f"dst: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # a bug: still one line, unless debugging
        if debug:
            traceback.print_exc()
        print(
            f"dst: error: internal error: {type(exc).__name__}: {exc}; rerun with --debug for "
            "the traceback and report it",
            file=sys.stderr,
        )
        return 1


def _main(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        # the benchmark parses its own options (argparse's REMAINDER would drop leading ones)
        from dst.cli.bench_cmd import run_bench

        return run_bench(argv[1:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help(sys.stderr)
        raise UsageError("no command given: use export, attach, demo, status, ctl, keygen or bench")
    if ns.command == "export":
        from dst.cli.export_cmd import run_export

        _setup_logging(_debug_of(ns))
        return run_export(ns)
    if ns.command == "attach":
        from dst.cli.attach_cmd import run_attach

        _setup_logging(_debug_of(ns))
        return run_attach(ns)
    if ns.command == "demo":
        from dst.cli.demo_cmd import run_demo

        _setup_logging(ns.debug, quiet=True)
        return run_demo(ns)
    if ns.command == "keygen":
        from dst.crypto.keys import generate_key_file

        generate_key_file(ns.file, force=ns.force)
        print(
            f"wrote a new 256-bit key to {ns.file} (mode 0600); copy it to both nodes",
            file=sys.stderr,
        )
        return 0
    if ns.command == "bench":
        from dst.cli.bench_cmd import run_bench

        return run_bench(ns.args)
    if ns.command in ("status", "ctl"):
        from dst.cli.control_cmd import run_control

        return run_control(ns)
    raise UsageError(f"unknown command {ns.command!r}")


def _debug_of(ns: argparse.Namespace) -> object:
    """The --debug value from the command line or, failing that, the config file."""
    if ns.debug is not None:
        return ns.debug
    if getattr(ns, "config", None):
        from dst.cli.options import load_config

        v = load_config(ns.config).get("debug")
        if isinstance(v, (bool, str)):
            return v or None
    return None
