"""The limit a training step can approach: its matmul FLOPs over this machine's fp32 matmul rate.

FLOPs are counted for the work a LoRA step cannot avoid:
  * base projections: forward, plus the input gradient in backward (frozen weights need no weight
    gradient), except layer 0's q/k/v whose input (the embedding output) needs no gradient;
  * LoRA: x A^T and h B^T forward; dh = g B, dB = g^T h, dA = dh^T x and dx = dh A backward;
  * attention: QK^T and PV forward, four matmuls of the same size backward, causal (half the scores);
  * the output head over the S - 1 predicted positions: forward and input gradient (it is frozen).
The rate is measured with torch.mm on the step's own shapes, the best rep of `rate_seconds` of reps
per shape (background load can only slow a rep down), weighted by each shape's share of a step.
"""

from __future__ import annotations

import time

import torch

from .setting import Setting, setup_process


def _dims(s: Setting) -> dict:
    from ..model.loading import read_config
    from .setting import model_folder

    c = read_config(model_folder(s))
    return {"H": c.hidden_size, "I": c.intermediate_size, "L": c.num_hidden_layers, "V": c.vocab_size,
            "heads": c.num_attention_heads, "kv": c.num_key_value_heads, "D": c.head_dim}


def projections(d: dict) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of the seven projections of one decoder layer."""
    H, inter, q, kv = d["H"], d["I"], d["heads"] * d["D"], d["kv"] * d["D"]
    return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_proj": (H, inter), "up_proj": (H, inter), "down_proj": (inter, H)}


def step_flops(s: Setting, d: dict | None = None) -> dict[str, float]:
    """Matmul FLOPs of one LoRA training step, by part."""
    d = d or _dims(s)
    T, r, L = s.batch * s.seq, s.r, d["L"]
    proj = projections(d)
    base = sum(i * o for i, o in proj.values())
    qkv_in = sum(i * o for n, (i, o) in proj.items() if n in ("q_proj", "k_proj", "v_proj"))
    lora = sum(r * (i + o) for i, o in proj.values())
    lora_qkv_dx = sum(r * i for n, (i, _) in proj.items() if n in ("q_proj", "k_proj", "v_proj"))
    return {
        "base": 2 * T * (2 * base * L - qkv_in),
        "lora": 2 * T * (3 * lora * L - lora_qkv_dx),
        "attention": 6 * (2 * s.batch * d["heads"] * s.seq * s.seq * d["D"]) / 2 * L,
        "head": 2 * 2 * s.batch * (s.seq - 1) * d["H"] * d["V"],
    }


def gen_flops(s: Setting, batch: int, d: dict | None = None) -> float:
    """Matmul FLOPs of generating `gen_tokens` tokens for `batch` rows (prefill + decode, adapter unmerged)."""
    d = d or _dims(s)
    proj = projections(d)
    per_token = 2 * (sum(i * o + s.r * (i + o) for i, o in proj.values()) * d["L"] + d["H"] * d["V"])
    tokens = batch * (s.gen_prompt + s.gen_tokens)
    return per_token * tokens


def matmul_rate(s: Setting) -> dict:
    """torch.mm GFLOP/s on the step's base and head shapes, forward ([T, in] x [in, out]) and backward
    ([T, out] x [out, in]), weighted by how many FLOPs of each shape a step does: in fp32, and in bf16 when
    this CPU multiplies bf16 fast (model.precision's verdict; elsewhere bf16 runs ~100x slower and a
    bf16 floor means nothing)."""
    from ..model.precision import cpu_bf16_verdict

    setup_process(s)
    out = _rate(s, torch.float32)
    out["bf16_verdict"] = verdict = cpu_bf16_verdict()
    if verdict["fast"]:
        bf16 = _rate(s, torch.bfloat16)
        out["gflops_bf16"], out["per_shape_bf16"] = bf16["gflops"], bf16["per_shape"]
    return out


def _rate(s: Setting, dtype: torch.dtype) -> dict:
    d = _dims(s)
    T, C = s.batch * s.seq, min(s.batch * s.seq, 256)
    weights: dict[tuple[int, int, int], float] = {}
    for i, o in projections(d).values():
        for shape in ((T, i, o), (T, o, i)):
            weights[shape] = weights.get(shape, 0) + d["L"]
    chunks = s.batch * (s.seq - 1) / C  # the head runs in chunks of C tokens
    weights[(C, d["H"], d["V"])] = chunks
    weights[(C, d["V"], d["H"])] = chunks
    flops, seconds, per_shape = 0.0, 0.0, {}
    for (m, k, n), w in sorted(weights.items()):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        out = torch.empty(m, n, dtype=dtype)
        torch.mm(a, b, out=out)
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < s.rate_seconds or best == float("inf"):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - t0)
        f = 2 * m * k * n
        per_shape[f"{m}x{k}x{n}"] = round(f / best / 1e9, 1)
        flops, seconds = flops + w * f, seconds + w * best
    return {"gflops": flops / seconds / 1e9, "per_shape": per_shape, "dims": d}
