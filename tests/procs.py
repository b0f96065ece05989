"""Start, watch and reap real `dst` processes and peer tools in tests."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

DST = [sys.executable, "-m", "dst"]
IN_CI = os.environ.get("CI", "").lower() == "true"

APT = {
    "qemu-io": "qemu-utils",
    "qemu-img": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdsh": "libnbd-bin python3-libnbd",
    "nbdkit": "nbdkit",
    "fio": "fio",
    "mkfs.xfs": "xfsprogs",
    "fusermount3": "fuse3",
}


def need_tool(name: str) -> str:
    """Path of a peer tool; skip (locally) or fail (CI=true) when it is missing."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed; install it with: apt-get install {APT.get(name, name)}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


class Proc:
    """A running process whose stderr is collected in a file and searchable."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        e = dict(os.environ)
        e.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            e.update(env)
        self.popen = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=e
        )
        self.pid = self.popen.pid

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.output)
            if m:
                return m
            if self.popen.poll() is not None:
                m = rx.search(self.output)
                if m:
                    return m
                raise AssertionError(
                    f"process exited ({self.popen.returncode}) before printing {pattern!r}:\n{self.output}"
                )
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.output}")

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGKILL)
            self.popen.wait(5)

    def wait(self, timeout: float = 20.0) -> int:
        rc = self.popen.wait(timeout)
        return rc


class Procs:
    """Every process a test starts; all are reaped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.n = 0

    def start(self, args: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        self.n += 1
        p = Proc(args, self.tmp / f"proc{self.n}.log", env)
        self.procs.append(p)
        return p

    def dst(self, *args: str, env: dict[str, str] | None = None) -> Proc:
        return self.start([*DST, *args], env)

    def export(self, *args: str, listen: str | None = None) -> tuple[Proc, str]:
        """Start `dst export`, wait until it listens; returns the process and its address."""
        if listen is None:
            self.n += 1
            listen = f"unix:{self.tmp}/export{self.n}.sock"
        p = self.dst("export", "--listen", listen, *args)
        m = p.wait_for(r"listening on (\S+)")
        return p, m.group(1)

    def attach(self, *args: str, nbd: str | None = None) -> tuple[Proc, str]:
        """Start `dst attach ... --nbd`, wait until it serves; returns the process and NBD URI."""
        if nbd is None:
            self.n += 1
            nbd = f"unix:{self.tmp}/nbd{self.n}.sock"
        p = self.dst("attach", *args, "--nbd", nbd)
        m = p.wait_for(r"serving NBD on (\S+)")
        return p, m.group(1)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found by walking /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (fio forks job processes)."""
    for p in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def nbdsh() -> list[str]:
    """nbdsh under Debian's own python3, which has libnbd's module (the venv's does not)."""
    need_tool("nbdsh")
    if not os.path.exists("/usr/lib/python3/dist-packages/nbd.py"):
        msg = "nbdsh needs libnbd's Python module; install it with: apt-get install python3-libnbd"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return ["/usr/bin/python3", "-m", "nbd"]


def run(
    args: Sequence[str], timeout: float = 60.0, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and cp.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {cp.returncode}:\n{cp.stdout}\n{cp.stderr}")
    return cp  # type: ignore[no-any-return]


def dst_run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return run([*DST, *args], timeout=timeout, check=False)


def member_uri(address: str, export: str = "default") -> str:
    """The dst:// or dst+unix:// URI for an address printed by `dst export`."""
    if address.startswith("unix:"):
        return f"dst+unix:///{export}?socket={address[5:]}"
    return f"dst://{address}/{export}"


@contextlib.contextmanager
def procs_for(tmp: Path) -> Iterator[Procs]:
    ps = Procs(tmp)
    try:
        yield ps
    finally:
        ps.stop_all()
