"""`hy-edge serve` (an OpenAI-compatible server for one model) and `hy-edge service install|uninstall`
(its systemd unit). A recipe: check the options, load the model, size the slots by the budget, bind,
serve HTTP from a second thread while the main thread runs the engine loop, until SIGTERM; drain,
exit 0.

FastAPI and uvicorn come with the `serve` extra and are imported only here (and in serve/http.py)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import click
from hy_edge_format.errors import HyEdgeError

from ..engine.backend import KV_CACHES
from .common import fail, user_errors

API_KEY_ENV = "HY_EDGE_API_KEY"


def _serve_options(fn):
    options = [
        click.option(
            "--model",
            "model_arg",
            default=None,
            help="Model (.onnx, .gguf, HF directory); default: the bundled SmolLM2.",
        ),
        click.option(
            "--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: the whole network)."
        ),
        click.option("--port", default=8000, show_default=True, type=int),
        click.option(
            "--max-batch", default=4, show_default=True, type=int, help="Sequences decoded together (KV slots)."
        ),
        click.option(
            "--max-queue", default=8, show_default=True, type=int, help="Requests waiting for a slot; beyond: 429."
        ),
        click.option("--api-key-file", default=None, help=f"File holding the API key (or set ${API_KEY_ENV})."),
        click.option(
            "--insecure-no-key",
            is_flag=True,
            help="Serve a non-loopback --host without an API key (refused otherwise).",
        ),
        click.option("--threads", default=None, type=int, help="Threads (default: physical cores)."),
        click.option(
            "--max-memory", default=None, help="Memory budget of the process (default: 3/4 of the available memory)."
        ),
        click.option(
            "--max-context", default=None, type=int, help="Context length of each slot (default: up to 4096)."
        ),
        click.option(
            "--kv-cache",
            default="fp16",  # `hy-edge run` keeps fp32; fp16 measured lossless (README's FP8 quality table)
            show_default=True,
            type=click.Choice(KV_CACHES),
            help="KV cache precision: fp16 holds twice the tokens of fp32 in the same memory.",
        ),
        click.option("--max-body", default="1MB", show_default=True, help="Largest request body."),
        click.option(
            "--default-max-tokens",
            default=512,
            show_default=True,
            type=int,
            help="max_tokens of a request that gives none (a request may ask for up to the context length).",
        ),
        click.option(
            "--request-timeout",
            default=300.0,
            show_default=True,
            type=float,
            help="Seconds a request may run from its arrival; past it, it ends with the text so far and "
            'finish_reason "length" (0: no limit).',
        ),
        click.option(
            "--max-connections",
            default=64,
            show_default=True,
            type=int,
            help="Open HTTP connections served at once; a request on one more gets 503.",
        ),
        click.option(
            "--header-timeout",
            default=10.0,
            show_default=True,
            type=float,
            help="Seconds a connection gets to send a request's line and headers, from its opening (or the "
            "request's first byte) on; past it, a partly sent request gets 408 and the connection is closed (0: no "
            "limit). A slow body is bounded by --max-body and --request-timeout, not by this.",
        ),
        click.option(
            "--prompt-cache",
            default=None,
            metavar="DIR|off",
            help="Where the slots' prompt prefixes (their KV cache) are saved on shutdown and loaded at start, so "
            "that a restart keeps them (the file prompt-cache.bin, used only with the same model file and KV "
            "cache type); default: $STATE_DIRECTORY when systemd gives one (hy-edge service), otherwise off.",
        ),
        click.option(
            "--prefill-stall",
            default=None,
            type=float,
            help="While streams decode, a new prompt is prefilled a few layers per step, each step's share about "
            "this many decode steps' time (default 0.8): lower keeps running streams steadier, higher gives the "
            "new prompt its first token sooner.",
        ),
        click.option(
            "--shutdown-timeout",
            default=30.0,
            show_default=True,
            type=float,
            help="Seconds running streams get after SIGTERM.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _read_api_key(path: str | None) -> str | None:
    if path is None:
        key = os.environ.get(API_KEY_ENV, "").strip()
        return key or None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise HyEdgeError(f"--api-key-file {path}: no such file") from None
    except UnicodeDecodeError:
        raise HyEdgeError(f"--api-key-file {path}: not UTF-8 text") from None
    if not key or len(key.split()) != 1:
        raise HyEdgeError(f"--api-key-file {path}: should hold one key on one line")
    return key


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (127.0.0.0/8, ::1); HyEdgeError if it names none."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror as e:
        raise HyEdgeError(f"--host {host}: {e.strerror}") from None
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_loopback(host: str, remedy: str) -> None:
    """A server open to the network without a key is refused unless the user says --insecure-no-key."""
    if not is_loopback(host):
        raise HyEdgeError(f"--host {host} is reachable from the network: {remedy}, or pass --insecure-no-key")


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise HyEdgeError(f"--port should be in 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise HyEdgeError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise HyEdgeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(False)
    return sock


def model_name(model_arg: str | None) -> str:
    """What /v1/models lists: the stem of the model file the user named (the bundled GGUF's by default)."""
    from .model import default_gguf

    path = Path(model_arg) if model_arg else default_gguf()
    return path.name if path.is_dir() else path.stem


@click.command("serve")
@_serve_options
def serve_cmd(
    model_arg,
    host,
    port,
    max_batch,
    max_queue,
    api_key_file,
    insecure_no_key,
    threads,
    max_memory,
    max_context,
    kv_cache,
    max_body,
    default_max_tokens,
    request_timeout,
    max_connections,
    header_timeout,
    prompt_cache,
    prefill_stall,
    shutdown_timeout,
):
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, streaming)."""
    try:
        import uvicorn  # noqa: F401 -- present, or the one-line error below

        from ..serve.http import Limits, Service, build_asgi
        from ..serve.metrics import Metrics
        from ..serve.protocol import http_config
    except ImportError as e:
        fail(f"hy-edge serve needs the serve extra ({e.name} is missing): pip install 'hy-edge[serve]'")
    from hy_edge_format.sizes import fmt_bytes

    from ..engine.memory import DEFAULT_BUDGET, parse_size
    from ..environment import check_threading_layer
    from ..model import load
    from ..serve.engine import Engine
    from ..serve.systemd import Watchdog, notify
    from .model import resolve_model

    with user_errors():
        for name, value, low in (
            ("--max-batch", max_batch, 1),
            ("--max-queue", max_queue, 0),
            ("--threads", threads, 1),
            ("--default-max-tokens", default_max_tokens, 1),
            ("--max-connections", max_connections, 1),
        ):
            if value is not None and value < low:
                raise HyEdgeError(f"{name} should be >= {low}, got {value}")
        if shutdown_timeout < 0:
            raise HyEdgeError(f"--shutdown-timeout should be >= 0, got {shutdown_timeout}")
        if prefill_stall is not None and not 0 < prefill_stall < float("inf"):  # NaN too
            raise HyEdgeError(f"--prefill-stall should be a number of decode steps > 0, got {prefill_stall}")
        for name, value in (("--request-timeout", request_timeout), ("--header-timeout", header_timeout)):
            if not 0 <= value < float("inf"):  # NaN too
                raise HyEdgeError(f"{name} should be a number of seconds >= 0 (0: no limit), got {value}")
        check_threading_layer()
        body_limit = parse_size(max_body)
        budget = parse_size(max_memory) if max_memory else DEFAULT_BUDGET
        api_key = _read_api_key(api_key_file)
        cache_dir = _prompt_cache_dir(prompt_cache)
        if api_key is None and not insecure_no_key:
            check_loopback(host, f"give an API key (--api-key-file or ${API_KEY_ENV})")
        asked = budget if max_memory else None  # an explicit budget: a first-run conversion runs under it
        path = resolve_model(model_arg, notice=lambda m: click.echo(m, err=True), max_memory=asked)
        model = load(path, threads=threads, max_context=max_context, max_memory=budget)
        from .. import bus_error

        bus_error.install()  # a data file truncated under the running server: one line, not "Bus error"
        if model.tokenizer is None:
            raise HyEdgeError(f"{path.name}: the model file carries no tokenizer; the server needs one")
        # a chat template every request would fail on is a bad model: refused now, not with 400 per request
        model.encode_prompt([{"role": "user", "content": "Hello"}])
        session = model.session(slots=max_batch, kv_cache=kv_cache)
        cache = None if cache_dir is None else _prompt_cache(cache_dir, model, session)
        sock = _bind(host, port)
    name = model_name(model_arg)
    plan, S = session.plan, session.max_context
    where = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    click.echo(
        f"hy-edge: serving {name} on {where}: {max_batch} slots x {S} tokens (KV cache "
        f"{fmt_bytes(plan.per_token * S / max_batch)} per slot); memory budget {fmt_bytes(budget)}, the process "
        f"{plan.describe(S)}" + ("; API key required" if api_key else ""),
        err=True,
    )
    metrics, watchdog = Metrics(), Watchdog()

    def ready() -> None:  # on the engine thread, warm, before its first watchdog ping
        notify("READY=1", f"STATUS=serving {name} on {max_batch} slots")
        click.echo("hy-edge: ready", err=True)

    engine = Engine(
        session,
        model.tokenizer,
        max_queue=max_queue,
        **({} if prefill_stall is None else {"max_stall": prefill_stall}),
        observer=metrics,
        heartbeat=watchdog.ping,
        on_ready=ready,
        prompt_cache=cache,
    )
    metrics.engine = engine
    limits = Limits(
        max_body_bytes=body_limit, default_max_tokens=default_max_tokens, request_timeout=request_timeout or None
    )
    service = Service(model, name, engine, metrics, api_key, limits)
    config = http_config(build_asgi(service), max_connections, header_timeout or None, on_reject=service.count)
    server = _server(config, engine, shutdown_timeout)
    failed: list[BaseException] = []
    http = threading.Thread(target=_serve_http, args=(server, sock, engine, failed), name="hy-edge-http")
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn listens to signals only on the main thread
        signal.signal(sig, server.handle_exit)
    http.start()
    try:
        engine.run()  # on the thread that loaded the model (Engine.run says why)
    except Exception:  # kept in engine.error, reported below
        pass
    finally:
        server.should_exit = True  # the engine died: close the listener and the streams
        http.join()
    if engine.error is not None:
        click.echo(f"hy-edge: error: the engine loop failed: {engine.error!r}", err=True)
        sys.exit(1)
    if failed:
        click.echo(f"hy-edge: error: the HTTP server failed: {failed[0]!r}", err=True)
        sys.exit(1)
    click.echo("hy-edge: stopped", err=True)


def _prompt_cache_dir(arg: str | None) -> Path | None:
    """The directory --prompt-cache names (None: off): given, or systemd's state directory."""
    from ..cache_dirs import is_writable_dir, state_dir

    if arg == "off":
        return None
    directory = Path(arg) if arg else state_dir()
    if directory is None:
        return None
    if not is_writable_dir(directory):
        if arg:
            raise HyEdgeError(f"--prompt-cache {arg}: not a writable directory (give one, or off)")
        click.echo(f"hy-edge: warning: no prompt cache: the state directory {directory} is not writable", err=True)
        return None
    return directory


