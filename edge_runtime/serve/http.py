"""The HTTP front of `hy-edge serve`: an OpenAI-compatible ASGI app (FastAPI).

It only validates, queues and streams: a request becomes token ids and sampling options, goes to the
engine's queue (serve/engine.py's Engine, its own thread), and the engine's events come back through an
asyncio queue (`loop.call_soon_threadsafe`). Every error is OpenAI-shaped: {"error": {"message", "type",
"param", "code"}}. Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{id}], GET /health,
GET /metrics. The request bodies are in bodies.py, the response objects in shapes.py, tool calls in text/tools.py.

In front of the app sits one pure ASGI middleware (`Front`): it stamps the arrival time (the TTFT clock), checks
the API key before the body is read, and refuses a body over the limit. It is pure ASGI on purpose: Starlette's
`@app.middleware("http")` hands the app a wrapped `receive` on which `request.is_disconnected()` never turns true,
so a non-streaming request whose client left decoded on to its end.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from hy_edge_format.errors import BudgetError, HyEdgeError
from starlette.exceptions import HTTPException

from ..text.sampling import make_logit_bias, make_logits_processors, make_openai_penalties, make_sampler
from ..text.tools import FORMATS, Tools, ToolStream, assistant_text, parse_tools
from .bodies import ChatBody, CompletionBody, Message, SamplingBody
from .engine import Engine, Failed, NotAccepting, QueueFull
from .engine import Request as EngineRequest
from .shapes import Shape, token_piece, usage_of

MAX_STOP = 16


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # a request body larger than this is refused (413) before it is read
    max_prompt_tokens: int | None = None  # None: the context length
    max_tokens: int | None = None  # largest max_tokens a request may ask for; None: the context length
    # what a request that names no max_tokens gets: a bounded answer (a small model at temperature > 0 may not
    # stop on its own; the whole context would hold a slot for minutes)
    default_max_tokens: int = 512
    # seconds from a request's arrival to its end (queue, prefill and decode): past it the request ends as
    # max_tokens ends one, with the text so far and finish_reason "length"; None: no limit
    request_timeout: float | None = 300.0


RETRY_AFTER_S = 1  # what a 429 tells the client to wait: about one decode step frees a slot or a queue place


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None
):
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# -- the app ------------------------------------------------------------------------------------
class Service:
    """What the routes share: the model, its name, the engine, the key, the limits, the metrics."""

    def __init__(self, model, name: str, engine: Engine, metrics=None, api_key: str | None = None, limits=Limits()):
        self.model, self.name, self.engine, self.metrics = model, name, engine, metrics
        self.api_key = api_key.encode() if api_key else None
        self.limits = limits
        self.created = int(time.time())

    def count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(status)


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="hy-edge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        service.count(str(e.status))
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        service.count("400")
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON")
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        return error_response(
            400, f"{where}: {err.get('msg', 'invalid value')}" if where else err.get("msg", ""), param=where or None
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        service.count(str(e.status_code))
        return error_response(
            e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error"
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        service.count("500")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    @app.get("/health")
    async def health():
        engine = service.engine
        if engine.error is not None:
            return JSONResponse({"status": "error"}, status_code=503)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        if engine.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if service.metrics is None:
            raise ApiError(404, "metrics are off")
        body, content_type = service.metrics.exposition()
        return PlainTextResponse(body, media_type=content_type)

    def card() -> dict:
        return {"id": service.name, "object": "model", "created": service.created, "owned_by": "hy-edge"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != service.name:
            raise ApiError(404, f"model '{model_id}' does not exist", param="model", code="model_not_found")
        return card()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        try:
            tools = parse_tools(service.model.spec.model_type, body.tools, body.tool_choice, body.parallel_tool_calls)
        except HyEdgeError as e:
            raise ApiError(400, str(e), param=str(e).split(":")[0]) from None
        if tools is not None and body.response_format not in (None, {"type": "text"}):
            raise ApiError(400, "response_format: cannot be combined with tools", param="response_format")
        messages = [_message(m, service.model.spec.model_type) for m in body.messages]
        if tools is not None:
            messages = tools.messages(messages)
        ids = await _encode(service, lambda: service.model.encode_prompt(messages))
        return await _complete(service, request, body, ids, chat=True, tools=tools)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: exactly one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        ids = await _encode(service, lambda: service.model.encode_prompt(prompt, raw=True))
        return await _complete(service, request, body, ids, chat=False)

    return app


def _message(m: Message, model_type: str) -> dict:
    """A chat message as the template reads it: an assistant's earlier tool calls written in its family's call
    format, as the model would have written them."""
    role = "system" if m.role == "developer" else m.role
    if m.role == "assistant" and m.tool_calls:
        fmt = FORMATS.get(model_type)
        if fmt is None:
            raise ApiError(400, f"messages: no tool-call format is known for {model_type} models", param="messages")
        try:
            return {"role": role, "content": assistant_text(m.text(), m.tool_calls, fmt)}
        except HyEdgeError as e:
            raise ApiError(400, str(e), param="messages") from None
    return {"role": role, "content": m.text()}


async def _encode(service: Service, encode) -> list[int]:
    """Tokenize off the event loop (a long prompt takes a while); a template error is the client's."""
    try:
        return await anyio.to_thread.run_sync(encode)
    except HyEdgeError as e:
        raise ApiError(400, str(e).splitlines()[0]) from None
    except Exception as e:  # jinja raises for message orders a template refuses
        raise ApiError(400, f"the messages cannot be rendered by the chat template: {e}") from None


