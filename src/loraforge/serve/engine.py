"""The serving engine: one base model, many LoRA adapters, continuous batching over a slot KV cache.

    engine = Engine(model, tokenizer, max_batch=16)
    engine.load_adapter("pirate", "runs/pirate")
    rid = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=32), adapter="pirate")
    while engine.has_unfinished():
        for out in engine.step(): ...      # StepOutput: new text and tokens per request, finish_reason at the end

Each ``step()`` first admits waiting requests into free slots (their prompts prefilled together in
right-padded batches, each row into its own slot, which yields each one's first token), then runs one decode forward over every running sequence together:
row b carries its own position, its own key mask and its own adapter id, so requests for different
adapters share one forward (the LoRA layers compute the base projection once and each row's low-rank
delta apart). A prefix-tuning adapter's row carries its prefix as the first P keys and values of its slot,
so it shares the decode batch too. Finished sequences leave the batch at the end of the step; their slot
is reused.

Threading: ``add_request`` and ``abort`` may be called from any thread. ``step``, ``load_adapter`` and
``unload_adapter`` change the model or the cache and must run on one thread, the engine loop's
(``runner.EngineThread``), or before that loop starts.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections import Counter, deque
from pathlib import Path

import torch

from ..adapters import adapter_kind, attach_adapter
from ..errors import LoraForgeError
from ..generate import SamplingParams, decode_until_stop, encode_prompt, stop_token_ids
from ..lora import adapter_ids_for, delete_adapter
from ..lora.model import registry
from ..lora.registry import check_adapter_name
from ..prefix.module import prefix_for
from .cache import SlotCache
from .errors import ServeError
from .metrics import Metrics
from .request import Completion, GenerationRequest, StepOutput, TokenLogprob
from .sampling import sample_batch


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_len: int | None = None,
                 metrics: Metrics | None = None):
        if max_batch < 1:
            raise ServeError(f"max_batch must be at least 1, got {max_batch}", param="max_batch")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        self.max_len = min(max_len or 2048, model.config.max_position_embeddings)
        self.base_name = str(getattr(model, "name_or_path", "base"))
        self.device = model.inv_freq.device
        self.cache = SlotCache.for_model(model, max_batch, self.max_len)
        self.eos = stop_token_ids(model, tokenizer)
        self.metrics = metrics or Metrics()
        self.adapters: dict[str, str] = {}  # name -> folder it was loaded from
        # prefix adapter -> per-layer (k, v) [1, Hkv, P, D], computed once (the encoder is frozen)
        self._prefixes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.waiting: deque[GenerationRequest] = deque()
        self.running: list[GenerationRequest] = []  # running[i] sits in cache slot i
        self._lock = threading.Lock()  # guards inbox, aborts, adapters' use counts and draining
        self._inbox: deque[GenerationRequest] = deque()
        self._aborts: set[str] = set()
        self._in_use: Counter[str] = Counter()
        self._draining: set[str] = set()
        self._ids = itertools.count()
        # A fast tokenizer may refuse to be used from two threads at once ("Already borrowed"). The engine
        # thread decodes with `tokenizer` under _tok_lock; prompts are encoded with a copy under _enc_lock,
        # so a long prompt being tokenized never holds up a decode step.
        self._tok_lock = threading.Lock()
        self._enc_lock = threading.Lock()
        self._enc_tokenizer = None  # the copy, made on first use
        self._max_token_chars = 0
        self._last_ids: tuple | None = None  # (the rows' adapters and the registry's names, their ids tensor)

    # -- adapters -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path) -> None:
        """Attach the LoRA or prefix-tuning folder at `path` as `name`. Engine thread only (it changes the
        model)."""
        try:
            check_adapter_name(name)
        except LoraForgeError as e:
            raise ServeError(f"lora_name: {e}", param="lora_name") from None
        if name == self.base_name or name in self.adapters:
            raise ServeError(f"lora_name {name!r} is already in use; unload it first or pick another name",
                             param="lora_name")
        kind = adapter_kind(path)
        if kind not in ("LORA", "PREFIX_TUNING"):
            raise ServeError(f"{path}: a {kind} adapter; the server serves LoRA and prefix-tuning adapters",
                             param="lora_path")
        attach_adapter(self.model, path, name, activate=False)
        if kind == "PREFIX_TUNING":
            with torch.inference_mode():
                dtype = self.cache.k.dtype
                self._prefixes[name] = [(k.to(dtype), v.to(dtype)) for k, v in prefix_for(self.model, name, 1)]
        self.adapters[name] = str(path)
        self.metrics.adapters_loaded = len(self.adapters)

    def begin_unload(self, name: str) -> None:
        """Refuse new requests for `name` from now on; `unload_adapter` succeeds once its requests finish."""
        with self._lock:
            if name not in self.adapters or name in self._draining:
                raise ServeError(f"no adapter named {name!r} is loaded", status=404, param="lora_name",
                                 code="model_not_found")
            self._draining.add(name)

    def adapter_busy(self, name: str) -> bool:
        with self._lock:
            return self._in_use[name] > 0

    def unload_adapter(self, name: str) -> None:
        """Remove adapter `name` from the model. Engine thread only; refuses while requests still use it."""
        with self._lock:
            if name not in self.adapters:
                raise ServeError(f"no adapter named {name!r} is loaded", status=404, param="lora_name",
                                 code="model_not_found")
            if self._in_use[name] > 0:
                raise ServeError(f"adapter {name!r} has {self._in_use[name]} requests in flight", status=409,
                                 param="lora_name")
            delete_adapter(self.model, name)
            del self.adapters[name]
            self._prefixes.pop(name, None)
            self._draining.discard(name)
            self.metrics.adapters_loaded = len(self.adapters)

    def cancel_unload(self, name: str) -> None:
        with self._lock:
            self._draining.discard(name)

    # -- requests -------------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict], chat: bool) -> list[int]:
        """Prompt token ids (chat messages go through the chat template). Any thread but the engine's.

        A text with more characters than max_len tokens can hold (max_len x the longest token's characters)
        is refused before it is tokenized: tokenizing megabytes takes seconds and a lot of memory."""
        field = "messages" if chat else "prompt"
        with self._enc_lock:
            encoder = self._encoder()
            chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
            if chars > self.max_len * self._max_token_chars:
                raise ServeError(f"{field}: {chars} characters cannot fit this model's maximum context length of "
                                 f"{self.max_len} tokens (a token is at most {self._max_token_chars} characters)",
                                 param=field, code="context_length_exceeded")
            try:
                return encode_prompt(encoder, prompt, chat)
            except Exception as e:  # noqa: BLE001 - a template rejecting odd messages is the user's input
                raise ServeError(f"{field}: cannot be encoded ({type(e).__name__}: {e})", param=field) from None

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token's text on its own (for log-probabilities). Any thread but the engine's."""
        with self._enc_lock:
            tok = self._encoder()
            return [tok.decode([i]) for i in ids]

    def _encoder(self):
        """The tokenizer copy used off the engine thread (made on first use); call with _enc_lock held."""
        if self._enc_tokenizer is None:
            self._enc_tokenizer = copy.deepcopy(self.tokenizer)
            # A token's string form has at least as many characters as the text it stands for.
            self._max_token_chars = max(map(len, self._enc_tokenizer.get_vocab()), default=1)
        return self._enc_tokenizer

    def resolve_model(self, model: str | None) -> str | None:
        """The adapter a request's `model` field names (None = the base); 404 for anything else."""
        if model is None or model == self.base_name:
            return None
        with self._lock:
            if model in self.adapters and model not in self._draining:
                return model
        names = ", ".join([self.base_name, *sorted(self.adapters)])
        raise ServeError(f"The model {model!r} does not exist; available: {names}", status=404, param="model",
                         code="model_not_found")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
                    request_id: str | None = None, logprobs: int | None = None) -> str:
        """Queue a request (any thread). Raises ServeError for a prompt that cannot fit or an unknown adapter."""
        n = len(prompt_ids)
        if n == 0:
            raise ServeError("the prompt is empty", param="prompt")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ServeError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        prefix = self._prefixes.get(adapter) if adapter is not None else None
        P = prefix[0][0].shape[2] if prefix else 0
        if P + n + params.max_new_tokens > self.max_len:
            with_prefix = f", {P} for the adapter's prefix" if P else ""
            raise ServeError(
                f"This model's maximum context length is {self.max_len} tokens; the request needs "
                f"{P + n + params.max_new_tokens} ({n} in the prompt, {params.max_new_tokens} to generate"
                f"{with_prefix}). Shorten the prompt or lower max_tokens.",
                param="max_tokens" if P + n < self.max_len else "prompt", code="context_length_exceeded")
        rid = request_id or f"req-{next(self._ids)}"
        req = GenerationRequest(rid, list(prompt_ids), params, adapter, prefix_len=P, logprobs=logprobs)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        with self._lock:
            if adapter is not None:
                if adapter not in self.adapters or adapter in self._draining:
                    raise ServeError(f"The model {adapter!r} does not exist", status=404, param="model",
                                     code="model_not_found")
                self._in_use[adapter] += 1
            self._inbox.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._inbox or self.waiting or self.running)

    @property
    def queue_length(self) -> int:
        with self._lock:
            return len(self._inbox) + len(self.waiting)

    # -- the loop -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit waiting requests, run one decode step for the batch, retire finished requests."""
        outs: list[StepOutput] = []
        self._take_inbox(outs)
        produced = 0
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting.popleft()
            req.slot = len(self.running)
            self.running.append(req)
            admitted.append(req)
        for group in prefill_groups(admitted):
            logits = self._prefill(group)  # [n, V]
            for req, tok in zip(group, self._sample(logits, group), strict=True):
                produced += self._emit(req, tok, outs)
        self._retire()
        if self.running:
            view = self.cache.decode_view(len(self.running))
            ids = torch.tensor([[r.output_ids[-1]] for r in self.running], device=self.device)  # [B, 1]
            logits = self.model(ids, positions=view.positions(), attention_mask=view.attention_mask(),
                                adapter_ids=self._adapter_ids(self.running), cache=view)[:, -1]  # [B, V]
            for req, tok in zip(self.running, self._sample(logits, self.running), strict=True):
                produced += self._emit(req, tok, outs)
            self._retire()
        self.metrics.step(produced, self.queue_length, len(self.running))
        return outs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[Completion]:
        """Run requests to completion on the calling thread (tests, benchmarks); results in input order.

        Not for use while an EngineThread runs the loop; other requests' outputs are dropped meanwhile.
        """
        params = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        rids = [self.add_request(p, sp, a) for p, sp, a in zip(prompts, params, adapters, strict=True)]
        texts = {r: [] for r in rids}
        tokens = {r: [] for r in rids}
        reasons: dict[str, str] = {}
        while len(reasons) < len(rids):
            for o in self.step():
                if o.request_id not in texts:  # someone else's request: its outputs are dropped here
                    continue
                texts[o.request_id].append(o.text)
                tokens[o.request_id] += o.token_ids
                if o.finish_reason:
                    reasons[o.request_id] = o.finish_reason
        return [Completion("".join(texts[r]), tokens[r], reasons[r]) for r in rids]

    # -- internals ------------------------------------------------------------------------------------------
    def _take_inbox(self, outs: list[StepOutput]) -> None:
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, set()
        if not aborts:
            return
        for req in [r for r in self.waiting if r.request_id in aborts]:
            self.waiting.remove(req)
            self._finish(req, "abort", outs)
        for req in self.running:
            if req.request_id in aborts:
                self._finish(req, "abort", outs)
        self._retire()

    def _adapter_ids(self, reqs: list[GenerationRequest]) -> torch.Tensor:
        # On the CPU whatever the model's device: every LoRA layer reads them as a list (LoraLinear._groups).
        # The same tensor while the rows' adapters stay the same (most decode steps): the layers then know
        # their cached grouping holds without reading it. Never written in place.
        key = ([r.adapter for r in reqs], list(registry(self.model).names))  # names -> indices can change
        if self._last_ids is None or self._last_ids[0] != key:
            self._last_ids = (key, adapter_ids_for(self.model, key[0]))
        return self._last_ids[1]

    def _prefill(self, reqs: list[GenerationRequest]) -> torch.Tensor:
        """One forward over the prompts of `reqs` (consecutive slots), right-padded; [n, V] next-token logits.
        A prefix adapter's request comes alone: its prefix fills the slot's first P positions, the prompt
        follows at positions P, P + 1, ... (as PEFT and generate_ids place it)."""
        lengths = [len(r.prompt_ids) for r in reqs]
        P = reqs[0].prefix_len
        if P:
            self.cache.write_prefix(reqs[0].slot, self._prefixes[reqs[0].adapter])
        view = self.cache.prefill_view(reqs[0].slot, lengths, past=P)
        S = max(lengths)
        ids = torch.tensor([r.prompt_ids + [0] * (S - len(r.prompt_ids)) for r in reqs], device=self.device)
        positions = torch.arange(P, P + S, device=self.device).expand(len(reqs), S)
        return self.model(ids, positions=positions, adapter_ids=self._adapter_ids(reqs), cache=view,
                          logits_at=view.last_positions())[:, -1]

    def _sample(self, logits: torch.Tensor, reqs: list[GenerationRequest]) -> list[int]:
        """One token per row; -1 for a row whose logits are not finite (its adapter overflowed or holds
        NaN): that request fails alone, instead of its NaN breaking the sampler for the whole batch."""
        # a row's sum is non-finite iff the row is (or its finite values overflow the sum: then look closer);
        # a sum costs ~20 us on [8, 49152], isfinite(...).any(-1) ~1 ms
        broken = ~torch.isfinite(logits.sum(-1, dtype=torch.float32))  # [B]
        if bool(broken.any()):
            broken = (~torch.isfinite(logits)).any(-1)
        if bool(broken.any()):
            logits = logits.masked_fill(broken[:, None], 0.0)
        want = [b for b, r in enumerate(reqs) if r.logprobs is not None]
        # the model's own distribution, before min_tokens, temperature, top-k and top-p shape the draw
        lp = torch.log_softmax(logits[want].float(), -1) if want else None  # [len(want), V]
        early = [b for b, r in enumerate(reqs) if len(r.output_ids) < r.params.min_tokens]
        if early and self.eos:  # too early to end: no end-of-sequence token may be drawn
            logits[torch.tensor(early, device=logits.device)[:, None],
                   torch.tensor(sorted(self.eos), device=logits.device)[None, :]] = float("-inf")
        toks = sample_batch(logits, [r.params for r in reqs], [r.generator for r in reqs])
        for i, b in enumerate(want):
            top = torch.topk(lp[i], reqs[b].logprobs) if reqs[b].logprobs else None
            reqs[b].last_logprob = (toks[b], float(lp[i, toks[b]]),
                                    list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else [])
        return [-1 if bad else t for t, bad in zip(toks, broken.tolist(), strict=True)]

    def _emit(self, req: GenerationRequest, tok: int, outs: list[StepOutput]) -> int:
        """Append one token to `req`; add its new text (and the end, if it ended) to `outs`."""
        if req.finish_reason is not None:
            return 0
        if tok < 0:  # non-finite logits (see _sample)
            self._finish(req, "error", outs)
            return 0
        req.output_ids.append(tok)
        p = req.params
        reason = None
        if tok in self.eos:
            reason = "stop"
        with self._tok_lock:
            text, stopped = decode_until_stop(self.tokenizer, req.output_ids, self.eos, p.stop)
        if stopped:
            reason = "stop"
        req.text = text
        if reason is None and (len(req.output_ids) >= p.max_new_tokens
                               or req.prefix_len + len(req.prompt_ids) + len(req.output_ids) >= self.max_len):
            reason = "length"
        if reason is not None:
            self._finish(req, reason, outs, new_tokens=[tok])
            return 1
        # Hold back text that might still become a stop string, or a half-decoded UTF-8 character.
        hold = max((len(s) - 1 for s in p.stop), default=0)
        upto = len(text) - hold
        while upto > req.sent and text[upto - 1] == "\ufffd":
            upto -= 1
        delta = text[req.sent:upto] if upto > req.sent else ""
        req.sent = max(req.sent, upto)
        outs.append(StepOutput(req.request_id, delta, [tok], None, len(req.prompt_ids), len(req.output_ids),
                               self._logprobs(req, [tok])))
        return 1

    @staticmethod
    def _logprobs(req: GenerationRequest, new_tokens: list[int]) -> list[TokenLogprob] | None:
        if req.logprobs is None:
            return None
        return [req.last_logprob] if new_tokens else []

    def _finish(self, req: GenerationRequest, reason: str, outs: list[StepOutput],
                new_tokens: list[int] | None = None) -> None:
        req.finish_reason = reason
        outs.append(StepOutput(req.request_id, req.text[req.sent:], new_tokens or [], reason,
                               len(req.prompt_ids), len(req.output_ids), self._logprobs(req, new_tokens or [])))
        req.sent = len(req.text)
        with self._lock:
            if req.adapter is not None:
                self._in_use[req.adapter] -= 1
        self.metrics.finished(len(req.prompt_ids), {"abort": "cancelled", "error": "failed"}.get(reason, "served"))

    def _retire(self) -> None:
        """Drop finished sequences; the last running one moves into each freed slot to keep slots contiguous."""
        for req in sorted((r for r in self.running if r.finish_reason), key=lambda r: r.slot, reverse=True):
            last = self.running[-1]
            if last is not req:
                self.cache.move(last.slot, req.slot)
                last.slot = req.slot
                self.running[req.slot] = last
            self.running.pop()

    def fail_all(self) -> list[GenerationRequest]:
        """After an engine error: end every request and empty the batch; returns them to notify."""
        with self._lock:
            reqs = [*self._inbox, *self.waiting, *self.running]
            self._inbox.clear()
            for r in reqs:
                if r.adapter is not None and r.finish_reason is None:
                    self._in_use[r.adapter] -= 1
        self.waiting.clear()
        self.running.clear()
        for r in reqs:
            if r.finish_reason is None:
                r.finish_reason = "error"
                self.metrics.finished(len(r.prompt_ids), "failed")
        return reqs


# A prefill batch holds at most this many tokens, padding included (bounds its activations: ~40 MB per
# 1000 tokens for a 135M model in fp32, with the logits of one position per row only).
PREFILL_TOKENS = 4096


def prefill_groups(reqs: list[GenerationRequest]) -> list[list[GenerationRequest]]:
    """Consecutive runs of `reqs` to prefill together, so that each run's slots stay consecutive.

    A run grows while its padded size (rows x longest prompt) stays within PREFILL_TOKENS and at most twice
    its real tokens plus 64, so that one long prompt does not make many short ones pay for its length."""
    groups: list[list[GenerationRequest]] = []
    real = longest = 0
    for r in reqs:
        n = len(r.prompt_ids)
        if groups and not r.prefix_len and not groups[-1][0].prefix_len:  # a prefix row is prefilled alone
            rows, top = len(groups[-1]) + 1, max(longest, n)
            if rows * top <= PREFILL_TOKENS and rows * top <= 2 * (real + n) + 64:
                groups[-1].append(r)
                real, longest = real + n, top
                continue
        groups.append([r])
        real, longest = n, n
    return groups
