"""Tool calls: OpenAI's `tools` / `tool_choice` for a chat, in the call format of the model's family.

A model is told about its tools in a system message (the function schemas and the format below), and calls them
by answering with a JSON list between its family's tags, or (Qwen2.5 / Qwen3, the Hermes format they are trained
on) with one JSON object per call, each between its own tags:

    <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>     (SmolLM2 / Llama)
    <tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_calls>   (Hunyuan)
    <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>  (Qwen2.5 / Qwen3)

grammar.py holds the answer to it token by token: from the first token for tool_choice "required" or a named
function, and from the opening tag on for "auto" (the model may answer in text instead, as llama-server's lazy
grammars do). `split` turns the answer back into OpenAI's `content` and `tool_calls`.

Nothing here imports llguidance or knows about HTTP.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hy_edge_format.errors import HyEdgeError
from hy_edge_format.families import FAMILIES, ToolTags

MAX_CALLS = 8  # calls in one answer: a sampled answer cannot run on listing calls until max_tokens
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function name


# a family's tool-call tags (hy_edge_format.families), by ModelSpec.model_type
FORMATS = {f.model_type: f.tools for f in FAMILIES if f.tools is not None}


@dataclass(frozen=True)
class Tools:
    """A chat's tools and how it must use them. choice: "auto", "required", or the name of one function."""

    functions: tuple[dict, ...]  # {"name", "description", "parameters"}
    choice: str
    format: ToolTags
    parallel: bool = True

    def call_schema(self) -> dict:
        """The JSON schema of one call."""
        allowed = [f for f in self.functions if self.choice in ("auto", "required", f["name"])]
        items = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in allowed
        ]
        return items[0] if len(items) == 1 else {"anyOf": items}

    @property
    def max_calls(self) -> int:
        return 1 if self.choice not in ("auto", "required") or not self.parallel else MAX_CALLS

    def calls_schema(self) -> dict:
        """The JSON schema of the call list the grammar holds the answer to (list formats)."""
        return {"type": "array", "items": self.call_schema(), "minItems": 1, "maxItems": self.max_calls}

    @property
    def lazy(self) -> bool:
        """The grammar starts at the opening tag (the model may answer in text)."""
        return self.choice == "auto"

    def system_prompt(self) -> str:
        schemas = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in self.functions)
        example = '[{"name": "function name", "arguments": {"argument": "value"}}]'
        if self.format.per_call:
            example = '\n{"name": "function name", "arguments": {"argument": "value"}}\n'
        if self.choice == "auto":
            when = "If a function helps to answer, call it"
        elif self.choice == "required":
            when = "Answer by calling one or more of them"
        else:
            when = f"Answer by calling the function {self.choice}"
        each = " for each call" if self.format.per_call else ""
        return (
            f"You can call these functions (their parameters are JSON schemas):\n<tools>\n{schemas}\n</tools>\n"
            f"{when}: reply with {self.format.open}{example}{self.format.close}{each} and nothing else."
        )

    def messages(self, messages: list[dict]) -> list[dict]:
        """The chat with the tools' description in its system message (added before the first, or joined to it)."""
        prompt = self.system_prompt()
        if messages and messages[0]["role"] == "system":
            return [{**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}, *messages[1:]]
        return [{"role": "system", "content": prompt}, *messages]


