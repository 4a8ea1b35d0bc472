"""`load(path)` → Model: spec, memory-mapped weights, tokenizer and chat template of one converted
.onnx file, plus `generate` / `stream` conveniences over a default session.

    model = edge_runtime.load("model.onnx")
    print(model.generate("Why is the sky blue?", max_tokens=64).text)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hy_edge_format import format as fmt
from hy_edge_format.errors import HyEdgeError, ModelFileError
from hy_edge_format.heap import trim_heap
from hy_edge_format.spec import ModelSpec

from .cache_dirs import verification_dir
from .engine.backend import BACKENDS, KV_CACHES, Backend, open_session
from .engine.memory import DEFAULT_BUDGET, MemoryPlan, parse_size, plan_context, runtime_overhead
from .engine.model_file import parse_json_meta, read_header, read_tensors
from .engine.weights import Weights, build_weights
from .integrity import check_data_size, verify_on_first_use
from .text.chat import encode_chat, make_messages
from .text.generate import GenerationResponse, GenerationResult, Generator, collect
from .text.sampling import make_logits_processors, make_sampler
from .text.tokenizer import Tokenizer, TokenizerConfig


@dataclass(frozen=True)
class SessionOptions:
    """How `Model.generate` / `Model.stream` open their default session."""

    backend: str = "numba"
    threads: int | None = None  # None: physical cores
    max_context: int | None = None  # None: min(model limit, 4096, what the budget allows)
    max_memory: int | None = None  # bytes; None: memory.DEFAULT_BUDGET
    prefill_chunk: int | None = None  # None: the backend's default
    kv_cache: str = "fp32"  # numba backend: "fp16" halves the KV cache (rounded to half), "fp8" E4M3 rows


class Model:
    """A converted model file. Weights are views into a read-only memory map of its data file."""

    def __init__(
        self,
        path: Path,
        spec: ModelSpec,
        weights: Weights,
        tokenizer: Tokenizer | None,
        quantization: dict,
        meta: dict[str, str],  # the file's metadata, but the tokenizer's text (parsed into `tokenizer`)
        options: SessionOptions,
    ):
        self.path = path
        self.spec = spec
        self.weights = weights
        self.tokenizer = tokenizer
        self.quantization = quantization
        self.meta = meta
        self.options = options
        self._generator: Generator | None = None

    @property
    def activations(self) -> str:
        """Linear-input fake quantization the file asks for: none | e4m3 | e5m2 | static."""
        return self.quantization.get("activations", "none")

    # -- sessions -----------------------------------------------------------------------------
    def session(self, backend: str | None = None, **kwargs) -> Backend:
        """A new backend session (its own KV cache); kwargs override the load-time SessionOptions."""
        o = self.options
        opts = dict(
            threads=o.threads, max_context=o.max_context, max_memory=o.max_memory, prefill_chunk=o.prefill_chunk
        )
        if o.kv_cache != "fp32":
            opts["kv_cache"] = o.kv_cache
        opts.update(kwargs)
        try:
            return open_session(self, backend or o.backend, **opts)
        except ModelFileError as e:  # a session's checks (FP8 codes, scales) name the tensor, not the file
            if str(e).startswith((self.path.name, str(self.path))):
                raise
            raise ModelFileError(f"{self.path.name}: {e}") from None

    def generator(self, backend: str | None = None, **kwargs) -> Generator:
        """A Generator on a new session: keeps its cache across calls (multi-turn chat)."""
        return Generator(self.session(backend, **kwargs), self.tokenizer)

    @property
    def default_generator(self) -> Generator:
        if self._generator is None:
            self._generator = self.generator()
        return self._generator

    # -- prompts -------------------------------------------------------------------------------
    def encode_prompt(
        self, prompt: str | Sequence[dict], *, raw: bool = False, system: str | None = None, **template_kwargs
    ) -> list[int]:
        """Token ids for a prompt string (through the chat template unless raw) or a message list."""
        if self.tokenizer is None:
            raise ModelFileError(f"{self.path.name}: the model file carries no tokenizer")
        if isinstance(prompt, str) and raw:
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        messages = make_messages(prompt, system) if isinstance(prompt, str) else list(prompt)
        return encode_chat(self.tokenizer, messages, add_generation_prompt=True, **template_kwargs)

    # -- generation ------------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | Sequence[dict] | Sequence[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        raw: bool = False,
        system: str | None = None,
        generator: Generator | None = None,
        response_format: Mapping | None = None,
        **template_kwargs,
    ) -> Iterator[GenerationResponse]:
        """Stream responses for a prompt (text, chat messages, or token ids) on the default session
        (or `generator`), reusing its cache when the prompt extends the previous one. `response_format`
        (OpenAI's: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}})
        holds the answer to JSON, token by token (grammar.py; needs llguidance, the `serve` extra)."""
        if not isinstance(prompt, str) and len(prompt) and isinstance(prompt[0], (int, np.integer)):
            ids = [int(t) for t in prompt]
        else:
            ids = self.encode_prompt(prompt, raw=raw, system=system, **template_kwargs)
        sampler = make_sampler(temperature, top_k, top_p, min_p, seed)
        processors = make_logits_processors(repetition_penalty)
        gen = generator or self.default_generator
        if response_format is not None:
            from .text.grammar import json_processor

            if self.tokenizer is None:
                raise ModelFileError(f"{self.path.name}: the model file carries no tokenizer")
            held = json_processor(self.tokenizer, self.spec.vocab_size, gen.eos_ids, response_format, len(ids))
            processors = [*processors, held] if held is not None else processors
        return gen.stream(ids, max_tokens=max_tokens, sampler=sampler, logits_processors=processors, stop=stop)

    def generate(self, prompt: str | Sequence[dict] | Sequence[int], **kwargs) -> GenerationResult:
        """Like `stream`, collected: text, token ids, finish reason and stats."""
        return collect(self.stream(prompt, **kwargs))


def load(
    path: str | Path,
    *,
    backend: str = "numba",
    threads: int | None = None,
    max_context: int | None = None,
    max_memory: int | str | None = None,
    prefill_chunk: int | None = None,
    kv_cache: str = "fp32",
) -> Model:
    """Open a converted .onnx file: check its header (checksum, format version, spec), refuse a budget
    it cannot run in before anything is loaded, verify its weights' checksums on first use
    (integrity.verify_on_first_use), map its weights, check every tensor the spec needs
    (ModelFileError naming the first bad one), load its tokenizer. No session is opened (no KV cache
    allocated) until the first generation or `Model.session()`."""
    path = Path(path)
    if backend not in BACKENDS:
        raise HyEdgeError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
    if kv_cache not in KV_CACHES:
        raise HyEdgeError(f"kv cache type '{kv_cache}' is not one of {', '.join(KV_CACHES)}")
    if kv_cache != "fp32" and backend != "numba":
        raise HyEdgeError(f"an {kv_cache} KV cache is a numba-backend option")
    budget = parse_size(max_memory) if max_memory is not None else None
    header = read_header(path)
    proto, meta, spec, quant = header.proto, header.meta, header.spec, header.quantization
    check_data_size(proto, path)  # before anything is mapped: a read past a mapping's end is a bus error
    tensors = read_tensors(proto, path, quant)  # every initializer's size checked (mapped, not read)
    if backend == "onnxruntime":  # the budget, before onnxruntime or the tokenizer take any of it
        from .engine.ort_session import ort_memory_plan

        check_budget(ort_memory_plan(spec, tensors), budget, max_context, spec)
    verify_on_first_use(proto, path, verification_dir())
    weights = build_weights(spec, tensors, path)
    del proto, header, tensors  # the graph itself is onnxruntime's business
    if backend == "numba":
        check_budget(numba_plan(spec, weights, kv_cache), budget, max_context, spec)
    tokenizer = None
    tok_meta = parse_json_meta(meta, fmt.META_TOKENIZER, path, required=False)
    if tok_meta is not None:
        tok_config = parse_json_meta(meta, fmt.META_TOKENIZER_CONFIG, path, required=False)
        try:
            tokenizer = Tokenizer.from_metadata(tok_meta, TokenizerConfig.from_dict(tok_config))
        except ModelFileError as e:  # the tokenizer's own errors do not know the file
            raise ModelFileError(f"{path.name}: {e}") from None
        del tok_meta
        meta = {k: v for k, v in meta.items() if k != fmt.META_TOKENIZER}  # its text (2 MB) is parsed: not kept
        trim_heap()  # parsing it freed ~30 MB that glibc keeps resident otherwise (hy_edge_format.heap)
    options = SessionOptions(backend, threads, max_context, budget, prefill_chunk, kv_cache)
    return Model(path, spec, weights, tokenizer, quant, meta, options)


def check_budget(plan: MemoryPlan, budget: int | None, max_context: int | None, spec: ModelSpec) -> None:
    """BudgetError (the session's own message) when even the smallest session does not fit: said before
    the model is loaded, not after."""
    plan_context(plan, DEFAULT_BUDGET if budget is None else budget, max_context, spec.max_position_embeddings, True)


KV_BYTES = {"fp32": 4, "fp16": 2, "fp8": 1}  # per cached value (fp8 rows also carry a 4-byte scale)


def numba_plan(spec: ModelSpec, weights: Weights, kv_cache: str) -> MemoryPlan:
    """A lower bound of a one-sequence numba session's plan (buffers.memory_plan, which NumbaSession
    uses, needs the kernels' modules): its weights, runtime and KV cache, no buffers. Enough to refuse
    a budget before the tokenizer and numba are loaded; the session checks the exact plan."""
    kv = 2 * len(spec.attention_layers) * spec.num_key_value_heads * spec.head_dim * KV_BYTES[kv_cache]
    resident = weights.resident_nbytes
    return MemoryPlan(resident, 0, kv, runtime_overhead("numba", resident))
