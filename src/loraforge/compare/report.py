"""The comparison as a markdown table, the trade-offs in sentences with the measured numbers, and a figure.

All three read only compare.json's structure (`runner.compare`'s result), so a report can be redrawn
from a saved comparison without training anything.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..model.loading import human
from ..paths import atomic_write_bytes
from .config import BASE, FULL, LABELS

COLUMNS = ("method", "lr", "trainable params", "adapter on disk", "base weights held", "peak RSS", "s/step",
           "tokens/s", "val loss", "exact match")
DASH = "—"
ANCHORS = ("lora", "qlora", "prefix")  # the first of these that trained is what the others are read against


def _bytes(n: float | None) -> str:
    if n is None:
        return DASH
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def _ratio(a: float, b: float) -> str:
    """a/b as '38x' or '1.7x'."""
    r = a / b
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x"


def _ok(row: dict[str, Any] | None) -> bool:
    return bool(row) and "error" not in row and "skipped" not in row


def _label(name: str, s: dict[str, Any]) -> str:
    if name in ("lora", "qlora"):
        return f"{LABELS[name]} r={s['rank']}"
    if name == "prefix":
        return f"{LABELS[name]} P={s['num_virtual_tokens']}"
    return LABELS[name]


def _em(r: dict[str, Any]) -> str:
    if not r.get("em_total"):
        return DASH
    return f"{r['em_correct']}/{r['em_total']} ({100 * r['exact_match']:.0f}%)"


def _cells(name: str, r: dict[str, Any], s: dict[str, Any]) -> list[str]:
    lr = s["lr"].get(name)
    head = [_label(name, s), f"{lr:g}" if lr is not None else DASH]
    if not _ok(r):
        why = r.get("skipped") or f"failed: {r.get('error')}"
        return head + [why.replace("|", "/")] + [DASH] * (len(COLUMNS) - 3)
    trainable = f"{human(r['trainable'])} ({r['trainable_percent']:.2f}%)" if r["trainable"] else "0"
    disk = DASH if name == BASE else _bytes(r["adapter_bytes"]) + ("" if r["adapter_written"] else " (not written)")
    peak = DASH if name == BASE else _bytes(r["peak_rss"])
    if r.get("peak_gpu") is not None:
        peak += f" (GPU {_bytes(r['peak_gpu'])})"

    def num(key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else DASH

    return head + [trainable, disk, _bytes(r["base_bytes"]), peak, num("step_s", ".2f"), num("tokens_per_s", ".0f"),
                   num("val_loss", ".4f"), _em(r)]


def table(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for name, r in results["rows"].items():
        lines.append("| " + " | ".join(_cells(name, r, s)) + " |")
    return "\n".join(lines)


def tradeoffs(results: dict[str, Any]) -> list[str]:
    """One sentence per row against the anchor (LoRA when it ran), each made of measured numbers."""
    rows, s = results["rows"], results["settings"]
    steps = s["max_steps"]
    out = []
    base = rows.get(BASE)
    if _ok(base) and base.get("val_loss") is not None:
        em = f", exact match {base['em_correct']}/{base['em_total']}" if base.get("em_total") else ""
        out.append(f"Untrained, the base model scores val loss {base['val_loss']:.4f}{em} on the "
                   f"{s['val_records']} validation records; every row below starts from it.")
    anchor = next((n for n in ANCHORS if _ok(rows.get(n))), None)
    if anchor is None:
        return out + ["No adapter method trained successfully, so there is nothing to compare."]
    a, an, alr = rows[anchor], _label(anchor, s), s["lr"][anchor]

    def loss_vs(r: dict[str, Any]) -> str:
        if r.get("val_loss") is None or a.get("val_loss") is None:
            return ""
        return f", and reached val loss {r['val_loss']:.4f} vs {a['val_loss']:.4f} for {an} in the same {steps} steps"

    def time_vs(r: dict[str, Any]) -> str:
        if r.get("step_s") is None or a.get("step_s") is None:
            return ""
        return f" at {r['step_s']:.2f} s/step vs {a['step_s']:.2f}"

    for name, r in rows.items():
        if name in (BASE, anchor):
            continue
        lab, lr = _label(name, s), s["lr"][name]
        lrs = f" (lr {lr:g} vs {alr:g})"
        if not _ok(r):
            if "skipped" in r and name == FULL:
                p = r["plan"]
                out.append(f"Full fine-tuning was not run: weights, gradients and AdamW state for "
                           f"{human(rows[BASE]['model_params'])} parameters plus activations need "
                           f"~{p['need'] / 1e9:.1f} GB and {p['available'] / 1e9:.1f} GB were available.")
            else:
                out.append(f"{lab} did not finish: {r.get('error') or r.get('skipped')}.")
            continue
        few = (f"{_ratio(a['trainable'], r['trainable'])} fewer than" if r["trainable"] <= a["trainable"]
               else f"{_ratio(r['trainable'], a['trainable'])} more than")
        if name == "prefix":
            out.append(f"{lab} trains {human(r['trainable'])} parameters ({few} {an}'s {human(a['trainable'])})"
                       f"{time_vs(r)}{loss_vs(r)}{lrs}; its adapter is {_bytes(r['adapter_bytes'])} on disk vs "
                       f"{_bytes(a['adapter_bytes'])}, and its peak RSS {_bytes(r['peak_rss'])} vs "
                       f"{_bytes(a['peak_rss'])}.")
        elif name == "qlora" or (anchor == "qlora" and name == "lora"):
            smaller = r["base_bytes"] < a["base_bytes"]
            held = (f"{_ratio(a['base_bytes'], r['base_bytes'])} less" if smaller
                    else f"{_ratio(r['base_bytes'], a['base_bytes'])} more")
            out.append(f"{lab} held the base in {_bytes(r['base_bytes'])} instead of {_bytes(a['base_bytes'])} "
                       f"({held}){time_vs(r)}, with peak RSS {_bytes(r['peak_rss'])} vs {_bytes(a['peak_rss'])}"
                       f"{loss_vs(r)}{lrs}.")
        elif name == FULL:
            out.append(f"Full fine-tuning trained all {human(r['trainable'])} parameters "
                       f"({_ratio(r['trainable'], a['trainable'])} {an}'s){time_vs(r)}, with peak RSS "
                       f"{_bytes(r['peak_rss'])} vs {_bytes(a['peak_rss'])}{loss_vs(r)}{lrs}; its trained "
                       f"weights are {_bytes(r['adapter_bytes'])} against {_bytes(a['adapter_bytes'])} for the "
                       f"{an} adapter.")
        else:
            out.append(f"{lab} trains {human(r['trainable'])} parameters ({few} {an}'s){time_vs(r)}{loss_vs(r)}"
                       f"{lrs}.")
    scored = [(n, r) for n, r in rows.items() if _ok(r) and r.get("em_total")]
    if scored:
        total = scored[0][1]["em_total"]
        parts = ", ".join(f"{_label(n, s)} {r['em_correct']}" for n, r in scored)
        out.append(f"Exact match (greedy) on the {total} validation records with a reference: {parts}.")
    return [t[0].upper() + t[1:] for t in out]


def render(results: dict[str, Any]) -> str:
    s, m, rows = results["settings"], results["machine"], results["rows"]
    val = f"`{s['val']}`" if s["val"] else f"{s['val_split']:g} of `{s['data']}` held out (seed {s['seed']})"
    lrs = ", ".join(f"{_label(n, s)} {lr:g}" for n, lr in s["lr"].items())
    load = "/".join(f"{v:.1f}" if v is not None else "?" for v in (m["loadavg_start"], m["loadavg_end"]))
    lines = [
        f"# Fine-tuning methods compared on `{Path(s['data']).name}`", "",
        f"- data: `{s['data']}`, {s['train_records']} training records; validation: {val}, "
        f"{s['val_records']} records",
        f"- model: `{s['model'] or 'embedded SmolLM2-135M-Instruct'}`, fp32, device {s['device'] or 'default'}",
        f"- every row: {s['max_steps']} steps, batch {s['batch_size']}, seed {s['seed']}, the same batches in the "
        f"same order, warm-up + cosine schedule; validation every {s['eval_every'] or s['max_steps']} steps",
        f"- LoRA/QLoRA: r={s['rank']}, alpha={s['alpha']:g}, all linear layers but the output head; prefix "
        f"tuning: {s['num_virtual_tokens']} virtual tokens, no MLP",
        f"- learning rates: {lrs}",
        f"- machine: {m['cpus']} CPUs, load average {load} (start/end); total {results['wall_s'] / 60:.1f} min",
        "", table(results), "", "## Trade-offs", "",
        *[f"- {t}" for t in tradeoffs(results)],
    ]
    full = rows.get(FULL, {})
    if "plan" in full:
        p = full["plan"]
        lines += ["", f"Full fine-tuning memory estimate: {p['need'] / 1e9:.2f} GB (16 bytes per parameter for "
                  f"weights, gradients and AdamW moments, plus {p['activations'] / 1e9:.2f} GB of activations from "
                  f"the {p['activations_from']}) against {p['available'] / 1e9:.2f} GB available."]
    lines += [
        "", "## How each column was measured", "",
        "- **trainable params**: elements of the tensors with `requires_grad` in the trained model (a tied weight "
        "once); the percentage is of the base model's parameters.",
        "- **adapter on disk**: bytes of `adapter_model.safetensors` + `adapter_config.json` in DIR/<method>. "
        "Full fine-tuning writes no weights; its number is the bytes of its trained tensors.",
        "- **base weights held**: bytes of the frozen base tensors in memory (for QLoRA the NF4 codes, block "
        "scales and nested scales of each quantized projection); for full fine-tuning all weights.",
        "- **peak RSS**: VmHWM of the worker process that trained the row (model load and training; exact match "
        "runs after it is read). Each row has its own process, so no row inherits another's peak.",
        "- **s/step**: median wall seconds per optimizer step, step 1 left out; **tokens/s**: non-padding input "
        "tokens over the same steps (DIR/<method>/metrics.jsonl). Other processes on the machine slow every row; "
        "compare rows of one run, not runs.",
        "- **val loss**: token-weighted mean loss on the validation records after the last step; **exact match**: "
        "greedy completions equal to the reference after stripping whitespace.",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Validation loss against the step per row, and bars for trainable parameters, memory and s/step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s, rows = results["settings"], results["rows"]
    trained = [(n, r) for n, r in rows.items() if n != BASE and _ok(r)]
    colors = {"lora": "tab:blue", "qlora": "tab:green", "prefix": "tab:orange", FULL: "tab:red"}
    fig = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(fig)
    (ax_loss, ax_params), (ax_mem, ax_time) = fig.subplots(2, 2)

    kind = "val" if any(r["curve"]["val"] for _, r in trained) else "train"
    for n, r in trained:
        pts = r["curve"][kind]
        if pts:
            ax_loss.plot([p[0] for p in pts], [p[1] for p in pts], "o-", markersize=3, color=colors.get(n),
                         label=f"{_label(n, s)} (lr {s['lr'][n]:g})")
    base = rows.get(BASE, {})
    if kind == "val" and _ok(base) and base.get("val_loss") is not None:
        ax_loss.axhline(base["val_loss"], color="gray", linestyle="--", linewidth=1, label="base, untrained")
    ax_loss.set(xlabel="step", ylabel=f"{kind} loss", title=f"{kind} loss vs step")
    if ax_loss.lines and all(v > 0 for line in ax_loss.lines for v in line.get_ydata()):
        ax_loss.set_yscale("log")  # trained rows end an order of magnitude or more below the base
    ax_loss.grid(alpha=0.3)
    if trained:
        ax_loss.legend(fontsize=8)

    names = [_label(n, s) for n, _ in trained]
    cs = [colors.get(n) for n, _ in trained]
    x = list(range(len(trained)))

    def bars(ax, values, title, ylabel, log=False):
        ax.bar(x, values, color=cs)
        ax.set_xticks(x, names, rotation=15, fontsize=8)
        ax.set(title=title, ylabel=ylabel)
        if log and any(values):
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)

    bars(ax_params, [r["trainable"] for _, r in trained], "trainable parameters", "parameters (log)", log=True)
    w = 0.4
    ax_mem.bar([i - w / 2 for i in x], [r["base_bytes"] / 1e6 for _, r in trained], w, label="base weights held",
               color="tab:gray")
    ax_mem.bar([i + w / 2 for i in x], [r["peak_rss"] / 1e6 for _, r in trained], w, label="peak RSS",
               color="tab:purple")
    ax_mem.set_xticks(x, names, rotation=15, fontsize=8)
    ax_mem.set(title="memory", ylabel="MB")
    ax_mem.grid(axis="y", alpha=0.3)
    if trained:
        ax_mem.legend(fontsize=8)
    bars(ax_time, [r.get("step_s") or 0.0 for _, r in trained], "time per step (median, step 1 left out)", "s")
    fig.suptitle(f"{Path(s['data']).name}: {s['max_steps']} steps, batch {s['batch_size']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
