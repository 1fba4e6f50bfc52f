"""The plain projection every layer is built from."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops import frozen_linear


class Linear(nn.Linear):
    """nn.Linear that accepts (and ignores) the per-row adapter ids every projection is called with."""

    def forward(self, x: Tensor, adapter_ids: Tensor | None = None) -> Tensor:  # noqa: ARG002
        return frozen_linear(x, self.weight, self.bias)
