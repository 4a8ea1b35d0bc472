"""`hy-edge`: the command-line front door. `run` reads like a recipe (llama2.c's main): load the
model, encode the prompt, build the sampler, stream, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli_common import user_errors
from .errors import HyEdgeError

MAX_PROMPT_BYTES = 16 << 20  # a prompt file larger than this is not a prompt


@click.group()
@click.version_option(package_name="hy-edge")
def main() -> None:
    """Run small LLMs (Hunyuan-0.5B, Llama family) from one FP8 ONNX file on a CPU."""


def read_prompt(source: str) -> str:
    """The prompt text of a file ('-' = stdin): must be non-empty UTF-8 text."""
    name = "stdin" if source == "-" else source
    if source == "-":
        data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
    else:
        path = Path(source)
        if not path.exists():
            raise HyEdgeError(f"prompt file not found: {source}")
        if not path.is_file():
            raise HyEdgeError(f"prompt file is not a regular file: {source}")
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPT_BYTES + 1)
    if len(data) > MAX_PROMPT_BYTES:
        raise HyEdgeError(f"prompt {name} is larger than {MAX_PROMPT_BYTES >> 20} MB")
    if b"\0" in data:
        raise HyEdgeError(f"prompt {name} is a binary file (it contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise HyEdgeError(f"prompt {name} is not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise HyEdgeError(f"prompt {name} is empty")
    return text


def _stats_line(r) -> str:
    return (f"[{r.prompt_tokens} prompt + {r.completion_tokens} generated tokens, {r.finish_reason}] "
            f"TTFT {r.ttft_s * 1000:.0f} ms, prefill {r.prefill_tps:.1f} tok/s, "
            f"decode {r.decode_tps:.1f} tok/s, peak RSS {r.peak_rss_mb:.0f} MB")


@main.command("run")
@click.argument("prompt_file", type=str)
@click.option("--model", "model_arg", default=None, type=str,
              help="A converted .onnx file, or a checkpoint (HF directory, .gguf) converted once into the "
                   "cache. Default: the bundled SmolLM2-135M-Instruct.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@click.option("--system", default=None, help="System message for the chat template.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int,
              help="Keep the k likeliest tokens (0 = off).")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling threshold.")
@click.option("--min-p", default=0.0, show_default=True, type=float,
              help="Min probability relative to the top token.")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="Seed for sampling (same seed, same text).")
@click.option("--max-tokens", default=256, show_default=True, type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable); not included in the output.")
@click.option("--backend", default="numba", show_default=True, type=click.Choice(["numba", "onnxruntime"]))
@click.option("--threads", default=None, type=int, help="Threads (default: physical cores).")
@click.option("--max-memory", default="8GB", show_default=True, help="Memory budget, e.g. 8GB, 512MB.")
@click.option("--max-context", default=None, type=int, help="Context length (default: up to 4096).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def run_cmd(prompt_file: str, model_arg: str | None, raw: bool, system: str | None, temperature: float, top_k: int,
            top_p: float, min_p: float, repetition_penalty: float, seed: int | None, max_tokens: int,
            stop: tuple[str, ...], backend: str, threads: int | None, max_memory: str,
            max_context: int | None, as_json: bool) -> None:
    """Generate a reply to the prompt in PROMPT_FILE ('-' reads stdin)."""
    from .cli_model import resolve_model
    from .generate import collect
    from .memory import parse_size
    from .model import load
    from .sampling import check_options

    with user_errors():
        check_options(temperature, top_k, top_p, min_p, repetition_penalty)
        if max_tokens < 1:
            raise HyEdgeError(f"--max-tokens should be >= 1, got {max_tokens}")
        if threads is not None and threads < 1:
            raise HyEdgeError(f"--threads should be >= 1, got {threads}")
        budget = parse_size(max_memory)
        prompt = read_prompt(prompt_file)
        model_path = resolve_model(model_arg, notice=lambda message: click.echo(message, err=True))
        model = load(model_path, backend=backend, threads=threads, max_context=max_context, max_memory=budget)
        ids = model.encode_prompt(prompt, raw=raw, system=system)
        responses = model.stream(ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                 stop=stop)
        if as_json:
            click.echo(json.dumps(collect(responses).to_dict(), ensure_ascii=False))
            return
        last = None
        for last in responses:
            if last.text:
                click.echo(last.text, nl=False)  # flushes: the text streams as it is generated
        click.echo()
        click.echo(_stats_line(last), err=True)


from .cli_convert import convert_cmd, info_cmd  # noqa: E402  (the converter's commands, imported lazily inside)

main.add_command(convert_cmd)
main.add_command(info_cmd)
