"""The servers `dst bench` compares, and how each is started as real processes.

- ``nbdkit``: `nbdkit file` on the backing file, one hop, the floor for any NBD server.
- ``nbdkit-chain``: `nbdkit nbd` in front of `nbdkit file`, two hops: the same shape as dst
  (a client node in front of an export node), so it is the fair peer and the ratio's base.
- ``qemu-nbd``: qemu's server on the backing file, one hop (only when installed).
- ``dst``: `dst attach --nbd` in front of `dst export` on the backing file.

A variant (`--variant dst:cipher=aes-256-gcm`) is another dst column with extra options; see
`parse_variant`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dst.bench.procs import ServerProcess, StartError, deferred_signals

DST = [sys.executable, "-m", "dst"]

KINDS: tuple[str, ...] = ("nbdkit", "nbdkit-chain", "qemu-nbd", "dst")
DESCRIPTIONS = {
    "nbdkit": "nbdkit file (one hop)",
    "nbdkit-chain": "nbdkit nbd -> nbdkit file (two hops)",
    "qemu-nbd": "qemu-nbd on the file (one hop)",
    "dst": "dst attach --nbd -> dst export file: (two hops)",
}
# the executable each kind needs, and the Debian package that has it
TOOLS = {"nbdkit": "nbdkit", "nbdkit-chain": "nbdkit", "qemu-nbd": "qemu-nbd"}
APT = {"nbdkit": "nbdkit", "qemu-nbd": "qemu-utils", "fio": "fio"}

# the peer dst is measured against in the ratio column
BASELINE = "nbdkit-chain"


@dataclass(frozen=True)
class TargetSpec:
    """One column of the table: a kind of server and, for dst, extra options per side."""

    name: str
    kind: str
    export_args: tuple[str, ...] = ()
    attach_args: tuple[str, ...] = ()
    auto_key: bool = False  # make a key file with `dst keygen` and give it to both sides

    @property
    def description(self) -> str:
        parts = [DESCRIPTIONS[self.kind]]
        if self.export_args:
            parts.append("export " + " ".join(self.export_args))
        if self.attach_args:
            parts.append("attach " + " ".join(self.attach_args))
        if self.auto_key:
            parts.append("key file from dst keygen")
        return "; ".join(parts)


def missing_tool(kind: str) -> str | None:
    """Why `kind` cannot run here (an install hint), or None when it can."""
    tool = TOOLS.get(kind)
    if tool is None or shutil.which(tool):
        return None
    return f"{tool} is not installed; install it with: apt-get install {APT[tool]}"


def parse_variant(
    text: str, export_args: tuple[str, ...] = (), attach_args: tuple[str, ...] = ()
) -> TargetSpec:
    """``dst:KEY=VALUE[,KEY=VALUE...]`` -> a dst column with those options.

    ``KEY=VALUE`` becomes ``--KEY=VALUE`` on both `dst export` and `dst attach`;
    ``export.KEY=VALUE`` or ``attach.KEY=VALUE`` on one side only; a KEY without ``=VALUE``
    is a flag. Repeat a key for list options (``cipher=a,cipher=b``). When a cipher is set
    and no ``key-file`` is given, a fresh key is made with `dst keygen` and given to both
    sides, since dst encrypts only between peers that share a key. The column is named by
    the whole text. Raises ValueError saying what is wrong.
    """
    base, sep, rest = text.partition(":")
    if base != "dst":
        raise ValueError(
            f"variant {text!r}: only dst variants are supported; write dst:KEY=VALUE[,...], "
            "e.g. dst:cipher=aes-256-gcm"
        )
    if not sep or not rest.strip():
        raise ValueError(f"variant {text!r} has no options; write e.g. dst:cipher=aes-256-gcm")
    exp: list[str] = list(export_args)
    att: list[str] = list(attach_args)
    keys: set[str] = set()
    for item in rest.split(","):
        key, eq, value = item.strip().partition("=")
        side = "both"
        if key.startswith(("export.", "attach.")):
            side, key = key.split(".", 1)
        if not key or key.startswith("-") or " " in key:
            raise ValueError(f"variant {text!r}: {item!r} is not KEY=VALUE or a flag name")
        keys.add(key)
        arg = f"--{key}={value}" if eq else f"--{key}"
        if side in ("both", "export"):
            exp.append(arg)
        if side in ("both", "attach"):
            att.append(arg)
    auto_key = "cipher" in keys and "key-file" not in keys
    return TargetSpec(text, "dst", tuple(exp), tuple(att), auto_key)


@dataclass
class RunningTarget:
    """The processes of one target while it is being measured; `stop` reaps them all."""

    spec: TargetSpec
    uri: str = ""
    servers: list[ServerProcess] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.servers]

    @property
    def commands(self) -> list[list[str]]:
        return [s.args for s in self.servers]

    def check_alive(self) -> None:
        for s in self.servers:
            s.check_alive()

    def last_words(self) -> str:
        return "; ".join(f"{s.name}: {s.last_words()}" for s in self.servers)

    def stop(self) -> None:
        """Front first, so the back end sees a clean disconnect; every one is waited for."""
        errors: list[BaseException] = []
        for s in reversed(self.servers):
            try:
                s.stop()
            except BaseException as exc:  # keep stopping the others, then re-raise
                errors.append(exc)
        if errors:
            raise errors[0]


@dataclass(frozen=True)
class Workspace:
    """Where a target's sockets, logs and key live, and the backing file it serves."""

    dir: Path
    image: Path
    size: int
    ready_timeout: float = 30.0


