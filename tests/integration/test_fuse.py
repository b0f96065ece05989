"""`dst attach --fuse DIR`: DIR/disk as a real file, a loop device, filesystems on top.

Needs root, /dev/fuse and loop devices; skips with the reason where they are missing.
Every loop device, mount and process a test makes is undone in teardown, also on
failure (the `host` fixture). FLUSH is shown at the export node by tracing its
fdatasync(2) calls on the backing file with strace (see `SyscallCounter`).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import errno
import filecmp
import hashlib
import os
import random
import re
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import DST, IN_CI, Proc, Procs, dst_run, member_uri, need_tool, run

pytestmark = [pytest.mark.integration, pytest.mark.root]

MiB = 1 << 20
CLIENT = "fuse-test"


def need_fuse() -> None:
    """Skip (with the reason) unless this machine can mount FUSE and set up loop devices."""
    if os.geteuid() != 0:
        pytest.skip("needs root: FUSE mounts, loop devices and mount(8)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("the kernel offers no FUSE: /dev/fuse is missing (modprobe fuse)")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("the kernel offers no loop devices: /dev/loop-control is missing")
    need_tool("fusermount3")
    need_tool("losetup")
    from dst.errors import DstError
    from dst.frontends.fuse import _load_mfusepy

    try:
        _load_mfusepy()
    except DstError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


class Host:
    """Loop devices and mounts made by a test, undone in reverse order at the end."""

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.loops: list[str] = []
        self.mounts: list[Path] = []
        self.fuse_dirs: list[Path] = []

    def losetup(self, path: Path, direct_io: bool = True) -> str:
        on = "on" if direct_io else "off"
        dev = run(["losetup", f"--direct-io={on}", "--show", "-f", str(path)]).stdout.strip()
        self.loops.append(dev)
        return dev

    def detach(self, dev: str) -> None:
        for _ in range(50):
            if run(["losetup", "-d", dev], check=False).returncode == 0:
                break
            time.sleep(0.1)
        with contextlib.suppress(ValueError):
            self.loops.remove(dev)

    def mount(self, dev: str, where: Path, *opts: str) -> None:
        where.mkdir(exist_ok=True)
        run(["mount", *opts, dev, str(where)])
        self.mounts.append(where)

    def umount(self, where: Path) -> None:
        run(["umount", str(where)])
        self.mounts.remove(where)

    def cleanup(self) -> None:
        for m in reversed(self.mounts):
            if run(["umount", str(m)], check=False).returncode != 0:
                run(["umount", "-l", str(m)], check=False)
        for dev in reversed(self.loops):
            self.detach(dev)
        for p in self.procs.procs:  # client nodes first: their last flush needs the exports
            if "attach" in p.args:
                p.stop()
        self.procs.stop_all()
        for d in self.fuse_dirs:
            if is_mounted(d):
                run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def host(procs: Procs) -> Iterator[Host]:
    need_fuse()
    h = Host(procs)
    try:
        yield h
    finally:
        h.cleanup()


def is_mounted(path: Path) -> bool:
    want = str(path)
    with open("/proc/self/mountinfo") as f:  # paths there escape space as \040
        return any(line.split()[4].encode().decode("unicode_escape") == want for line in f)


def start_export(procs: Procs, tmp: Path, size: str = "256M", sock: str = "e.sock") -> Proc:
    p, _ = procs.export(f"file:{tmp / 'd.img'}", "--size", size, listen=f"unix:{tmp / sock}")
    return p


def attach_fuse(
    procs: Procs, host: Host, tmp: Path, *args: str, sock: str = "e.sock", mnt_name: str = "mnt"
) -> Proc:
    mnt = tmp / mnt_name
    mnt.mkdir(exist_ok=True)
    host.fuse_dirs.append(mnt)
    addr = f"unix:{tmp / sock}"
    p = procs.dst("attach", member_uri(addr), "--client-id", CLIENT, "--fuse", str(mnt), *args)
    p.wait_for(r"serving FUSE on " + re.escape(str(mnt / "disk")))
    return p


class SyscallCounter:
    """Counts syscalls of a running process on one file, with strace attached to it.

    All threads are traced (the export node's storage calls run on a worker pool);
    -y prints each descriptor's path, so only calls on the backing file count.
    """

    def __init__(self, procs: Procs, pid: int, syscalls: str, path: Path, log: Path) -> None:
        exe = need_tool("strace")
        self.out = log
        self.path = str(path)
        pids = [a for t in os.listdir(f"/proc/{pid}/task") for a in ("-p", t)]
        args = [exe, "-f", "-qq", "-y", "-e", f"trace={syscalls}", "-o", str(log), *pids]
        self.proc = procs.start(args)
        deadline = time.monotonic() + 10
        while not all(self._traced(pid, t) for t in os.listdir(f"/proc/{pid}/task")):
            assert time.monotonic() < deadline, f"strace did not attach:\n{self.proc.output}"
            time.sleep(0.05)

    @staticmethod
    def _traced(pid: int, tid: str) -> bool:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            return True
        m = re.search(r"TracerPid:\s+(\d+)", text)
        return m is not None and m.group(1) != "0"

    def lines(self, name: str) -> list[str]:
        if not self.out.exists():
            return []
        return [
            ln
            for ln in self.out.read_text().splitlines()
            if f" {name}(" in f" {ln.split(' ', 1)[-1]}" and f"<{self.path}>" in ln
        ]

    def count(self, name: str) -> int:
        return len(self.lines(name))


def write_files(root: Path, n: int, seed: int, max_size: int = 400_000) -> dict[str, str]:
    rnd = random.Random(seed)
    sums: dict[str, str] = {}
    for i in range(n):
        data = rnd.randbytes(rnd.randint(0, max_size))
        name = f"d{i % 7}/f{i:04d}.bin"
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def check_files(root: Path, sums: dict[str, str]) -> None:
    bad = [n for n, h in sums.items() if hashlib.sha256((root / n).read_bytes()).hexdigest() != h]
    assert not bad, f"{len(bad)} files differ, e.g. {bad[:5]}"


# ---- the file itself ------------------------------------------------------------------


def test_disk_file_reads_writes_fsync_and_punch_hole_reach_the_export(
    procs: Procs, host: Host, sockdir: Path
) -> None:
    exp = start_export(procs, sockdir, size="64M")
    attach_fuse(procs, host, sockdir)
    disk, img = sockdir / "mnt" / "disk", sockdir / "d.img"
    st = os.stat(disk)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 64 * MiB
    assert os.listdir(sockdir / "mnt") == ["disk"]
    trace = SyscallCounter(procs, exp.pid, "fdatasync,fsync,fallocate", img, sockdir / "st.txt")
    data = os.urandom(3 * MiB + 123)
    fd = os.open(disk, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 5 * MiB + 7) == len(data)
        assert os.pread(fd, len(data), 5 * MiB + 7) == data
        before = trace.count("fdatasync")
        os.fsync(fd)
        assert trace.count("fdatasync") > before, "fsync did not reach the export node's disk"
        before = trace.count("fdatasync")
        os.fdatasync(fd)
        assert trace.count("fdatasync") > before, "fdatasync did not reach the export's disk"
        with open(img, "rb") as f:
            f.seek(5 * MiB + 7)
            assert f.read(len(data)) == data
        # punch a hole: a TRIM at the export node, which punches its file; zeroes read back
        run([need_tool("fallocate"), "-p", "-o", str(6 * MiB), "-l", str(MiB), str(disk)])
        assert os.pread(fd, MiB, 6 * MiB) == bytes(MiB)
        assert any("FALLOC_FL_PUNCH_HOLE" in ln for ln in trace.lines("fallocate")), (
            trace.out.read_text()
        )
        # the end of the device: short read, ENOSPC past it
        assert os.pread(fd, 100, 64 * MiB - 10) == b"\0" * 10
        assert os.pread(fd, 100, 64 * MiB) == b""
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x", 64 * MiB)
        assert ei.value.errno in (errno.ENOSPC, errno.EFBIG)
        with pytest.raises(OSError):
            os.truncate(disk, MiB)  # the size is the device's
        assert os.stat(disk).st_size == 64 * MiB
    finally:
        os.close(fd)


def test_libfuse3_is_used_where_libfuse2_is_installed_too(
    procs: Procs, host: Host, sockdir: Path
) -> None:
    """find_library("fuse") names libfuse.so.2 here; the mount must still use libfuse3."""
    if ctypes.util.find_library("fuse") != "libfuse.so.2":
        msg = "libfuse2 is not installed; install it with: apt-get install libfuse2"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    start_export(procs, sockdir, size="8M")
    att = attach_fuse(procs, host, sockdir)
    maps = Path(f"/proc/{att.pid}/maps").read_text()
    assert "libfuse3.so.3" in maps and "libfuse.so.2" not in maps
    disk = sockdir / "mnt" / "disk"
    fd = os.open(disk, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"libfuse3" * 512, 4096) == 4096
        os.fsync(fd)
        assert os.pread(fd, 4096, 4096) == b"libfuse3" * 512
    finally:
        os.close(fd)
    assert "unknown option" not in att.output and "dst: error" not in att.output
    assert att.stop() == 0


def _library_file(soname: str) -> Path | None:
    """The file the dynamic linker loads for ``soname`` (as this process maps it)."""
    try:
        ctypes.CDLL(soname)
    except OSError:
        return None
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if os.path.basename(path).startswith(soname):
            return Path(os.path.realpath(path))
    return None


def test_missing_libfuse3_is_one_line_naming_the_package(procs: Procs, sockdir: Path) -> None:
    """Hide libfuse3 from one `dst attach` (its own mount namespace, /dev/null over the
    library file): one error line naming the package, before the member is contacted."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a mount namespace that hides libfuse3")
    unshare = need_tool("unshare")
    lib = _library_file("libfuse3.so.3")
    if lib is None:
        pytest.skip("libfuse3 is not installed, so there is nothing to hide")
    exp = start_export(procs, sockdir, size="8M")
    mnt = sockdir / "mnt"
    mnt.mkdir()
    attach = [*DST, "attach", member_uri(f"unix:{sockdir / 'e.sock'}"), "--fuse", str(mnt)]
    script = 'mount --bind /dev/null "$0" && exec "$@"'
    cp = run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script, str(lib), *attach],
        check=False,
    )
    assert cp.returncode == 1, cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dst: error: --fuse needs libfuse3"), lines
    assert "apt-get install libfuse3-3" in lines[0]
    assert "attached export" not in exp.output
    assert not is_mounted(mnt)


