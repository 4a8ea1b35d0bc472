"""JSON from files the user hands us (config.json, tokenizer files, safetensors headers, a model's
metadata): bounded in nesting, typed before it is used.

`json.loads` recurses once per level of nesting: `[[[[...` 100,000 deep ends in a RecursionError (a
traceback) rather than a parse error, a structure a few hundred deep parses but makes any later
recursive walk fail, and a value that parses may still be a list where the reader expects a number.
`loads` refuses both depths (the parsed value is measured without recursion); `field` reads one typed
value and names it when it is wrong. Callers turn `JSONInputError` into their own one-line error
naming the file.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64  # the deepest real file (a tokenizer.json) nests 5 levels


class JSONInputError(ValueError):
    """Text that is not JSON, nested too deeply, or a value of the wrong type (one line)."""


def depth(value: Any, stop: int = 1 << 30) -> int:
    """How deeply the lists and dicts of a parsed JSON value nest, level by level (no recursion);
    counting stops past `stop`."""
    deepest, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level and deepest <= stop:
        deepest += 1
        inner = []
        for v in level:
            inner += [x for x in (v.values() if isinstance(v, dict) else v) if isinstance(x, (dict, list))]
        level = inner
    return deepest


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads, but nested at most `max_depth` levels; JSONInputError (one line) for anything else.
    Numbers beyond float range parse as inf, and NaN / Infinity literals are accepted: the typed
    reads below refuse them where a finite number is needed."""
    too_deep = f"nested more than {max_depth} levels deep"
    try:
        value = json.loads(text)
    except RecursionError:
        raise JSONInputError(too_deep) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JSONInputError(f"not valid JSON ({e})") from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise JSONInputError(f"not valid JSON ({str(e).splitlines()[0]})") from None
    if depth(value, max_depth) > max_depth:
        if isinstance(value, dict):  # name the field that nests too deeply
            key = next((k for k, v in value.items() if depth(v, max_depth) >= max_depth), None)
            if key is not None:
                raise JSONInputError(f"field '{key[:80]}' is {too_deep}")
        raise JSONInputError(too_deep)
    return value


def show(value: Any, limit: int = 40) -> str:
    """A value for an error message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A number float() takes and that is finite (an integer of 400 digits is not: float() overflows)."""
    return is_number(value) and (abs(value) < 2**1023 if isinstance(value, int) else math.isfinite(value))


def field(obj: dict, key: str, kind: str, default: Any = ..., where: str = "") -> Any:
    """obj[key] checked against `kind`: "int", "number" (finite int or float, returned as float), "bool",
    "str", "dict", "list", "str-list", "int-list"; `default` when absent or null (a required key without
    one raises). JSONInputError names `where` + the key and shows the value."""
    name = f"{where}{key}"
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None:
        if default is ...:
            raise JSONInputError(f"field '{name}' is missing")
        return default
    ok = {
        "int": is_int,
        "number": is_finite,
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "dict": lambda v: isinstance(v, dict),
        "list": lambda v: isinstance(v, list),
        "str-list": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "int-list": lambda v: isinstance(v, list) and all(is_int(x) for x in v),
    }[kind](value)
    if not ok:
        what = {
            "int": "an integer",
            "number": "a finite number",
            "bool": "true or false",
            "str": "a string",
            "dict": "an object",
            "list": "a list",
            "str-list": "a list of strings",
            "int-list": "a list of integers",
        }[kind]
        raise JSONInputError(f"field '{name}' should be {what}, got {show(value)}")
    return float(value) if kind == "number" else value
