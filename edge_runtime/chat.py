"""Chat prompts rendered with the model's own Jinja template, the way transformers'
`apply_chat_template` does (sandboxed environment, trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `tojson`, `strftime_now`). Model-specific switches such as Hunyuan's
`enable_thinking` pass through as template variables; what `/no_think` does is up to the template."""

from __future__ import annotations

import functools
import json
from datetime import datetime

from .errors import HyEdgeError
from .tokenizer import Tokenizer


class TemplateError(HyEdgeError):
    """The chat template failed to render (raise_exception or a Jinja error)."""


def _raise_exception(message):
    raise TemplateError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping (unlike Jinja's built-in), unicode kept
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs,
) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
    import jinja2

    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            tools=None,
            documents=None,
            **kwargs,
        )
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template: {type(e).__name__}: {e}") from None


def plain_prompt(messages: list[dict]) -> str:
    """Fallback for a model without a template: the message texts, one paragraph each."""
    return "\n\n".join(str(m.get("content", "")) for m in messages)


def encode_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """Token ids of a chat. The rendered template carries its own BOS, so it is encoded without
    adding special tokens (as apply_chat_template(tokenize=True) does); without a template the plain
    text is encoded like a raw prompt."""
    cfg = tokenizer.config
    if not cfg.chat_template:
        return tokenizer.encode(plain_prompt(messages), add_special_tokens=True)
    text = render(cfg.chat_template, messages, add_generation_prompt, cfg.bos_token, cfg.eos_token, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def make_messages(prompt: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]