def test_read_only_export_gives_a_read_only_file(procs: Procs, host: Host, sockdir: Path) -> None:
    img = sockdir / "d.img"
    img.write_bytes(b"\x5a" * 4 * MiB)
    procs.export(f"file:{img}", "--read-only", listen=f"unix:{sockdir / 'e.sock'}")
    attach_fuse(procs, host, sockdir)
    disk = sockdir / "mnt" / "disk"
    assert disk.read_bytes() == b"\x5a" * 4 * MiB
    with pytest.raises(OSError) as ei:
        os.open(disk, os.O_RDWR)
    assert ei.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


@pytest.mark.parametrize("case", ["missing", "not-empty"])
def test_bad_mountpoint_is_a_usage_error(
    procs: Procs, host: Host, sockdir: Path, case: str
) -> None:
    start_export(procs, sockdir, size="8M")
    mnt = sockdir / "m"
    if case == "not-empty":
        mnt.mkdir()
        (mnt / "x").write_text("x")
    cp = dst_run("attach", member_uri(f"unix:{sockdir / 'e.sock'}"), "--fuse", str(mnt))
    assert cp.returncode == 2, cp.stderr
    assert cp.stderr.startswith("dst: error: --fuse") or "\ndst: error: --fuse" in cp.stderr
    assert ("no such directory" if case == "missing" else "not empty") in cp.stderr


