"""OpenAI's response objects for one request of `hy-edge serve`: whole answers, stream chunks, usage, logprobs
(chat's and completions' legacy columns), and tool calls split out of an answer (tools.py)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass

from ..text.generate import GenerationResponse
from ..text.sampling import TokenLogprobs
from ..text.tools import ToolTags, split


def usage_of(r: GenerationResponse) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": r.cached_tokens},
    }


def token_piece(tokenizer):
    """token id -> its text, as logprobs name tokens (special tokens included)."""
    return lambda token: tokenizer.decode([token], skip_special_tokens=False)


@dataclass(frozen=True)
class Shape:
    """OpenAI's response objects for one request."""

    id: str
    model: str
    chat: bool
    created: int = 0
    piece: Callable[[int], str] | None = None  # token id -> text, when logprobs were asked for
    tools: ToolTags | None = None  # the call format, when the answer may call tools

    def logprobs(self, items: list[TokenLogprobs], offset: int = 0) -> dict | None:
        """chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions: the legacy columns."""
        if self.piece is None:
            return None
        if self.chat:

            def entry(token: int, logprob: float) -> dict:
                text = self.piece(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

            return {
                "content": [
                    {**entry(lp.token, lp.logprob), "top_logprobs": [entry(*t) for t in lp.top]} for lp in items
                ]
            }
        tokens = [self.piece(lp.token) for lp in items]
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{self.piece(t): v for t, v in lp.top} for lp in items],
            "text_offset": list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset)),
        }

    def head(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, delta, finish: str | None, logprobs: dict | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**self.head(), "choices": [choice]}

    @staticmethod
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def whole(self, text: str, last: GenerationResponse, logprobs: list[TokenLogprobs]) -> dict:
        if self.chat:
            message, finish = {"role": "assistant", "content": text}, last.finish_reason
            if self.tools is not None and finish == "stop":
                content, calls = split(text, self.tools)
                if calls:
                    message, finish = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": self.logprobs(logprobs), "finish_reason": finish}
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": self.logprobs(logprobs),
                "finish_reason": last.finish_reason,
            }
        obj = {**self.head(), "choices": [choice], "usage": usage_of(last)}
        obj["object"] = "chat.completion" if self.chat else "text_completion"
        return obj
