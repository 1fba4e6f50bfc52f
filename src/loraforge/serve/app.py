"""The OpenAI-compatible HTTP API (FastAPI) in front of an Engine; OpenAPI page at /docs.

The request's ``model`` field picks the adapter: the base model's name runs the bare base, a loaded
adapter's name runs that adapter (vLLM's and LoRAX's convention). Adapters are hot-loaded with vLLM's
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, only from inside ``adapters_dir``.
Every error, including FastAPI's own validation errors, is answered in OpenAI's
``{"error": {"message", "type", "param", "code"}}`` shape, and the OpenAPI document lists the statuses
and media types actually sent (400, never FastAPI's 422; /metrics as text or JSON).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LoraForgeError
from ..generate import SamplingParams
from .engine import Engine, StepOutput
from .errors import ServeError
from .middleware import BodyLimit, CatchAll
from .runner import EngineThread
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ErrorResponse,
    LoadLoraRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    TextCompletion,
    TokenLogprob,
    TopLogprob,
    UnloadLoraRequest,
    Usage,
)

log = logging.getLogger("loraforge")

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409)}
MAX_BODY_BYTES = 4 * 2**20  # a full 2048-token prompt is ~10-100 KB of JSON; megabytes are a mistake or an attack


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": ServeError(message, status).type, "param": param, "code": code}})


def resolve_inside(root: Path, lora_path: str) -> Path:
    """`lora_path` (relative to `root`, or absolute) resolved with symlinks; 403 if it leaves `root`."""
    try:
        root = root.resolve(strict=True)
        raw = Path(lora_path)
        path = (root / raw).resolve()
    except (OSError, ValueError, RuntimeError) as e:
        raise ServeError(f"lora_path {lora_path!r} is not a usable path ({e})", param="lora_path") from None
    if ".." in raw.parts or not path.is_relative_to(root):
        raise ServeError(f"lora_path {lora_path!r} is outside the server's adapters directory", status=403,
                         param="lora_path")
    # The folder is inside; a file in it may still be a symlink that leads out (its weights, its config).
    try:
        escapes = [f.name for f in path.iterdir() if f.is_symlink() and not f.resolve().is_relative_to(root)]
    except OSError:
        escapes = []  # not a readable folder: loading it says so
    if escapes:
        raise ServeError(f"lora_path {lora_path!r}: {escapes[0]} is a symlink to outside the server's adapters "
                         "directory", status=403, param="lora_path")
    return path


def sampling_params(body: SamplingFields, max_tokens: int) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=max(body.top_k, 0), seed=body.seed, stop=body.stop_list(),
                              min_tokens=body.min_tokens)
    except LoraForgeError as e:  # messages start with the field's name, e.g. "min_tokens must be ..."
        field = str(e).split(" ", 1)[0]
        raise ServeError(str(e), param=field if field in type(body).model_fields else None) from None


def _lp(x: float) -> float:
    return max(x, -9999.0)  # OpenAI's floor: JSON has no -infinity


def chat_logprobs(engine: Engine, entries: list | None) -> ChatLogprobs | None:
    """OpenAI's chat `logprobs` object for (token id, logprob, top [(id, logprob)]) entries."""
    if entries is None:
        return None
    content = []
    for tok, lp, top in entries:
        texts = engine.token_strings([tok, *(i for i, _ in top)])
        alts = [TopLogprob(token=t, logprob=_lp(v), bytes=list(t.encode())) for t, (_, v) in zip(texts[1:], top,
                                                                                                  strict=True)]
        content.append(TokenLogprob(token=texts[0], logprob=_lp(lp), bytes=list(texts[0].encode()), top_logprobs=alts))
    return ChatLogprobs(content=content)


def completion_logprobs(engine: Engine, entries: list | None, offset: int = 0) -> CompletionLogprobs | None:
    """OpenAI's legacy completions `logprobs` object; text offsets count from `offset`."""
    if entries is None:
        return None
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for tok, lp, top in entries:
        texts = engine.token_strings([tok, *(i for i, _ in top)])
        out.tokens.append(texts[0])
        out.token_logprobs.append(_lp(lp))
        out.top_logprobs.append({t: _lp(v) for t, (_, v) in zip(texts[1:], top, strict=True)})
        out.text_offset.append(offset)
        offset += len(texts[0])
    return out


