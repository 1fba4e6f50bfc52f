"""A Llama-family decoder in plain PyTorch, with Hugging Face's module names.

Why our own model rather than transformers' classes: adapter ids, prefixes and the KV cache are explicit
arguments of ``forward`` here, so a mixed batch (one adapter per row) needs no hooks or globals, the
serving engine owns its cache layout, and the training loss never materialises [tokens x vocab] logits.
Module and parameter names match ``LlamaForCausalLM`` exactly (``model.layers.0.self_attn.q_proj``), so
Hugging Face checkpoints load with ``load_state_dict`` and PEFT adapter keys map 1:1.

Every projection is called as ``proj(x, adapter_ids)``: the plain ``Linear`` ignores the ids, a LoRA
wrapper uses them. ``adapter_ids`` is a [B] long tensor of per-row adapter indices (-1 = base) or None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .cache import KVCache
from .config import ModelConfig
from .loss import chunked_cross_entropy

# Few-token products on CPU (decoding a batch): W [out, in] @ x^T [in, T], with x^T the transposed view of
# a row-major x, reads the weight in its stored order and runs up to 4x faster than F.linear's x @ W^T for
# 2 <= T <= 64 with MKL on 2 cores (SmolLM2's head at T = 2: 2.7 vs 14.5 ms; 576 -> 1536 at T = 8: 166 vs
# 275 us). Two exceptions, measured with cold weights: a contiguous x^T [in, T] (e.g. the transpose of a
# previous product of this form) takes a 2x slower MKL path, so x is made row-major first (a [T, in] copy);
# and for a long input (in >= 1024: the MLP's down projection) at 5 <= T <= 11, F.linear's kernel wins
# (1536 -> 576 at T = 8: 239 vs 283 us; 1536 -> 128: 52 vs 66 us; 576 -> 192 is the other way round).
# At T = 1 both are a GEMV.
SKINNY_MAX_TOKENS = 64


def frozen_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, contiguous: bool = True) -> Tensor:
    """F.linear(x, weight, bias), in the faster GEMM form for a few tokens when no gradient is recorded.

    That form computes the [out, T] transpose; contiguous=False returns its [T, out] view without the
    copy, for a consumer that only reads it (the copy is 4 ms of a 10 ms head product at T = 8; layers'
    outputs stay contiguous, as the ops after them (norms, rotary embedding, attention, even silu(gate) * up)
    ran slower on the strided view than the copy costs).
    Grad mode is always off inside an autograd.Function's forward, so call it outside one.
    """
    T = x.numel() // x.shape[-1] if x.shape[-1] else 0
    out_f, in_f = weight.shape
    if not (1 < T <= SKINNY_MAX_TOKENS and x.device.type == "cpu" and not torch.is_grad_enabled()) or (
        in_f >= 1024 and 5 <= T <= 11
    ):
        return F.linear(x, weight, bias)
    x2 = x.reshape(T, in_f)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = (weight @ x2.t() if bias is None else torch.addmm(bias[:, None], weight, x2.t())).t()  # [T, out]
    return (out.contiguous() if contiguous else out).view(*x.shape[:-1], out_f)


class Linear(nn.Linear):
    """nn.Linear that accepts (and ignores) the per-row adapter ids every projection is called with."""

    def forward(self, x: Tensor, adapter_ids: Tensor | None = None) -> Tensor:  # noqa: ARG002
        return frozen_linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward: saves x and the [*, 1] scale, not autograd's chain of
    [*, H] intermediates, and takes ~4 passes over [*, H] in backward instead of ~8."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        # Normalise in fp32 as Hugging Face does, then cast back: bf16 variance loses too many bits.
        xf = x.float()
        y = torch.pow(xf, 2)  # x^2, then overwritten by the output: one [*, H] buffer, not two
        rstd = torch.rsqrt(y.mean(-1, keepdim=True) + eps)  # [*, 1]
        y = torch.mul(xf, rstd, out=y).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y.mul_(weight) if weight.dtype == y.dtype else weight * y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd  # [*, H]
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (g.float() * xhat).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
        gx = (g * weight).float()  # d loss / d xhat
        # d xhat_j / d x_i = rstd (delta_ij - xhat_i xhat_j / H)
        dot = (gx * xhat).mean(-1, keepdim=True)  # [*, 1]
        dx = gx.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
        return dx, dw, None


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq.float()
    if sc["rope_type"] == "linear":
        return (inv_freq / float(sc["factor"])).float()
    # llama3: long wavelengths are divided by `factor`, short ones kept, a smooth ramp between.
    factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_ctx = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
    scaled = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return scaled.float()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    # q: [B, H, S, D], k: [B, Hkv, S, D], cos/sin: [B, 1, S, D]
    return _RopeFn.apply(q, cos, sin), _RopeFn.apply(k, cos, sin)


class _RopeFn(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin in one output buffer; the backward is the inverse rotation.

    Autograd of the plain expression allocates five [B, H, S, D] temporaries forward and as many
    backward; this writes the output once and the gradient once.
    """

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1.0)
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        dx = g * cos  # rotate_half's transpose maps (a, b) to (b, -a)
        dx[..., :h].addcmul_(g[..., h:], sin[..., h:])
        dx[..., h:].addcmul_(g[..., :h], sin[..., :h], value=-1.0)
        return dx, None, None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=cfg.o_bias)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        adapter_ids: Tensor | None,
        cache: KVCache | None,
        prefix: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x, adapter_ids).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x, adapter_ids).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x, adapter_ids).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)  # q: [B, H, S, D], k/v: [B, Hkv, S, D]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, T, D], T = everything cached so far + S
        elif prefix is not None:
            pk, pv = prefix  # [B, Hkv, P, D]: learned keys/values, positions before the first token
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and k.shape[2] == S, enable_gqa=self.n_kv != self.n_heads
        )  # [B, H, S, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1), adapter_ids)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x: Tensor, adapter_ids: Tensor | None, recompute: bool = False) -> Tensor:
        gate, up = self.gate_proj(x, adapter_ids), self.up_proj(x, adapter_ids)  # [B, S, I]
        h = _SiluMulFn.apply(gate, up)
        if not recompute:
            return self.down_proj(h, adapter_ids)
        # down_proj keeps its input for the adapter's gradient; rebuild it from gate and up instead
        with RecomputeSaved(h, lambda: F.silu(gate).mul_(up)):
            return self.down_proj(h, adapter_ids)


