"""NBD FAST_ZERO and CACHE through the whole stack, driven by nbdsh and qemu-img.

Export nodes on real files (ext4, which punches holes and zeroes ranges; tmpfs, which
punches but has no ZERO_RANGE), `dst attach` serving one member, a mirror or a stripe
over NBD. A fast zero is served where the storage zeroes natively and refused with
ENOTSUP, changing nothing, where zeroing would mean writing zeroes (NO_HOLE on tmpfs);
a mirror whose legs disagree about that still ends with identical legs. `qemu-img
convert -n` pre-zeroes with FAST_ZERO and falls back to writing where it is refused.
CACHE is advertised, passed down to the export node's backend, and range-checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_nbd_member import nbdkit
from tests.procs import Procs, dst_run, member_uri, nbdsh, need_tool, run

pytestmark = pytest.mark.integration

KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB
LAYOUTS = ["single", "mirror", "stripe"]

# nbdsh prelude: write a pattern, try a zero, say what happened and what reads back
PRELUDE = """
import errno, hashlib, json, os
def attempt(n, off, flags):
    try:
        h.zero(n, off, flags)
        return "ok"
    except nbd.Error as e:
        return e.errno
def digest(n, off):
    return hashlib.sha256(h.pread(n, off)).hexdigest()
"""


def nbdsh_json(uri: str, script: str) -> Any:
    cp = run([*nbdsh(), "-u", uri, "-c", PRELUDE + script], timeout=60)
    return json.loads(cp.stdout.strip().splitlines()[-1])


def exports(procs: Procs, dirs: list[Path], size: int, sockdir: Path) -> list[tuple[str, Path]]:
    """One export node per directory, each on a new sparse file with a control socket;
    (member URI, control socket) of each."""
    out = []
    for i, d in enumerate(dirs):
        ctl = sockdir / f"ectl{i}.sock"
        _, addr = procs.export(
            f"file:{d}/leg{i}.img", "--size", str(size), "--control", str(ctl), "--debug=txn"
        )
        out.append((member_uri(addr), ctl))
    return out


def serve(procs: Procs, sockdir: Path, layout: str, dirs: list[Path]) -> tuple[str, list[Path]]:
    """The layout over export nodes in ``dirs`` (one for single, two otherwise); the NBD
    URI and the export nodes' control sockets."""
    if layout == "single":
        nodes, extra = exports(procs, dirs[:1], SIZE, sockdir), []
    elif layout == "mirror":
        nodes = exports(procs, dirs, SIZE, sockdir)
        extra = ["--mirror", "--bitmap", f"{sockdir}/m.bitmap", "--assume-clean"]
    else:
        nodes = exports(procs, dirs, SIZE // 2, sockdir)
        extra = ["--stripe", "64K"]
    _, uri = procs.attach(*(u for u, _ in nodes), *extra)
    return uri, [c for _, c in nodes]


def export_stats(ctl: Path) -> dict[str, Any]:
    cp = dst_run("status", "--control", str(ctl), "--json", timeout=20)
    assert cp.stdout, cp.stderr
    (e,) = json.loads(cp.stdout)["exports"]
    stats: dict[str, Any] = e["statistics"]
    return stats


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_zero_where_the_storage_zeroes_natively(
    procs: Procs, sockdir: Path, layout: str
) -> None:
    # ext4 punches holes and zeroes ranges: every fast zero is served
    d1, d2 = sockdir / "a", sockdir / "b"
    d1.mkdir()
    d2.mkdir()
    uri, _ = serve(procs, sockdir, layout, [d1, d2])
    got = nbdsh_json(
        uri,
        f"""
assert h.can_fast_zero() and h.can_zero()
h.pwrite(b"\\x5a" * {4 * MiB}, {2 * MiB})
out = {{
    "punch": attempt({MiB}, {2 * MiB}, nbd.CMD_FLAG_FAST_ZERO),
    "no_hole": attempt({MiB}, {4 * MiB}, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE),
    "zeroes": h.pread({MiB}, {2 * MiB}) == bytes({MiB})
    and h.pread({MiB}, {4 * MiB}) == bytes({MiB}),
    "kept": h.pread({MiB}, {3 * MiB}) == b"\\x5a" * {MiB},
}}
print(json.dumps(out))
""",
    )
    assert got == {"punch": "ok", "no_hole": "ok", "zeroes": True, "kept": True}
    # the punched range is a hole again
    cp = run([need_tool("nbdinfo"), "--map", "--json", uri])
    extents = [(e["offset"], e["length"], e["type"]) for e in json.loads(cp.stdout)]
    assert any(o <= 2 * MiB and o + n >= 3 * MiB and t == 3 for o, n, t in extents), extents


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_zero_is_refused_where_it_would_write_zeroes(
    procs: Procs, sockdir: Path, shm_dir: Path, layout: str
) -> None:
    # tmpfs has no ZERO_RANGE: NO_HOLE would allocate (= zero) every page, as slow as a
    # write, so with FAST_ZERO it is refused before anything changed; a punch is fine
    d2 = shm_dir / "b"
    d2.mkdir()
    uri, _ = serve(procs, sockdir, layout, [shm_dir, d2])
    got = nbdsh_json(
        uri,
        f"""
assert h.can_fast_zero()
h.pwrite(os.urandom({4 * MiB}), {MiB})
before = digest({4 * MiB}, {MiB})
out = {{"refused": attempt({2 * MiB}, {2 * MiB}, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)}}
out["unchanged"] = digest({4 * MiB}, {MiB}) == before
out["slow"] = attempt({2 * MiB}, {2 * MiB}, nbd.CMD_FLAG_NO_HOLE)
out["punch"] = attempt({MiB}, {4 * MiB}, nbd.CMD_FLAG_FAST_ZERO)
out["zeroes"] = h.pread({3 * MiB}, {2 * MiB}) == bytes({3 * MiB})
print(json.dumps(out))
""",
    )
    assert got == {
        "refused": "ENOTSUP",
        "unchanged": True,
        "slow": "ok",
        "punch": "ok",
        "zeroes": True,
    }
    # the refusal reached an export node as a FAST_ZERO request (flag 8), answered 95
    logs = "".join(p.output for p in procs.procs)
    served = [json.loads(ln) for ln in logs.splitlines() if '"served"' in ln]
    fast = [s for s in served if s["op"] == "write_zeroes" and s["flags"] & 8]
    assert any(s["status"] == 95 for s in fast), fast
    assert any(s["status"] == 0 for s in fast), fast


def test_mirror_legs_that_disagree_stay_identical(
    procs: Procs, sockdir: Path, shm_dir: Path
) -> None:
    # leg 0 on ext4 zeroes NO_HOLE ranges natively (ZERO_RANGE), leg 1 on tmpfs refuses:
    # the mirror zeroes leg 1 without FAST_ZERO, so both hold zeroes and the zero succeeds
    ext4 = sockdir / "a"
    ext4.mkdir()
    uri, _ = serve(procs, sockdir, "mirror", [ext4, shm_dir])
    got = nbdsh_json(
        uri,
        f"""
h.pwrite(os.urandom({4 * MiB}), 0)
out = {{"zero": attempt({2 * MiB}, {MiB}, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)}}
h.flush()
out["zeroes"] = h.pread({2 * MiB}, {MiB}) == bytes({2 * MiB})
print(json.dumps(out))
""",
    )
    assert got == {"zero": "ok", "zeroes": True}
    a = (ext4 / "leg0.img").read_bytes()
    b = (shm_dir / "leg1.img").read_bytes()
    assert a[MiB : 3 * MiB] == bytes(2 * MiB)
    assert a == b, "the mirror legs differ"


@pytest.mark.parametrize("layout", ["single", "stripe"])
def test_qemu_img_convert_onto_old_data(
    procs: Procs, sockdir: Path, tmp_path: Path, layout: str
) -> None:
    # the target holds old data everywhere; a sparse source must arrive exactly
    d1, d2 = sockdir / "a", sockdir / "b"
    d1.mkdir()
    d2.mkdir()
    uri, _ = serve(procs, sockdir, layout, [d1, d2])
    nbdsh_json(uri, f"h.pwrite(b'\\xee' * {SIZE}, 0); h.flush(); print(1)")
    src = tmp_path / "sparse.img"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.seek(3 * MiB)
        f.write(os.urandom(256 * KiB))
        f.seek(11 * MiB)
        f.write(os.urandom(64 * KiB))
    qemu_img = need_tool("qemu-img")
    run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri], timeout=120)
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), uri], timeout=120)


