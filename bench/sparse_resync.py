"""Full resync of a sparse mirror leg: time, bytes moved, and how sparse the new leg stays.

Leg A is a sparse file of ``--size`` (default 4 GiB) holding ``--data`` (default 64 MiB)
of random bytes in evenly spread ``--piece`` (64 KiB) runs; leg B is a new empty file. A
``dst attach A B --mirror`` with a new bitmap file copies A to B at start (a full resync);
the ``--debug=mirror`` events time it. Afterwards the script reads the resync's bytes
copied and zeroed and the bytes the client node read from A (``dst status --json``),
stops everything, and checks that B equals A byte for byte and how much of B is allocated.

``--compare SRC`` also runs the ``dst`` of another source tree (its ``src`` directory, e.g.
an older revision from ``git archive REV src | tar -x -C /tmp/old``), alternating with
this one, ``--rounds`` times each. Runs in a private directory on ``--dir`` (/dev/shm).
Results: docs/benchmarks-raid.md.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dst.bench.procs import ServerProcess
from dst.units import parse_size

DST = [sys.executable, "-m", "dst"]


def make_source(path: Path, size: int, data: int, piece: int) -> None:
    """A sparse file with ``data`` bytes of random runs of ``piece`` bytes, evenly spread."""
    n = max(1, data // piece)
    stride = size // n // piece * piece
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(n):
            f.seek(i * stride)
            f.write(rng.randbytes(piece))


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def events(proc: ServerProcess) -> list[dict[str, Any]]:
    out = []
    for line in proc.output().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def one_run(src: str | None, work: Path, size: int, data: int, piece: int) -> dict[str, Any]:
    """One full resync of B from A with the ``dst`` of source tree ``src`` (None: this one)."""
    env_path = os.environ.get("PYTHONPATH", "")
    if src is not None:
        os.environ["PYTHONPATH"] = src
    procs: list[ServerProcess] = []
    try:
        a, b = work / "a.img", work / "b.img"
        make_source(a, size, data, piece)
        members = []
        for name in ("a", "b"):
            sock = work / f"{name}.sock"
            args = [*DST, "export", "--listen", f"unix:{sock}", f"file:{work}/{name}.img"]
            args += ["--size", str(size)]
            p = ServerProcess(f"export-{name}", args, work / f"export-{name}.log")
            procs.append(p)
            p.wait_for_line(r"listening on ", 30, "the export node to listen")
            members.append(f"dst+unix:///default?socket={sock}")
        ctl = work / "m.ctl"
        args = [*DST, "attach", *members, "--mirror", "--bitmap", str(work / "m.bitmap")]
        args += ["--debug=mirror", "--nbd", f"unix:{work}/m.nbd", "--control", str(ctl)]
        att = ServerProcess("attach", args, work / "attach.log")
        procs.append(att)
        deadline = time.monotonic() + 600
        done: dict[str, Any] | None = None
        while done is None:
            done = next((e for e in events(att) if e.get("event") == "resync-done"), None)
            att.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"no resync-done within 600 s: {att.last_words()}")
            time.sleep(0.02)
        cp = subprocess.run(
            [*DST, "status", "--control", str(ctl), "--json"], capture_output=True, text=True
        )
        st = json.loads(cp.stdout[cp.stdout.find("{") :])
        read_from_a = st["members"][0].get("bytes_read")
        for p in reversed(procs):
            p.stop(30)
        procs.clear()
        return {
            "seconds": done["seconds"],
            "bytes": done["bytes"],
            "zeroed": done.get("zeroed", 0),
            "read_from_a": read_from_a,
            "a_allocated": allocated(a),
            "b_allocated": allocated(b),
            "identical": filecmp.cmp(a, b, shallow=False),
        }
    finally:
        for p in reversed(procs):
            p.stop(10)
        os.environ["PYTHONPATH"] = env_path
        for f in work.iterdir():
            f.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--data", default="64M")
    ap.add_argument("--piece", default="64K")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare", metavar="SRC", help="another source tree's src directory")
    ap.add_argument("--dir", default="/dev/shm")
    o = ap.parse_args()
    size, data, piece = parse_size(o.size), parse_size(o.data), parse_size(o.piece)
    trees: list[tuple[str, str | None]] = [("this", None)]
    if o.compare:
        trees.insert(0, (f"{o.compare}", str(Path(o.compare).resolve())))
    work = Path(tempfile.mkdtemp(prefix="dst-sparse-", dir=o.dir))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    try:
        for r in range(o.rounds):
            for name, src in trees:
                res = one_run(src, work, size, data, piece)
                results[name].append(res)
                print(f"round {r + 1} {name}: {json.dumps(res)}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"full resync of a {o.size} leg holding {o.data} in {o.piece} runs, {o.rounds} rounds")
    print("| dst | resync s (median, range) | read from A | zeroed | B allocated | identical |")
    print("|---|---:|---:|---:|---:|---|")
    for name, runs in results.items():
        secs = [x["seconds"] for x in runs]
        last = runs[-1]
        print(
            f"| {name} | {statistics.median(secs):.2f} ({min(secs):.2f}-{max(secs):.2f}) "
            f"| {last['read_from_a'] / (1 << 20):.0f} MiB | {last['zeroed'] / (1 << 20):.0f} MiB "
            f"| {last['b_allocated'] / (1 << 20):.0f} MiB "
            f"(A: {last['a_allocated'] / (1 << 20):.0f} MiB) "
            f"| {'yes' if all(x['identical'] for x in runs) else 'NO'} |"
        )
    return 0 if all(x["identical"] for runs in results.values() for x in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
