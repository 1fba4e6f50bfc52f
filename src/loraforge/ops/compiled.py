"""Elementwise chains compiled by torch.compile (Inductor's C++ kernels on CPU) for 16-bit training steps.

An RMSNorm or silu(gate) * up is a chain of elementwise ops and reductions. Eager PyTorch runs each op as
its own pass over memory, with a temporary per op and a cast per dtype change; Inductor fuses the chain
into one or two loops that read the inputs once and keep the intermediates in registers. Forward +
backward through the autograd Function, embedded model's shapes (4 x 256 tokens), bf16, 2 threads:
RMSNorm 2.1-3.9 ms eager, 0.8-1.3 ms compiled; silu(gate) * up 3.9-4.1 ms eager, 2.5-2.7 ms compiled.
Two chains were tried and left eager, as the compiled form was no faster: the rotary embedding (1.19 vs
1.08 ms) and the loss head's softmax - onehot (270 vs 246 ms for a step's loss head, its two head
products included).
In fp32, where the eager ops need no casts, the compiled ones were no faster either (RMSNorm 1.51 vs 1.66
ms, silu(gate) * up 4.8 vs 4.4 ms).

A kernel is a plain function of tensors that the op calls where compiled_kernels() says yes; the op keeps
its own eager code for the rest. Inductor keeps the function's explicit casts, so a kernel rounds where
the eager code does, though it may add a sum's terms in another order. The ops' `*_ref` functions remain
the references that tests/test_ops.py checks both paths against.

The kernels run only where they pay for their compile time (~2 s per kernel and dtype the first time on
this machine, ~0.2 s once Inductor's cache in /tmp holds it): on CPU, in a pass that records gradients
(training, not decoding), on bf16 / fp16 tensors of at least MIN_NUMEL elements. CUDA keeps the eager
ops (its Inductor backend needs Triton and has not been measured here). LORAFORGE_COMPILE=0 turns the
kernels off; so does ops.use_reference(). The first kernel that fails to compile (no C++ compiler, say)
warns once, and the eager ops run from then on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from .switch import reference_ops

log = logging.getLogger("loraforge")

MIN_NUMEL = 1 << 16  # a [256, 256] activation: below this the eager ops take less than a few tens of us

_state = {"on": os.environ.get("LORAFORGE_COMPILE", "1") not in ("0", "", "false", "no"), "min_numel": MIN_NUMEL,
          "announced": False, "broken": False}


_local = threading.local()  # .recording: grad mode as the forward saw it, while a saved value is rebuilt


def compiled_kernels(x: Tensor) -> bool:
    """Whether the ops on `x` run their compiled kernels: call it before an autograd.Function's apply (grad
    mode is off inside forward) and pass the answer in."""
    recording = getattr(_local, "recording", None)
    return (
        _state["on"]
        and not _state["broken"]
        and not reference_ops()
        and x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)
        and (torch.is_grad_enabled() if recording is None else recording)
        and x.numel() >= _state["min_numel"]
    )


@contextlib.contextmanager
def as_recorded(recording: bool):
    """Ops within choose their kernels as in a pass where grad mode was `recording`: a value rebuilt in
    backward (ops.RecomputeSaved, with grad mode off) must come from the same kernel as in the forward."""
    old = getattr(_local, "recording", None)
    _local.recording = recording
    try:
        yield
    finally:
        _local.recording = old


@contextlib.contextmanager
def force_compiled(on: bool = True, min_numel: int = 0):
    """Tests: compiled kernels on (or off) whatever the size of the tensors."""
    old = dict(_state)
    _state.update(on=on, min_numel=min_numel, broken=False)
    try:
        yield
    finally:
        _state.update(on=old["on"], min_numel=old["min_numel"], broken=old["broken"])


class Kernel:
    """`fn`, compiled on first call (with dynamic sizes, so one compile serves every batch shape). The first
    kernel that fails to compile turns them all off: `fn` itself runs, eagerly, from then on."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled: Callable | None = None

    def __call__(self, *args):
        if _state["broken"]:
            return self.fn(*args)
        if self.compiled is None:
            if not _state["announced"]:
                _state["announced"] = True
                log.info("compiling the training step's elementwise kernels with torch.compile (the first "
                         "steps take a few seconds longer; LORAFORGE_COMPILE=0 turns this off)")
            self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        # tensors go in detached: a graph compiled for an input that requires grad is not reused for one
        # that does not (grad mode is off where the kernels run, in an autograd.Function)
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure; a bad input raises again just below
            out = self.fn(*args)
            _state["broken"] = True
            log.warning("torch.compile could not build the kernel %s (%s: %s); the eager ops run from now on "
                        "(LORAFORGE_COMPILE=0 skips trying)",
                        self.fn.__name__, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return out


def kernel(fn: Callable) -> Kernel:
    """Decorator: fn as a Kernel. The ops call it only where compiled_kernels() said yes, and keep their
    own eager code for the rest."""
    return Kernel(fn)
