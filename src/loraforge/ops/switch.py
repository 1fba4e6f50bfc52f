"""The one switch that runs every op's plain reference instead of its fused form.

`LORAFORGE_REFERENCE_OPS=1` in the environment, or `with use_reference():` in code. The references are
what a reader checks against the paper; the fused forms must agree with them (tests/test_ops.py), so
flipping the switch is how a suspected kernel bug is ruled in or out.
"""

from __future__ import annotations

import contextlib
import os

import torch

_state = {"reference": os.environ.get("LORAFORGE_REFERENCE_OPS", "") not in ("", "0")}


def reference_ops() -> bool:
    """True when every op should run its plain reference."""
    return _state["reference"]


@contextlib.contextmanager
def use_reference(on: bool = True):
    old = _state["reference"]
    _state["reference"] = on
    try:
        yield
    finally:
        _state["reference"] = old


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a product on `x` runs in: autocast's when it is on for x's device, else x's own."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype
