"""A frozen linear layer whose weight is stored quantized (NF4 / FP4 / INT8), and the model helper.

The forward dequantizes the weight into the compute dtype, multiplies, and lets the full-precision
copy go: between steps only the packed codes and scales are held. The backward needs only the input
gradient (the base weight is frozen; adapters train beside it), grad_out @ W, and re-dequantizes W for
it instead of saving it, trading one dequantization for not keeping a [out, in] float tensor per layer
alive across the whole forward pass.
"""

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.errors import LoraForgeError
from loraforge.ops import compute_dtype, frozen_linear
from loraforge.quant.functional import (
    QuantState,
    check_config,
    dequantize,
    quantize,
    zeros_state,
)
from loraforge.quant.serialize import state_from_tensors, state_to_tensors

# The buffers that make up the quantized state, and the QuantState field each one holds.
_BUFFERS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")
_FIELDS = ("data", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")


class QuantMatmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized on the fly; the backward returns only the input gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: QuantState) -> torch.Tensor:
        # x: [*, in] -> [*, out], in x's dtype: the caller casts x to the compute dtype, and the weight is
        # dequantized straight into it (never to fp32 and then cast)
        ctx.state = state  # the packed buffers (frozen, never written in place), not W
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, dequantize(state, x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        # grad_out: [*, out] @ W: [out, in] -> [*, in]
        with torch.autocast(grad_out.device.type, enabled=False):
            return grad_out @ dequantize(ctx.state, grad_out.dtype), None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and not prefix.endswith(".") else f"{prefix}{key}"


class QuantLinear(nn.Module):
    """Frozen y = x W^T + b with W stored blockwise-quantized; b stays in full precision.

    The packed codes and scales are buffers (so `.to(device)` moves them and they never get
    gradients). `state_dict()` writes the bitsandbytes Linear4bit layout (see serialize.py), so a
    checkpoint round-trips through `load_state_dict` and transformers can read it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_config(quant_type, blocksize, where="QuantLinear")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.dense: torch.Tensor | None = None  # a dequantized copy for inference (cache_dense), not state
        # A zero weight of the right shapes, so that a model can be built (e.g. on the meta device)
        # and then filled by load_state_dict; from_linear / from_state_tensors replace it.
        shape = (out_features, in_features)
        self._set_state(zeros_state(shape, quant_type, blocksize, double_quant, dtype, device))
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_state(
        cls, state: QuantState, bias: torch.Tensor | None = None, compute_dtype=None
    ) -> "QuantLinear":
        if len(state.shape) != 2:
            raise LoraForgeError(
                f"QuantLinear: the quantized weight has shape {list(state.shape)}, not [out, in]."
            )
        out_features, in_features = state.shape
        module = cls(in_features, out_features, False, state.quant_type, state.blocksize, device="meta")
        module.compute_dtype = compute_dtype
        module._set_state(state)
        module.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        return module

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> "QuantLinear":
        """Quantize `linear`'s weight on its device; the bias is shared, not copied."""
        if linear.weight.is_meta:
            raise LoraForgeError("QuantLinear.from_linear: the weight is on the meta device; load it first.")
        state = quantize(linear.weight.detach(), quant_type, blocksize, double_quant)
        return cls.from_state(state, linear.bias, compute_dtype)

    @classmethod
    def from_state_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, device=None, compute_dtype=None
    ) -> "QuantLinear":
        """Build from the serialized layout: `prefix.weight`, `prefix.weight.absmax`, ..., `prefix.bias`."""
        state = state_from_tensors(tensors, _join(prefix, "weight"), device)
        bias = tensors.get(_join(prefix, "bias"))
        return cls.from_state(state, None if bias is None else bias.to(device), compute_dtype)

    def set_quant_state(self, state: QuantState) -> None:
        """Replace the quantized weight (e.g. the placeholder of a layer built on the meta device)."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise LoraForgeError(
                f"QuantLinear: the quantized weight has shape {list(state.shape)}, "
                f"expected [{self.out_features}, {self.in_features}]."
            )
        self._set_state(state)

    def _set_state(self, state: QuantState) -> None:
        self.quant_type, self.blocksize = state.quant_type, state.blocksize
        self.weight_dtype, self.nested_blocksize = state.dtype, state.nested_blocksize
        for buffer, field in zip(_BUFFERS, _FIELDS, strict=True):
            # register_buffer(name, None) keeps absent fields (int8 quant_map, no double quant)
            # out of state_dict and of .to().
            self.register_buffer(buffer, getattr(state, field), persistent=False)

    # -- the quantized weight -------------------------------------------------------------------

    @property
    def quant_state(self) -> QuantState:
        """A view of the buffers as a QuantState (no copies; rebuilt per call so it follows .to())."""
        fields = {field: getattr(self, buffer) for buffer, field in zip(_BUFFERS, _FIELDS, strict=True)}
        shape = torch.Size((self.out_features, self.in_features))
        return QuantState(
            self.quant_type,
            shape,
            self.weight_dtype,
            self.blocksize,
            nested_blocksize=self.nested_blocksize,
            **fields,
        )

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (default: the dtype it was quantized from)."""
        return dequantize(self.quant_state, dtype)

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        # x: [*, in] -> [*, out] in x.dtype. adapter_ids is accepted so that every projection is
        # called the same way; the frozen base layer has no adapters.
        # autocast decides the product's dtype when it is on; else the layer's compute dtype, else x's
        dtype = compute_dtype(x) if torch.is_autocast_enabled(x.device.type) else (self.compute_dtype or x.dtype)
        if torch.is_grad_enabled():
            out = QuantMatmul.apply(x.to(dtype), self.quant_state)
        elif self.dense is not None and self.dense.dtype == dtype:  # a server's cached weight: no dequantization
            out = frozen_linear(x.to(dtype), self.dense)
        else:  # inference: no autograd node, and the few-token GEMM form
            out = frozen_linear(x.to(dtype), dequantize(self.quant_state, dtype))
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        # under autocast the product keeps autocast's dtype, as nn.Linear's does
        return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)

    def cache_dense(self, dtype: torch.dtype | None) -> int:
        """Keep a dequantized copy in `dtype` for inference (None drops it); returns its bytes.

        Decoding multiplies each weight by a few tokens only, so dequantizing the whole weight every step
        costs more than the product itself; a server trades the memory of a dense copy for that."""
        self.dense = None if dtype is None else self.dequantize(dtype)
        return 0 if self.dense is None else self.dense.numel() * self.dense.element_size()

    # -- serialization --------------------------------------------------------------------------

    def to_state_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The serialized layout under `prefix` (a module name like "layers.0.q_proj", or "")."""
        tensors = state_to_tensors(self.quant_state, _join(prefix, "weight"))
        if self.bias is not None:
            tensors[_join(prefix, "bias")] = self.bias
        return tensors

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, tensor in self.to_state_tensors(prefix).items():
            destination[key] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs
    ):
        # The state's tensor shapes depend on how it was quantized (nested or not, block size), so
        # it is read whole and assigned rather than copied into the existing buffers.
        mine = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        name = prefix + "weight"
        if name not in mine:
            missing.append(name)
            return
        device = None if self.weight.is_meta else self.weight.device
        state = state_from_tensors(mine, name, device)
        if state.shape != (self.out_features, self.in_features):
            error_msgs.append(
                f"{name}: checkpoint shape {list(state.shape)} != [{self.out_features}, {self.in_features}]"
            )
            return
        self._set_state(state)
        used = {name} | {k for k in mine if k.startswith(name + ".")}  # bitsandbytes' quantized tensors
        if self.bias is not None:
            if prefix + "bias" in mine:
                bias = mine[prefix + "bias"].to(device=device, dtype=self.bias.dtype)
                self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
                used.add(prefix + "bias")
            else:
                missing.append(prefix + "bias")
        if strict:
            unexpected.extend(k for k in mine if k not in used)  # this module has no children

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would cast the float32 scales and tables, which must keep their
        # exact values; so the quantized buffers only follow the device change, and the bias follows
        # both. The target device is read off `fn` applied to an empty tensor.
        self.dense = None  # a cached copy would not follow; cache_dense again after moving
        quantized = {b: self._buffers.pop(b) for b in _BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for buffer, tensor in quantized.items():
                if tensor is not None:
                    target = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device)).device
                    if target != tensor.device:
                        tensor = (
                            torch.empty_like(tensor, device=target) if tensor.is_meta else tensor.to(target)
                        )
                self._buffers[buffer] = tensor
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}"
        )


def _skipper(skip) -> Callable[[str], bool]:
    if skip is None:
        return lambda name: False
    if callable(skip):
        return skip
    names = {skip} if isinstance(skip, str) else set(skip)
    return lambda name: name in names or name.rsplit(".", 1)[-1] in names


def linear_names(
    module: nn.Module, skip: Callable[[str], bool] | Iterable[str] | str | None = None
) -> list[str]:
    """Dotted names of the nn.Linear layers under `module` that get quantized.

    `lm_head` is never quantized (it is often tied to the embedding and is the most sensitive
    projection); embeddings and norms are not linears. `skip` is a predicate on the dotted module
    name, or names matched against the full name or its last part. The model loader uses the same
    rule, so quantizing on load and quantizing a loaded model pick the same layers.
    """
    skipped = _skipper(skip)
    return [
        name
        for name, child in module.named_modules()
        # name "" is `module` itself, which cannot be replaced in place: use QuantLinear.from_linear
        if name
        and isinstance(child, nn.Linear)
        and name.rsplit(".", 1)[-1] != "lm_head"
        and not skipped(name)
    ]


def quantize_linears(
    module: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    skip: Callable[[str], bool] | Iterable[str] | str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> int:
    """Replace every nn.Linear under `module` (see `linear_names`) by a QuantLinear, in place.

    Returns how many. Layers are replaced one at a time and only names are held between them, so
    each full-precision weight is freed as soon as its quantized copy exists (peak memory: the model
    plus one layer). Quantize before adding adapters, or skip the adapters' own linears.
    """
    check_config(quant_type, blocksize, where="quantize_linears")
    names = linear_names(module, skip)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, leaf)
        if linear.weight.is_meta:
            raise LoraForgeError(
                f"quantize_linears: '{name}' has its weight on the meta device; load weights first."
            )
        setattr(
            parent, leaf, QuantLinear.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype)
        )
        del linear
    return len(names)


def cache_dense_weights(model: nn.Module, dtype: torch.dtype | None) -> int:
    """cache_dense(dtype) on every QuantLinear under `model`; returns the bytes the copies hold."""
    return sum(m.cache_dense(dtype) for m in model.modules() if isinstance(m, QuantLinear))
