"""Shared fixtures: temporary dirs for sockets (short paths) and process reaping."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dst import compiled
from tests import ceph
from tests.procs import IN_CI, Procs


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test an editable install whose compiled modules are older than their
    source: the extensions, not the edits, would run."""
    old = compiled.stale()
    if old:
        pytest.exit(
            f"these modules' C extensions are older than their source or left over: "
            f"{', '.join(old)}; "
            "rebuild them with scripts/dev env (or install with DST_PURE_PYTHON=1)",
            returncode=4,
        )


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A directory on tmpfs (/dev/shm): it punches holes but has no ZERO_RANGE, and never
    blocks a read or a write (the file backend serves it inline)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs) on this machine")
    d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="dst-test-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="dst-t-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test's own directory for the nodes' default control sockets (DST_RUNTIME_DIR),
    so `dst status` without --control sees only that test's nodes, never the machine's."""
    d = Path(tempfile.mkdtemp(prefix="dst-r-", dir="/tmp"))
    monkeypatch.setenv("DST_RUNTIME_DIR", str(d))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def procs(sockdir: Path) -> Iterator[Procs]:
    ps = Procs(sockdir)
    try:
        yield ps
    finally:
        ps.stop_all()


@pytest.fixture(scope="module")
def ceph_cluster() -> Iterator[ceph.Cluster]:
    """A one-node Ceph cluster (1 mon, 1 memstore OSD, pool ``rbd``) shared by a test module.

    Skips (fails under CI=true) with the install command when Ceph is not installed."""
    why = ceph.missing()
    if why is not None:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    cluster = ceph.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.dir, ignore_errors=True)