def _prompt_cache(directory: Path, model, session):
    """The PromptCache in `directory`, tied to this model file and session."""
    from ..integrity import content_digest
    from ..serve.prompt_cache import FILE_NAME, PromptCache, cache_key

    key = cache_key(content_digest(model.path, model.meta), session)
    return PromptCache(directory / FILE_NAME, key, log=lambda message: click.echo(message, err=True))


def _server(config, engine, shutdown_timeout: float):
    """uvicorn's Server with our own drain on SIGTERM: systemd hears STOPPING=1, the engine stops accepting
    while the listener stays open (a new request gets 503, not a refused connection), running requests get
    `shutdown_timeout` seconds to finish; then the engine stops, failing what still runs (a stream ends with
    an error event and [DONE]), and uvicorn closes. A second signal stops at once."""
    import uvicorn

    from ..serve.systemd import notify

    class Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame):
            if self.draining or self.should_exit:
                engine.stop(timeout=0)
                return super().handle_exit(sig, frame)
            self.draining = True
            notify("STOPPING=1")
            engine.drain(0)  # stop accepting now; the signal handler must not wait
            threading.Thread(target=self._drain, name="hy-edge-drain", daemon=True).start()

        def _drain(self) -> None:
            engine.drain(shutdown_timeout)
            engine.stop(timeout=0)  # the loop fails what still runs, then ends; run() returns on the main thread
            self.should_exit = True

    return Server(config)


