"""`loraforge serve`: one base model, many LoRA adapters, behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import logging

from ..errors import LoraForgeError
from .common import add_model_args, load_from_args, parse_named_adapters

log = logging.getLogger("loraforge")


def register(p):
    p.add_argument("--adapter", metavar="NAME=DIR", action="append", default=[],
                   help="load a LoRA adapter folder at start under NAME (repeatable); requests pick it with "
                        "model=NAME")
    p.add_argument("--adapters-dir", metavar="DIR", default=None,
                   help="allow POST /v1/load_lora_adapter to load folders from inside DIR (off without it)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 for every interface; pair it with --api-key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help="require 'Authorization: Bearer KEY' on every /v1 endpoint")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="context length per sequence, prompt + completion (capped by the model's)")
    p.add_argument("--dequant-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="with a quantized base (--quantize nf4, or a pre-quantized folder): keep a dequantized copy "
                   "of each weight for decoding, instead of dequantizing every weight on every step (faster; "
                   "costs the memory of the base in the compute dtype) (default: on)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="refuse request bodies larger than this with 413 (default: 4 MiB)")
    add_model_args(p)


def run(args) -> int:
    import signal
    import threading
    from pathlib import Path

    try:
        import uvicorn
    except ModuleNotFoundError:
        raise LoraForgeError("serve needs FastAPI and uvicorn: pip install 'loraforge[serve]'") from None
    from ..serve.app import create_app
    from ..serve.engine import Engine

    if args.adapters_dir is not None and not Path(args.adapters_dir).is_dir():
        raise LoraForgeError(f"--adapters-dir {args.adapters_dir}: no such folder")
    if not 1 <= args.max_batch <= 1024:
        raise LoraForgeError(f"--max-batch must be between 1 and 1024, got {args.max_batch}")
    if args.max_model_len < 2:
        raise LoraForgeError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    if args.max_body_bytes is not None and args.max_body_bytes < 1024:
        raise LoraForgeError(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    adapters = parse_named_adapters(args.adapter)
    model, tok = load_from_args(args)
    if args.dequant_cache:
        from ..quant import cache_dense_weights

        cached = cache_dense_weights(model, model.model.embed_tokens.weight.dtype)
        if cached:
            log.info("quantized base: %.1f MB of dequantized weights cached for decoding (--no-dequant-cache "
                     "keeps only the quantized codes)", cached / 1e6)
    engine = Engine(model, tok, max_batch=args.max_batch, max_len=args.max_model_len)
    for name, path in adapters:
        try:
            engine.load_adapter(name, path)
        except LoraForgeError as e:
            raise LoraForgeError(f"--adapter {name}={path}: {e}") from None
        log.info("adapter %s loaded from %s", name, path)
    limit = {} if args.max_body_bytes is None else {"max_body_bytes": args.max_body_bytes}
    app = create_app(engine, api_key=args.api_key, adapters_dir=args.adapters_dir, engine_thread=False, **limit)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    http = threading.Thread(target=server.run, name="loraforge-http", daemon=True)

    def shut_down(_sig, _frame):  # uvicorn on a thread installs no handlers: the first signal stops it
        if server.should_exit:  # gracefully, as its own would, and a second one stops it at once
            server.force_exit = True
        server.should_exit = True

    log.info("serving %s with %d adapters on http://%s:%d (API docs at /docs)", engine.base_name,
             len(engine.adapters), args.host, args.port)
    signal.signal(signal.SIGINT, shut_down)
    signal.signal(signal.SIGTERM, shut_down)
    http.start()
    # The engine loop stays on this thread, the one that loaded the model (serve/runner.py says why);
    # it runs until the HTTP server has shut down, finishing the requests that were in flight.
    app.state.runner.run_here(until=http)
    http.join(timeout=30)
    if not server.started:
        raise LoraForgeError(f"could not serve on {args.host}:{args.port} (uvicorn's message is above: "
                             "is the port already in use?)")
    return 0
