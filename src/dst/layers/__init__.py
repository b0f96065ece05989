"""Layers: block devices over other block devices (nbdkit-filter style).

``mirror`` (RAID1 with a persistent bitmap and resync), ``stripe`` (RAID0),
``linear`` (concatenation) over N devices; ``faults`` over one, for tests.
``build_stack`` assembles what ``dst attach`` serves.
"""

from dst.layers.faults import FaultDevice
from dst.layers.linear import Composite, LinearDevice, merge_capabilities
from dst.layers.mirror import MirrorCore
from dst.layers.stack import MODES, MirrorDevice, build_stack, mirror_of
from dst.layers.stripe import StripeDevice

__all__ = [
    "MODES",
    "Composite",
    "FaultDevice",
    "LinearDevice",
    "MirrorCore",
    "MirrorDevice",
    "StripeDevice",
    "build_stack",
    "merge_capabilities",
    "mirror_of",
]
