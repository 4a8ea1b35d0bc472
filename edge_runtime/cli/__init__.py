"""`hy-edge`: the command-line front door. `run` reads like a recipe (llama2.c's main): load the
model, encode the prompt, build the sampler, stream, report."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import click
from hy_edge_format.errors import HyEdgeError

from ..environment import check_environment
from .common import (
    Sampling,
    check_text,
    fail,
    model_options,
    open_model,
    require_stdout,
    sampling_options,
    stats_line,
    template_kwargs,
    user_errors,
)

MAX_PROMPT_BYTES = 16 << 20  # a prompt file larger than this is not a prompt


def _notes_as_one_line() -> None:
    """The library's notices (memory.ContextLimited, backend.PythonLayerLoop, threads.ThreadsBusy) as
    `hy-edge: note: ...` and `hy-edge: warning: ...`, once each."""
    from ..engine.backend import PythonLayerLoop
    from ..engine.memory import ContextLimited
    from ..engine.threads import ThreadsBusy

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (ContextLimited, PythonLayerLoop)):
            click.echo(f"hy-edge: note: {message}", err=True)
        elif issubclass(category, ThreadsBusy):
            click.echo(f"hy-edge: warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("once", ContextLimited)
    warnings.simplefilter("once", ThreadsBusy)
    warnings.simplefilter("once", PythonLayerLoop)


class OneLineErrors(click.Group):
    """click's own usage errors (`--backend foo`, `--seed abc`) in the same one-line form as ours:
    `hy-edge: error: ...`, exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _notes_as_one_line()
        try:
            check_environment()  # before anything imports numba, which reads it at import
        except HyEdgeError as e:
            fail(str(e))
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:  # Ctrl-C or EOF inside a click prompt
            click.echo("", err=True)
            sys.exit(130)
        except click.ClickException as e:
            fail(" ".join(e.format_message().split()))


@click.group(cls=OneLineErrors)
@click.version_option(package_name="hy-edge")
def main() -> None:
    """Run small LLMs (Hunyuan-0.5B, Llama family) from one ONNX file (FP8 or integer blocks) on a CPU."""


def read_prompt(source: str) -> str:
    """The prompt text of a file ('-' = stdin): must be non-empty UTF-8 text."""
    name = "stdin" if source == "-" else source
    if source == "-":
        data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
    else:
        path = Path(source)
        if not path.exists():
            raise HyEdgeError(f"prompt file not found: {source}")
        if path.is_dir():
            raise HyEdgeError(f"prompt file is a directory: {source}")
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPT_BYTES + 1)
    if len(data) > MAX_PROMPT_BYTES:
        raise HyEdgeError(f"prompt {name} is larger than {MAX_PROMPT_BYTES >> 20} MB")
    if _is_utf16(data):
        raise HyEdgeError(f"prompt {name} is UTF-16 text; save it as UTF-8 (iconv -f UTF-16 -t UTF-8)")
    if b"\0" in data:
        raise HyEdgeError(f"prompt {name} is a binary file (it contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise HyEdgeError(f"prompt {name} is not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise HyEdgeError(f"prompt {name} is empty")
    return text


def _response_format(schema_file: str | None, json_object: bool) -> dict | None:
    """run's --json-schema FILE / --json-object as an OpenAI response_format (None: plain text)."""
    if schema_file is not None and json_object:
        raise HyEdgeError("--json-schema and --json-object exclude each other")
    if json_object:
        if importlib.util.find_spec("llguidance") is None:
            raise HyEdgeError("--json-object needs llguidance: pip install 'hy-edge[serve]'")
        return {"type": "json_object"}
    if schema_file is None:
        return None
    if importlib.util.find_spec("llguidance") is None:
        raise HyEdgeError("--json-schema needs llguidance: pip install 'hy-edge[serve]'")
    try:
        schema = json.loads(Path(schema_file).read_text(encoding="utf-8"))
    except OSError as e:
        raise HyEdgeError(f"--json-schema: cannot read {schema_file}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise HyEdgeError(f"--json-schema: {schema_file} is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise HyEdgeError(f"--json-schema: {schema_file} should hold a JSON schema (an object)")
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def _is_utf16(data: bytes) -> bool:
    """A UTF-16 byte-order mark, or mostly-ASCII text whose every other byte is NUL (no mark)."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return True
    even, odd = data[0::2], data[1::2]
    return len(data) >= 4 and len(data) % 2 == 0 and (even.count(0) == len(even) or odd.count(0) == len(odd))


@main.command("run")
@click.argument("prompt_file", type=str)
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@sampling_options
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option(
    "--json-schema",
    "schema_file",
    type=str,
    default=None,
    help="Hold the answer to this JSON schema (a file), token by token (needs llguidance: hy-edge[serve]).",
)
@click.option("--json-object", is_flag=True, help="Hold the answer to a JSON object (needs llguidance).")
def run_cmd(
    prompt_file: str,
    raw: bool,
    system: str | None,
    thinking: bool | None,
    sampling: Sampling,
    as_json: bool,
    schema_file: str | None,
    json_object: bool,
    **model_args,
) -> None:
    """Generate a reply to the prompt in PROMPT_FILE ('-' reads stdin)."""
    from ..text.generate import collect

    with user_errors():
        require_stdout()
        prompt = read_prompt(prompt_file)
        if system is not None:
            check_text(system, "--system")
        response_format = _response_format(schema_file, json_object)
        model = open_model(sampling, **model_args)
        ids = model.encode_prompt(prompt, raw=raw, system=system, **template_kwargs(thinking))
        responses = model.stream(ids, response_format=response_format, **sampling.kwargs())
        if as_json:
            click.echo(json.dumps(collect(responses).to_dict(), ensure_ascii=False))
            return
        last = None
        for last in responses:
            if last.text:
                click.echo(last.text, nl=False)  # flushes: the text streams as it is generated
        click.echo()
        click.echo(stats_line(last), err=True)


from .chat import chat_cmd  # noqa: E402
from .convert import convert_cmd, info_cmd  # noqa: E402  (the converter's commands, imported lazily inside)
from .serve import serve_cmd, service_cmd  # noqa: E402  (fastapi / uvicorn imported inside)

main.add_command(chat_cmd)
main.add_command(convert_cmd)
main.add_command(info_cmd)
main.add_command(serve_cmd)
main.add_command(service_cmd)