def parse_tools(
    model_type: str, tools: Sequence | None, tool_choice: str | Mapping | None, parallel: bool = True
) -> Tools | None:
    """The Tools of a request's `tools` / `tool_choice` (None: no tool may be called). HyEdgeError whose
    message starts with the field at fault."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise HyEdgeError("tool_choice: needs tools")
        return None
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(fn, Mapping):
            raise HyEdgeError(f'tools: tools[{i}] should be {{"type": "function", "function": {{...}}}}')
        name, parameters = fn.get("name"), fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise HyEdgeError(f"tools: tools[{i}].function.name should be 1 to 64 letters, digits, _ or -")
        if not isinstance(parameters, Mapping):
            raise HyEdgeError(f"tools: tools[{i}].function.parameters should be a JSON schema (an object)")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise HyEdgeError(f"tools: tools[{i}].function.description should be a string")
        entry = {"name": name, **({"description": description} if description else {}), "parameters": dict(parameters)}
        functions.append(entry)
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise HyEdgeError("tools: two tools have the same name")
    if tool_choice is None or tool_choice == "auto":
        choice = "auto"
    elif tool_choice == "none":
        return None
    elif tool_choice == "required":
        choice = "required"
    elif isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        choice = (tool_choice.get("function") or {}).get("name")
        if choice not in names:
            raise HyEdgeError(f"tool_choice: no tool named {choice!r}")
    else:
        raise HyEdgeError('tool_choice: should be "none", "auto", "required" or {"type": "function", ...}')
    fmt = FORMATS.get(model_type)
    if fmt is None:
        raise HyEdgeError(f"tools: no tool-call format is known for {model_type} models")
    return Tools(tuple(functions), choice, fmt, parallel)


def assistant_text(content: str | None, tool_calls: Sequence[Mapping], fmt: ToolTags) -> str:
    """An earlier assistant turn that called tools, as the model wrote it (for the chat template)."""
    calls = []
    for call in tool_calls:
        fn = call.get("function") or {}
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except (TypeError, ValueError):
            raise HyEdgeError("messages: a tool call's function.arguments should be a JSON string") from None
        calls.append({"name": fn.get("name"), "arguments": arguments})
    if fmt.per_call:
        tagged = (f"{fmt.open}\n{json.dumps(c, ensure_ascii=False)}\n{fmt.close}" for c in calls)
        return (content or "") + "\n".join(tagged)
    return (content or "") + fmt.open + json.dumps(calls, ensure_ascii=False) + fmt.close


def split(text: str, fmt: ToolTags) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) of an answer: tool_calls in OpenAI's shape when the answer holds a call list that
    parses, else None (the answer is all content)."""
    start = text.find(fmt.open)
    if start < 0:
        return text, None
    body = text[start + len(fmt.open) :]
    try:
        if fmt.per_call:  # each call between its own tags (the last one's close may be missing: cut)
            calls = [json.loads(piece.split(fmt.close, 1)[0]) for piece in body.split(fmt.open)]
        else:
            end = body.rfind(fmt.close)
            calls = json.loads(body[:end] if end >= 0 else body)
    except ValueError:
        return text, None
    if not isinstance(calls, list) or not calls:
        return text, None
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, None
        function = {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}
        out.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function", "function": function})
    return text[:start].strip() or None, out


class ToolStream:
    """Streams an answer's content while holding back what may be the start of a call: `feed` returns the text
    that is content for sure; once the opening tag has come, nothing more (`split` of the whole text at the end)."""

    def __init__(self, fmt: ToolTags):
        self.fmt, self.text, self.sent = fmt, "", 0

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.fmt.open in self.text:
            safe = self.text.find(self.fmt.open)
        else:
            safe = len(self.text)
            for n in range(min(len(self.fmt.open) - 1, len(self.text)), 0, -1):  # a tag's beginning at the end
                if self.fmt.open.startswith(self.text[-n:]):
                    safe = len(self.text) - n
                    break
        out, self.sent = self.text[self.sent : max(safe, self.sent)], max(safe, self.sent)
        return out

    def finish(self, complete: bool = True) -> tuple[str, list[dict] | None]:
        """(content not yet sent, tool_calls). An answer that did not end on its own (`complete` false: cut by
        max_tokens) is all content, as `Shape.whole` makes it."""
        _, calls = split(self.text, self.fmt) if complete else (None, None)
        if calls is None:
            return self.text[self.sent :], None
        return self.text[self.sent : self.text.find(self.fmt.open)], calls
