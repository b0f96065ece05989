"""contrib/systemd: the units verify, their command lines parse, and dst tells systemd it is ready."""

from __future__ import annotations

import configparser
import shlex
import shutil
import socket
import sys
from pathlib import Path

import pytest

from dst.cli.main import build_parser
from tests.procs import Procs, member_uri, run

pytestmark = pytest.mark.integration

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
NAMES = ("dst-export@.service", "dst-attach@.service")


def unit(name: str) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNITS / name)
    return cp


@pytest.mark.parametrize("name", NAMES)
def test_unit_policy(name: str) -> None:
    s = unit(name)["Service"]
    assert s["Type"] == "notify"
    assert s["Restart"] == "on-failure" and s["RestartPreventExitStatus"] == "2"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "SystemCallFilter": "@system-service",
        "User": "dst",
    }.items():
        assert s[key] == value, (name, key)


@pytest.mark.parametrize("name", NAMES)
def test_unit_command_line_parses(name: str) -> None:
    argv = shlex.split(unit(name)["Service"]["ExecStart"].replace("%i", "vm1"))
    assert argv[0] == "/usr/local/bin/dst"
    ns = build_parser().parse_args(argv[1:])
    assert ns.command == name.split("-")[1].split("@")[0]
    assert ns.config == f"/etc/dst/{ns.command}-vm1.toml"
    runtime = unit(name)["Service"]["RuntimeDirectory"].replace("%i", "vm1")
    assert ns.control == f"/run/{runtime}/control.sock"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed; install it with: apt-get install systemd")
    dst = Path(sys.executable).with_name("dst")
    assert dst.exists(), f"{dst}: the dst entry point of this environment"
    paths = []
    for name in NAMES:  # verify checks ExecStart exists: point it at this environment's dst
        text = (UNITS / name).read_text().replace("/usr/local/bin/dst", str(dst))
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    cp = run([exe, "verify", "--man=no", *paths], check=False, timeout=60)
    assert cp.returncode == 0 and cp.stdout + cp.stderr == "", cp.stdout + cp.stderr
    # and the check is real: a misspelt key in the same unit is reported
    bad = tmp_path / "dst-bad@.service"
    bad.write_text(Path(paths[0]).read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    cp = run([exe, "verify", "--man=no", str(bad)], check=False, timeout=60)
    assert "Unknown key 'NoNewPrivilege'" in cp.stdout + cp.stderr


def notify_socket(tmp: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp / "notify.sock"))
    s.settimeout(20)
    return s


def test_ready_and_stopping_are_sent_to_the_service_manager(procs: Procs, sockdir: Path) -> None:
    with notify_socket(sockdir) as ns:
        env = {"NOTIFY_SOCKET": str(sockdir / "notify.sock")}
        exp = procs.dst("export", "--listen", f"unix:{sockdir}/e.sock", "memory:1M", env=env)
        msg = ns.recv(4096).decode()
        assert "READY=1" in msg and f"STATUS=listening on unix:{sockdir}/e.sock" in msg
        assert "listening on" in exp.output  # ready only once it really listens
        att = procs.dst(
            "attach",
            member_uri(f"unix:{sockdir}/e.sock"),
            "--nbd",
            f"unix:{sockdir}/n.sock",
            env=env,
        )
        msg = ns.recv(4096).decode()
        assert "READY=1" in msg and "serving NBD on" in att.output
        assert att.stop() == 0
        assert ns.recv(4096) == b"STOPPING=1"
        assert exp.stop() == 0
        assert ns.recv(4096) == b"STOPPING=1"