# ---- filesystems on a loop device -----------------------------------------------------


@pytest.mark.parametrize("direct_io", [True, False], ids=["dio-on", "dio-off"])
def test_ext4_200_files_fsck_clean_and_intact_after_remount(
    procs: Procs, host: Host, sockdir: Path, direct_io: bool
) -> None:
    need_tool("mkfs.ext4")
    need_tool("e2fsck")
    exp = start_export(procs, sockdir)
    attach_fuse(procs, host, sockdir)
    loop = host.losetup(sockdir / "mnt" / "disk", direct_io)
    dio = Path(f"/sys/block/{os.path.basename(loop)}/loop/dio").read_text().strip()
    assert dio == ("1" if direct_io else "0")
    run(["mkfs.ext4", "-q", "-F", loop])
    fs = sockdir / "fs"
    host.mount(loop, fs)
    sums = write_files(fs, 200, seed=1)
    trace = SyscallCounter(procs, exp.pid, "fdatasync", sockdir / "d.img", sockdir / "st.txt")
    run(["sync", "-f", str(fs)])
    assert trace.count("fdatasync") >= 1, "sync in the filesystem did not reach the export disk"
    host.umount(fs)
    cp = run(["e2fsck", "-fn", loop], check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    host.mount(loop, fs)
    check_files(fs, sums)
    host.umount(fs)
    host.detach(loop)


def test_xfs_fsck_clean(procs: Procs, host: Host, sockdir: Path) -> None:
    need_tool("mkfs.xfs")
    need_tool("xfs_repair")
    exp = start_export(procs, sockdir, size="512M")
    attach_fuse(procs, host, sockdir)
    loop = host.losetup(sockdir / "mnt" / "disk", direct_io=True)
    run(["mkfs.xfs", "-q", "-f", loop])
    fs = sockdir / "fs"
    host.mount(loop, fs)
    sums = write_files(fs, 60, seed=2)
    trace = SyscallCounter(procs, exp.pid, "fdatasync", sockdir / "d.img", sockdir / "st.txt")
    run(["sync", "-f", str(fs)])
    assert trace.count("fdatasync") >= 1, "sync in the filesystem did not reach the export disk"
    host.umount(fs)
    cp = run(["xfs_repair", "-n", loop], check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    host.mount(loop, fs)
    check_files(fs, sums)


def test_ext4_survives_export_node_kill_and_restart_mid_write(
    procs: Procs, host: Host, sockdir: Path
) -> None:
    need_tool("mkfs.ext4")
    need_tool("e2fsck")
    exp = start_export(procs, sockdir)
    att = attach_fuse(
        procs,
        host,
        sockdir,
        "--resend-timeout",
        "1",
        "--resends",
        "25",
        "--ping-interval",
        "0.5",
        "--ping-timeout",
        "0.5",
        "--reconnect-max",
        "0.5",
    )
    loop = host.losetup(sockdir / "mnt" / "disk")
    run(["mkfs.ext4", "-q", "-F", loop])
    fs = sockdir / "fs"
    host.mount(loop, fs)
    sums: dict[str, str] = {}
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for batch in range(8):
                got = write_files(fs / f"b{batch}", 25, seed=100 + batch)
                os.sync()  # each batch reaches the export nodes; the kill lands among them
                sums.update({f"b{batch}/{k}": v for k, v in got.items()})
        except BaseException as exc:
            errors.append(exc)

    for b in range(8):
        (fs / f"b{b}").mkdir()
    t = threading.Thread(target=writer)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while len(sums) < 50 and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        exp.signal(signal.SIGKILL)
        exp.wait(10)
        written_at_kill = len(sums)
        time.sleep(0.5)
        start_export(procs, sockdir)
    finally:
        t.join(60)
    assert not t.is_alive(), "the writer did not finish"
    assert not errors, errors
    assert written_at_kill < 200, "the export node was killed after the writes ended"
    assert len(sums) == 200
    assert "connection lost; reconnecting" in att.output, att.output
    run(["sync"])
    host.umount(fs)
    cp = run(["e2fsck", "-fn", loop], check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    host.mount(loop, fs)
    check_files(fs, sums)


# ---- stopping while busy, stale mounts -------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_unmounts_cleanly_and_flushes(
    procs: Procs, host: Host, sockdir: Path, sig: signal.Signals
) -> None:
    start_export(procs, sockdir, size="8M")
    att = attach_fuse(procs, host, sockdir)
    mnt = sockdir / "mnt"
    with open(mnt / "disk", "r+b", buffering=0) as f:
        f.write(b"bye" * 1000)
    att.signal(sig)
    assert att.wait(20) == 0, att.output
    assert not is_mounted(mnt) and os.listdir(mnt) == []
    assert "stopped serving FUSE" in att.output and "Traceback" not in att.output
    assert (sockdir / "d.img").read_bytes()[:3000] == b"bye" * 1000


def test_sigterm_while_a_loop_device_holds_the_file_keeps_serving(
    procs: Procs, host: Host, sockdir: Path
) -> None:
    start_export(procs, sockdir, size="16M")
    att = attach_fuse(procs, host, sockdir)
    mnt = sockdir / "mnt"
    loop = host.losetup(mnt / "disk")
    att.signal(signal.SIGTERM)
    att.wait_for(r"not unmounting .* in use by .*loop device " + re.escape(loop))
    assert "SIGTERM again to force a lazy unmount" in att.output
    # still serving, through the loop device
    with open(loop, "r+b", buffering=0) as f:
        f.write(b"still here" * 100)
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read(1000) == b"still here" * 100
    assert att.popen.poll() is None
    host.detach(loop)
    att.signal(signal.SIGTERM)
    assert att.wait(20) == 0, att.output
    assert not is_mounted(mnt)
    assert "stopped serving FUSE" in att.output


def test_second_sigterm_unmounts_lazily_and_serves_until_released(
    procs: Procs, host: Host, sockdir: Path
) -> None:
    start_export(procs, sockdir, size="16M")
    att = attach_fuse(procs, host, sockdir)
    mnt = sockdir / "mnt"
    fd = os.open(mnt / "disk", os.O_RDWR)
    try:
        att.signal(signal.SIGTERM)
        att.wait_for(rf"in use by process {os.getpid()} \(\S+, fd {fd}\)")
        att.signal(signal.SIGTERM)
        att.wait_for(r"forced a lazy unmount")
        assert not is_mounted(mnt)  # the name is gone at once
        os.pwrite(fd, b"after lazy" * 10, 4096)  # the holder is still served
        os.fsync(fd)
        assert os.pread(fd, 100, 4096) == b"after lazy" * 10
        assert att.popen.poll() is None
    finally:
        os.close(fd)
    assert att.wait(20) == 0, att.output
    assert "the last holder" in att.output
    with open(sockdir / "d.img", "rb") as f:
        f.seek(4096)
        assert f.read(100) == b"after lazy" * 10


def test_third_sigterm_aborts_the_fuse_connection(procs: Procs, host: Host, sockdir: Path) -> None:
    start_export(procs, sockdir, size="16M")
    att = attach_fuse(procs, host, sockdir)
    fd = os.open(sockdir / "mnt" / "disk", os.O_RDWR)
    try:
        for expect in ("not unmounting", "forced a lazy unmount", "aborted the FUSE connection"):
            att.signal(signal.SIGTERM)
            att.wait_for(expect)
        assert att.wait(20) == 0, att.output
        with pytest.raises(OSError) as ei:
            os.pread(fd, 10, 0)
        assert ei.value.errno == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def test_stale_mount_after_kill_is_reported_then_cleared(
    procs: Procs, host: Host, sockdir: Path
) -> None:
    exp = start_export(procs, sockdir, size="16M")
    att = attach_fuse(procs, host, sockdir, mnt_name="stale mnt")  # mountinfo escapes the space
    mnt = sockdir / "stale mnt"
    fd = os.open(mnt / "disk", os.O_RDONLY)
    try:
        att.kill()
        assert is_mounted(mnt)
        with pytest.raises(OSError) as ei:
            os.statvfs(mnt)
        assert ei.value.errno == errno.ENOTCONN
        # held by our descriptor: reported with the holder and the commands that clear it
        addr = member_uri(f"unix:{sockdir / 'e.sock'}")
        sessions = exp.output.count("attached export")
        again = procs.dst("attach", addr, "--client-id", CLIENT, "--fuse", str(mnt))
        assert again.wait(30) == 1, again.output
        assert exp.output.count("attached export") == sessions  # its member was not contacted
        out = again.output
        assert "dst: error: --fuse" in out and "stale mount" in out, out
        assert f"process {os.getpid()}" in out and f"fusermount3 -uz '{mnt}'" in out, out
    finally:
        with contextlib.suppress(OSError):  # closed even so; the dead mount answers ENOTCONN
            os.close(fd)
    # nothing holds it now: the next start clears it and serves
    att2 = attach_fuse(procs, host, sockdir, mnt_name="stale mnt")
    assert "cleared a stale FUSE mount" in att2.output
    assert (mnt / "disk").stat().st_size == 16 * MiB


def test_a_second_attach_on_a_live_mount_is_refused(
    procs: Procs, host: Host, sockdir: Path
) -> None:
    start_export(procs, sockdir, size="8M")
    attach_fuse(procs, host, sockdir)
    exp2, addr2 = procs.export(f"file:{sockdir / 'd2.img'}", "--size", "8M")
    cp = dst_run("attach", member_uri(addr2), "--fuse", str(sockdir / "mnt"))
    assert cp.returncode == 1, cp.stderr
    assert "dst: error: --fuse" in cp.stderr and "already a mount point" in cp.stderr, cp.stderr
    assert (sockdir / "mnt" / "disk").stat().st_size == 8 * MiB  # the first one still serves
    assert "attached export" not in exp2.output  # refused before it contacted its member


def test_unmounting_from_outside_stops_a_fuse_only_attach(
    procs: Procs, host: Host, sockdir: Path
) -> None:
    start_export(procs, sockdir, size="8M")
    att = attach_fuse(procs, host, sockdir)
    run([need_tool("fusermount3"), "-u", str(sockdir / "mnt")])
    assert att.wait(20) == 0, att.output
    assert "unmounted from outside" in att.output


def test_ext4_200_files_through_a_mirror_of_two_export_nodes(
    procs: Procs, host: Host, sockdir: Path
) -> None:
    """The same filesystem check with the FUSE file over a mirror: both legs end identical."""
    need_tool("mkfs.ext4")
    need_tool("e2fsck")
    legs = []
    for name in ("a", "b"):
        _, addr = procs.export(
            f"file:{sockdir / name}.img", "--size", "256M", listen=f"unix:{sockdir / name}.sock"
        )
        legs.append(member_uri(addr))
    mnt = sockdir / "mnt"
    mnt.mkdir()
    host.fuse_dirs.append(mnt)
    att = procs.dst(
        "attach",
        *legs,
        "--mirror",
        "--bitmap",
        str(sockdir / "bm"),
        "--client-id",
        CLIENT,
        "--fuse",
        str(mnt),
    )
    att.wait_for(r"serving FUSE on " + re.escape(str(mnt / "disk")))
    att.wait_for(r"resync finished", timeout=60)
    loop = host.losetup(mnt / "disk", True)
    run(["mkfs.ext4", "-q", "-F", loop])
    fs = sockdir / "fs"
    host.mount(loop, fs)
    sums = write_files(fs, 200, seed=7)
    run(["sync", "-f", str(fs)])
    host.umount(fs)
    cp = run(["e2fsck", "-fn", loop], check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    host.mount(loop, fs)
    check_files(fs, sums)
    host.umount(fs)
    host.detach(loop)
    assert filecmp.cmp(sockdir / "a.img", sockdir / "b.img", shallow=False)
