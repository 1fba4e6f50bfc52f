"""Turn the workers' raw results into results.json (ratios: below 1 means loraforge is faster/smaller)
and one printed table."""

from __future__ import annotations

from .floor import gen_flops, step_flops
from .setting import Setting

LOSS_TOL = {"float32": 1e-4, "bfloat16": 1e-2}  # first-step loss against PEFT at the same precision
# key -> most it may be. Against "PEFT at its best" (the faster of its fp32 and bf16-autocast rows); on a
# CPU without fast bf16 only PEFT's fp32 row runs, and the bar is lower.
TARGETS_FAST_BF16 = {
    "lora_step_ratio_vs_peft_best": 0.6,
    "qlora_step_ratio_vs_peft_bnb_best": 0.7,
    "lora_peak_rss_ratio_vs_peft_best": 0.5,
    "lora_step_over_floor_best": 1.5,
}
TARGETS_SLOW_BF16 = {"lora_step_ratio_vs_peft_best": 0.85}


def _ok(r: dict | None) -> bool:
    return bool(r) and "error" not in r and "pending" not in r and "skipped" not in r


def _best(*rows: dict | None) -> dict | None:
    """The faster of PEFT's rows that ran."""
    ran = [r for r in rows if _ok(r)]
    return min(ran, key=lambda r: r["step_s"]) if ran else None


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    return a[key] / b[key] if _ok(a) and _ok(b) else None


def _loss_check(ours: dict | None, anchor: dict | None, precision: str = "float32") -> dict | None:
    """The first step's loss (B = 0 there, so dropout's masks do not enter it); later steps differ by
    each library's own dropout draws."""
    if not (_ok(ours) and _ok(anchor)):
        return None
    diffs = [abs(a - b) for a, b in zip(ours["losses"], anchor["losses"], strict=False)]
    tol = LOSS_TOL[precision]
    return {"ours": ours["losses"][0], "peft": anchor["losses"][0], "abs_diff": diffs[0], "precision": precision,
            "tolerance": tol, "max_abs_diff_all_steps": max(diffs), "steps": len(diffs), "ok": diffs[0] <= tol}


def build(raw: dict[str, dict], s: Setting, machine: dict) -> dict:
    rate = raw.get("matmul_rate", {})
    flops = step_flops(s, rate.get("dims")) if _ok(rate) else None
    floor_s = sum(flops.values()) / (rate["gflops"] * 1e9) if flops else None
    lo, lp = raw.get("lora_ours"), raw.get("lora_peft")
    qo, qp = raw.get("qlora_ours"), raw.get("qlora_peft_bnb")
    la, lpb, qa, qpb = (raw.get(k) for k in ("lora_ours_auto", "lora_peft_bf16", "qlora_ours_auto",
                                             "qlora_peft_bnb_bf16"))
    loss, qloss = _loss_check(lo, lp), _loss_check(qo, qp)
    fast_bf16 = bool((machine.get("bf16") or {}).get("fast"))
    rate_best = max(rate.get("gflops") or 0, rate.get("gflops_bf16") or 0) if _ok(rate) else 0
    floor_best = sum(flops.values()) / (rate_best * 1e9) if flops and rate_best else None
    # the auto rows against PEFT at the same precision: bf16 autocast where auto picked bf16, else fp32
    same = (lpb, qpb) if _ok(la) and la.get("dtype") == "bfloat16" else (lp, qp)
    lbest, qbest = _best(lp, lpb), _best(qp, qpb)
    out = {
        "lora_step_ratio_vs_peft": _ratio(lo, lp, "step_s"),
        "qlora_step_ratio_vs_peft_bnb": _ratio(qo, qp, "step_s"),
        "lora_peak_rss_ratio_vs_peft": _ratio(lo, lp, "peak_rss"),
        "qlora_peak_rss_ratio_vs_peft_bnb": _ratio(qo, qp, "peak_rss"),
        "lora_step_over_floor": lo["step_s"] / floor_s if _ok(lo) and floor_s else None,
        "lora_step_ratio_vs_peft_best": _ratio(la, lbest, "step_s"),
        "qlora_step_ratio_vs_peft_bnb_best": _ratio(qa, qbest, "step_s"),
        "lora_peak_rss_ratio_vs_peft_best": _ratio(la, lbest, "peak_rss"),
        "lora_step_over_floor_best": la["step_s"] / floor_best if _ok(la) and floor_best else None,
        "peft_best": {"lora": lbest and lbest.get("dtype"), "qlora": qbest and qbest.get("dtype")},
        "first_step_loss": loss,
        "qlora_first_step_loss": qloss,  # NF4 codes are bnb's bit for bit, so these agree too
        "auto_first_step_loss": _loss_check(la, same[0], (la or {}).get("dtype", "float32")),
        "qlora_auto_first_step_loss": _loss_check(qa, same[1], (qa or {}).get("dtype", "float32")),
        "floor": {"step_flops": flops, "matmul_gflops": rate.get("gflops"), "step_s": floor_s,
                  "matmul_per_shape_gflops": rate.get("per_shape"), "matmul_gflops_bf16": rate.get("gflops_bf16"),
                  "step_s_best": floor_best},
        "setting": s.to_json(),
        "machine": machine,
        "systems": raw,
    }
    targets = TARGETS_FAST_BF16 if fast_bf16 else TARGETS_SLOW_BF16
    out["targets"] = {k: {"value": out[k], "at_most": t, "met": out[k] is not None and out[k] <= t}
                      for k, t in targets.items()}
    return out


