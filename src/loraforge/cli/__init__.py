"""The `loraforge` command. Each subcommand lives in its own module with `register(subparsers)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from ..errors import LoraForgeError

# (module, one-line help) in the order `--help` lists them.
COMMANDS = [
    ("info", "describe a model or an adapter folder"),
    ("generate", "complete a prompt with the base model, optionally with an adapter"),
    ("chat", "chat in the terminal; switch persona adapters with /adapter NAME"),
    ("train", "fine-tune an adapter (LoRA, QLoRA or prefix tuning) on a data file"),
    ("eval", "score base vs adapter on a data file: loss, perplexity, exact match"),
    ("compare", "train LoRA, QLoRA and prefix tuning on the same data and report the trade-offs"),
    ("merge", "fold an adapter into the base weights and write a plain Hugging Face model"),
    ("export", "write an adapter or merged model for llama.cpp / Ollama (GGUF) or Hugging Face"),
    ("quantize", "write a pre-quantized (NF4/FP4/INT8) copy of a model"),
    ("serve", "serve one base model with many adapters behind an OpenAI-compatible API"),
    ("bench", "benchmark training, generation and quantization against PEFT and bitsandbytes"),
]

EPILOG = """\
examples:
  loraforge generate --prompt "What is the capital of France?"
  loraforge train examples/pirate.jsonl --out runs/pirate --max-steps 100
  loraforge generate --adapter runs/pirate --prompt "How do I boil an egg?"
  loraforge serve --adapter pirate=runs/pirate --port 8000

--model defaults to the embedded SmolLM2-135M-Instruct; it also takes a Hugging Face model folder or a
.gguf file. Logs go to stderr; results go to stdout.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to a flag's help unless the help already speaks of its default, or there is
    none worth saying (None, False, or suppressed). Epilogs keep their line breaks (lists, examples)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d is argparse.SUPPRESS or action.nargs == 0:
            return text
        if action.option_strings or action.nargs in ("?", "*"):
            return f"{text} (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraforge",
        description="Fine-tune Llama-family models with LoRA, QLoRA and prefix tuning; serve many adapters on one base.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS:
        try:
            mod = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(f"{__name__}.{name}"):
                continue  # a command not built yet
            raise
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=_HelpFormatter)
        mod.register(p)
        p.set_defaults(_run=mod.run)
    return parser


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("loraforge: %(message)s"))
    log = logging.getLogger("loraforge")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # transformers' own progress bars and advice are noise on our stderr
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as Ctrl-C raises KeyboardInterrupt: `kill`, a job scheduler or
    a container stop then unwinds the same way (atomic writes abandoned, the trainer naming its last
    checkpoint) instead of dying without a word."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    setup_logging(args.verbose, args.quiet)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc N` re-runs this command line
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args._run(args) or 0)
    except LoraForgeError as e:
        print(f"loraforge: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("loraforge: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("loraforge: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:  # main() called in-process (tests, scripts) leaves the caller's handler
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
