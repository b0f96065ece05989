"""Server processes of the benchmark: start, wait until ready, measure CPU, always reap.

Servers run in their own session, so a Ctrl-C at the terminal reaches only the harness, which
then stops them in order; they also get SIGTERM from the kernel if the harness itself dies
(PR_SET_PDEATHSIG), so not even a SIGKILL of `dst bench` leaves one behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TypeVar

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


_LIBC = _load_libc()


def die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM it when the harness dies."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while a child is made and recorded, then deliver them.

    An interrupt that lands between fork and the caller keeping the Popen would leave a
    process nobody reaps; held here, it arrives once the process is on a list to stop.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    old = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            if handler is not None:  # None: installed outside Python, cannot be restored
                signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])


class StartError(Exception):
    """A server did not come up; the message says which and its last words."""


def spawn(
    args: Sequence[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `args` with stdout and stderr into `log`, in a new session, tied to our life."""
    e = dict(os.environ)
    e["PYTHONUNBUFFERED"] = "1"
    if env:
        e.update(env)
    with open(log, "wb") as out:
        return subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=e,
            start_new_session=True,
            preexec_fn=die_with_parent,  # only prctl between fork and exec
        )


class ServerProcess:
    """One running server; its output is kept in a log file to search and to quote."""

    def __init__(self, name: str, args: Sequence[str], log: Path) -> None:
        self.name = name
        self.args = list(args)
        self.log = log
        self.popen = spawn(self.args, log)
        self.pid = self.popen.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def last_words(self, lines: int = 3) -> str:
        """The last few non-empty output lines, to quote in an error."""
        tail = [ln.strip() for ln in self.output().splitlines() if ln.strip()][-lines:]
        return " | ".join(tail) if tail else "(no output)"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise StartError(
                f"{self.name} exited with status {self.popen.returncode}: {self.last_words()}"
            )

    def wait_for_line(self, pattern: str, timeout: float, what: str) -> re.Match[str]:
        """Wait until the output has a line matching `pattern` (the readiness contract)."""
        rx = re.compile(pattern)
        return _poll(lambda: rx.search(self.output()), self, timeout, what)

    def wait_for_socket(self, path: Path, timeout: float) -> None:
        """Wait until a unix socket accepts connections (for servers that print nothing)."""

        def probe() -> bool | None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(path))
                except OSError:
                    return None
            return True

        _poll(probe, self, timeout, f"listening on {path}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; always waits, so nothing is left a zombie."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait()
        # whatever it left behind (worker processes) goes with it: its own session's group
        # and, for those that made their own, its descendants
        left = descendants([self.pid])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _poll(check: Callable[[], T | None], proc: ServerProcess, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if not proc.alive():
            found = check()
            if found:
                return found
            raise StartError(
                f"{proc.name} exited with status {proc.popen.returncode} before {what}: "
                f"{proc.last_words()}"
            )
        if time.monotonic() > deadline:
            raise StartError(
                f"{proc.name} was not {what} within {timeout:g} s: {proc.last_words()}"
            )
        time.sleep(0.02)


def _read_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, user+system clock ticks) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # the command name is in parentheses and may contain spaces: split after the last ')'
    fields = raw[raw.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15
    return int(fields[1]), int(fields[11]) + int(fields[12])


def descendants(roots: Iterable[int]) -> list[int]:
    """Every live process below `roots` (not the roots themselves)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _read_stat(int(entry))
            if st is not None:
                parent[int(entry)] = st[0]
    found: list[int] = []
    frontier = set(roots)
    while frontier:
        kids = {pid for pid, ppid in parent.items() if ppid in frontier and pid not in found}
        found.extend(sorted(kids))
        frontier = kids
    return found


def cpu_seconds(roots: Iterable[int]) -> float:
    """User + system CPU seconds used so far by `roots` and their live descendants.

    The kernel's per-process counters include every thread, which is what a server's cost is.
    """
    roots = list(roots)
    ticks = 0
    for pid in [*roots, *descendants(roots)]:
        st = _read_stat(pid)
        if st is not None:
            ticks += st[1]
    return ticks / _CLK_TCK
