"""The request bodies of `hy-edge serve`'s OpenAI-compatible routes (pydantic): unknown fields are ignored, types
are strict ("5" is not a number), and a known field that would change the answer and is not supported is named
by `refused()` (the route answers 400), never dropped."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: to which call
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingBody(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # llama-server's extensions (defaults off: an answer equals `hy-edge run`'s)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatBody(SamplingBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None  # text, json_object, json_schema (grammar.py)
    tools: list | None = None  # tools.py
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True
    # fields that would change the answer and are not supported: named in a 400, never dropped (`refused`)
    functions: list | None = None
    function_call: str | dict | None = None
    audio: dict | None = None
    modalities: list[str] | None = None
    prediction: dict | None = None

    def refused(self) -> str | None:
        for name in ("functions", "function_call", "audio", "prediction"):
            if getattr(self, name) is not None:
                return f"{name}: not supported by this server"
        if self.modalities not in (None, ["text"]):
            return "modalities: only ['text'] is supported"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs: requires logprobs: true"
        return None

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionBody(SamplingBody):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refused(self) -> str | None:
        if self.echo:
            return "echo: not supported by this server"
        if self.best_of not in (None, 1):
            return "best_of: only 1 is supported"
        if self.suffix:
            return "suffix: not supported by this server (no fill-in-the-middle)"
        return None

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs
