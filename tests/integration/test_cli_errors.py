"""The command line's contract: exit codes and one `dst: error:` line that says what to do."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Procs, dst_run, member_uri, procs_for

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
        (["export", "--frobnicate", "memory:1M"], "unrecognized arguments: --frobnicate (see"),
        (["atach", "dst://a/x"], "invalid choice: 'atach'"),
        (["atach", "dst://a/x"], "did you mean 'attach'?"),
        (["attach", "dst://a/x", "--mirorr", "--nbd", "unix:/tmp/x"], "did you mean --mirror?"),
        (["export", "--chcksum=none", "memory:1M"], "did you mean --checksum?"),
        (["export", "--mirror", "memory:1M"], "--mirror is an option of dst attach"),
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
    assert "stopped serving" not in cp.stderr  # the NBD server never started
    assert not (sockdir / "n.sock").exists()  # and the socket it had bound is gone


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


# ---- the whole command line is checked before any member is contacted ----------------
class Node:
    """One export node (exports `default` and `b`) shared by the checks below."""

    def __init__(self, procs: Procs, tmp: Path) -> None:
        self.tmp = tmp
        self.control = tmp / "e.ctl"
        self.proc, self.addr = procs.export(
            f"file:{tmp / 'a.img'}",
            f"b=file:{tmp / 'b.img'}",
            "--size",
            "8M",
            "--control",
            str(self.control),
        )

    def uri(self, name: str = "default") -> str:
        return member_uri(self.addr, name)

    def saw_client(self, client_id: str) -> bool:
        """Did this client reach the export node: a session in its log or its status?"""
        if f"client {client_id!r}" in self.proc.output:
            return True
        cp = dst_run("status", "--control", str(self.control), "--json", timeout=20)
        return any(s.get("client_id") == client_id for s in json.loads(cp.stdout)["sessions"])


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    tmp = Path(tempfile.mkdtemp(prefix="dst-cf-", dir="/tmp"))
    with procs_for(tmp) as ps:
        yield Node(ps, tmp)
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def busy_tcp_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def attach_refused(node: Node, case: str, *args: str, two: bool = False) -> tuple[int, str]:
    """Run a `dst attach` that must fail before contacting the node; returns (code, line)."""
    client = f"check-first-{case}"
    members = [node.uri(), node.uri("b")] if two else [node.uri()]
    cp = dst_run("attach", *members, "--client-id", client, "--connect-timeout", "5", *args)
    line = error_line(cp.stderr)
    assert "stopped serving" not in cp.stderr, cp.stderr  # nothing was ever served
    assert not node.saw_client(client), f"{case}: the export node saw {client}:\n{cp.stderr}"
    return cp.returncode, line


@pytest.mark.parametrize(
    ("case", "args", "needle"),
    [
        (
            "bare-path",
            ["--nbd", "/tmp/x.sock"],
            "a unix socket needs the unix: prefix, e.g. unix:/tmp/x.sock",
        ),
        ("uri", ["--nbd", "nbd://localhost:10809"], "give an address, not a URI"),
        ("empty-unix", ["--nbd", "unix:"], "the unix socket path is empty"),
        ("bad-host", ["--nbd", "a b:10809"], "'a b' is not a host name"),
        ("bad-port", ["--nbd", "127.0.0.1:99999"], "the port must be a number"),
        ("metrics-path", ["--nbd", "unix:/tmp/n.sock", "--metrics", "/tmp/m"], "unix: prefix"),
        ("metrics-v6", ["--nbd", "unix:/tmp/n.sock", "--metrics", "::1:5"], "in brackets"),
        ("fuse-missing", ["--fuse", "/nonexistent/dst-dir"], "no such directory"),
        ("leg-timeout", ["--nbd", "unix:/tmp/n.sock", "--leg-timeout", "0"], "--leg-timeout"),
    ],
)
def test_malformed_front_ends_exit_2_before_members(
    node: Node, case: str, args: list[str], needle: str
) -> None:
    code, line = attach_refused(node, case, *args)
    assert code == 2 and needle in line, line


@pytest.mark.parametrize("chunk", ["3", "1K", "96K", "0"])
def test_stripe_chunk_is_a_power_of_two_of_4k_or_more(node: Node, chunk: str) -> None:
    code, line = attach_refused(
        node, f"stripe-{chunk}", "--stripe", chunk, "--nbd", "unix:/tmp/n.sock", two=True
    )
    assert code == 2 and "power of two of at least 4 KiB" in line, line


def test_a_good_stripe_chunk_gives_whole_chunks(procs: Procs, node: Node) -> None:
    p, _ = procs.attach(node.uri(), node.uri("b"), "--stripe", "4K", "--client-id", "cf-ok")
    assert node.saw_client("cf-ok")  # the check above can see a client that came
    assert "(16777216 bytes)" in p.wait_for(r"device: .*").group(0)  # 2 x 8M in 4K chunks
    assert p.stop() == 0


def test_addresses_in_use_exit_1_before_members(node: Node) -> None:
    n = node.tmp / "n.sock"
    with busy_tcp_port() as port:
        code, line = attach_refused(node, "nbd-busy", "--nbd", f"127.0.0.1:{port}")
        assert code == 1 and f"cannot serve NBD on 127.0.0.1:{port}: address in use" in line
        code, line = attach_refused(
            node, "metrics-busy", "--nbd", f"unix:{n}", "--metrics", f"127.0.0.1:{port}"
        )
        assert code == 1 and "cannot serve metrics" in line and "address in use" in line
    assert not n.exists()  # the NBD socket it had bound is gone again
    # a live unix socket: the export node's own control socket
    code, line = attach_refused(
        node, "control-live", "--nbd", f"unix:{n}", "--control", str(node.control)
    )
    assert code == 1 and "address in use" in line, line
    code, line = attach_refused(node, "nbd-live", "--nbd", f"unix:{node.control}")
    assert code == 1 and "address in use" in line, line
    code, line = attach_refused(node, "nbd-resolve", "--nbd", "nosuchhost.invalid:0")
    assert code == 1 and "cannot resolve 'nosuchhost.invalid'" in line, line
    assert not n.exists()


def test_export_binds_its_addresses_before_it_creates_a_backing_file(tmp_path: Path) -> None:
    img = tmp_path / "new.img"
    sock = tmp_path / "e.sock"
    with busy_tcp_port() as port:
        for args, needle in [
            (
                ["--listen", f"127.0.0.1:{port}"],
                f"cannot listen on 127.0.0.1:{port}: address in use",
            ),
            (
                ["--listen", f"unix:{sock}", "--metrics", f"127.0.0.1:{port}"],
                "cannot serve metrics",
            ),
        ]:
            cp = dst_run("export", *args, f"file:{img}", "--size", "1M")
            assert cp.returncode == 1 and needle in error_line(cp.stderr), cp.stderr
            assert not img.exists() and not sock.exists()
    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(live))
        s.listen()
        cp = dst_run(
            "export",
            "--listen",
            f"unix:{sock}",
            "--control",
            str(live),
            f"file:{img}",
            "--size",
            "1M",
        )
    assert cp.returncode == 1 and "address in use" in error_line(cp.stderr), cp.stderr
    assert not img.exists() and not sock.exists()
    cp = dst_run("export", "--listen", str(sock), f"file:{img}", "--size", "1M")
    assert cp.returncode == 2 and f"e.g. unix:{sock}" in error_line(cp.stderr)


def test_keygen_on_an_unwritable_path_is_a_run_time_error(tmp_path: Path) -> None:
    cp = dst_run("keygen", str(tmp_path / "nodir" / "k"))
    assert cp.returncode == 1 and "cannot write key file" in error_line(cp.stderr)
    cp = dst_run("keygen", str(tmp_path))  # a directory
    assert cp.returncode == 1 and "cannot write key file" in error_line(cp.stderr)
    key = tmp_path / "k"
    assert dst_run("keygen", str(key)).returncode == 0
    cp = dst_run("keygen", str(key))  # the command line must say --force: a usage error
    assert cp.returncode == 2 and "--force" in error_line(cp.stderr)
