"""`loraforge generate`: one completion on stdout, nothing else."""

from __future__ import annotations

from .common import add_model_args, load_from_args


def register(p):
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--system", default=None, help="a system prompt before the user message (not with --raw)")
    p.add_argument("--adapter", metavar="DIR", default=None, help="a LoRA or prefix adapter folder (PEFT format)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: draw from the most likely tokens that cover P of the probability "
                        "(with --temperature > 0)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="draw from the K most likely tokens (with --temperature > 0; 0 = no cut)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: a fresh draw each run)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="cut a prompt too long for the model's context from the left (with a warning) instead "
                        "of refusing it")
    add_model_args(p)


def run(args) -> int:
    from ..adapters import attach_adapter
    from ..errors import LoraForgeError
    from ..generate import SamplingParams, generate

    if args.system is not None and args.raw:
        raise LoraForgeError("--system: a system prompt needs the chat template; leave out --raw")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    model, tok = load_from_args(args)
    if args.adapter:
        attach_adapter(model, args.adapter)
    prompt = args.prompt
    if args.system is not None:
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}]
    print(generate(model, tok, [prompt], params, chat=not args.raw, truncate_prompt=args.truncate_prompt)[0])
    return 0
