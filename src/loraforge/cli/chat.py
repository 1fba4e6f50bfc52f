"""`loraforge chat`: a conversation in the terminal, with persona adapters switched on the fly.

Reads stdin line by line (so it can be scripted: `printf 'hi\\n/adapter pirate\\nhi\\n' | loraforge chat ...`)
and prints each reply on stdout as `NAME> text`, NAME being the adapter that answered or `base`.
Every adapter is loaded once at start; switching is a pointer change, and the history is kept.
"""

from __future__ import annotations

import sys

from .common import add_model_args, load_from_args

HELP = """\
commands:
  /adapter NAME   answer with adapter NAME from now on (history is kept)
  /base           answer with the base model (adapters off)
  /reset          forget the conversation so far
  /help           this list
  /quit           leave (as does end of input)"""


def register(p):
    p.epilog = "in the chat, lines starting with / are commands:\n" + HELP.split("\n", 1)[1]
    p.add_argument("--adapter", metavar="NAME=DIR", action="append", default=None,
                   help="load an adapter folder as NAME (repeatable); the first one starts active")
    p.add_argument("--system", default=None, help="a system prompt at the start of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    add_model_args(p)


class Chat:
    """The conversation state; `handle(line)` returns what to print (None: quit)."""

    def __init__(self, model, tokenizer, params, adapters: list[str], system: str | None = None):
        from ..lora import set_adapter

        self.model, self.tok, self.params = model, tokenizer, params
        self.adapters, self.system = adapters, system
        self.active: str | None = adapters[0] if adapters else None
        set_adapter(model, self.active)
        self.history: list[dict[str, str]] = []

    @property
    def label(self) -> str:
        return self.active or "base"

    def handle(self, line: str) -> str | None:
        text = line.strip()
        if not text:
            return ""
        if text.startswith("/"):
            return self.command(text)
        from ..errors import LoraForgeError
        from ..generate import generate

        self.history.append({"role": "user", "content": text})
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        try:
            reply = generate(self.model, self.tok, [msgs], self.params)[0].strip()
        except LoraForgeError as e:  # a conversation grown past the context: say so, and keep chatting
            self.history.pop()
            return f"# {e}; /reset starts a new conversation"
        self.history.append({"role": "assistant", "content": reply})
        return f"{self.label}> {reply}"

    def command(self, text: str) -> str | None:
        from ..lora import set_adapter

        cmd, _, arg = text.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            return None
        if cmd == "/help":
            return HELP
        if cmd == "/reset":
            self.history.clear()
            return "# history cleared"
        if cmd == "/base":
            set_adapter(self.model, None)
            self.active = None
            return "# base model (adapters off)"
        if cmd == "/adapter":
            if arg not in self.adapters:
                have = ", ".join(self.adapters) or "none (pass --adapter NAME=DIR)"
                return f"# no adapter {arg!r}; loaded: {have}" if arg else f"# usage: /adapter NAME; loaded: {have}"
            set_adapter(self.model, arg)
            self.active = arg
            return f"# adapter {arg}"
        return f"# unknown command {cmd}; /help lists them"


def run(args) -> int:
    from ..adapters import attach_adapter
    from ..generate import SamplingParams
    from .common import parse_named_adapters

    named = parse_named_adapters(args.adapter)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    model, tok = load_from_args(args)
    for name, path in named:
        attach_adapter(model, path, name, activate=False)
    chat = Chat(model, tok, params, [n for n, _ in named], args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401 -- importing it gives input() line editing and history (arrow keys)

        print(f"chatting with {chat.label}; /help for commands, /quit to leave", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input(f"you ({chat.label})> ") + "\n"
            except EOFError:
                break
        else:
            line = sys.stdin.readline()
        if not line:  # end of input
            break
        out = chat.handle(line)
        if out is None:
            break
        if out:
            print(out, flush=True)
    return 0