async def _grammar(service: Service, wanted: dict | Tools, prompt_tokens: int):
    """The structured-output processor of a request (grammar.py): a response_format, or tools. Built off the
    event loop (the first one reads the whole vocabulary, a schema compiles in milliseconds)."""
    from ..text.grammar import json_processor, tool_processor

    build = tool_processor if isinstance(wanted, Tools) else json_processor
    model = service.model
    try:
        return await anyio.to_thread.run_sync(
            build, model.tokenizer, model.spec.vocab_size, service.engine.eos_ids, wanted, prompt_tokens
        )
    except HyEdgeError as e:
        message = str(e).splitlines()[0]
        raise ApiError(400, message, param=message.split(":")[0]) from None


def _engine_request(
    service: Service, body: SamplingBody, ids: list[int], emit, arrived: float, grammar=None
) -> EngineRequest:
    if body.model is not None and body.model != service.name:
        raise ApiError(
            404,
            f"model '{body.model}' does not exist (this server runs '{service.name}')",
            param="model",
            code="model_not_found",
        )
    if body.n != 1:
        raise ApiError(400, "n: only n=1 is supported", param="n")
    refused = body.refused()
    if refused:
        raise ApiError(400, refused, param=refused.split(":")[0])
    context = service.engine.max_context
    max_prompt = service.limits.max_prompt_tokens or context
    if len(ids) > min(max_prompt, context):
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens, more than the limit of {min(max_prompt, context)} "
            f"(context length {context})",
            param="messages" if hasattr(body, "messages") else "prompt",
            code="context_length_exceeded",
        )
    cap = service.limits.max_tokens or context
    max_tokens = min(service.limits.default_max_tokens, cap) if body.max_tokens is None else body.max_tokens
    if not 1 <= max_tokens <= cap:
        raise ApiError(400, f"max_tokens should be between 1 and {cap}, got {max_tokens}", param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise ApiError(400, f"stop: at most {MAX_STOP} stop strings", param="stop")
    if body.seed is not None and body.seed < 0:
        raise ApiError(400, "seed should be >= 0", param="seed")
    try:
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    except ValueError:
        raise ApiError(400, "logit_bias: the keys should be token ids", param="logit_bias") from None
    try:
        sampler = make_sampler(body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p, seed=body.seed)
        processors = [
            *make_logits_processors(body.repetition_penalty),
            *make_openai_penalties(len(ids), body.frequency_penalty, body.presence_penalty),
            *make_logit_bias(bias, service.model.spec.vocab_size if bias else 0),
            *([grammar] if grammar is not None else []),  # last: nothing re-allows a token it forbids
        ]
    except HyEdgeError as e:
        raise ApiError(400, str(e)) from None
    limit = service.limits.request_timeout
    return EngineRequest(
        ids, max_tokens, emit, sampler, processors, tuple(stop), submitted=arrived, logprobs=body.logprobs_k,
        deadline=arrived + limit if limit else None,
    )  # fmt: skip


async def _complete(
    service: Service, request: Request, body: SamplingBody, ids: list[int], chat: bool, tools: Tools | None = None
):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event) -> None:  # engine thread → this event loop
        loop.call_soon_threadsafe(events.put_nowait, event)

    arrived = request.scope.get("state", {}).get("arrived", time.perf_counter())  # stamped by Front
    grammar = None
    if tools is not None:
        grammar = await _grammar(service, tools, len(ids))
    elif getattr(body, "response_format", None) is not None:
        grammar = await _grammar(service, body.response_format, len(ids))
    req = _engine_request(service, body, ids, emit, arrived, grammar)
    engine = service.engine
    try:
        engine.submit(req)
    except QueueFull as e:
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        raise ApiError(429, str(e), "rate_limit_error", code="server_busy", headers=retry) from None
    except NotAccepting as e:
        raise ApiError(503, str(e), "server_error") from None
    except (BudgetError, HyEdgeError) as e:
        raise ApiError(400, str(e)) from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    piece = token_piece(service.model.tokenizer) if req.logprobs is not None else None
    shape = Shape(rid, service.name, chat, int(time.time()), piece, tools.format if tools is not None else None)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return _EventStream(
            _stream(engine, req, events, shape, usage),
            on_close=lambda: engine.cancel(req),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    text, logprobs, last = [], [], None
    watcher = asyncio.create_task(_watch_disconnect(request.receive, events))
    try:
        while last is None:
            event = await events.get()
            if event is _GONE:
                return PlainTextResponse("", status_code=499)
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message, "server_error")
            text.append(event.text)
            if event.logprobs is not None:
                logprobs.append(event.logprobs)
            if event.finish_reason:
                last = event
    finally:
        watcher.cancel()
        if last is None:
            engine.cancel(req)
    return shape.whole("".join(text), last, logprobs)


