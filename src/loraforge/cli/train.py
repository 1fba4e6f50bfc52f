"""`loraforge train DATA`: fine-tune an adapter; DIR ends up a PEFT adapter plus metrics, plot and config.

Every flag maps onto a TrainConfig field. Flags default to "not given" (argparse.SUPPRESS), so only the
ones the user typed override a --config YAML; the help shows TrainConfig's defaults.
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("loraforge")


def register(p):
    from ..train.config import DATA_FORMATS, DTYPE_CHOICES, METHODS, TrainConfig

    d = TrainConfig()
    S = argparse.SUPPRESS

    def dflt(v) -> str:
        return f" (default: {v})"

    p.add_argument("data", nargs="?", default=S, metavar="DATA",
                   help="training file: .jsonl, .json, .csv or .parquet (chat, alpaca, prompt/completion or text), "
                        "or .txt (plain text: one record per paragraph, packed)")
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="a YAML file of TrainConfig fields; flags given here override it")
    p.add_argument("--out", metavar="DIR", default=S, help="output folder (default: runs/<data file name>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in DIR")
    p.add_argument("--no-progress", action="store_true", default=S,
                   help="no progress bar (otherwise shown when stderr is a terminal)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N processes on this machine (re-runs this command through torch.distributed.run; "
                        "for several machines run `torchrun --nnodes ... -m loraforge train ...` yourself)")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default=S,
                   help="with several processes: ddp replicates the model on each; fsdp (FSDP2) shards the base, "
                        "NF4 codes included, and the adapter across them" + dflt(d.strategy))

    g = p.add_argument_group("model and method")
    g.add_argument("--model", metavar="SRC", default=S,
                   help="Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default=S, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default=S,
                   help="compute dtype of the frozen base; auto = bfloat16 on CUDA and on CPUs with fast bf16 "
                   "(AMX), else float32. Trained weights and optimizer state stay float32" + dflt(d.dtype))
    g.add_argument("--save-dtype", choices=("float32", "bfloat16"), default=S, dest="save_dtype",
                   help="dtype of the saved LoRA tensors (float32 is what PEFT writes)" + dflt(d.save_dtype))
    g.add_argument("--method", choices=METHODS, default=S,
                   help="lora; qlora = NF4 base (double quantization) + LoRA; prefix = prefix tuning" + dflt(d.method))
    g.add_argument("--rank", type=int, default=S, help="LoRA rank r" + dflt(d.rank))
    g.add_argument("--alpha", type=float, default=S, help="LoRA alpha (scale alpha/r)" + dflt(d.alpha))
    g.add_argument("--dropout", type=float, default=S, help="LoRA dropout" + dflt(d.dropout))
    g.add_argument("--targets", default=S, type=_targets,
                   help="all-linear, a comma-separated list of module names (q_proj,v_proj) or a regex"
                   + dflt(d.targets))
    g.add_argument("--target-parameters", default=S, dest="target_parameters", metavar="NAMES",
                   type=lambda v: [t.strip() for t in v.split(",") if t.strip()],
                   help="MoE models: comma-separated expert weights to adapt as PEFT's target_parameters, e.g. "
                   "mlp.experts.gate_up_proj,mlp.experts.down_proj (needs --dropout 0)")
    g.add_argument("--num-virtual-tokens", type=int, default=S, dest="num_virtual_tokens",
                   help="prefix tuning: learned prefix length" + dflt(d.num_virtual_tokens))
    g.add_argument("--prefix-projection", action=argparse.BooleanOptionalAction, default=S,
                   help="prefix tuning: train the prefix through a two-layer MLP (folded away on save)"
                   + dflt(d.prefix_projection))

    g = p.add_argument_group("optimisation")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, default=S, metavar="N", help="optimizer steps")
    length.add_argument("--epochs", type=float, default=S, metavar="E", help="passes over the data (default: 1)")
    g.add_argument("--lr", type=float, default=S, help="peak learning rate (default: 2e-4 for lora/qlora, 3e-2 for prefix, 1e-3 for prefix "
                   "with --prefix-projection)")
    g.add_argument("--batch-size", type=int, default=S, metavar="B", help="rows per micro-batch" + dflt(d.batch_size))
    g.add_argument("--grad-accum", type=int, default=S, metavar="G",
                   help="micro-batches per optimizer step" + dflt(d.grad_accum))
    g.add_argument("--warmup-steps", type=int, default=S, metavar="N",
                   help="linear warm-up before the cosine decay (default: 5%% of the steps)")
    g.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay" + dflt(d.weight_decay))
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=S,
                   help="recompute activations in backward: less memory, ~30%% more compute")
    g.add_argument("--seed", type=int, default=S, help="seeds adapter init, data split and order, dropout"
                   + dflt(d.seed))

    g = p.add_argument_group("data")
    g.add_argument("--format", choices=DATA_FORMATS, default=S, help="record format (default: detected)")
    g.add_argument("--max-len", type=int, default=S, metavar="L", help="tokens per record (longer ones are "
                   "truncated)" + dflt(d.max_len))
    g.add_argument("--train-on-prompt", action=argparse.BooleanOptionalAction, default=S,
                   help="also train on prompt/user tokens (default: assistant/completion tokens only)")
    g.add_argument("--pack", action=argparse.BooleanOptionalAction, default=S,
                   help="pack several records per row (block-diagonal attention, no cross-talk; default: on for "
                        "a .txt file)")
    g.add_argument("--txt-lines", action="store_true", default=S,
                   help="a .txt file holds one record per line (default: per blank-line-separated paragraph)")
    g.add_argument("--max-line-bytes", type=int, default=S, metavar="N",
                   help="longest record (JSONL line, CSV row, paragraph) read; a longer one is a bad record"
                   + dflt(d.max_line_bytes))
    g.add_argument("--skip-bad-lines", action=argparse.BooleanOptionalAction, default=S,
                   help="skip malformed records with one warning instead of stopping")
    g.add_argument("--val", metavar="FILE", default=S, help="validation file (instead of --val-split)")
    g.add_argument("--val-split", type=float, default=S, metavar="F",
                   help="fraction of DATA held out for validation" + dflt(d.val_split))

    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=S, metavar="N",
                   help="validate every N steps; the best adapter goes to DIR/best (0 = at the end)"
                   + dflt(d.eval_every))
    g.add_argument("--save-every", type=int, default=S, metavar="N",
                   help="checkpoint every N steps (0 = at the end)" + dflt(d.save_every))
    g.add_argument("--keep-checkpoints", type=int, default=S, metavar="K",
                   help="keep the newest K checkpoints" + dflt(d.keep_checkpoints))


def _targets(value: str) -> str | list[str]:
    if value == "all-linear":
        return value
    parts = [v.strip() for v in value.split(",")]
    if len(parts) > 1 or value.replace("_", "").isalnum():
        return [p for p in parts if p]
    return value  # a regex


def config_from_args(args: argparse.Namespace):
    """The TrainConfig: the --config YAML (if any) with the flags the user gave on top."""
    from ..train.config import TrainConfig, config_fields

    given = {k: v for k, v in vars(args).items() if k in config_fields()}
    if args.config:
        return TrainConfig.from_yaml(args.config, given)
    return TrainConfig.from_dict(given, flags=set(given))


def run(args) -> int:
    import sys

    from ..train import train

    cfg = config_from_args(args)
    if args.nproc < 1:
        from ..errors import LoraForgeError

        raise LoraForgeError(f"--nproc {args.nproc}: must be at least 1")
    if args.nproc > 1 and "RANK" not in os.environ:  # not already one of torchrun's processes
        from ..train.launch import launch

        return launch(args._argv, args.nproc, cfg.with_absolute_paths().out_dir())
    result = train(cfg, resume=args.resume, progress=False if getattr(args, "no_progress", False) else None)
    # stdout: where the adapter is, for scripts (logs and the progress bar are on stderr); once per job
    if os.environ.get("RANK", "0") == "0":
        print(result.out)
    sys.stdout.flush()
    return 0