def sse(chunk) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has closed its connection (the body has been read: only that is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine, *, api_key: str | None = None, adapters_dir: str | Path | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, engine_thread: bool = True) -> FastAPI:
    """The app. The engine loop runs on a thread of its own from start-up to shut-down; with
    engine_thread=False the caller runs it, with ``app.state.runner.run_here`` (see runner.py for why)."""
    runner = EngineThread(engine)
    started = int(time.time())
    adapters_root = Path(adapters_dir) if adapters_dir is not None else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if engine_thread:
            runner.start()
        try:
            yield
        finally:
            runner.stop()

    app = FastAPI(title="loraforge", summary="one base model, many LoRA adapters, OpenAI-compatible API",
                  lifespan=lifespan)
    app.state.engine, app.state.runner = engine, runner
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(CatchAll)  # outermost of ours: also catches BodyLimit's errors

    # -- errors ---------------------------------------------------------------------------------------------
    @app.exception_handler(ServeError)
    async def _serve_error(_req: Request, e: ServeError):
        return error_response(e.status, str(e), e.param, e.code)

    @app.exception_handler(LoraForgeError)
    async def _user_error(_req: Request, e: LoraForgeError):
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError):
        # FastAPI answers 422 with its own shape; OpenAI clients expect 400 and {"error": ...} naming the field.
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query")]
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON ({msg})")
        if not loc:
            return error_response(400, f"the request body must be a JSON object ({msg})")
        if err.get("type") == "extra_forbidden":
            msg = "this server does not support this field"
        return error_response(400, f"{'.'.join(loc)}: {msg}", param=loc[0])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, e: StarletteHTTPException):
        response = error_response(e.status_code, str(e.detail))
        response.headers.update(e.headers or {})  # 405's Allow
        return response

    # -- auth -----------------------------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False)

    async def check_key(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if api_key is None:
            return
        if cred is None or not secrets.compare_digest(cred.credentials.encode(), api_key.encode()):
            raise ServeError("missing or wrong API key: send the header 'Authorization: Bearer KEY'", status=401,
                             code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)], responses=ERRORS)

    # -- models and adapters --------------------------------------------------------------------------------
    @v1.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        cards = [ModelCard(id=engine.base_name, created=started, root=engine.base_name)]
        # names only: where an adapter was loaded from is the server's business
        cards += [ModelCard(id=n, created=started, root=n, parent=engine.base_name) for n in sorted(engine.adapters)]
        return ModelList(data=cards)

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest) -> dict:
        """Load a PEFT LoRA folder from inside the server's --adapters-dir under `lora_name`."""
        if adapters_root is None:
            raise ServeError("loading adapters at run time is off: start the server with --adapters-dir DIR",
                             status=403, param="lora_path")
        path = resolve_inside(adapters_root, body.lora_path)
        try:
            await runner.call(engine.load_adapter, body.lora_name, path)
        except LoraForgeError as e:  # named as the client named it: the server's own paths are its business
            msg = str(e).replace(str(path), body.lora_path)
            if isinstance(e, ServeError):
                raise ServeError(msg, e.status, e.param, e.code) from None
            raise ServeError(f"lora_path {body.lora_path!r}: {msg}", param="lora_path") from None
        return {"object": "lora_adapter", "lora_name": body.lora_name, "status": "loaded"}

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest) -> dict:
        """Unload an adapter; requests already running on it finish first, new ones get 404."""
        await runner.unload(body.lora_name)
        return {"object": "lora_adapter", "lora_name": body.lora_name, "status": "unloaded"}

    # -- generation -----------------------------------------------------------------------------------------
    async def collect(rid: str, q, request: Request) -> tuple[str, StepOutput, list | None]:
        """The whole text (and log-probabilities, if asked) of a non-streamed request; its slot is freed as
        soon as the client goes away."""
        parts, logprobs, done = [], [], False
        gone = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            while True:
                get = asyncio.ensure_future(q.get())
                await asyncio.wait([get, gone], return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise ServeError("the client closed the connection", status=499)
                item = get.result()
                if isinstance(item, ServeError):
                    done = True
                    raise item
                parts.append(item.text)
                logprobs += item.logprobs or []
                if item.finish_reason is not None:
                    done = True
                    return "".join(parts), item, logprobs if item.logprobs is not None else None
        finally:
            gone.cancel()
            if not done:  # the client went away: free the slot
                runner.abort(rid)

    def usage(o: StepOutput) -> Usage:
        return Usage(prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens,
                     total_tokens=o.prompt_tokens + o.completion_tokens)

    async def stream(rid: str, q, first, make_chunk, include_usage: bool) -> AsyncIterator[str]:
        done = False
        try:
            if first is not None:
                yield sse(first)
            while True:
                item = await q.get()
                if isinstance(item, ServeError):
                    done = True
                    yield f"data: {ErrorResponse(error={'message': str(item), 'type': item.type}).model_dump_json()}\n\n"
                    break
                if item.text or item.finish_reason is not None or item.logprobs:
                    yield sse(make_chunk(item.text, item.finish_reason, None, item.logprobs))
                if item.finish_reason is not None:
                    done = True
                    if include_usage:
                        yield sse(make_chunk(None, None, usage(item), None))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                runner.abort(rid)

    @v1.post("/chat/completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Chat completion, streamed as server-sent events with `stream: true`."""
        adapter = engine.resolve_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await run_in_threadpool(engine.encode, messages, True)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.max_len - len(ids))
        rid, q = runner.submit(ids, sampling_params(body, max_tokens), adapter, body.logprobs_k())
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def chunk(text, reason, use, lps):
                choices = [] if use is not None else [ChatChunkChoice(
                    delta=Delta(content=text), finish_reason=reason, logprobs=chat_logprobs(engine, lps))]
                return ChatCompletionChunk(id=cid, created=created, model=body.model, choices=choices, usage=use)

            first = ChatCompletionChunk(id=cid, created=created, model=body.model,
                                        choices=[ChatChunkChoice(delta=Delta(role="assistant", content=""))])
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(rid, q, first, chunk, include), media_type="text/event-stream")
        text, last, lps = await collect(rid, q, request)
        return ChatCompletion(id=cid, created=created, model=body.model, usage=usage(last), choices=[
            ChatChoice(message=AssistantMessage(content=text), finish_reason=last.finish_reason,
                       logprobs=chat_logprobs(engine, lps))])

    @v1.post("/completions", response_model=TextCompletion)
    async def completions(body: CompletionRequest, request: Request):
        """Plain-text completion of `prompt` (no chat template), streamed with `stream: true`."""
        adapter = engine.resolve_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ServeError("prompt: one prompt per request (a list of strings is not supported)",
                                 param="prompt")
            prompt = prompt[0]
        ids = list(prompt) if isinstance(prompt, list) else await run_in_threadpool(engine.encode, prompt, False)
        max_tokens = body.max_tokens or 16
        rid, q = runner.submit(ids, sampling_params(body, max_tokens), adapter, body.logprobs)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            sent = 0  # text offset of the next token's log-probability (its tokens' characters so far)

            def chunk(text, reason, use, lps):
                nonlocal sent
                lp = completion_logprobs(engine, lps, sent)
                if lp is not None and lp.tokens:
                    sent = lp.text_offset[-1] + len(lp.tokens[-1])
                choices = [] if use is not None else [CompletionChoice(text=text or "", finish_reason=reason,
                                                                       logprobs=lp)]
                return TextCompletion(id=cid, created=created, model=body.model, choices=choices, usage=use)

            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(rid, q, None, chunk, include), media_type="text/event-stream")
        text, last, lps = await collect(rid, q, request)
        return TextCompletion(id=cid, created=created, model=body.model, usage=usage(last), choices=[
            CompletionChoice(text=text, finish_reason=last.finish_reason, logprobs=completion_logprobs(engine, lps))])

    app.include_router(v1)

    # -- operations -----------------------------------------------------------------------------------------
    @app.get("/health", responses={503: {"description": "the engine thread has stopped"}})
    async def health() -> dict:
        alive = runner.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text exposition, or JSON with ?format=json",
              "content": {"text/plain": {"schema": {"type": "string"}},
                          "application/json": {"schema": {"type": "object",
                                                          "additionalProperties": {"type": "number"}}}}},
        400: {"model": ErrorResponse}})
    async def metrics(format: Literal["prometheus", "json"] = "prometheus"):
        """Counters as Prometheus text, or as JSON with `?format=json`."""
        if format == "json":
            return JSONResponse(engine.metrics.snapshot())
        return PlainTextResponse(engine.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    def openapi() -> dict:
        """FastAPI's document, less the 422 it adds to every operation (we answer 400, listed already)."""
        if app.openapi_schema is None:
            spec = FastAPI.openapi(app)
            for ops in spec["paths"].values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    return app
