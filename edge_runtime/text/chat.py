"""Chat prompts rendered with the model's own Jinja template, the way transformers'
`apply_chat_template` does (sandboxed environment, trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `tojson`, `strftime_now`). Model-specific switches such as Hunyuan's
`enable_thinking` pass through as template variables; what `/no_think` does is up to the template.

The template comes with the model file: it is code, run in Jinja's sandbox, and bounded here in what
the sandbox leaves open (a range of 10**12, 'a' * 10**9, a string doubled in a loop, a loop nest
that never ends): `range` and every loop over it, the sizes `*`, `+`, `%` and `namespace` may build,
the length of the prompt, and the time a rendering takes. Whatever it raises is reported as one line,
"the model's chat template failed: ...".
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from datetime import datetime

from hy_edge_format.errors import HyEdgeError

from .tokenizer import Tokenizer

MAX_CHARS = 32 << 20  # of any string or list a template builds, and of the prompt (the CLI reads <= 16 MB)
MAX_RANGE = 100_000  # jinja2.sandbox's own bound on range()
MAX_SECONDS = 10.0  # a rendering takes milliseconds; this is a loop that will not end
_WIDE_FORMAT = re.compile(r"%[-+ #0]*(\d{6,}|\*)|\.(\d{6,}|\*)")  # '%0999999999d' % 1: a 1 GB string


class TemplateError(HyEdgeError):
    """The chat template failed to render (raise_exception, a Jinja error, or a bound above)."""


def _raise_exception(message):
    raise TemplateError(f"the model's chat template failed: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping (unlike Jinja's built-in), unicode kept
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _size(value) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else 0


def _bounded(value):
    if _size(value) > MAX_CHARS:
        raise TemplateError(f"the model's chat template failed: it builds a value of {_size(value):,} items")
    return value


_deadline = threading.local()  # .end: when this thread's rendering must stop (the server renders on several)


def _check_time() -> None:
    if time.monotonic() > getattr(_deadline, "end", float("inf")):
        raise TemplateError(f"the model's chat template failed: it ran for more than {MAX_SECONDS:g} s")


def _range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise TemplateError(f"the model's chat template failed: range of {len(r):,} items (at most {MAX_RANGE:,})")

    def steps():
        for n, i in enumerate(r):
            if n % 1024 == 0:
                _check_time()
            yield i

    return steps()


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class BoundedNamespace(Namespace):
        def __setitem__(self, name, value):
            _check_time()
            super().__setitem__(name, _bounded(value))

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "%", "**"])

        def call_binop(self, context, operator, left, right):
            n = right if isinstance(right, int) else left if isinstance(left, int) else 0
            if operator == "*" and max(_size(left), _size(right)) * n > MAX_CHARS:
                raise TemplateError(f"the model's chat template failed: it repeats a value {n:,} times")
            if operator == "+" and _size(left) + _size(right) > MAX_CHARS:
                raise TemplateError(f"the model's chat template failed: it builds a value over {MAX_CHARS:,} items")
            if operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
                raise TemplateError("the model's chat template failed: a %-format of a huge width or precision")
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(right) > 64:
                raise TemplateError(f"the model's chat template failed: an integer power of {right}")
            return super().call_binop(context, operator, left, right)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _range
    env.globals["namespace"] = BoundedNamespace
    return env.from_string(template)


def render(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs,
) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]). TemplateError (one line)
    for anything the template raises or a bound it passes: the template is the model's, not ours."""
    _deadline.end = time.monotonic() + MAX_SECONDS
    try:
        parts, size = [], 0
        chunks = _compile(template).generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            tools=None,
            documents=None,
            **kwargs,
        )
        for chunk in chunks:
            size += len(chunk)
            if size > MAX_CHARS:
                raise TemplateError(f"the model's chat template failed: its prompt passes {MAX_CHARS:,} characters")
            parts.append(chunk)
            _check_time()
        return "".join(parts)
    except TemplateError:
        raise
    except Exception as e:  # the template's own errors: Jinja's, its sandbox's, a TypeError...
        text = " ".join(str(e).split())[:200]
        raise TemplateError(f"the model's chat template failed: {type(e).__name__}: {text}") from None
    finally:
        _deadline.end = float("inf")


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
