"""`--config FILE`: exact messages for wrong files, and the same running state as the command line."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dst.cli.main import build_parser
from dst.cli.options import ATTACH_OPTS, EXPORT_OPTS, merge
from tests.integration.test_control import error_line, status
from tests.procs import Proc, Procs, dst_run, member_uri, run

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
ATTACH_KEYS = (
    "assume-clean, async-leg, async-legs, async-max-lag, async-on-congestion, bitmap, "
    "bitmap-granularity, checksum, cipher, client-id, connect-timeout, "
    "control, crypto-workers, debug, fuse, key-file, leg-timeout, linear, members, metrics, "
    "mirror, nbd, ping-interval, ping-timeout, read-only, reconnect-max, reconnect-min, "
    "resend-timeout, resends, resync-rate, stripe, takeover"
)
SIZE = 'a size (a number of bytes, or a string like "64K")'


@pytest.mark.parametrize(
    ("command", "toml", "message"),
    [
        ("attach", 'resends = "many"', "resends must be an integer, not 'many'"),
        ("attach", "resends = 2.5", "resends must be an integer, not 2.5"),
        ("attach", "resends = -1", "resends: invalid resends '-1': it must not be negative"),
        (
            "attach",
            'resend-timeout = "soon"',
            "resend-timeout: invalid resend-timeout 'soon': give seconds, e.g. 5 or 0.5",
        ),
        ("attach", "resend-timeout = true", "resend-timeout must be a number of seconds, not True"),
        ("attach", 'mirror = "yes"', "mirror must be true or false, not 'yes'"),
        ("attach", "cipher = 5", "cipher must be a list of strings, not 5"),
        ("attach", "checksum = [1, 2]", "checksum must be a list of strings, not [1, 2]"),
        ("attach", "nbd = 1", "nbd must be a string, not 1"),
        ("attach", "stripe = true", f"stripe must be {SIZE}, not True"),
        (
            "attach",
            'stripe = "12Q"',
            "stripe: invalid stripe '12Q': use a number with an optional K, M, G or T suffix, "
            "e.g. 64K",
        ),
        (
            "attach",
            "resync-rate = [1]",
            'resync-rate must be a rate (a number of bytes per second, or a string like "100M"), '
            "not [1]",
        ),
        ("attach", "debug = 3", 'debug must be true, false or a string like "txn,proto", not 3'),
        ("attach", 'members = "dst://a/b"', "members must be a list of strings"),
        ("attach", "frobnicate = 1", f"unknown key 'frobnicate'; allowed keys: {ATTACH_KEYS}"),
        ("attach", "[attach]\nresends = 1", f"unknown key 'attach'; allowed keys: {ATTACH_KEYS}"),
        ("attach", 'config = "other.toml"', f"unknown key 'config'; allowed keys: {ATTACH_KEYS}"),
        (
            "export",
            'size = "lots"',
            "size: invalid size 'lots': use a number with an optional "
            "K, M, G or T suffix, e.g. 64K",
        ),
        ("export", "read-only = 1", "read-only must be true or false, not 1"),
        ("export", 'allow = [["a"]]', "allow must be a list of strings, not [['a']]"),
        ("export", "exports = [1]", "exports must be a list of strings"),
        ("export", 'crypto-workers = "4"', "crypto-workers must be an integer, not '4'"),
    ],
)
def test_wrong_values_give_exact_messages(
    tmp_path: Path, command: str, toml: str, message: str
) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(toml + "\n")
    cp = dst_run(command, "--config", str(cfg))
    assert cp.returncode == 2, cp.stderr
    assert error_line(cp.stderr) == f"dst: error: config file {cfg}: {message}"


def test_unreadable_files_give_exact_messages(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    cp = dst_run("attach", "--config", str(missing))
    assert cp.returncode == 2
    assert error_line(cp.stderr) == (
        f"dst: error: config file {missing} does not exist; check the --config path"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("resends = [\n")
    cp = dst_run("export", "--config", str(bad))
    assert cp.returncode == 2
    assert error_line(cp.stderr).startswith(f"dst: error: config file {bad} is not valid TOML: ")


@pytest.mark.parametrize(
    ("command", "toml", "key"),
    [
        ("attach", 'nbd = "unix:/tmp/n.sock"', "members"),
        ("attach", 'members = ["dst://a/b"]', "nbd"),
        ("export", 'listen = "unix:/tmp/e.sock"', "exports"),
    ],
)
def test_missing_required_values_name_the_file_and_key(
    tmp_path: Path, command: str, toml: str, key: str
) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(toml + "\n")
    cp = dst_run(command, "--config", str(cfg))
    assert cp.returncode == 2
    line = error_line(cp.stderr)
    assert str(cfg) in line and key in line, line


def test_missing_required_values_today(tmp_path: Path) -> None:
    """The messages as they are; the xfail above says what they should add."""
    cfg = tmp_path / "node.toml"
    cfg.write_text('nbd = "unix:/tmp/n.sock"\n')
    cp = dst_run("attach", "--config", str(cfg))
    assert cp.returncode == 2 and "no member given" in error_line(cp.stderr)
    cfg.write_text('members = ["dst://a/b"]\n')
    cp = dst_run("attach", "--config", str(cfg))
    assert cp.returncode == 2 and "no front end" in error_line(cp.stderr)
    cfg.write_text('listen = "unix:/tmp/e.sock"\n')
    cp = dst_run("export", "--config", str(cfg))
    assert cp.returncode == 2 and "no export given" in error_line(cp.stderr)


# ---- the same running state from a file and from the command line ---------------------
def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v) + '"'


def as_args(options: dict[str, Any]) -> list[str]:
    """The command line that says what ``options`` (a config file's table) says."""
    out: list[str] = []
    for k, v in options.items():
        if v is True:
            out.append(f"--{k}")
        elif isinstance(v, list):
            for x in v:
                out += [f"--{k}", str(x)]
        else:
            out += [f"--{k}", str(v)]
    return out


def write_toml(path: Path, positional: str, items: list[str], options: dict[str, Any]) -> None:
    lines = [f"{positional} = {toml_value(items)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in options.items()]
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())  # the test's own file must be valid TOML


def running_state(st: dict[str, Any]) -> dict[str, Any]:
    """What a node runs with, without counters and times."""
    keep = ("uri", "state", "cipher", "checksum", "identity", "size", "generation")
    return {
        "role": st["role"],
        "settings": st["settings"],
        "device": st.get("device"),
        "members": [{k: m.get(k) for k in keep} for m in st.get("members", [])],
        "exports": [
            {k: e[k] for k in ("name", "backend", "size", "identity", "read_only", "shared")}
            for e in st.get("exports", [])
        ],
        "address": st.get("address"),
    }


def start(procs: Procs, *args: str, ready: str) -> Proc:
    p = procs.dst(*args)
    p.wait_for(ready)
    return p


def test_config_file_and_command_line_give_the_same_running_state(
    procs: Procs, sockdir: Path
) -> None:
    ectl, actl = sockdir / "e.ctl", sockdir / "a.ctl"
    exports = [f"a=file:{sockdir}/a.img", f"b=file:{sockdir}/b.img"]
    export_opts: dict[str, Any] = {
        "listen": f"unix:{sockdir}/e.sock",
        "size": "8M",
        "shared": True,
        "allow": ["eq-client", "other"],
        "checksum": ["xxh3", "crc32c"],
        "control": str(ectl),
    }
    members = [member_uri(f"unix:{sockdir}/e.sock", "a")]
    attach_opts: dict[str, Any] = {
        "nbd": f"unix:{sockdir}/n.sock",
        "control": str(actl),
        "client-id": "eq-client",
        "resends": 4,
        "resend-timeout": 2.5,
        "ping-interval": 3,
        "ping-timeout": 1.5,
        "connect-timeout": 5,
        "reconnect-min": 0.2,
        "reconnect-max": 2,
        "checksum": ["xxh3"],
        "cipher": ["none"],
        "read-only": True,
        "leg-timeout": 7,
        "takeover": True,
    }
    states = []
    for use_file in (False, True):
        if use_file:
            ecfg, acfg = sockdir / "export.toml", sockdir / "attach.toml"
            write_toml(ecfg, "exports", exports, export_opts)
            write_toml(acfg, "members", members, attach_opts)
            eargs, aargs = ["--config", str(ecfg)], ["--config", str(acfg)]
        else:
            eargs = [*exports, *as_args(export_opts)]
            aargs = [*members, *as_args(attach_opts)]
        exp = start(procs, "export", *eargs, ready=r"listening on ")
        att = start(procs, "attach", *aargs, ready=r"serving NBD on ")
        states.append((running_state(status(ectl)), running_state(status(actl))))
        assert att.stop() == 0 and exp.stop() == 0
    (e1, a1), (e2, a2) = states
    assert e1 == e2 and a1 == a2
    assert a1["settings"]["resend_timeout"] == 2.5 and a1["device"]["read_only"] is True
    assert a1["settings"]["leg_timeout"] == 7 and a1["settings"]["takeover"] is True
    assert a1["members"][0]["checksum"] == "xxh3" and a1["members"][0]["state"] == "connected"
    assert e1["settings"]["allow"] == ["eq-client", "other"]
    assert [x["name"] for x in e1["exports"]] == ["a", "b"]


def test_command_line_wins_over_the_file(procs: Procs, sockdir: Path) -> None:
    actl = sockdir / "a.ctl"
    _, addr = procs.export(f"x=file:{sockdir}/x.img", f"y=file:{sockdir}/y.img", "--size", "8M")
    cfg = sockdir / "attach.toml"
    write_toml(
        cfg,
        "members",
        [member_uri(addr, "x")],
        {"resend-timeout": 9, "resends": 3, "control": str(actl), "client-id": "from-file"},
    )
    procs.attach(member_uri(addr, "y"), "--config", str(cfg), "--resend-timeout", "2")
    st = status(actl)
    assert st["settings"]["resend_timeout"] == 2.0  # the command line's
    assert st["settings"]["resends"] == 3  # the file's, not the default 10
    assert st["settings"]["client_id"] == "from-file"
    assert [m["uri"] for m in st["members"]] == [member_uri(addr, "y")]  # replaced, not added


def _doc_configs() -> list[tuple[str, str]]:
    text = DOCS.read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    out = []
    for b in blocks:
        m = re.match(r"# .*?(export|attach)", b)
        assert m, f"a toml block in {DOCS.name} does not say which command it is for:\n{b}"
        out.append((m.group(1), b))
    return out


def test_documented_config_files_are_valid(tmp_path: Path) -> None:
    configs = _doc_configs()
    kinds = [k for k, _ in configs]
    assert kinds.count("export") >= 2 and kinds.count("attach") >= 1, kinds
    for i, (command, body) in enumerate(configs):
        path = tmp_path / f"doc{i}.toml"
        path.write_text(body)
        ns: argparse.Namespace = build_parser().parse_args([command, "--config", str(path)])
        if command == "export":
            o = merge(ns, EXPORT_OPTS, "exports", "exports")
            assert o["exports"], body
        else:
            o = merge(ns, ATTACH_OPTS, "members", "members")
            assert o["members"], body
    assert any(
        "mirror = true" in body and body.count("dst://") >= 2
        for command, body in configs
        if command == "attach"
    ), "the docs show a two-node mirror"


README = DOCS.parents[1] / "README.md"
STANDARD_DIRS = ("/etc", "/run", "/tmp", "/dev", "/srv", "/var/lib")


def _toml_blocks_with_what_follows(path: Path) -> list[tuple[str, str]]:
    """Each TOML block of a document and the text after it, up to the next heading."""
    text = path.read_text()
    out = []
    for m in re.finditer(r"```toml\n(.*?)```", text, re.S):
        rest = text[m.end() :]
        heading = re.search(r"^#", rest, re.M)
        out.append((m.group(1), rest[: heading.start()] if heading else rest))
    return out


@pytest.mark.parametrize("doc", [README, DOCS], ids=["README", "operations"])
def test_documented_paths_exist_or_are_created(doc: Path) -> None:
    """A path a documented config file names is in a standard directory, or the document
    says to create its directory (`mkdir -p`)."""
    text = doc.read_text()
    commands = re.findall(r"`mkdir -p ([^`]+)`", text)  # in the text, maybe over two lines
    commands += re.findall(r"^mkdir -p ([^#\n]+)", text, re.M)  # in a shell block
    made = {d for cmd in commands for d in cmd.split()}
    blocks = _toml_blocks_with_what_follows(doc)
    assert blocks
    for body, _ in blocks:
        for value in re.findall(r'"(?:unix:)?(/[^"?]+)"', body):
            directory = os.path.dirname(value)
            assert directory in STANDARD_DIRS or directory in made, (
                f"{doc.name}: {value} is in {directory}, which a fresh machine lacks and the "
                "document does not create"
            )


@pytest.mark.parametrize("doc", [README, DOCS], ids=["README", "operations"])
def test_documented_control_sockets_are_in_the_config(doc: Path) -> None:
    """The text after an attach config that talks to `--control PATH` finds PATH in it."""
    for body, after in _toml_blocks_with_what_follows(doc):
        if not body.lstrip().startswith("#") or "attach" not in body.splitlines()[0]:
            continue
        for path in re.findall(r"--control (/[^\s`]+)", after):
            assert f'control = "{path}"' in body, f"{doc.name}: {path} is not in\n{body}"


def test_readme_config_file_is_valid(tmp_path: Path) -> None:
    (body, _) = _toml_blocks_with_what_follows(README)[0]
    path = tmp_path / "readme.toml"
    path.write_text(body)
    ns = build_parser().parse_args(["attach", "--config", str(path)])
    o = merge(ns, ATTACH_OPTS, "members", "members")
    assert o["mirror"] is True and len(o["members"]) == 2


def test_readme_python_example_runs(procs: Procs, sockdir: Path) -> None:
    """The README's Python snippet, run as it is against a real export node (both URIs
    pointed at it), sync and asyncio parts."""
    _, addr = procs.export(f"file:{sockdir / 'py.img'}", "--size", "4M")
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert code, "README has no Python API example"
    text = code.group(1)
    assert "asyncio.run(main())" in text
    text = text.replace('"dst://node1:10810/default"', repr(member_uri(addr)))
    text = text.replace('"dst+unix:///default?socket=/run/dst-export.sock"', repr(member_uri(addr)))
    assert "node1" not in text and "/run/" not in text
    script = sockdir / "readme_example.py"
    script.write_text(text)
    cp = run([sys.executable, str(script)], check=False, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == str(4 << 20)  # print(dev.size); its asserts held
    # the asyncio part ran: it trimmed (and zeroed) what the sync part wrote
    assert (sockdir / "py.img").read_bytes()[: 2 << 20] == bytes(2 << 20)
