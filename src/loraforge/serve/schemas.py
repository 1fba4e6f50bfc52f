"""Request and response bodies of the OpenAI-compatible API.

Requests are strict, as OpenAI's are: no type coercion (``max_tokens: "5"``, ``stream: "yes"`` and
``prompt: [true]`` are 400s) and no silently ignored fields. A field we do not honour is refused by name
(an unknown field, or a known one such as ``presence_penalty`` set to anything but its neutral value), so
a client never gets an answer computed without what it asked for.

Log-probabilities (``logprobs``, ``top_logprobs``) are those of the model's own next-token distribution,
before temperature, top-k and top-p shape the draw (as OpenAI and vLLM report them).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..lora.registry import NAME_RULE

_REQUEST = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _REQUEST
    include_usage: bool = False


def _neutral(name: str, value, neutral: tuple) -> None:
    if value not in neutral:
        raise ValueError(f"{name} is not supported by this server; leave it out or send {json.dumps(neutral[0])}")


class SamplingFields(BaseModel):
    model_config = _REQUEST

    model: str = Field(min_length=1, description="the base model's name or a loaded adapter's name")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1 = no cut (vLLM extension)")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = Field(None, description="strings that end the completion (not included in it)")
    min_tokens: int = Field(0, ge=0, description="tokens to generate before end-of-sequence may end the completion "
                                                 "(vLLM extension)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    user: str | None = Field(None, description="an end-user id (accepted for compatibility; not used)")
    # Accepted only at their neutral value, for clients that always send them: not implemented here.
    presence_penalty: float = Field(0.0, description="only 0 (penalties are not implemented)")
    frequency_penalty: float = Field(0.0, description="only 0 (penalties are not implemented)")
    logit_bias: dict[str, float] | None = Field(None, description="only empty (not implemented)")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v, info):
        _neutral(info.field_name, v, (0.0,))
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v, info):
        _neutral(info.field_name, v or None, (None,))
        return v

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class TextPart(BaseModel):
    model_config = _REQUEST
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _REQUEST
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, description="required except in an assistant message")

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: bool | None = Field(None, description="return each output token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and the most likely tokens' at each step "
                                                                    "(needs logprobs: true)")

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] = Field(description="a string, or token ids")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20, description="return each output token's log-probability "
                                                                "and the k most likely tokens' at each step")
    echo: bool = Field(False, description="only false")
    best_of: int | None = Field(None, description="only 1")
    suffix: str | None = Field(None, description="only null")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v, info):
        _neutral(info.field_name, v, (None,))
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v, info):
        _neutral(info.field_name, v, (False,))
        return v

    @field_validator("best_of")
    @classmethod
    def _one(cls, v, info):
        _neutral(info.field_name, v, (1, None))
        return v


class LoadLoraRequest(BaseModel):
    model_config = _REQUEST
    lora_name: str = Field(min_length=1, description=f"the adapter's name: {NAME_RULE}")
    lora_path: str = Field(min_length=1, description="a folder inside the server's --adapters-dir")


class UnloadLoraRequest(BaseModel):
    model_config = _REQUEST
    lora_name: str = Field(min_length=1)


# -- responses ------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraforge"
    root: str | None = None
    parent: str | None = None  # the base model, for an adapter


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]  # from the start of the completion's text


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