def start_target(spec: TargetSpec, tag: str, ws: Workspace) -> RunningTarget:
    """Start `spec`'s processes and wait until its NBD URI answers; stop them on any failure."""
    why = missing_tool(spec.kind)
    if why:
        raise StartError(why)
    t = RunningTarget(spec)
    try:
        _STARTERS[spec.kind](t, tag, ws)
    except BaseException:
        t.stop()
        raise
    return t


def _server(t: RunningTarget, name: str, args: list[str], ws: Workspace, tag: str) -> ServerProcess:
    with deferred_signals():  # on the list before any interrupt can strike
        s = ServerProcess(name, args, ws.dir / f"{tag}-{name.replace(' ', '-')}.log")
        t.servers.append(s)
    return s


def _start_nbdkit(t: RunningTarget, tag: str, ws: Workspace) -> None:
    sock = ws.dir / f"{tag}-k.sock"
    s = _server(
        t,
        "nbdkit",
        ["nbdkit", "-f", "-U", str(sock), "--exit-with-parent", "file", str(ws.image)],
        ws,
        tag,
    )
    s.wait_for_socket(sock, ws.ready_timeout)
    t.uri = f"nbd+unix:///?socket={sock}"


def _start_chain(t: RunningTarget, tag: str, ws: Workspace) -> None:
    back = ws.dir / f"{tag}-k1.sock"
    front = ws.dir / f"{tag}-k2.sock"
    b = _server(
        t,
        "nbdkit file",
        ["nbdkit", "-f", "-U", str(back), "--exit-with-parent", "file", str(ws.image)],
        ws,
        tag,
    )
    b.wait_for_socket(back, ws.ready_timeout)
    f = _server(
        t,
        "nbdkit nbd",
        ["nbdkit", "-f", "-U", str(front), "--exit-with-parent", "nbd", f"socket={back}"],
        ws,
        tag,
    )
    f.wait_for_socket(front, ws.ready_timeout)
    t.uri = f"nbd+unix:///?socket={front}"


def _start_qemu_nbd(t: RunningTarget, tag: str, ws: Workspace) -> None:
    sock = ws.dir / f"{tag}-q.sock"
    # --persistent: fio opens one connection per job; --shared: the readiness probe's
    # connection must not hold the only client slot
    s = _server(
        t,
        "qemu-nbd",
        ["qemu-nbd", "-f", "raw", "-k", str(sock), "--persistent", "--shared=8", str(ws.image)],
        ws,
        tag,
    )
    s.wait_for_socket(sock, ws.ready_timeout)
    t.uri = f"nbd+unix:///?socket={sock}"


def _start_dst(t: RunningTarget, tag: str, ws: Workspace) -> None:
    spec = t.spec
    exp_extra, att_extra = list(spec.export_args), list(spec.attach_args)
    if spec.auto_key:
        key = ws.dir / f"{tag}.key"
        make_key(key)
        exp_extra.append(f"--key-file={key}")
        att_extra.append(f"--key-file={key}")
    esock = ws.dir / f"{tag}-e.sock"
    nsock = ws.dir / f"{tag}-n.sock"
    e = _server(
        t,
        "dst export",
        [
            *DST,
            "export",
            "--listen",
            f"unix:{esock}",
            f"file:{ws.image}",
            "--size",
            str(ws.size),
            *exp_extra,
        ],
        ws,
        tag,
    )
    m = e.wait_for_line(r"listening on (\S+)", ws.ready_timeout, "listening")
    addr = m.group(1)
    path = addr[len("unix:") :] if addr.startswith("unix:") else str(esock)
    a = _server(
        t,
        "dst attach",
        [
            *DST,
            "attach",
            f"dst+unix:///default?socket={path}",
            "--nbd",
            f"unix:{nsock}",
            *att_extra,
        ],
        ws,
        tag,
    )
    m = a.wait_for_line(r"serving NBD on (\S+)", ws.ready_timeout, "serving NBD")
    uri = m.group(1).rstrip(".,;")
    t.uri = uri if uri.startswith("nbd") else f"nbd+unix:///?socket={nsock}"


def make_key(path: Path) -> None:
    """A key file for a cipher variant, made the way an operator would: `dst keygen`."""
    with deferred_signals():  # a few milliseconds; never leave it half-made
        cp = subprocess.run(
            [*DST, "keygen", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
    if cp.returncode != 0:
        last = (cp.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise StartError(f"dst keygen exited with status {cp.returncode}: {last}")


_STARTERS = {
    "nbdkit": _start_nbdkit,
    "nbdkit-chain": _start_chain,
    "qemu-nbd": _start_qemu_nbd,
    "dst": _start_dst,
}