def test_qemu_io_fast_zeroes(procs: Procs, sockdir: Path, shm_dir: Path) -> None:
    # qemu's own FAST_ZERO (write -z -n: BDRV_REQ_NO_FALLBACK): served with unmap (-u),
    # refused on tmpfs without it (NO_HOLE), where the data stays as it was
    uri, _ = serve(procs, sockdir, "single", [shm_dir])
    qemu_io = need_tool("qemu-io")

    def qio(*cmds: str, ok: bool = True) -> str:
        args = [qemu_io, "-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        cp = run([*args, uri], timeout=60, check=ok)
        return cp.stdout + cp.stderr

    out = qio("write -P 0x44 0 2M", "write -z -n -u 0 1M", "read -P 0 0 1M")
    assert "fail" not in out.lower(), out
    out = qio("write -z -n 1M 1M", ok=False)
    assert "Operation not supported" in out, out
    out = qio("read -P 0x44 1M 1M")
    assert "fail" not in out.lower() and "Pattern verification" not in out, out
    logs = "".join(p.output for p in procs.procs)
    served = [json.loads(ln) for ln in logs.splitlines() if '"served"' in ln]
    fast = [(s["status"], s["offset"]) for s in served if s["op"] == "write_zeroes"]
    assert fast == [(0, 0), (95, MiB)], fast


def test_qemu_img_convert_onto_a_member_that_refuses_fast_zero(
    procs: Procs, sockdir: Path, tmp_path: Path
) -> None:
    # nbdkit's nozero filter advertises FAST_ZERO and refuses every one (zeromode=emulate):
    # qemu-img's pre-zeroing is refused, and it writes the zeroes instead
    sock = sockdir / "kit.sock"
    nbdkit(procs, sock, "--filter=nozero", "memory", str(SIZE), "zeromode=emulate")
    _, uri = procs.attach(f"nbd+unix:///?socket={sock}")
    got = nbdsh_json(
        uri,
        f"""
h.pwrite(b"\\xee" * {SIZE}, 0)
print(json.dumps([h.can_fast_zero(), attempt({MiB}, 0, nbd.CMD_FLAG_FAST_ZERO), digest({MiB}, 0)]))
""",
    )
    assert got[:2] == [True, "ENOTSUP"]
    assert got[2] == hashlib.sha256(b"\xee" * MiB).hexdigest()  # unchanged
    src = tmp_path / "sparse.img"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.seek(5 * MiB)
        f.write(os.urandom(128 * KiB))
    qemu_img = need_tool("qemu-img")
    run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri], timeout=120)
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), uri], timeout=120)


