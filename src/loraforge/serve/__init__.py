"""Serving many adapters on one base model: a continuous-batching engine and an OpenAI-compatible server.

    engine.py    Engine: requests join and leave a running batch between decode steps; one adapter per row
    request.py   GenerationRequest (the engine's record of a request), StepOutput, Completion
    cache.py     SlotCache: a fixed pool of per-sequence KV-cache slots
    sampling.py  per-request temperature / top-k / top-p draws, each with its own generator
    runner.py    EngineThread: the engine loop in a background thread, bridged to asyncio queues
    app.py       create_app(): FastAPI routes (/v1/models, /v1/chat/completions, /v1/completions, ...)
    middleware.py  ASGI: request-body cap (413), a last-resort 500 that keeps the connection
    schemas.py   pydantic request and response bodies
    metrics.py   counters for /metrics (JSON or Prometheus text)
"""

from .engine import Completion, Engine, GenerationRequest, StepOutput
from .errors import ServeError

__all__ = ["Completion", "Engine", "GenerationRequest", "ServeError", "StepOutput"]
