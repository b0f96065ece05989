"""Changed-block tracking with real processes: `dst ctl checkpoint`, the NBD contexts
``x-dst:changed:NAME`` seen by nbdinfo, nbdsh and qemu-img, restarts, kill -9 of the
client node, and the backup script of docs/backup.md end to end.

Export nodes run on sparse files; `dst attach --bitmap` serves one member, a stripe, a
linear device or a mirror over NBD; writes go through the NBD front end with nbdsh.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_block_status import nbdsh_run, sparse_exports
from tests.procs import DST, Proc, Procs, dst_run, nbdsh, need_tool, run

pytestmark = pytest.mark.integration

KiB, MiB = 1 << 10, 1 << 20
SIZE = 64 * MiB
G = 32 * KiB  # --bitmap-granularity of these tests (not the default, to prove it is used)
BACKUP = Path(__file__).resolve().parents[2] / "contrib" / "backup" / "dst-backup"

BEFORE = [(0, 4 * KiB), (20 * MiB, 1 * MiB)]  # written before the checkpoint
# (what, offset, length) after it: writes, a trim and a zeroing, some not aligned
AFTER = [
    ("write", 1 * MiB + 100, 10),
    ("write", 5 * MiB, 200 * KiB),
    ("trim", 20 * MiB + 64 * KiB, 64 * KiB),
    ("zero", 40 * MiB + 1000, 3 * G),
    ("write", SIZE - 4 * KiB, 4 * KiB),
]


def changes_script(changes: list[tuple[str, int, int]]) -> str:
    lines = ["import os"]
    for what, off, n in changes:
        if what == "write":
            lines.append(f"h.pwrite(os.urandom({n}), {off})")
        elif what == "trim":
            lines.append(f"h.trim({n}, {off})")
        else:
            lines.append(f"h.zero({n}, {off})")
    lines.append("h.flush()")
    return "\n".join(lines)


def granules(changes: list[tuple[str, int, int]], g: int = G) -> list[tuple[int, int]]:
    """The changed (offset, length) ranges the context must show: whole granules, merged."""
    bits = sorted({b for _, off, n in changes for b in range(off // g, -(-(off + n) // g))})
    out: list[tuple[int, int]] = []
    for b in bits:
        if out and out[-1][0] + out[-1][1] == b * g:
            out[-1] = (out[-1][0], out[-1][1] + g)
        else:
            out.append((b * g, g))
    return out


def changed_map(uri: str, name: str) -> list[tuple[int, int]]:
    """The changed ranges of checkpoint ``name`` as nbdinfo maps them (whole device)."""
    cp = run([need_tool("nbdinfo"), f"--map=x-dst:changed:{name}", "--json", uri])
    entries = json.loads(cp.stdout)
    assert sum(e["length"] for e in entries) == SIZE
    assert all(e["type"] in (0, 1) for e in entries), entries
    return [(e["offset"], e["length"]) for e in entries if e["type"] & 1]


def ctl(control: Path, *words: str) -> dict[str, object]:
    cp = dst_run("ctl", "--control", str(control), "checkpoint", *words, "--json")
    assert cp.returncode == 0, cp.stderr
    out: dict[str, object] = json.loads(cp.stdout)
    return out


class Node:
    """A client node over export nodes on sparse files, with --bitmap and --control."""

    def __init__(self, procs: Procs, tmp: Path, layout: str, *extra: str) -> None:
        self.procs, self.tmp, self.layout = procs, tmp, layout
        self.control = tmp / "ctl.sock"
        self.bitmap = tmp / "cbt.bitmap"
        if layout == "single":
            self.members, self.args = sparse_exports(procs, tmp, 1), []
        elif layout == "mirror":  # blank legs: in sync from the start
            self.members, self.args = sparse_exports(procs, tmp, 2), ["--mirror", "--assume-clean"]
        elif layout == "stripe":
            self.members, self.args = sparse_exports(procs, tmp, 2, SIZE // 2), ["--stripe", "64K"]
        else:
            self.members = sparse_exports(procs, tmp, 2, SIZE // 2)
            self.args = ["--linear"]
        self.extra = list(extra)
        self.proc, self.uri = self.start()

    def start(self, *more: str) -> tuple[Proc, str]:
        self.proc, self.uri = self.procs.attach(
            *self.members,
            *self.args,
            *self.extra,
            *more,
            "--bitmap",
            str(self.bitmap),
            "--bitmap-granularity",
            str(G),
            "--control",
            str(self.control),
            nbd=f"unix:{self.tmp}/nbd.sock",
        )
        return self.proc, self.uri

    def restart(self) -> None:
        assert self.proc.stop() == 0
        self.start()


@pytest.mark.parametrize("layout", ["single", "stripe", "linear", "mirror"])
def test_changes_after_the_checkpoint_appear_exactly(
    procs: Procs, sockdir: Path, layout: str
) -> None:
    """Writes, trims and zeroes after `checkpoint add` are in its context at the bitmap's
    granularity; writes before it are not; `list` counts the changed bytes."""
    node = Node(procs, sockdir, layout)
    before = [("write", off, n) for off, n in BEFORE]
    nbdsh_run(node.uri, changes_script(before))
    added = ctl(node.control, "add", "b1")
    assert added["name"] == "b1" and added["context"] == "x-dst:changed:b1"
    assert changed_map(node.uri, "b1") == []
    nbdsh_run(node.uri, changes_script(AFTER))
    want = granules(AFTER)
    assert changed_map(node.uri, "b1") == want
    listing = ctl(node.control, "list")
    assert listing["granularity"] == G and listing["bitmap"] == str(node.bitmap)
    (entry,) = listing["checkpoints"]
    assert entry["changed_bytes"] == sum(n for _, n in want)
    assert abs(entry["created"] - time.time()) < 60
    status = json.loads(dst_run("status", "--control", str(node.control), "--json").stdout)
    assert [c["name"] for c in status["device"]["checkpoints"]] == ["b1"]


def test_qemu_img_reads_a_checkpoint_as_a_dirty_bitmap(procs: Procs, sockdir: Path) -> None:
    """qemu's NBD client takes the context as x-dirty-bitmap: changed regions are the ones
    it maps as not data (bit 0 is what qemu reads as a hole)."""
    node = Node(procs, sockdir, "single")
    ctl(node.control, "add", "b1")
    nbdsh_run(node.uri, changes_script(AFTER))
    opts = (
        f"driver=nbd,server.type=unix,server.path={sockdir}/nbd.sock,"
        "x-dirty-bitmap=x-dst:changed:b1"
    )
    cp = run([need_tool("qemu-img"), "map", "--output=json", "--image-opts", opts])
    dirty: list[tuple[int, int]] = []
    for e in json.loads(cp.stdout):
        if not e["data"]:
            if dirty and sum(dirty[-1]) == e["start"]:
                dirty[-1] = (dirty[-1][0], dirty[-1][1] + e["length"])
            else:
                dirty.append((e["start"], e["length"]))
    assert dirty == granules(AFTER)


def test_contexts_are_listed_and_remove_drops_one(procs: Procs, sockdir: Path) -> None:
    """LIST_META_CONTEXT with the query `x-dst:` lists every checkpoint; after `remove`
    new connections do not see it, and a connection that chose it before sees everything
    as changed (nothing tracks it any more, so nothing may be skipped)."""
    node = Node(procs, sockdir, "single")
    ctl(node.control, "add", "b1")
    ctl(node.control, "add", "b2")
    nbdsh_run(node.uri, changes_script(AFTER[:1]))
    listing = """
