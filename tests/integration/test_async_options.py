"""The asynchronous-leg options on the command line and in a config file: wrong uses exit 2
with one `dst: error:` line, found before any member is contacted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_cli_errors import error_line
from tests.procs import dst_run

pytestmark = pytest.mark.integration

A, B, C = "dst://node-a/default", "dst://node-b/default", "dst://far/default"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([A, "--async-leg", C], "--async-leg applies to --mirror only"),
        ([A, B, "--stripe", "64K", "--async-leg", C], "--async-leg applies to --mirror only"),
        ([A, B, "--mirror", "--async-leg", A], "the same member is named twice"),
        ([A, B, "--mirror", "--async-leg", C, "--async-max-lag", "0"], "--async-max-lag must"),
        ([A, B, "--mirror", "--async-leg", C, "--async-max-lag", "lots"], "invalid"),
        (
            [A, B, "--mirror", "--async-leg", C, "--async-on-congestion", "drop"],
            "invalid --async-on-congestion 'drop': use pull-ahead",
        ),
        ([A, B, "--mirror", "--async-leg", "ftp://far/x"], "ftp://far/x"),
    ],
)
def test_wrong_async_options_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    cp = dst_run("attach", *args, "--nbd", f"unix:{tmp_path}/n.sock")
    assert cp.returncode == 2, cp.stderr
    assert needle in error_line(cp.stderr)


def test_config_file_takes_async_legs_under_either_name(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text(
        f'members = ["{A}", "{B}"]\nmirror = true\nasync-legs = ["{C}"]\n'
        f'async-leg = ["{C}"]\nnbd = "unix:{tmp_path}/n.sock"\n'
    )
    cp = dst_run("attach", "--config", str(cfg))
    assert cp.returncode == 2
    assert "async-legs and async-leg are the same option" in error_line(cp.stderr)
    cfg.write_text(
        f'members = ["{A}", "{B}"]\nmirror = true\nasync-legs = "{A}"\n'
        f'nbd = "unix:{tmp_path}/n.sock"\n'
    )
    cp = dst_run("attach", "--config", str(cfg))
    assert cp.returncode == 2 and "named twice" in error_line(cp.stderr)
    cfg.write_text(
        f'members = ["{A}"]\nasync-legs = ["{C}"]\nasync-on-congestion = 3\n'
        f'nbd = "unix:{tmp_path}/n.sock"\n'
    )
    cp = dst_run("attach", "--config", str(cfg))
    assert cp.returncode == 2
    assert f"config file {cfg}: async-on-congestion must be a string" in error_line(cp.stderr)


def test_ctl_add_async_needs_a_uri(tmp_path: Path) -> None:
    cp = dst_run("ctl", "--control", str(tmp_path / "none.sock"), "add", "--async")
    assert cp.returncode == 2
    assert "takes one member URI" in error_line(cp.stderr) and "--async" in cp.stderr
