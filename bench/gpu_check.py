"""GPU checks and timings for one lent H200 session (not part of CI; CPU CI never needs a GPU).

    python bench/gpu_check.py --tokenizer DIR --out OUT_DIR

Builds a random Llama (1024 hidden, 8 layers, GQA) with transformers in a temp folder, then on CUDA:
1. our forward vs transformers' (bf16), 2. a LoRA training step vs PEFT (bf16 autocast, same init),
3. QLoRA (NF4 + double quant) codes on CUDA equal CPU's, a training step, packed weights unchanged,
4. mixed-adapter greedy generation equals each row alone, 5. `train()` end to end with bf16 autocast,
6. a prefix adapter's cached generation equals uncached decoding. Prints one table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn, warmup=2, reps=5):
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def build(folder: Path, tok_dir: Path, small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, n = (64, 128, 2) if small else (1024, 2816, 8)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                      num_attention_heads=16 if not small else 4, num_key_value_heads=4 if not small else 2,
                      max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default="examples/dates.jsonl")
    ap.add_argument("--dry-run", action="store_true", help="a tiny model on CPU, to check this script itself")
    args = ap.parse_args()
    assert args.dry_run or torch.cuda.is_available(), "no CUDA device"
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import loraforge as lf
    from loraforge.lora import get_adapter_params

    results: dict = {"device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
                     "torch": torch.__version__}
    tmp = Path(tempfile.mkdtemp())
    folder = tmp / "llama"
    build(folder, Path(args.tokenizer), args.dry_run)
    dev = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        torch.cuda.reset_peak_memory_stats = torch.cuda.max_memory_allocated = torch.cuda.empty_cache = lambda *a: 0
    B, S = (2, 32) if args.dry_run else (8, 512)
    ids = torch.randint(0, 49152, (B, S), generator=torch.Generator().manual_seed(0)).to(dev)

    def check(name, fn):
        t0 = time.perf_counter()
        try:
            results[name] = fn()
            results[name]["ok"] = results[name].get("ok", True)
        except Exception as e:  # noqa: BLE001 - report and go on to the next check
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(name, json.dumps(results[name], default=str)[:600], flush=True)

    def adamw_step(loss_fn, params, lr, autocast=True):
        """A function running one AdamW step on loss_fn() (bf16 autocast on CUDA) and returning the loss."""
        opt = torch.optim.AdamW(params, lr=lr)

        def step():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast and dev == "cuda"):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return step

    def forward_parity():
        model, _ = lf.load_model(str(folder), device=dev)  # bf16 by default on CUDA
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).to(dev).eval()
        with torch.no_grad():
            a, b = model(ids[:2, :128]).float(), hf(ids[:2, :128]).logits.float()
        rel = ((a - b).norm() / b.norm()).item()
        top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        return {"dtype": str(next(model.parameters()).dtype), "rel_err": rel, "top1_agree": top1,
                "ok": rel < 2e-2 and top1 > 0.95}

    def lora_step(dtype="float32", dropout=0.0):
        """Ours in `dtype` (fp32 under bf16 autocast, or --dtype auto = bf16 weights with fp32 masters) against
        PEFT under bf16 autocast, at `dropout` (first-step losses agree whatever the dropout: B = 0)."""
        model, _ = lf.load_model(str(folder), device=dev, dtype=dtype)
        lf.add_lora(model, "a", lf.LoraConfig(r=16, alpha=32, dropout=dropout))
        params = lf.set_trainable_params(model, "a")
        model.train()
        step = adamw_step(lambda: model(ids, labels=ids), params, 1e-4, autocast=dtype == "float32")
        init = {k: v.detach().clone() for k, v in get_adapter_params(model, "a").items()}
        first = step().item()
        torch.cuda.reset_peak_memory_stats()
        ours = cuda_time(step)
        ours_mem = torch.cuda.max_memory_allocated()
        model.cpu()  # free the GPU for PEFT's run
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(dev)
        pm = get_peft_model(hf, PeftLoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear"))
        with torch.no_grad():  # same initial adapter as ours
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    path = name.replace("base_model.model.", "").replace(".default.weight", "")
                    p.copy_(init[path])
        pm.train()
        pstep = adamw_step(lambda: pm(input_ids=ids, labels=ids).loss,
                           [p for p in pm.parameters() if p.requires_grad], 1e-4)
        pfirst = pstep().item()
        torch.cuda.reset_peak_memory_stats()
        theirs = cuda_time(pstep)
        theirs_mem = torch.cuda.max_memory_allocated()
        return {"ours_s": ours, "peft_s": theirs, "ratio": ours / theirs, "ours_peak_gb": ours_mem / 1e9,
                "peft_peak_gb": theirs_mem / 1e9, "first_loss_ours": first, "first_loss_peft": pfirst,
                "tokens_per_s_ours": B * S / ours, "ok": abs(first - pfirst) < 5e-2}

    def qlora():
        from loraforge.quant import QuantLinear, quantize

        w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
        cpu, gpu = quantize(w), quantize(w.to(dev))
        same_codes = torch.equal(cpu.data, gpu.data.cpu())
        model, _ = lf.load_model(str(folder), device=dev, dtype="float32", quantize="nf4")
        lf.add_lora(model, "a", lf.LoraConfig(r=16, alpha=32, dropout=0.0))
        params = lf.set_trainable_params(model, "a")
        packed = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        model.train()
        step = adamw_step(lambda: model(ids, labels=ids), params, 1e-3)
        losses = [step().item() for _ in range(3)]
        torch.cuda.reset_peak_memory_stats()
        t = cuda_time(step, warmup=0, reps=3)
        unchanged = all(torch.equal(packed[n], m.weight) for n, m in model.named_modules() if isinstance(m, QuantLinear))
        return {"codes_equal_cpu": same_codes, "step_s": t, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                "losses": losses, "packed_unchanged": unchanged, "ok": same_codes and unchanged}

    def mixed_generation():
        model, tok = lf.load_model(str(folder), device=dev)
        names = ["a", "b", "c", "d"]
        for i, n in enumerate(names):
            lf.add_lora(model, n, lf.LoraConfig(r=8 + 4 * i))
            g = torch.Generator(device="cpu").manual_seed(i)
            with torch.no_grad():
                for p in get_adapter_params(model, n).values():
                    p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.05)
        from loraforge.generate import SamplingParams, generate_ids

        prompts = [[5 + i, 6, 7, 8 + i] for i in range(8)]
        rows = [names[i % 4] for i in range(8)]
        p = SamplingParams(max_new_tokens=32)
        mixed = generate_ids(model, prompts, p, set(), adapter_ids=lf.adapter_ids_for(model, rows, device=dev))
        alone = []
        for q, n in zip(prompts, rows, strict=True):
            lf.set_adapter(model, n)
            alone.append(generate_ids(model, [q], p, set())[0])
        same = sum(a == b for a, b in zip(mixed, alone, strict=True))
        t = cuda_time(lambda: generate_ids(model, prompts, p, set(), adapter_ids=lf.adapter_ids_for(model, rows, device=dev)),
                      warmup=1, reps=3)
        return {"rows_equal_alone": f"{same}/8", "mixed_tok_s": 8 * 32 / t, "ok": same >= 7}

    def train_end_to_end():
        from loraforge.train import TrainConfig, train

        out = tmp / "run"
        res = train(TrainConfig(data=args.data, out=str(out), model=str(folder), method="qlora", max_steps=15,
                                lr=2e-3, batch_size=8, max_len=96, eval_every=5, save_every=5, rank=8, alpha=16),
                    progress=False)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in lines if "loss" in r and "val_loss" not in r]
        return {"first_loss": losses[0], "last_loss": losses[-1], "val_loss": res.val_loss,
                "files": sorted(p.name for p in out.iterdir()), "ok": losses[-1] < losses[0]}

    def prefix_generation():
        from loraforge.generate import SamplingParams, generate_ids
        from loraforge.prefix import PrefixConfig, add_prefix, prefix_for

        model, _ = lf.load_model(str(folder), device=dev, dtype="float32")
        add_prefix(model, "p", PrefixConfig(num_virtual_tokens=10))
        prompt = [11, 12, 13, 14]
        cached = generate_ids(model, [prompt], SamplingParams(max_new_tokens=12), set())[0]
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                logits = model(torch.tensor([seq], device=dev), prefix=prefix_for(model, "p", 1))
                seq.append(int(logits[0, -1].argmax()))
        with lf.disable_adapter(model):
            base = generate_ids(model, [prompt], SamplingParams(max_new_tokens=12), set())[0]
        return {"cached_equals_uncached": cached == seq[len(prompt):], "differs_from_base": cached != base,
                "ok": cached == seq[len(prompt):] and cached != base}

    for name, fn in [("forward_parity", forward_parity), ("lora_step_vs_peft", lora_step),
                     ("lora_step_auto_dropout_vs_peft", lambda: lora_step("auto", 0.05)), ("qlora", qlora),
                     ("mixed_generation", mixed_generation), ("train_end_to_end", train_end_to_end),
                     ("prefix_generation", prefix_generation)]:
        check(name, fn)
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n| check | ok | seconds |\n|---|---|---|")
    for k, v in results.items():
        if isinstance(v, dict):
            print(f"| {k} | {v.get('ok')} | {v.get('seconds')} |")
    return 0 if all(v.get("ok") for v in results.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
