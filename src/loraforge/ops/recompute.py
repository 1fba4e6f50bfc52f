"""Saved-tensor hooks that store a cheap-to-rebuild activation as a recipe instead of as data."""

from __future__ import annotations

import torch
from torch import Tensor

from .compiled import as_recorded


class RecomputeSaved(torch.autograd.graph.saved_tensors_hooks):
    """Within the block, autograd saves `value` (and views of it) as a recipe, not as data: `rebuild()`
    runs again in backward, once for all the nodes that saved it.

    For a tensor that is cheap to rebuild from tensors autograd keeps anyway (a norm's output from its
    input; silu(gate) * up from the gate and up the SiLU backward saves), one elementwise pass in
    backward replaces holding [tokens x width] per layer from the forward to the backward. `rebuild`
    must reproduce `value` exactly (the same ops), and must not refer to `value` itself.
    """

    def __init__(self, value: Tensor, rebuild):
        ptr, state = value.untyped_storage().data_ptr(), {"pending": 0, "value": None}
        recording = torch.is_grad_enabled()  # the rebuild runs in backward, grad mode off: same kernels as now

        def pack(t: Tensor):
            if t.untyped_storage().data_ptr() != ptr:
                return t
            state["pending"] += 1
            return (t.shape, t.stride(), t.storage_offset())

        def unpack(p):
            if isinstance(p, Tensor):
                return p
            if state["value"] is None:
                with as_recorded(recording):
                    state["value"] = rebuild()
            v = state["value"]
            state["pending"] -= 1
            if state["pending"] <= 0:  # the last node that saved it: let the rebuilt tensor go
                state["value"] = None
            return v.as_strided(*p)

        super().__init__(pack, unpack)