_GONE = object()  # put in a request's event queue when its client has disconnected


async def _watch_disconnect(receive, events: asyncio.Queue) -> None:
    """Wait for the client to go away (the body has been read: the server's next message is the
    disconnect), then wake the request's reader. Waiting on `receive` notices it at once, however busy the
    event queue is (a poll between events never ran while tokens kept arriving)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(_GONE)


async def _stream(
    engine: Engine, req: EngineRequest, events: asyncio.Queue, shape: Shape, usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, the finish reason, usage if asked, [DONE]. A
    client that goes away ends this generator (GeneratorExit / cancellation): the engine frees its slot."""
    done, offset = False, 0  # offset: text_offset of completions' logprobs
    calls = ToolStream(shape.tools) if shape.tools is not None else None
    try:
        if shape.chat:
            yield shape.sse(shape.chunk({"role": "assistant", "content": ""}, None))
        while True:
            event = await events.get()
            if isinstance(event, Failed):
                yield shape.sse(
                    {"error": {"message": event.message, "type": "server_error", "param": None, "code": None}}
                )
                break
            text = event.text if calls is None else calls.feed(event.text)  # a call is sent whole, at the end
            if text or event.logprobs is not None:  # a held-back token still brings its logprobs
                logprobs = shape.logprobs([event.logprobs], offset) if event.logprobs is not None else None
                yield shape.sse(shape.chunk({"content": text} if shape.chat else text, None, logprobs))
                offset += len(text)
            if event.finish_reason:
                finish = event.finish_reason
                if calls is not None:
                    rest, tool_calls = calls.finish(complete=finish == "stop")
                    if rest:
                        yield shape.sse(shape.chunk({"content": rest}, None))
                    if tool_calls:
                        delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(tool_calls)]}
                        yield shape.sse(shape.chunk(delta, None))
                        finish = "tool_calls"
                yield shape.sse(shape.chunk({} if shape.chat else "", finish))
                if usage:
                    yield shape.sse({**shape.head(), "choices": [], "usage": usage_of(event)})
                break
        done = True
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            engine.cancel(req)


class _EventStream(StreamingResponse):
    """A stream that cancels its request however the response ends: a client that leaves before the first
    chunk never starts the generator, so the generator's own `finally` would not run (cancelling a request
    that has finished is a no-op)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Front:
    """Pure ASGI middleware before the app (see the module's docstring for why not Starlette's): stamps
    `scope["state"]["arrived"]`, answers 401 for a missing or wrong key before any of the body is read
    (/health is exempt), and 413 for a body over `limit` bytes -- refused by its Content-Length before
    anything is read, or as soon as a chunked body passes the limit."""

    def __init__(self, app, limit: int, api_key: bytes | None = None, on_reject=lambda status: None):
        self.app, self.limit, self.api_key, self.on_reject = app, limit, api_key, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["arrived"] = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope.get("path") != "/health":
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                message = "a valid API key is required (Authorization: Bearer KEY)"
                return await self._reject(send, 401, error_body(message, code="invalid_api_key"))
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(send)
        body, more = bytearray(), True
        while more:  # read the body first (it is small, or refused): the app then gets it in one piece
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(send)
        replayed = False

        async def replay():  # the body once, then the server's own receive (which reports a disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send):
        return await self._reject(send, 413, error_body(f"the request body is larger than {self.limit} bytes"))

    async def _reject(self, send, status: int, obj: dict):
        self.on_reject(str(status))
        body = json.dumps(obj).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the unread body must not be taken for the next request
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def build_asgi(service: Service):
    """The app behind its front (arrival stamp, key, body limit): what uvicorn serves."""
    return Front(create_app(service), service.limits.max_body_bytes, service.api_key, service.count)
