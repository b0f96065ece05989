"""The mount table, the holders of a file and unmounting: what the FUSE front end needs to
start on a clean mountpoint, to say who keeps ``DIR/disk`` busy, and to stop.

Kept apart from the FUSE callbacks so that both stay readable; nothing here
talks to FUSE itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from dst.errors import DstError, UsageError

log = logging.getLogger("dst.fuse")

FILE_NAME = "disk"
FSNAME = "dst"
FSTYPE = "fuse.dst"
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
FUSECTL = "/sys/fs/fuse/connections"


# ---- mount table and holders ---------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo that matters here."""

    mountpoint: str
    fstype: str
    source: str
    device: tuple[int, int]


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \ooo."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountEntry]:
    """The mount table of this process's namespace, in mount order."""
    out: list[MountEntry] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            if len(a) < 5 or len(b) < 2:
                continue
            major, _, minor = a[2].partition(":")
            out.append(MountEntry(_unescape(a[4]), b[0], _unescape(b[1]), (int(major), int(minor))))
    return out


def mount_at(path: str) -> MountEntry | None:
    """The topmost mount whose mount point is exactly ``path``, if any."""
    found = None
    for m in mounts():
        if m.mountpoint == path:
            found = m
    return found


def holders_of(path: str) -> list[str]:
    """Who keeps ``path`` busy: open descriptors, working directories, loop devices.

    Scans /proc/*/fd, /proc/*/cwd and /sys/block/loop*/loop/backing_file; reading
    these links never touches the file itself, so it is safe on a dead mount.
    """
    base = os.path.dirname(path)
    me = os.getpid()
    found: list[str] = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        comm = _read(f"/proc/{pid}/comm").strip() or "?"
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        if int(pid) != me and (cwd == base or cwd.startswith(base + "/")):
            found.append(f"process {pid} ({comm}, working directory)")
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target == path or target == path + " (deleted)":
                found.append(f"process {pid} ({comm}, fd {fd})")
    for dev, backing in loop_devices().items():
        if backing == path:
            where = [m.mountpoint for m in mounts() if m.source == dev]
            extra = f", mounted on {', '.join(where)}" if where else ""
            found.append(f"loop device {dev}{extra}")
    return found


def loop_devices() -> dict[str, str]:
    """Every configured loop device and the path of its backing file."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir("/sys/block")):
            if name.startswith("loop"):
                backing = _read(f"/sys/block/{name}/loop/backing_file").rstrip("\n")
                if backing:
                    out[f"/dev/{name}"] = backing
    return out


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def unmount(path: str, *, lazy: bool = False) -> None:
    """Unmount ``path`` (lazily: detach now, finish when the last holder lets go).

    As root this is umount2(2); otherwise fusermount3. Raises OSError (EBUSY when
    something still holds the mount).
    """
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
        if libc.umount2(os.fsencode(path), flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return
    exe = shutil.which("fusermount3") or "fusermount3"
    cp = subprocess.run(
        [exe, "-u", *(["-z"] if lazy else []), path],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if cp.returncode != 0:
        msg = cp.stderr.strip() or f"fusermount3 exited {cp.returncode}"
        raise OSError(errno.EBUSY if "busy" in msg.lower() else errno.EPERM, msg, path)


def unmount_command(path: str, *, lazy: bool = False) -> str:
    """The shell command an operator runs to unmount ``path``."""
    return f"fusermount3 -u{'z' if lazy else ''} {shlex.quote(path)}"


def check_mountpoint(path: str) -> str:
    """Validate DIR from the command line (no mounting yet); returns its absolute path.

    A mount already on DIR (live or stale) is left for :meth:`FuseFrontend.start`.
    """
    mp = os.path.abspath(path)
    if mount_at(mp) is not None:
        return mp
    if not os.path.exists(mp):
        raise UsageError(f"--fuse {path}: no such directory; create it with `mkdir -p {mp}`")
    if not os.path.isdir(mp):
        raise UsageError(f"--fuse {path}: not a directory; give an empty directory")
    if os.listdir(mp):
        raise UsageError(
            f"--fuse {path}: the directory is not empty; give an empty directory "
            f"(the mount would hide its contents)"
        )
    return mp


def clear_stale_mount(mp: str) -> None:
    """Detect a mount on ``mp`` left by a crash; clear it when nothing holds it.

    A live mount, a stale mount of another filesystem, or a stale one that a loop
    device or a process still holds is reported with the commands that clear it.
    """
    m = mount_at(mp)
    if m is None:
        return
    try:
        os.statvfs(mp)  # always asks the daemon (stat may be answered from the attr cache)
        alive = True
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise DstError(f"--fuse {mp}: cannot inspect the mount there: {exc}") from None
        alive = False
    if alive:
        raise DstError(
            f"--fuse {mp}: already a mount point ({m.fstype} from {m.source}); is another "
            f"`dst attach` serving it? Stop it, or unmount with `{unmount_command(mp)}`"
        )
    if m.fstype != FSTYPE:
        raise DstError(
            f"--fuse {mp}: a dead {m.fstype} mount is in the way; clear it with "
            f"`{unmount_command(mp)}`"
        )
    disk = os.path.join(mp, FILE_NAME)
    held = holders_of(disk)
    if not held:
        try:
            unmount(mp)
        except OSError as exc:
            raise DstError(
                f"--fuse {mp}: a stale mount left by an earlier dst attach could not be "
                f"cleared ({exc.strerror}); clear it with `{unmount_command(mp, lazy=True)}`"
            ) from None
        log.warning("cleared a stale FUSE mount on %s left by an earlier dst attach", mp)
        return
    raise DstError(
        f"--fuse {mp}: a stale mount left by an earlier dst attach is still held "
        f"by {'; '.join(held)}; release them (unmount what is mounted on a loop device and "
        f"`losetup -d` it, close the files), then run `{unmount_command(mp)}`, or detach it "
        f"now with `{unmount_command(mp, lazy=True)}`"
    )


# ---- the filesystem ------------------------------------------------------------------
