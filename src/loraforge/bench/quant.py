"""NF4 (+ double quantization) throughput and reconstruction error: loraforge.quant vs bitsandbytes.

Both quantize the same seeded weight ([n / 576, 576], normal with std 0.02 like a trained projection)
with block size 64; ours also dequantizes into bf16, QLoRA's compute dtype. Throughput is millions of
weights per second (best of `quant_reps`, since a background process can only make a rep slower), and
the error is relative to the weight's RMS.
"""

from __future__ import annotations

import time

import torch

from .setting import Setting, setup_process


def weight(s: Setting) -> torch.Tensor:
    g = torch.Generator().manual_seed(s.seed + 7)
    return torch.randn(s.quant_numel // 576, 576, generator=g) * 0.02


def _best(fn, reps: int) -> tuple[float, object]:
    out, best = fn(), float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _report(w: torch.Tensor, q_s: float, dq_s: float, deq: torch.Tensor, nbytes: int) -> dict:
    err = (deq.float() - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()
    return {
        "quantize_mparams_per_s": w.numel() / q_s / 1e6,
        "dequantize_mparams_per_s": w.numel() / dq_s / 1e6,
        "rel_rmse": float(err),
        "max_abs_err": float((deq.float() - w).abs().max()),
        "bits_per_param": 8 * nbytes / w.numel(),
        "checksum": float(deq.double().sum()),
    }


def ours(s: Setting) -> dict:
    try:
        from ..quant import dequantize, quantize, quantized_nbytes
    except ImportError as e:
        return {"pending": f"loraforge.quant unavailable ({e})"}
    setup_process(s)
    w = weight(s)
    q_s, state = _best(lambda: quantize(w, "nf4", 64, double_quant=True), s.quant_reps)
    dq_s, deq = _best(lambda: dequantize(state, torch.float32), s.quant_reps)
    res = _report(w, q_s, dq_s, deq, quantized_nbytes(state))
    # QLoRA's training step dequantizes into the compute dtype (bf16 where the CPU is fast at it)
    dq16_s, _ = _best(lambda: dequantize(state, torch.bfloat16), s.quant_reps)
    res["dequantize_bf16_mparams_per_s"] = w.numel() / dq16_s / 1e6
    return res


def bnb(s: Setting) -> dict:
    import bitsandbytes.functional as bf

    setup_process(s)
    w = weight(s)
    q_s, (packed, state) = _best(
        lambda: bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"), s.quant_reps)
    dq_s, deq = _best(lambda: bf.dequantize_4bit(packed, state), s.quant_reps)
    nbytes = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.state2 is not None:
        nbytes += state.state2.absmax.numel() * 4 + 256 * 4 + 4
    return _report(w, q_s, dq_s, deq, nbytes)
