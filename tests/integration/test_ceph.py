"""DST on Ceph RBD, against a real one-node cluster shared by the module.

- the ``rbd:`` backend through the framework (conformance suite, read-write and read-only);
- `dst export rbd:...` behind `dst attach --nbd`: data, FUA and flush reach Ceph (read back
  by Ceph's own `rbd export`), status, metrics, watchers and the exclusive lock;
- errors an operator meets: missing image or size, a size that differs, a missing pool,
  an unreachable cluster, a missing config or binding, an image without exclusive-lock;
- two export nodes on one image refused; identity kept across restarts, also after kill -9;
- qemu-nbd on an RBD image as an ``nbd+unix://`` mirror member;
- a disk moved into Ceph online (`dst ctl add` an rbd-backed export, sync, detach the old
  legs) under a verified writer;
- the OSD restarted under a verified writer: latency, then the writes go on; no errors.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from dst.backends import BackendDevice, open_backend
from dst.device import BlockDevice
from tests import conformance
from tests.ceph import WATCH_TIMEOUT, Cluster
from tests.conformance import Expect
from tests.faults.test_mirror import wait_in_sync
from tests.faults.test_resilience import fio_result, fio_writer
from tests.integration.test_nbd_member import wait_socket
from tests.procs import Proc, Procs, dst_run, member_uri, nbdsh, need_tool, run

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 16 * MiB
_images = itertools.count()


def image_name(tag: str) -> str:
    """A fresh image name: the cluster is shared by every test of the module."""
    return f"{tag}-{next(_images)}"


def export(
    procs: Procs, c: Cluster, spec: str, *args: str, sock: Path, env: bool = False
) -> tuple[Proc, str]:
    """`dst export` on ``spec``; ``env`` gives the config as ``$CEPH_CONF`` only."""
    sock.unlink(missing_ok=True)
    p = procs.dst(
        "export",
        "--listen",
        f"unix:{sock}",
        spec,
        *args,
        env={"CEPH_CONF": str(c.conf)} if env else None,
    )
    m = p.wait_for(r"listening on (\S+)", timeout=60)
    return p, member_uri(m.group(1))


def error_of(cp: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in cp.stderr.splitlines() if ln.startswith("dst: error:")]
    assert len(lines) == 1 and "Traceback" not in cp.stderr, cp.stderr
    return lines[0]


def dst_env(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    from tests.procs import DST

    return subprocess.run(
        [*DST, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        check=False,
    )


def status(ctl: Path) -> dict[str, object]:
    cp = dst_run("status", "--control", str(ctl), "--json", timeout=20)
    assert cp.stdout, cp.stderr
    return json.loads(cp.stdout)  # type: ignore[no-any-return]


def qemu_io(uri: str, *cmds: str, read_only: bool = False) -> None:
    args = [need_tool("qemu-io"), "-f", "raw", *(["-r"] if read_only else [])]
    for cmd in cmds:
        args += ["-c", cmd]
    cp = run([*args, uri], check=False, timeout=120)
    assert cp.returncode == 0 and "failed" not in cp.stdout.lower(), cp.stdout + cp.stderr


# ---- the backend through the framework ---------------------------------------------------
def test_conformance_read_write_and_read_only(ceph_cluster: Cluster) -> None:
    c = ceph_cluster

    async def fresh() -> BlockDevice:
        return BackendDevice(open_backend(c.spec(image_name("conf")), size=SIZE))

    asyncio.run(conformance.run_conformance(fresh, Expect(size=SIZE)))

    ro = image_name("conf-ro")
    c.rbd("create", f"{c.pool}/{ro}", "--size", "16M")

    async def read_only() -> BlockDevice:
        return BackendDevice(open_backend(c.spec(ro), read_only=True))

    asyncio.run(
        conformance.run_conformance(
            read_only, Expect(size=SIZE, read_only=True, fresh_zeroes=False)
        )
    )


# ---- dst export rbd: behind dst attach --------------------------------------------------
def test_export_attach_round_trip_lands_in_ceph(
    ceph_cluster: Cluster, procs: Procs, sockdir: Path
) -> None:
    c = ceph_cluster
    name = image_name("rt")
    ectl = sockdir / "e.ctl"
    exp, member = export(
        procs,
        c,
        f"rbd:{c.pool}/{name}",  # the config from $CEPH_CONF
        "--size",
        "32M",
        "--control",
        str(ectl),
        "--metrics",
        "127.0.0.1:0",
        sock=sockdir / "e.sock",
        env=True,
    )
    assert re.search(rf"rbd:{c.pool}/{name}, {32 * MiB} bytes, read-write", exp.output)
    att, uri = procs.attach(member)
    flags = nbdsh()  # libnbd sends no flush of its own: each FUA and flush is the test's
    script = (
        "h.flush()\n"  # after a first flush librbd's cache may hold writes back
        "h.pwrite(b'\\x5a' * 65536, 1 << 20, nbd.CMD_FLAG_FUA)\n"
    )
    run([*flags, "-u", uri, "-c", script], timeout=30)
    got = c.export_image(name, sockdir / "x1.raw")
    assert got[MiB : MiB + 65536] == b"\x5a" * 65536  # FUA: in Ceph before the ack

    data = os.urandom(3 * MiB)
    (sockdir / "in").write_bytes(data)
    script = (
        f"h.pwrite(open({str(sockdir / 'in')!r}, 'rb').read(), 4 << 20)\n"
        "h.zero(1 << 20, 5 << 20)\n"  # WRITE_ZEROES over the second MiB of the data
        "h.trim(1 << 20, 6 << 20)\n"  # TRIM over the third: a hint, no zeroes promised
        "h.flush()\n"
    )
    run([*flags, "-u", uri, "-c", script], timeout=30)
    got = c.export_image(name, sockdir / "x2.raw")
    assert got[4 * MiB : 5 * MiB] == data[:MiB]
    assert got[5 * MiB : 6 * MiB] == bytes(MiB)
    # the trimmed part reads as zeroes or as the old data, never as anything else
    for off in range(6 * MiB, 7 * MiB, 4096):
        assert got[off : off + 4096] in (data[off - 4 * MiB : off - 4 * MiB + 4096], bytes(4096))

    # Ceph sees the export node: a watcher, and the exclusive lock
    assert "watcher=" in c.rbd("status", f"{c.pool}/{name}")
    assert "1 exclusive lock" in c.rbd("lock", "ls", f"{c.pool}/{name}")
    st = status(ectl)
    e = st["exports"][0]  # type: ignore[index]
    backend = e["statistics"]["backend"]
    assert (backend["pool"], backend["image"], backend["cluster"]) == (c.pool, name, c.fsid)
    assert backend["identity_store"] == "metadata" and backend["conf"] == str(c.conf)
    meta = c.rbd("image-meta", "get", f"{c.pool}/{name}", "dst.identity").strip()
    assert meta == e["identity"]
    url = exp.wait_for(r"serving metrics on (http://\S+)").group(1)
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    info = f'dst_export_rbd_info{{cluster="{c.fsid}",export="default",image="{name}",pool="{c.pool}"}} 1.0'
    assert info in body, body
    assert e["statistics"]["errors"] == 0 and e["statistics"]["writes"] >= 2

    assert att.stop() == 0 and exp.stop() == 0
    assert "watcher=" not in c.rbd("status", f"{c.pool}/{name}")  # released on a clean stop
    assert "exclusive lock" not in c.rbd("lock", "ls", f"{c.pool}/{name}")


# ---- what goes wrong, said clearly -----------------------------------------------------
def test_errors_say_what_to_do(ceph_cluster: Cluster, sockdir: Path) -> None:
    c = ceph_cluster
    listen = ("--listen", f"unix:{sockdir}/x.sock")
    name = image_name("err")

    def export_fails(spec: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        cp = dst_env("export", *listen, spec, *args, env=env or {})
        return cp.returncode, error_of(cp)

    rc, msg = export_fails(c.spec(name))
    assert rc == 2 and f"image {c.pool}/{name} does not exist; give --size SIZE" in msg
    rc, msg = export_fails(c.spec(name), "--size", "8M", "--read-only")
    assert rc == 2 and "a read-only export cannot create it" in msg
    c.rbd("create", f"{c.pool}/{name}", "--size", "8M")
    rc, msg = export_fails(c.spec(name), "--size", "16M")
    assert rc == 2 and "8388608 bytes (8 MiB) but --size asks for 16777216" in msg
    rc, msg = export_fails(f"rbd:nopool/{name}?conf={c.conf}")
    assert rc == 1 and "pool 'nopool' does not exist" in msg and "ceph osd pool create" in msg

    nolock = image_name("nolock")
    c.rbd("create", f"{c.pool}/{nolock}", "--size", "8M", "--image-feature", "layering")
    rc, msg = export_fails(c.spec(nolock))
    assert rc == 1 and "has no exclusive-lock feature" in msg and "rbd feature enable" in msg

    # a cluster nobody answers for: the connect timeout, then a clear error
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        away = sockdir / "away.conf"
        away.write_text(
            re.sub(r"mon host = .*", f"mon host = v2:127.0.0.1:{port}", c.conf.read_text())
        )
        t0 = time.monotonic()
        rc, msg = export_fails(f"rbd:{c.pool}/{name}?conf={away}&timeout=1")
        took = time.monotonic() - t0
    assert rc == 1 and "cannot reach the Ceph cluster" in msg and "within 1 s" in msg, msg
    assert took < 30

    rc, msg = export_fails(f"rbd:{c.pool}/{name}", env={"CEPH_CONF": str(sockdir / "none.conf")})
    assert rc == 2 and "named by $CEPH_CONF does not exist" in msg

    fake = sockdir / "nobinding"  # a Python that cannot import the binding
    fake.mkdir()
    for mod in ("rados", "rbd"):
        (fake / f"{mod}.py").write_text(f'raise ImportError("No module named {mod!r}")\n')
    rc, msg = export_fails(c.spec(name), env={"PYTHONPATH": str(fake)})
    assert rc == 1 and "apt-get install python3-rbd python3-rados" in msg


def test_one_writer_per_image_and_identity_across_restarts(
    ceph_cluster: Cluster, procs: Procs, sockdir: Path
) -> None:
    """librbd's exclusive lock is the file lock of rbd: a second read-write export node is
    refused, a read-only one may serve beside it; the identity in the image's metadata
    survives a restart, also one after kill -9 (the dead owner's lock is broken once its
    watch times out)."""
    c = ceph_cluster
    name = image_name("lock")
    spec = c.spec(name)
    first, member = export(procs, c, spec, "--size", "16M", sock=sockdir / "a.sock")
    identity = re.search(r"identity (\S+)", first.output).group(1)  # type: ignore[union-attr]
    att, uri = procs.attach(member)
    qemu_io(uri, "write -P 0x33 0 1M", "flush")

    cp = dst_env("export", "--listen", f"unix:{sockdir}/b.sock", spec, env={})
    assert cp.returncode == 1
    assert "already in use by another client" in error_of(cp)

    ro, ro_member = export(procs, c, spec, "--read-only", sock=sockdir / "r.sock")
    assert "read-only" in ro.output
    ro_att, ro_uri = procs.attach(ro_member, "--read-only", "--client-id", "reader")
    qemu_io(ro_uri, "read -P 0x33 0 1M", read_only=True)
    assert ro_att.stop() == 0 and ro.stop() == 0

    assert att.stop() == 0 and first.stop() == 0
    again, member = export(procs, c, spec, sock=sockdir / "a.sock")
    assert f"identity {identity}" in again.output
    att, uri = procs.attach(member)
    qemu_io(uri, "write -P 0x44 1M 1M", "flush")
    att.stop()
    again.kill()  # its lock stays, held by a client that is gone

    t0 = time.monotonic()
    third, member = export(procs, c, spec, sock=sockdir / "a.sock")
    took = time.monotonic() - t0
    assert "waiting for the exclusive lock" in third.output
    assert f"identity {identity}" in third.output
    assert took < WATCH_TIMEOUT + 30
    att, uri = procs.attach(member)
    qemu_io(uri, "read -P 0x33 0 1M", "read -P 0x44 1M 1M")


# ---- Ceph as a mirror member: qemu-nbd over rbd -----------------------------------------
def qemu_nbd_rbd(procs: Procs, c: Cluster, image: str, sock: Path) -> Proc:
    exe = need_tool("qemu-nbd")
    sock.unlink(missing_ok=True)
    p = procs.start(
        [exe, "-k", str(sock), "-f", "raw", "--persistent", "--discard=unmap", c.qemu(image)]
    )
    wait_socket(sock, p, timeout=30)
    return p


def test_qemu_nbd_on_rbd_as_a_mirror_member(
    ceph_cluster: Cluster, procs: Procs, sockdir: Path
) -> None:
    c = ceph_cluster
    name = image_name("qnbd")
    c.rbd("create", f"{c.pool}/{name}", "--size", "32M")
    qsock = sockdir / "q.sock"
    qemu = qemu_nbd_rbd(procs, c, name, qsock)
    _, addr = procs.export(
        f"file:{sockdir}/a.img", "--size", "32M", listen=f"unix:{sockdir}/a.sock"
    )
    att, uri = procs.attach(
        member_uri(addr),
        f"nbd+unix:///?socket={qsock}",
        "--mirror",
        "--bitmap",
        str(sockdir / "bm"),
    )
    wait_in_sync(att)
    ref = sockdir / "ref.img"
    ref.write_bytes(os.urandom(12 * MiB) + bytes(20 * MiB))
    qemu_img = need_tool("qemu-img")
    run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(ref), uri])
    qemu_io(uri, "flush")
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(ref), uri])
    assert att.stop() == 0
    qemu.stop()
    assert c.export_image(name, sockdir / "q.raw") == ref.read_bytes()
    assert (sockdir / "a.img").read_bytes() == ref.read_bytes()


# ---- a disk moved into Ceph without downtime -----------------------------------------
def test_online_migration_into_ceph(ceph_cluster: Cluster, procs: Procs, sockdir: Path) -> None:
    """A mirror of two file legs serves a verified writer; an rbd-backed export is added,
    synced, and the file legs detached, all while the writer runs: zero errors, and the
    image in Ceph equals the device."""
    c = ceph_cluster
    legs = []
    for leg in ("a", "b"):
        _, addr = procs.export(
            f"file:{sockdir}/{leg}.img", "--size", "64M", listen=f"unix:{sockdir}/{leg}.sock"
        )
        legs.append(member_uri(addr))
    ctl = sockdir / "ctl.sock"
    att, uri = procs.attach(
        *legs, "--mirror", "--bitmap", str(sockdir / "bm"), "--control", str(ctl)
    )
    wait_in_sync(att)
    qemu_io(uri, "write -P 0x21 0 64M", "flush")  # the disk's life before the move

    name = image_name("mig")
    exp, ceph_member = export(procs, c, c.spec(name), "--size", "64M", sock=sockdir / "c.sock")
    # 16 s of writing at 2 MB/s: the move (64 MiB into Ceph) must end while it runs, also
    # on a busy machine
    fio = subprocess.Popen(
        fio_writer(uri, size="32M", rate="2m"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        cp = dst_run("ctl", "--control", str(ctl), "add", ceph_member)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        wait_in_sync(att, 2, timeout=90)
        for leg in legs:
            cp = dst_run("ctl", "--control", str(ctl), "detach", leg)
            assert cp.returncode == 0, cp.stdout + cp.stderr
        st = status(ctl)
        assert [(m["uri"], m["state"]) for m in st["members"]] == [(ceph_member, "connected")]  # type: ignore[index]
        assert fio.poll() is None, "the writer finished before the move did: nothing was proven"
        job = fio_result(fio)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.communicate()
    assert job["write"]["io_bytes"] >= 32 * MiB  # type: ignore[index]
    qemu_io(uri, "flush")
    qemu_img = need_tool("qemu-img")
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", uri, c.qemu(name)], timeout=120)
    assert att.stop() == 0 and exp.stop() == 0


# ---- the cluster goes away mid-run ------------------------------------------------------
def test_osd_restart_under_a_verified_writer(
    ceph_cluster: Cluster, procs: Procs, sockdir: Path
) -> None:
    """The OSD stops and comes back while writes run: the export node's librbd requests
    wait and then complete; the client node resends what took too long; fio's
    verification finds every block; the image equals the device."""
    c = ceph_cluster
    name = image_name("osd")
    exp, member = export(procs, c, c.spec(name), "--size", "32M", sock=sockdir / "e.sock")
    att, uri = procs.attach(member, "--resend-timeout", "2", "--resends", "30")
    fio = subprocess.Popen(
        fio_writer(uri, size="12M", rate="3m"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        assert fio.poll() is None
        before = c.pid("osd.0")
        c.stop_daemon("osd.0")
        time.sleep(1.0)
        c.start_osd()
        assert c.pid("osd.0") != before
        job = fio_result(fio, timeout=110)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.communicate()
    assert job["write"]["io_bytes"] >= 12 * MiB  # type: ignore[index]
    # some write waited out the outage (the OSD was away for more than a second)
    assert job["write"]["clat_ns"]["max"] >= 0.5e9  # type: ignore[index]
    qemu_io(uri, "flush")
    run(
        [need_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", uri, c.qemu(name)], timeout=120
    )
    assert att.stop() == 0 and exp.stop() == 0