def _gb(x) -> str:
    return f"{x / 1e9:.2f}GB" if x else "-"


def _row(cells) -> str:
    widths = (12, 26, 16, 9, 9, 14, 7)
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()


def table(res: dict) -> str:
    s = Setting.from_json(res["setting"])
    raw, floor = res["systems"], res["floor"]
    floor_s, gflops = floor["step_s"], floor["matmul_gflops"]
    lines = [_row(["row", "system", "s/step (best)", "tokens/s", "peak RSS", "vs anchor", "x floor"]), "-" * 104]

    def train_row(label, key, anchor, name):
        r = raw.get(key)
        if not r:
            return
        if not _ok(r):
            why = r.get("skipped") or r.get("pending") or r.get("error", "")
            state = "skipped" if "skipped" in r else ("pending" if "pending" in r else "error")
            lines.append(_row([label, name, state, "", "", "", ""]) + "  " + why[:80])
            return
        a = raw.get(anchor)
        vs = f"{r['step_s'] / a['step_s']:.2f}x" if _ok(a) and anchor != key else "anchor"
        mem = f" / {r['peak_rss'] / a['peak_rss']:.2f}x" if _ok(a) and anchor != key else ""
        fl = f"{r['step_s'] / floor_s:.2f}" if floor_s else "-"
        if floor["step_s_best"] and floor["step_s_best"] != floor_s:
            fl += f" / {r['step_s'] / floor['step_s_best']:.1f}"
        lines.append(_row([label, name, f"{r['step_s']:.2f} ({r['best_step_s']:.2f})", f"{r['tokens_per_s']:.0f}",
                           _gb(r["peak_rss"]), vs + mem, fl]))

    auto = (raw.get("lora_ours_auto") or {}).get("dtype", "?")
    lbest = "lora_peft_bf16" if res["peft_best"]["lora"] and "autocast" in res["peft_best"]["lora"] else "lora_peft"
    qbest = ("qlora_peft_bnb_bf16" if res["peft_best"]["qlora"] and "autocast" in res["peft_best"]["qlora"]
             else "qlora_peft_bnb")
    train_row("LoRA step", "lora_peft", "lora_peft", "PEFT fp32")
    train_row("LoRA step", "lora_peft_bf16", "lora_peft", "PEFT bf16 autocast")
    train_row("LoRA step", "lora_ours", "lora_peft", "loraforge fp32")
    train_row("LoRA step", "lora_ours_ckpt", "lora_peft", "loraforge fp32 + ckpt")
    train_row("LoRA step", "lora_ours_auto", lbest, f"loraforge auto={auto}")
    train_row("QLoRA step", "qlora_peft_bnb", "qlora_peft_bnb", "PEFT+bnb fp32")
    train_row("QLoRA step", "qlora_peft_bnb_bf16", "qlora_peft_bnb", "PEFT+bnb bf16 autocast")
    train_row("QLoRA step", "qlora_ours", "qlora_peft_bnb", "loraforge NF4 fp32")
    train_row("QLoRA step", "qlora_ours_auto", qbest, f"loraforge NF4 auto={auto}")
    for b in s.gen_batches:
        anchor = raw.get("gen_peft", {}).get(f"b{b}")
        for key, name in (("gen_peft", "PEFT"), ("gen_ours", "loraforge"), ("gen_ours_merged", "loraforge merged")):
            r = raw.get(key)
            if not r:
                continue
            if not _ok(r):
                lines.append(_row([f"generate b={b}", name, "error"]) + "  " + r.get("error", "")[:80])
                continue
            g = r[f"b{b}"]
            vs = "anchor" if key == "gen_peft" else (f"{anchor['s'] / g['s']:.2f}x tok/s" if anchor else "-")
            same = ""
            if anchor and key != "gen_peft":
                n = len(anchor["ids"])
                same = f" {sum(x == y for x, y in zip(g['ids'], anchor['ids'], strict=False))}/{n} same"
            fl = f"{g['s'] / (gen_flops(s, b, floor_dims(res)) / (gflops * 1e9)):.1f}" if gflops else "-"
            lines.append(_row([f"generate b={b}", name, f"{g['s']:.2f} s", f"{g['tokens_per_s']:.1f}",
                               _gb(r.get("peak_rss")), vs, fl]) + same)
    qb, qo = raw.get("quant_bnb"), raw.get("quant_ours")
    for key, name in (("quant_bnb", "bitsandbytes"), ("quant_ours", "loraforge.quant")):
        r = raw.get(key)
        if not r:
            continue
        if not _ok(r):
            lines.append(_row(["NF4 quant", name, "pending" if r.get("pending") else "error"]) + "  "
                         + (r.get("pending") or r.get("error", ""))[:80])
            continue
        vs = "anchor" if key == "quant_bnb" else (
            f"{r['quantize_mparams_per_s'] / qb['quantize_mparams_per_s']:.2f}x / "
            f"{r['dequantize_mparams_per_s'] / qb['dequantize_mparams_per_s']:.2f}x" if _ok(qb) else "-")
        lines.append(f"{'NF4 quant':<12}  {name:<24}  quantize {r['quantize_mparams_per_s']:.0f} M/s, dequantize "
                     f"{r['dequantize_mparams_per_s']:.0f} M/s"
                     + (f" (bf16 {r['dequantize_bf16_mparams_per_s']:.0f} M/s)" if "dequantize_bf16_mparams_per_s" in r else "")
                     + f", rel RMSE {r['rel_rmse']:.5f}, "
                     f"{r['bits_per_param']:.3f} bits/param  ({vs})")
    if _ok(qb) and _ok(qo):
        lines.append(f"{'':<12}  dequantized weights identical: {qb['checksum'] == qo['checksum']}")
    lines.append("-" * 104)
    if floor_s:
        parts = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in floor["step_flops"].items())
        lines.append(f"floor: {sum(floor['step_flops'].values()) / 1e9:.0f} GFLOP per step ({parts}) at "
                     f"{gflops:.0f} GFLOP/s fp32 torch.mm ({s.threads} threads) = {floor_s:.2f} s/step")
        if floor.get("matmul_gflops_bf16"):
            lines.append(f"       at {floor['matmul_gflops_bf16']:.0f} GFLOP/s bf16 torch.mm = {floor['step_s_best']:.2f} "
                         "s/step (x floor column: fp32 / bf16)")
    for key, what in (("first_step_loss", "LoRA"), ("qlora_first_step_loss", "QLoRA"),
                      ("auto_first_step_loss", "LoRA auto"), ("qlora_auto_first_step_loss", "QLoRA auto")):
        loss = res.get(key)
        if loss:
            lines.append(f"{what} first-step loss ({loss['precision']}): loraforge {loss['ours']:.6f}, PEFT "
                         f"{loss['peft']:.6f}, |diff| {loss['abs_diff']:.1e} ({'ok' if loss['ok'] else 'MISMATCH'}, "
                         f"tolerance {loss['tolerance']:g})")
    for k, t in res["targets"].items():
        v = t["value"]
        lines.append(f"target {k} <= {t['at_most']}: " + ("n/a" if v is None else
                                                           f"{v:.2f} {'met' if t['met'] else 'NOT met'}"))
    m = res["machine"]
    load = [f"{v:.1f}" if v is not None else "?" for v in (m.get("loadavg_start"), m.get("loadavg_end"))]
    lines.append(f"machine: {m.get('cpu', '?')}, load average {load[0]} at start, {load[1]} at end "
                 "(other processes slow every row down)")
    return "\n".join(lines)


def floor_dims(res: dict) -> dict | None:
    return (res["systems"].get("matmul_rate") or {}).get("dims")
