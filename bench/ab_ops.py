"""A/B of the fused ops (src/loraforge/ops) and the NF4 dequantize between a git revision and the working tree.

    python bench/ab_ops.py --base REV [--reps 30] [--pairs 8] [--no-step]

Both versions run in one process, interleaved, on one thread, timed in thread CPU time (a loaded machine
delays a process but barely changes the CPU time it uses), median of `reps`; the ratio is new / base.
The whole-step rows run forward + backward of the embedded model with bf16 weights and the bench's
adapter (r = 16, dropout 0.05, batch 2 x 256), switching every call site between the two versions of
the ops each step (same dropout masks: the seed is reset), median of per-pair ratios.
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load_base(rev: str, into: Path):
    """(ops package, quant.functional module) as they were at `rev`."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/loraforge/ops", "src/loraforge/quant/functional.py"],
                         check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(tar)).extractall(into, filter="data")
    (into / "src/loraforge/ops").rename(into / "base_ops")
    (into / "src/loraforge/quant/functional.py").rename(into / "base_qf.py")
    sys.path.insert(0, str(into))
    return importlib.import_module("base_ops"), importlib.import_module("base_qf")


def timed(fns: dict, reps: int, inner: int = 3) -> dict:
    """Median thread-CPU seconds per call of each fn, the fns interleaved rep by rep."""
    ts = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t = time.thread_time()
            for _ in range(inner):
                f()
            ts[k].append((time.thread_time() - t) / inner)
    return {k: statistics.median(v) for k, v in ts.items()}


def op_rows(base, new, base_qf, new_qf, reps: int):
    torch.manual_seed(0)
    bf = torch.bfloat16
    for i, o in ((576, 576), (1536, 576), (576, 1536)):
        x = torch.randn(2, 256, i).to(bf).requires_grad_()
        W = (torch.randn(o, i) * 0.02).to(bf)
        A, B = (torch.randn(16, i) * 0.02).requires_grad_(), (torch.randn(o, 16) * 0.02).requires_grad_()
        g = torch.randn(2, 256, o).to(bf)

        def lora(ops, x=x, W=W, A=A, B=B, g=g):
            ops.lora_linear(x, W, None, A, B, 2.0, ops.dropout_mask(x, 0.05), 0.05).backward(g)

        yield f"dropout_mask + lora_linear fwd+bwd bf16 [512, {i}] -> {o}", lora
    for dt in (bf, torch.float32):
        h = torch.randn(510, 576).to(dt).requires_grad_()
        w = (torch.randn(49152, 576) * 0.05).to(dt)
        y = torch.randint(0, 49152, (510,))
        yield f"frozen_head_ce fwd+bwd {str(dt)[6:]} [510, 576] x [49152, 576]", \
            lambda ops, h=h, w=w, y=y: ops.frozen_head_ce(h, w, None, y, 256).backward()
    x = (torch.randn(2, 256, 576) * 3).to(bf).requires_grad_()
    wn, g = (torch.rand(576) + 0.5).to(bf), torch.randn(2, 256, 576).to(bf)
    yield "rms_norm fwd+bwd bf16 [2, 256, 576]", lambda ops: ops.rms_norm(x, wn, 1e-5).backward(g)
    from loraforge.quant import quantize

    for shape in ((12288, 576), (576, 1536), (576, 576)):
        st = quantize(torch.randn(shape) * 0.02, "nf4", 64, double_quant=True)
        absmax = new_qf.dequantize_absmax(st)
        for dt in (bf, torch.float32):
            args = (st.data, absmax, st.quant_map, 64, st.shape, dt)
            yield f"dequantize_4bit nf4 -> {str(dt)[6:]} {list(shape)}", \
                lambda ops, args=args: (base_qf if ops is base else new_qf).dequantize_4bit(*args)


def step_ratio(base, new, quantize: str | None, pairs: int) -> str:
    import loraforge.lora.layer as layer
    import loraforge.model.attention as att
    import loraforge.model.loss as mloss
    import loraforge.model.mlp as mlp
    import loraforge.model.norm as mnorm
    import loraforge.quant.functional as qf
    from loraforge.bench.setting import Setting, add_ours, batches
    from loraforge.lora import set_trainable_params
    from loraforge.model import load_model

    sites = [(layer, ["dropout_mask", "dropout_ref", "lora_linear"]), (mnorm, ["rms_norm"]), (mlp, ["silu_mul"]),
             (att, ["apply_rope"]), (mloss, ["frozen_head_ce"])]
    deq = {base: sys.modules["base_qf"].dequantize_4bit, new: qf.dequantize_4bit}

    def use(ops):
        for mod, names in sites:
            for n in names:
                setattr(mod, n, getattr(ops, n))
        qf.dequantize_4bit = deq[ops]  # dequantize() looks it up in its module at each call

    s = Setting(dtype="bfloat16", batch=2, seq=256)
    model, _ = load_model(s.model, device="cpu", dtype=s.dtype, quantize=quantize)
    add_ours(model, s)
    params = set_trainable_params(model, "bench")
    model.train()
    ids = batches(s, model.config.vocab_size)[0]

    def step(ops):
        use(ops)
        torch.manual_seed(1)
        t = time.thread_time()
        model(ids, labels=ids).backward()
        t = time.thread_time() - t
        for p in params:
            p.grad = None
        return t

    step(base), step(new)
    ratios, tb, tn = [], [], []
    for i in range(pairs):  # which version goes first alternates
        if i % 2 == 0:
            a = step(base)
            b = step(new)
        else:
            b = step(new)
            a = step(base)
        ratios.append(b / a)
        tb.append(a)
        tn.append(b)
    use(new)
    return (f"{statistics.median(tb):.3f} s  {statistics.median(tn):.3f} s  {statistics.median(ratios):.3f}"
            f"  (pairs {pairs}: {min(ratios):.3f}..{max(ratios):.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare the working tree against")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--no-step", action="store_true", help="only the per-op rows")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import loraforge.ops as new
    import loraforge.quant.functional as new_qf

    with tempfile.TemporaryDirectory() as tmp:
        base, base_qf = load_base(a.base, Path(tmp))
        print(f"{'op (1 thread, thread CPU time)':<64}  {'base':>9}  {'new':>9}  new/base")
        for name, fn in op_rows(base, new, base_qf, new_qf, a.reps):
            t = timed({"base": lambda fn=fn: fn(base), "new": lambda fn=fn: fn(new)}, a.reps)
            print(f"{name:<64}  {t['base'] * 1e3:7.3f}ms  {t['new'] * 1e3:7.3f}ms  {t['new'] / t['base']:.3f}")
        if not a.no_step:
            for q in (None, "nf4"):
                print(f"{'train step fwd+bwd bf16 ' + ('QLoRA' if q else 'LoRA'):<64}  {step_ratio(base, new, q, a.pairs)}")


if __name__ == "__main__":
    main()
