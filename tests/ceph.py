"""A one-node Ceph cluster for tests and benchmarks: one mon, one OSD, all in a temp dir.

The OSD keeps its objects in memory (``memstore``), authentication is off, pools have one
replica, and both daemons bind to 127.0.0.1 (the mon on a free port, the OSD on free ports
of Ceph's own range). No mgr runs: pools, images and librbd I/O do not need one, but then
``ceph health`` says OK even while placement groups are stuck, so readiness is probed with
a real ``rbd create``/``rbd info`` under a timeout. The daemons run in the foreground as our
children and are stopped one at a time by PID, the OSD first and the mon last.

Settings that matter (each found the hard way):

- ``paxos propose interval``/``paxos min wait`` short: a cold start takes a second or two
  instead of several;
- ``osd fast shutdown = false``: with the fast shutdown memstore loses its data, so an OSD
  restart (a test of a cluster that goes away) would find every image empty;
- ``memstore page set = true``: about twice the 4 KiB write rate;
- ``[client] admin socket =`` empty: two clients of the same name (two ``dst export``
  processes, ``qemu-nbd``, the ``rbd`` tool) would otherwise fight over one socket path;
- ``mon osd initial require min compat client = mimic``: clone v2;
- ``osd client watch timeout`` 10 s instead of 30: how long the exclusive lock of a
  killed client stays before librbd breaks it (a test restarts a killed export node).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool")
DEBS = "ceph-mon ceph-osd ceph-common python3-rbd python3-rados"
POOL = "rbd"
START_TIMEOUT = 60.0
PROBE_TIMEOUT = 5.0
WATCH_TIMEOUT = 10


class ClusterError(Exception):
    """The test cluster could not be started; the message has the daemon's last words."""


def missing() -> str | None:
    """Why no cluster can be started here (what to install), or None when one can."""
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        return f"{', '.join(absent)} not installed; install them with: apt-get install {DEBS}"
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        return (
            "this Python cannot import Ceph's binding (rbd, rados); install python3-rbd "
            "python3-rados and run scripts/dev env, which links them into the virtualenv"
        )
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONF = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{port}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
osd objectstore = memstore
memstore device bytes = {store_bytes}
memstore page set = true
osd fast shutdown = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon osd initial require min compat client = mimic
mon data avail warn = 1
mon data avail crit = 1
osd crush chooseleaf type = 0
osd client watch timeout = {watch_timeout}
paxos propose interval = 0.05
paxos min wait = 0.01
run dir = {dir}/run
log file = {dir}/log/$name.log
pid file =
mon data = {dir}/$name
osd data = {dir}/$name
admin socket = {dir}/run/$name.asok