import nbd
h.set_opt_mode(True)
h.connect_uri({uri!r})
h.add_meta_context("x-dst:")
found = []
h.opt_list_meta_context(lambda name: found.append(name) or 0)
print(",".join(sorted(found)))
h.opt_abort()
"""
    script = listing.format(uri=node.uri)
    names = run([*nbdsh(), "-c", script]).stdout.strip()
    assert names == "x-dst:changed:b1,x-dst:changed:b2"

    dst_cmd = [*DST, "ctl", "--control", str(node.control), "checkpoint", "remove", "b1"]
    held = f"""
import subprocess
h.add_meta_context("x-dst:changed:b1")
h.connect_uri({node.uri!r})
before = []
h.block_status(4 << 20, 0, lambda ctx, off, ents, err: before.extend(ents) or 0)
subprocess.run({dst_cmd!r}, check=True, capture_output=True, env={dict(os.environ)!r})
after = []
h.block_status(4 << 20, 0, lambda ctx, off, ents, err: after.extend(ents) or 0)
print(before, after)
"""
    out = run([*nbdsh(), "-c", held]).stdout.strip()
    before, after = out.split("] [")
    first = AFTER[0][1] // G * G
    assert before == f"[{first}, 0, {G}, 1, {4 * MiB - first - G}, 0"
    assert after == f"{4 * MiB}, 1]"
    names = run([*nbdsh(), "-c", script]).stdout.strip()
    assert names == "x-dst:changed:b2"
    cp = run([need_tool("nbdinfo"), "--map=x-dst:changed:b1", node.uri], check=False)
    assert cp.returncode != 0  # not offered any more
    assert changed_map(node.uri, "b2") == granules(AFTER[:1])


def test_a_restart_keeps_checkpoints(procs: Procs, sockdir: Path) -> None:
    node = Node(procs, sockdir, "mirror")
    ctl(node.control, "add", "b1")
    nbdsh_run(node.uri, changes_script(AFTER[:2]))
    created = ctl(node.control, "list")["checkpoints"]
    node.restart()
    assert "writes in flight" not in node.proc.output  # a clean stop: nothing extra
    assert ctl(node.control, "list")["checkpoints"] == created
    assert changed_map(node.uri, "b1") == granules(AFTER[:2])
    nbdsh_run(node.uri, changes_script(AFTER[2:]))
    assert changed_map(node.uri, "b1") == granules(AFTER)


WRITER = """
import os, random, sys
rnd = random.Random({seed})
for i in range({count}):
    off = rnd.randrange(0, {span} // 4096) * 4096
    h.pwrite(os.urandom(4096), off)
    print(off, flush=True)
"""


@pytest.mark.parametrize("layout", ["single", "mirror"])
def test_a_killed_client_node_never_loses_a_change(
    procs: Procs, sockdir: Path, layout: str
) -> None:
    """kill -9 of `dst attach` in the middle of writes: after the restart every write that
    was acknowledged is in the checkpoint (the activity log's extents count as changed);
    a region never written since the checkpoint stays unchanged."""
    node = Node(procs, sockdir, layout)
    ctl(node.control, "add", "b1")
    span = 24 * MiB  # the writes land in [0, 24 MiB); [32 MiB, 64 MiB) is never written
    script = WRITER.format(seed=random.randrange(1 << 30), count=20000, span=span)
    writer = procs.start([*nbdsh(), "-u", node.uri, "-c", script])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(writer.output.split()) < 300:
        time.sleep(0.05)
    node.proc.signal(signal.SIGKILL)  # in the middle of the writes
    node.proc.popen.wait(10)
    writer.popen.wait(30)  # its next write fails: the server is gone
    acked = [int(x) for x in writer.output.split() if x.isdigit()]
    assert len(acked) >= 300, writer.output[-2000:]
    node.start()
    assert "count as changed in every checkpoint" in node.proc.output
    changed = changed_map(node.uri, "b1")
    missing = [
        off for off in acked if not any(a <= off and off + 4096 <= a + n for a, n in changed)
    ]
    assert not missing, f"{len(missing)} acknowledged writes not in the checkpoint: {missing[:5]}"
    assert all(a + n <= 32 * MiB for a, n in changed), changed


def test_without_a_bitmap_checkpoints_are_refused(procs: Procs, sockdir: Path) -> None:
    (member,) = sparse_exports(procs, sockdir, 1)
    control = sockdir / "ctl.sock"
    procs.attach(member, "--control", str(control))
    cp = dst_run("ctl", "--control", str(control), "checkpoint", "add", "b1")
    assert cp.returncode == 1
    assert cp.stderr.strip() == (
        "dst: error: cannot add checkpoint b1: checkpoints are kept in the --bitmap file, "
        "and this client node runs without one; restart `dst attach` with --bitmap FILE"
    )
    cp = dst_run("ctl", "--control", str(control), "checkpoint", "list")
    assert cp.returncode == 0 and "runs without --bitmap" in cp.stdout
    for words, needle in [
        (["add", "no:colons"], "invalid checkpoint name 'no:colons'"),
        (["add"], "`dst ctl checkpoint add` needs a NAME"),
        (["rename", "x"], "unknown checkpoint action 'rename'"),
        (["list", "x"], "takes no name"),
    ]:
        cp = dst_run("ctl", "--control", str(control), "checkpoint", *words)
        assert cp.returncode == 2 and needle in cp.stderr, cp.stderr


def test_human_list_and_refusals(procs: Procs, sockdir: Path) -> None:
    node = Node(procs, sockdir, "linear")
    cp = dst_run("ctl", "--control", str(node.control), "checkpoint", "add", "nightly")
    assert cp.returncode == 0
    assert cp.stdout.strip() == (
        "checkpoint nightly added: what changes from now on is NBD metadata context "
        "x-dst:changed:nightly"
    )
    nbdsh_run(node.uri, changes_script([("write", 0, 3 * G)]))
    cp = dst_run("ctl", "--control", str(node.control), "checkpoint", "list")
    header, row, summary = cp.stdout.strip().splitlines()
    assert header.split() == ["NAME", "CREATED", "CHANGED", "NBD", "CONTEXT"]
    assert row.startswith("nightly ") and "96 KiB" in row and "ago)" in row
    assert row.endswith("x-dst:changed:nightly")
    assert summary == f"1 of 8 checkpoints in {node.bitmap}, granularity 32 KiB"
    cp = dst_run("ctl", "--control", str(node.control), "checkpoint", "add", "nightly")
    assert cp.returncode == 1 and "a checkpoint named nightly already exists" in cp.stderr
    cp = dst_run("ctl", "--control", str(node.control), "checkpoint", "remove", "weekly")
    assert cp.returncode == 1
    assert "no checkpoint named weekly; the checkpoints are: nightly" in cp.stderr
    cp = dst_run("ctl", "--control", str(node.control), "checkpoint", "remove", "nightly")
    assert cp.returncode == 0 and "checkpoints left: none" in cp.stdout


def test_resync_options_stay_mirror_only(sockdir: Path) -> None:
    cp = dst_run(
        "attach", "dst://a/x", "--nbd", f"unix:{sockdir}/n", "--bitmap", f"{sockdir}/b",
        "--resync-rate", "10M",
    )  # fmt: skip
    assert cp.returncode == 2 and "--resync-rate applies to --mirror only" in cp.stderr


def test_backup_script_full_then_incrementals_restores_the_device(
    procs: Procs, sockdir: Path, tmp_path: Path
) -> None:
    """contrib/backup/dst-backup as docs/backup.md runs it: a full backup, changes, two
    incremental backups that copy only what changed, then a restore that is identical to
    the device."""
    for tool in ("nbdinfo", "nbdcopy", "qemu-img", "qemu-nbd"):
        need_tool(tool)
    python = nbdsh()[0]
    node = Node(procs, sockdir, "stripe")
    env = dict(os.environ, DST=" ".join([sys.executable, "-m", "dst"]))
    backup = tmp_path / "backup"

    def script(*args: str) -> str:
        cp = run([python, str(BACKUP), "--control", str(node.control), *args], env=env)
        return cp.stdout

    nbdsh_run(node.uri, changes_script([("write", off, n) for off, n in BEFORE]))
    assert "full backup 0000-full.raw" in script("full", node.uri, str(backup))
    first = [("write", 3 * MiB, 1 * MiB), ("zero", 20 * MiB, 256 * KiB)]
    nbdsh_run(node.uri, changes_script(first))
    out = script("incremental", node.uri, str(backup))
    copied = sum(n for _, n in granules(first))
    assert f"incremental backup 0001-inc.qcow2: {copied} of {SIZE} bytes" in out
    second = [("write", 50 * MiB + 5, 100), ("trim", 3 * MiB, 512 * KiB)]
    nbdsh_run(node.uri, changes_script(second))
    out = script("incremental", node.uri, str(backup))
    copied = sum(n for _, n in granules(second))
    assert f"incremental backup 0002-inc.qcow2: {copied} of {SIZE} bytes" in out
    names = [c["name"] for c in ctl(node.control, "list")["checkpoints"]]
    assert names == ["dst-backup-2"]  # each backup removed the one before
    overlay = backup / "0002-inc.qcow2"
    assert overlay.stat().st_blocks * 512 < 2 * MiB  # what changed, not the device

    restored = tmp_path / "restored.img"
    script("restore", str(backup), str(restored))
    run([need_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(restored), node.uri])
    assert "identical" in script("compare", str(backup), node.uri)
    nbdsh_run(node.uri, changes_script([("write", 7 * MiB, 4096)]))  # now they differ
    cp = run([python, str(BACKUP), "compare", str(backup), node.uri], check=False)
    assert cp.returncode == 1