class _SiluMulFn(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only: silu(gate) is recomputed in backward (one cheap pass)
    rather than kept alive, one [B, S, intermediate] tensor less per layer."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, g: Tensor):
        gate, up = ctx.saved_tensors
        d_up = F.silu(gate).mul_(g) if ctx.needs_input_grad[1] else None
        d_gate = torch.ops.aten.silu_backward(g * up, gate) if ctx.needs_input_grad[0] else None
        return d_gate, d_up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, adapter_ids, cache, prefix, recompute: bool = False):
        """recompute: rebuild the norms' outputs and the MLP's hidden product in backward instead of
        keeping them (training without activation checkpointing; see RecomputeSaved)."""
        # The residual adds go into the block's output buffer, which nothing saves: a fresh sum would
        # leave that buffer as a freed hole in the heap each time (attn + x == x + attn bit for bit).
        if not recompute:
            x = self.self_attn(self.input_layernorm(x), cos, sin, mask, adapter_ids, cache, prefix).add_(x)
            return self.mlp(self.post_attention_layernorm(x), adapter_ids).add_(x)
        h = self.input_layernorm(x)
        with RecomputeSaved(h, lambda x=x: self.input_layernorm(x)):  # q/k/v keep their input for the adapters
            x = self.self_attn(h, cos, sin, mask, adapter_ids, cache, prefix).add_(x)
        h = self.post_attention_layernorm(x)
        with RecomputeSaved(h, lambda x=x: self.post_attention_layernorm(x)):
            return self.mlp(h, adapter_ids, recompute=True).add_(x)


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

        def pack(t: Tensor):
            if t.untyped_storage().data_ptr() != ptr:
                return t
            state["pending"] += 1
            return (t.shape, t.stride(), t.storage_offset())

        def unpack(p):
            if isinstance(p, Tensor):
                return p
            if state["value"] is None:
                state["value"] = rebuild()
            v = state["value"]
            state["pending"] -= 1
            if state["pending"] <= 0:  # the last node that saved it: let the rebuilt tensor go
                state["value"] = None
            return v.as_strided(*p)

        super().__init__(pack, unpack)


