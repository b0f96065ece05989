"""The command line's contract: exit codes and one `dst: error:` line that says what to do."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.procs import Procs, dst_run, member_uri

pytestmark = pytest.mark.integration


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("dst: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "no command given"),
        (["export"], "no export given"),
        (["export", "--listen", "host:notaport", "memory:1M"], "port must be a number"),
        (["export", "--listen", "::1:5", "memory:1M"], "put IPv6 addresses in brackets"),
        (["export", "bogus:thing"], "bogus"),
        (["export", "memory:12Q"], "invalid"),
        (["export", "--cipher", "aes-256-gcm", "memory:1M"], "needs a key"),
        (["export", "--checksum", "md5", "memory:1M"], "unknown checksum 'md5'"),
        (["export", "--debug=nonsense", "memory:1M"], "unknown debug category nonsense"),
        (["export", "--frobnicate", "memory:1M"], "unrecognized arguments"),
        (["attach"], "no member given"),
        (
            ["attach", "dst://a/x", "dst://b/y", "--nbd", "unix:/tmp/x"],
            "need --mirror, --stripe CHUNK or --linear",
        ),
        (["attach", "dst://a/x"], "no front end"),
        (["attach", "http://a/x", "--nbd", "unix:/tmp/x"], "invalid member"),
        (["attach", "dst+unix:///x", "--nbd", "unix:/tmp/x"], "?socket=PATH"),
        (
            ["attach", "dst://a/x", "--nbd", "unix:/tmp/x", "--resend-timeout", "soon"],
            "invalid --resend-timeout",
        ),
    ],
)
def test_usage_errors_exit_2(args: list[str], needle: str) -> None:
    cp = dst_run(*args)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    assert needle in error_line(cp.stderr)


def test_new_file_without_size_exit_2(tmp_path: Path) -> None:
    cp = dst_run("export", "--listen", f"unix:{tmp_path}/s", f"file:{tmp_path}/new.img")
    assert cp.returncode == 2
    line = error_line(cp.stderr)
    assert "--size" in line and "new.img" in line
    assert not (tmp_path / "new.img").exists()


def test_existing_file_with_other_size_exit_2(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(bytes(4096))
    cp = dst_run("export", "--listen", f"unix:{tmp_path}/s", f"file:{img}", "--size", "1M")
    assert cp.returncode == 2
    assert "4096" in error_line(cp.stderr) or "size" in error_line(cp.stderr)
    assert img.stat().st_size == 4096


def test_port_in_use_exit_1(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cp = dst_run("export", "--listen", f"127.0.0.1:{port}", "memory:1M")
    assert cp.returncode == 1
    assert "address in use" in error_line(cp.stderr)


def test_live_unix_socket_in_use_and_stale_one_reused(procs: Procs, sockdir: Path) -> None:
    path = sockdir / "e.sock"
    procs.export("memory:1M", listen=f"unix:{path}")
    cp = dst_run("export", "--listen", f"unix:{path}", "memory:1M")
    assert cp.returncode == 1 and "in use" in error_line(cp.stderr)
    # a socket file left by a killed process is reused
    stale = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    p, _ = procs.export("memory:1M", listen=f"unix:{stale}")
    assert p.popen.poll() is None


def test_unreachable_member_exit_1_within_connect_timeout(sockdir: Path) -> None:
    cp = dst_run(
        "attach",
        f"dst+unix:///default?socket={sockdir}/nobody.sock",
        "--nbd",
        f"unix:{sockdir}/n.sock",
        "--connect-timeout",
        "1",
    )
    assert cp.returncode == 1
    line = error_line(cp.stderr)
    assert "cannot reach" in line and "--connect-timeout 1" in line


def test_config_file_errors_name_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "dst.toml"
    cfg.write_text('resend-timeout = "soon"\n')
    cp = dst_run("attach", "dst://h/x", "--nbd", "unix:/tmp/x", "--config", str(cfg))
    assert cp.returncode == 2
    line = error_line(cp.stderr)
    assert str(cfg) in line and "resend-timeout" in line
    cfg.write_text("colour = 3\n")
    cp = dst_run("attach", "dst://h/x", "--nbd", "unix:/tmp/x", "--config", str(cfg))
    assert cp.returncode == 2 and "unknown key 'colour'" in error_line(cp.stderr)
    cfg.write_text("resends = 2.5\n")
    cp = dst_run("attach", "dst://h/x", "--nbd", "unix:/tmp/x", "--config", str(cfg))
    assert cp.returncode == 2 and "resends must be an integer" in error_line(cp.stderr)
    cp = dst_run("attach", "--config", str(tmp_path / "missing.toml"))
    assert cp.returncode == 2 and "does not exist" in error_line(cp.stderr)


def test_config_file_supplies_members_and_options(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "c.img"
    _, addr = procs.export(f"file:{img}", "--size", "4M")
    cfg = sockdir / "attach.toml"
    cfg.write_text(
        f'members = ["{member_uri(addr)}"]\nnbd = "unix:{sockdir}/cfg-nbd.sock"\n'
        'resend-timeout = 1.5\nclient-id = "from-config"\n'
    )
    p = procs.dst("attach", "--config", str(cfg))
    p.wait_for(r"serving NBD on")
    assert (sockdir / "cfg-nbd.sock").exists()


def test_clean_stop_on_sigterm_removes_sockets(procs: Procs, sockdir: Path) -> None:
    img = sockdir / "d.img"
    e, addr = procs.export(f"file:{img}", "--size", "4M")
    a, _ = procs.attach(member_uri(addr), nbd=f"unix:{sockdir}/n.sock")
    assert a.stop() == 0
    assert not (sockdir / "n.sock").exists()
    assert e.stop() == 0
    assert not Path(addr[5:]).exists()
