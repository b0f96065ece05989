"""`dst status` and `dst ctl`: talk to a running node over its control socket."""

from __future__ import annotations

import argparse

from dst.errors import DstError


def run_control(ns: argparse.Namespace) -> int:
    raise DstError(
        f"cannot reach the control socket {ns.control}: this version of dst has no control "
        "socket yet; use the log of the node instead"
    )
