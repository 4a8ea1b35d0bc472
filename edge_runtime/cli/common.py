"""What every hy-edge command shares: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import click
from hy_edge_format.errors import EXIT_USER_ERROR, HyEdgeError

from ..engine.backend import KV_CACHES


def fail(message: str) -> None:
    """Print `hy-edge: error: message` and exit 2."""
    click.echo(f"hy-edge: error: {message}", err=True)
    sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into one line; anything else is a bug and keeps its traceback."""
    try:
        yield
    except HyEdgeError as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except BrokenPipeError:  # the reader of stdout went away (`| head`, a closed socket)
        _silence_stdout()
        fail("stdout was closed before the output was written")
    except OSError as e:  # the environment, not a bug: a full disk, a read-only directory, a missing file
        where = f"{e.filename}: " if e.filename else ""
        fail(f"{where}{e.strerror or e}" + (" (no space left for the output)" if e.errno == errno.ENOSPC else ""))
    except KeyboardInterrupt:
        click.echo("", err=True)
        sys.exit(130)


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush does not raise again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def require_stdout() -> None:
    """A command whose output is its purpose fails at once when stdout is closed (`>&-`): Python then
    has no sys.stdout and the text would vanish with exit code 0."""
    if sys.stdout is None:
        raise HyEdgeError("stdout is closed; nothing could be written")


def check_text(text: str, what: str) -> str:
    """Text from the command line or a terminal arrives with undecodable bytes as lone surrogates
    (surrogateescape); the tokenizer cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HyEdgeError(f"{what} is not valid UTF-8 text (invalid byte at offset {e.start})") from None
    return text


def model_options(fn: Callable) -> Callable:
    """--model, --backend, --threads, --max-memory, --max-context, --kv-cache: which model, and how to run it."""
    options = [
        click.option(
            "--model",
            "model_arg",
            default=None,
            type=str,
            help="A converted .onnx file, or a checkpoint (HF directory, .gguf) converted once into "
            "the cache. Default: the bundled SmolLM2-135M-Instruct.",
        ),
        click.option("--backend", default="numba", show_default=True, type=click.Choice(["numba", "onnxruntime"])),
        click.option("--threads", default=None, type=int, help="Threads (default: physical cores)."),
        click.option(
            "--max-memory",
            default=None,
            help="Memory budget of the process, e.g. 8GB, 512MB (default: 3/4 of the available memory, "
            "within the cgroup's limit).",
        ),
        click.option("--max-context", default=None, type=int, help="Context length (default: up to 4096)."),
        click.option(
            "--kv-cache",
            default="fp32",
            show_default=True,
            type=click.Choice(KV_CACHES),
            help="KV cache precision (numba backend): fp16 halves its memory, keys and values rounded to half; "
            "fp8 stores each key and value row as E4M3 codes with a scale (about a quarter of fp32).",
        ),
    ]
    return functools.reduce(lambda f, o: o(f), reversed(options), fn)


@dataclass(frozen=True)
class Sampling:
    """What sampling_options collected: the keyword arguments of Model.stream."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int | None
    max_tokens: int
    stop: tuple[str, ...]

    def kwargs(self) -> dict:
        return dict(self.__dict__)


def sampling_options(fn: Callable) -> Callable:
    """The sampling and stopping options; the command receives them as one `sampling: Sampling`."""
    options = [
        click.option("--system", default=None, help="System message for the chat template."),
        click.option(
            "--thinking/--no-thinking",
            "thinking",
            default=None,
            help="Hunyuan: switch the reasoning part on or off (enable_thinking in the template).",
        ),
        click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy."),
        click.option("--top-k", default=0, show_default=True, type=int, help="Keep the k likeliest tokens (0 = off)."),
        click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling threshold."),
        click.option(
            "--min-p", default=0.0, show_default=True, type=float, help="Min probability relative to the top token."
        ),
        click.option("--repetition-penalty", default=1.0, show_default=True, type=float),
        click.option("--seed", default=None, type=int, help="Seed for sampling (same seed, same text; -1: random)."),
        click.option("--max-tokens", default=256, show_default=True, type=int),
        click.option("--stop", multiple=True, help="Stop string (repeatable); not included in the output."),
    ]

    @functools.wraps(fn)
    def wrapper(temperature, top_k, top_p, min_p, repetition_penalty, seed, max_tokens, stop, **kw):
        return fn(
            sampling=Sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed, max_tokens, tuple(stop)), **kw
        )

    return functools.reduce(lambda f, o: o(f), reversed(options), wrapper)


def open_model(
    sampling: Sampling,
    model_arg: str | None,
    backend: str,
    threads: int | None,
    max_memory: str | None,
    max_context: int | None,
    kv_cache: str = "fp32",
):
    """Check the options a user typed, find (or convert) the model, load it."""
    from ..engine.memory import parse_size
    from ..environment import check_threading_layer
    from ..model import load
    from ..text.sampling import check_options
    from .model import resolve_model

    check_threading_layer()
    s = sampling
    check_options(s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty)
    if s.max_tokens < 1:
        raise HyEdgeError(f"--max-tokens should be >= 1, got {s.max_tokens}")
    if threads is not None and threads < 1:
        raise HyEdgeError(f"--threads should be >= 1, got {threads}")
    if s.seed is not None and s.seed < -1:
        raise HyEdgeError(f"--seed should be >= 0, or -1 for a random seed; got {s.seed}")
    if threads is not None:
        from ..engine.threads import max_threads

        cap = max_threads()
        if threads > cap:
            click.echo(f"hy-edge: note: --threads {threads} capped at {cap} (the CPUs this process may use)", err=True)
            threads = cap
    if max_context is not None and max_context < 1:
        raise HyEdgeError(f"--max-context should be >= 1, got {max_context}")
    budget = parse_size(max_memory) if max_memory is not None else None  # None: memory.DEFAULT_BUDGET
    path = resolve_model(model_arg, notice=lambda message: click.echo(message, err=True), max_memory=budget)
    model = load(path, backend=backend, threads=threads, max_context=max_context, max_memory=budget, kv_cache=kv_cache)
    if backend == "numba":  # onnxruntime reads the data file into its own memory when it loads
        from .. import bus_error

        bus_error.install()  # a data file truncated while mapped: one line, not "Bus error"
    return model


def template_kwargs(thinking: bool | None) -> dict:
    return {} if thinking is None else {"enable_thinking": thinking}


def stats_line(r) -> str:
    cached = f", {r.cached_tokens} reused from cache" if getattr(r, "cached_tokens", 0) else ""
    return (
        f"[{r.prompt_tokens} prompt{cached} + {r.completion_tokens} generated tokens, {r.finish_reason}] "
        f"TTFT {r.ttft_s * 1000:.0f} ms, prefill {r.prefill_tps:.1f} tok/s, "
        f"decode {r.decode_tps:.1f} tok/s, peak RSS {r.peak_rss_mb:.0f} MB"
    )