def _serve_http(server, sock, engine, failed: list) -> None:
    """uvicorn on its own thread; when it ends (signal, engine death, error) the engine loop stops."""
    try:
        server.run(sockets=[sock])
    except BaseException as e:
        failed.append(e)
    finally:
        engine.stop()


# -- hy-edge service install | uninstall -------------------------------------------------------------------
@click.group("service")
def service_cmd():
    """Install or remove the systemd unit that runs `hy-edge serve` at boot."""


@service_cmd.command("install")
@click.option("--model", "model_arg", default=None, help="Model for the service (default: the bundled SmolLM2).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--max-batch", default=4, show_default=True, type=int)
@click.option("--max-queue", default=8, show_default=True, type=int)
@click.option("--threads", default=None, type=int)
@click.option("--max-memory", default=None, help="Memory budget (default: 3/4 of the memory available now).")
@click.option("--max-context", default=None, type=int)
@click.option("--api-key-file", default=None, help="Key file, handed to the service as a systemd credential.")
@click.option("--insecure-no-key", is_flag=True, help="Serve a non-loopback --host without an API key.")
@click.option(
    "--python",
    "python",
    default=None,
    help="The Python the unit runs (default: this one); it must lie outside /home and /root, which the unit hides.",
)
@click.option(
    "--unit-path", default=None, help="Where to write the unit (default /etc/systemd/system/hy-edge.service)."
)
@click.option("--print", "print_only", is_flag=True, help="Print the unit instead of installing it.")
def install_cmd(
    model_arg,
    host,
    port,
    max_batch,
    max_queue,
    threads,
    max_memory,
    max_context,
    api_key_file,
    insecure_no_key,
    python,
    unit_path,
    print_only,
):
    """Write the hy-edge.service unit."""
    from hy_edge_format.sizes import MB

    from ..engine.memory import default_budget, parse_size
    from ..serve.systemd import UNIT_PATH, hidden_by_unit, systemd_running, unit_file

    with user_errors():
        python = python or sys.executable
        if hidden_by_unit(python):
            raise HyEdgeError(
                f"the unit would run {python}, under /home or /root, which it hides (ProtectHome=yes): install "
                "hy-edge outside them (python3 -m venv /opt/hy-edge) and run that one's hy-edge, or give --python"
            )
        loopback = is_loopback(host)
        if not loopback and api_key_file is None and not insecure_no_key:
            raise HyEdgeError(
                f"--host {host} is reachable from the network: give --api-key-file, or pass --insecure-no-key"
            )
        budget = parse_size(max_memory) if max_memory else default_budget()
        args = ["--host", host, "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(max_queue)]
        if insecure_no_key:
            args.append("--insecure-no-key")
        args += ["--max-memory", f"{budget // MB}MB"]  # written out: MemoryMax= is derived from it
        if model_arg is not None:
            model = Path(model_arg).resolve()
            if not model.exists():
                raise HyEdgeError(f"--model {model_arg}: no such file or directory")
            if hidden_by_unit(model):
                raise HyEdgeError(
                    f"--model {model}: the unit hides /home and /root (ProtectHome=yes); put it under /opt or /srv"
                )
            args += ["--model", str(model)]
        if threads is not None:
            args += ["--threads", str(threads)]
        if max_context is not None:
            args += ["--max-context", str(max_context)]
        key = str(Path(api_key_file).resolve()) if api_key_file else None
        if key and not Path(key).is_file():
            raise HyEdgeError(f"--api-key-file {api_key_file}: no such file")
        text = unit_file(args, python=python, budget_bytes=budget, api_key_file=key, loopback_only=loopback)
        if print_only:
            click.echo(text, nl=False)
            return
        target = Path(unit_path) if unit_path else UNIT_PATH
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, target)
        click.echo(f"hy-edge: wrote {target}", err=True)
        if unit_path is None and systemd_running():
            _systemctl("daemon-reload")
            click.echo("hy-edge: start it with: systemctl enable --now hy-edge; logs: journalctl -u hy-edge", err=True)


@service_cmd.command("uninstall")
@click.option("--unit-path", default=None, help="The unit to remove (default /etc/systemd/system/hy-edge.service).")
def uninstall_cmd(unit_path):
    """Stop and remove the hy-edge.service unit."""
    from ..serve.systemd import UNIT_PATH, systemd_running

    with user_errors():
        target = Path(unit_path) if unit_path else UNIT_PATH
        if not target.exists():
            raise HyEdgeError(f"{target}: not installed")
        if unit_path is None and systemd_running():
            _systemctl("disable", "--now", "hy-edge.service")
        target.unlink()
        if unit_path is None and systemd_running():
            _systemctl("daemon-reload")
        click.echo(f"hy-edge: removed {target}", err=True)


def _systemctl(*args: str) -> None:
    import subprocess

    r = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise HyEdgeError(
            f"systemctl {' '.join(args)}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
        )