class Backbone(nn.Module):
    """The `model.` part of LlamaForCausalLM: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions: [B, S] -> cos/sin: [B, 1, S, D]
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(
        self,
        input_ids: Tensor,
        *,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        adapter_ids: Tensor | None = None,
        cache: KVCache | None = None,
        prefix: list[tuple[Tensor, Tensor]] | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int = 0,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """Run the decoder.

        input_ids: [B, S]. positions: [B, S] (default: continue after the cache or prefix).
        attention_mask: [B, 1, S, T] bool (True = may attend), T = keys including cache/prefix; default
        causal, or taken from the cache's key mask. prefix: per-layer (k, v) [B, Hkv, P, D] prepended as
        past keys when there is no cache (with a cache, put the prefix into the cache instead).
        labels: [B, S] with -100 for ignored tokens; when given, returns the mean next-token loss (a
        scalar) computed in chunks, never the full logits. logits_to_keep: only the last N positions'
        logits (0 = all).
        """
        B, S = input_ids.shape
        training = self.training and torch.is_grad_enabled()
        if training:
            release_free_heap()
        past = cache.length if cache is not None else (prefix[0][0].shape[2] if prefix else 0)
        if positions is None:
            positions = torch.arange(past, past + S, device=input_ids.device).expand(B, S)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        mask = attention_mask
        if mask is None and cache is not None:
            mask = cache.attention_mask(S)  # [B, 1, S, T] or None when plain causal suffices
        elif mask is None and prefix is not None:
            mask = causal_mask(S, past, x.device).expand(B, 1, S, past + S)
        for i, layer in enumerate(self.model.layers):
            p = prefix[i] if (prefix is not None and cache is None) else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, adapter_ids, cache, p, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, adapter_ids, cache, p, recompute=training)
        if cache is not None:
            cache.advance(S)
        x = self.model.norm(x)
        if labels is not None:
            loss = chunked_cross_entropy(x, self.lm_head, labels, adapter_ids)
            if training:
                release_free_heap()  # the forward's temporaries, before the backward allocates its own
            return loss
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # [B, 1, H]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        if type(self.lm_head) is Linear:  # logits are only read: no copy out of the few-token GEMM form
            return frozen_linear(x, self.lm_head.weight, self.lm_head.bias, contiguous=False)
        return self.lm_head(x, adapter_ids)


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to release
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim); called at the start and the end of a
    training forward.

    A training step frees thousands of activation and gradient buffers of a dozen sizes, in an order
    unlike the one they were allocated in. glibc keeps freed blocks mapped for reuse, and the holes
    between long-lived tensors add up: ~0.25 GB at the end of a forward and more across steps
    (SmolLM2, 4 x 256 tokens, 30 layers), resident memory that no live tensor uses. Trimming returns
    them; the price is re-faulting the pages that are reused, about 1% of the step.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def causal_mask(S: int, past: int, device) -> Tensor:
    """[1, 1, S, past + S] bool: query i (absolute position past + i) sees keys 0 .. past + i."""
    q = torch.arange(S, device=device)[:, None] + past
    k = torch.arange(past + S, device=device)[None, :]
    return (k <= q)[None, None]