[client]
admin socket =
log file =
"""


@dataclass
class Cluster:
    """A running one-node cluster; ``conf`` is its ceph.conf, ``env`` sets ``CEPH_CONF``."""

    dir: Path
    conf: Path
    fsid: str
    pool: str = POOL
    daemons: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    def cli(
        self, tool: str, *args: str, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ceph``/``rbd``/... against this cluster."""
        cp = subprocess.run(
            [tool, "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and cp.returncode != 0:
            raise ClusterError(
                f"{tool} {' '.join(args)} exited {cp.returncode}: {cp.stderr.strip()[-2000:]}"
            )
        return cp

    def rbd(self, *args: str, timeout: float = 60.0) -> str:
        return self.cli("rbd", *args, timeout=timeout).stdout

    def spec(self, image: str, *, conf: bool = True) -> str:
        """The `dst export` backend for an image of the test pool."""
        return f"rbd:{self.pool}/{image}" + (f"?conf={self.conf}" if conf else "")

    def qemu(self, image: str) -> str:
        """The same image as qemu names it."""
        return f"rbd:{self.pool}/{image}:conf={self.conf}"

    def export_image(self, image: str, dest: Path) -> bytes:
        """The image's bytes, read by Ceph's own tool."""
        dest.unlink(missing_ok=True)
        self.rbd("export", f"{self.pool}/{image}", str(dest))
        return dest.read_bytes()

    def pid(self, name: str) -> int:
        return next(p.pid for n, p in self.daemons if n == name)

    def daemon(self, name: str) -> subprocess.Popen[bytes]:
        return next(p for n, p in self.daemons if n == name)

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        log = open(self.dir / "log" / f"{name}.out", "wb")  # noqa: SIM115 - the child owns it
        try:
            p = subprocess.Popen(
                list(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        self.daemons = [(n, q) for n, q in self.daemons if n != name] + [(name, p)]
        return p

    def last_words(self, name: str) -> str:
        parts = []
        for f in (self.dir / "log" / f"{name}.out", self.dir / "log" / f"{name}.log"):
            with contextlib.suppress(OSError):
                parts.append(f.read_text(errors="replace")[-1500:])
        return "\n".join(parts)

    def start_osd(self) -> None:
        """Start (or restart) osd.0 on the data it already has."""
        self._spawn("osd.0", ["ceph-osd", "-c", str(self.conf), "-i", "0", "-f"])

    def stop_daemon(self, name: str, timeout: float = 15.0) -> None:
        """SIGTERM one daemon by PID and wait for it; SIGKILL if it does not go."""
        for n, p in self.daemons:
            if n == name and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)
                    p.wait(5)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until a real image can be created and opened (``ceph health`` cannot tell)."""
        deadline = time.monotonic() + timeout
        probe = f"{self.pool}/ready-{uuid.uuid4().hex[:8]}"
        created = False
        last = ""
        while time.monotonic() < deadline:
            for name, p in self.daemons:
                if p.poll() is not None:
                    raise ClusterError(
                        f"{name} exited ({p.returncode}) while starting:\n{self.last_words(name)}"
                    )
            try:
                if not created:
                    cp = self.cli(
                        "rbd", "create", probe, "--size", "1M", timeout=PROBE_TIMEOUT, check=False
                    )
                    created = cp.returncode == 0 or "exists" in cp.stderr
                    last = cp.stderr
                if created:
                    cp = self.cli("rbd", "info", probe, timeout=PROBE_TIMEOUT, check=False)
                    if cp.returncode == 0:
                        self.cli("rbd", "rm", "--no-progress", probe, timeout=PROBE_TIMEOUT * 2)
                        return
                    last = cp.stderr
            except subprocess.TimeoutExpired:
                last = f"no answer within {PROBE_TIMEOUT:g} s"
            time.sleep(0.05)
        raise ClusterError(f"the cluster did not serve an image within {timeout:g} s: {last}")

    def stop(self) -> None:
        """The OSD first (it reports to the mon on its way out), the mon last."""
        for name, _ in reversed(self.daemons):
            self.stop_daemon(name)


def start(
    base: Path | None = None, store_bytes: int = 2 << 30, timeout: float = START_TIMEOUT
) -> Cluster:
    """Make and start a cluster with pool ``rbd``; stop it with :meth:`Cluster.stop`.

    ``base`` is a short directory (admin socket paths are limited to 107 bytes); the
    caller removes it."""
    d = Path(tempfile.mkdtemp(prefix="dst-ceph-", dir="/tmp")) if base is None else base
    for sub in ("run", "log", "mon.a", "osd.0"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    fsid = str(uuid.uuid4())
    port = free_port()
    conf = d / "ceph.conf"
    conf.write_text(
        CONF.format(
            fsid=fsid, port=port, dir=d, store_bytes=store_bytes, watch_timeout=WATCH_TIMEOUT
        )
    )
    c = Cluster(d, conf, fsid)
    try:
        subprocess.run(
            ["monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{port}]",
             str(d / "monmap")],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        c.cli("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(d / "monmap"))
        c._spawn("mon.a", ["ceph-mon", "-c", str(conf), "-i", "a", "-f"])
        osd_uuid = str(uuid.uuid4())
        # the first command also waits for the mon to answer
        osd_id = c.cli("ceph", "--connect-timeout", str(int(timeout)), "osd", "create", osd_uuid)
        if osd_id.stdout.strip() != "0":
            raise ClusterError(f"ceph osd create gave id {osd_id.stdout.strip()!r}, not 0")
        c.cli("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        c.start_osd()
        c.cli("ceph", "osd", "pool", "create", POOL, "8")
        c.cli("ceph", "osd", "pool", "application", "enable", POOL, "rbd")
        c.wait_ready(timeout)
    except BaseException:
        c.stop()
        raise
    return c