def test_nbd_member_without_fast_zero(procs: Procs, sockdir: Path) -> None:
    # a server that does not advertise SEND_FAST_ZERO: dst does not either, and a fast
    # zero sent anyway is refused by the front end; plain zeroes work
    sock = sockdir / "kit.sock"
    nbdkit(procs, sock, "--filter=nozero", "memory", str(SIZE), "fastzeromode=none")
    _, uri = procs.attach(f"nbd+unix:///?socket={sock}")
    got = nbdsh_json(
        uri,
        f"""
h.set_strict_mode(0)
h.pwrite(b"\\x11" * {MiB}, 0)
out = [h.can_fast_zero(), attempt({MiB}, 0, nbd.CMD_FLAG_FAST_ZERO), attempt({MiB}, 0, 0)]
print(json.dumps(out + [h.pread({MiB}, 0) == bytes({MiB})]))
""",
    )
    assert got == [False, "EINVAL", "ok", True]


def test_nbd_member_passes_fast_zero_through(procs: Procs, sockdir: Path) -> None:
    sock = sockdir / "kit.sock"
    nbdkit(procs, sock, "memory", str(SIZE))
    _, uri = procs.attach(f"nbd+unix:///?socket={sock}")
    got = nbdsh_json(
        uri,
        f"""
h.pwrite(b"\\x22" * {MiB}, 0)
out = [h.can_fast_zero(), attempt({MiB}, 0, nbd.CMD_FLAG_FAST_ZERO)]
h.cache({MiB}, 0)
print(json.dumps(out + [h.pread({MiB}, 0) == bytes({MiB}), h.can_cache()]))
""",
    )
    assert got == [True, "ok", True, True]


# ---- CACHE ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cache_reaches_the_backend(procs: Procs, sockdir: Path, layout: str) -> None:
    d1, d2 = sockdir / "a", sockdir / "b"
    d1.mkdir()
    d2.mkdir()
    uri, ctls = serve(procs, sockdir, layout, [d1, d2])
    got = nbdsh_json(
        uri,
        f"""
h.set_strict_mode(0)  # let the server refuse what is out of range
out = {{"can": h.can_cache()}}
h.pwrite(b"\\x33" * {MiB}, {MiB})
h.cache({2 * MiB}, {MiB})
h.cache({SIZE}, 0)  # the whole device
try:
    h.cache({2 * MiB}, {SIZE - MiB})
    out["past_end"] = "ok"
except nbd.Error as e:
    out["past_end"] = e.errno
out["data"] = h.pread({MiB}, {MiB}) == b"\\x33" * {MiB}
print(json.dumps(out))
""",
    )
    assert got == {"can": True, "past_end": "EINVAL", "data": True}
    caches = [export_stats(c)["caches"] for c in ctls]
    if layout == "mirror":  # every in-sync leg prefetches
        assert caches == [2, 2], caches
    else:  # a single member takes both; a stripe member its part of each
        assert caches == [2] * len(ctls), caches
    logs = "".join(p.output for p in procs.procs)
    served = [json.loads(ln) for ln in logs.splitlines() if '"served"' in ln]
    cached = [s for s in served if s["op"] == "cache"]
    assert cached and all(s["status"] == 0 for s in cached), cached
