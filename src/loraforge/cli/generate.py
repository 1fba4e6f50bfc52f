"""`loraforge generate`: one completion on stdout, nothing else."""

from __future__ import annotations

from .common import add_model_args, load_from_args


def register(p):
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--adapter", metavar="DIR", default=None, help="a LoRA or prefix adapter folder (PEFT format)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_model_args(p)


def run(args) -> int:
    from ..adapters import attach_adapter
    from ..generate import SamplingParams, generate

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    model, tok = load_from_args(args)
    if args.adapter:
        attach_adapter(model, args.adapter)
    print(generate(model, tok, [args.prompt], params, chat=not args.raw)[0])
    return 0
