"""`dst demo`: the self-contained default, as the README's first command runs it."""

from __future__ import annotations

import glob
import signal
import tempfile

import pytest

from tests.procs import Procs, dst_run

pytestmark = pytest.mark.integration


def demo_dirs() -> set[str]:
    return set(glob.glob(f"{tempfile.gettempdir()}/dst-demo-*"))


def test_demo_check_passes_and_leaves_nothing_behind() -> None:
    before = demo_dirs()
    cp = dst_run("demo", "--check", timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "self-check passed" in cp.stdout
    assert "nbd+unix:///?socket=" in cp.stdout
    assert demo_dirs() == before


def test_demo_runs_until_ctrl_c(procs: Procs) -> None:
    before = demo_dirs()
    p = procs.dst("demo")
    m = p.wait_for(r"NBD front end: (\S+)")
    p.wait_for(r"Press Ctrl-C")
    assert "nbdinfo" in p.output and "qemu-io" in p.output
    p.signal(signal.SIGINT)
    assert p.wait(20) == 0
    assert demo_dirs() == before
    assert m.group(1).startswith("nbd+unix:///")
