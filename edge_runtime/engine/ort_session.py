"""Backend "onnxruntime": the same .onnx file through a stock InferenceSession.

The reference executor: it runs the graph as written (DequantizeLinear and all, folded into fp32
weights when the session loads), so agreement with it proves the file; the numba backend is the fast
path. Batch 1; the KV cache and conv states
are kept as the graph's present outputs and fed back as the next call's past inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from hy_edge_format import format as F
from hy_edge_format.errors import BudgetError, ModelFileError
from hy_edge_format.spec import ModelSpec

from .memory import DEFAULT_BUDGET, MemoryPlan, plan_context, runtime_overhead
from .model_file import Tensor, read_header, read_tensors

# onnxruntime's own errors (its pybind11 exception classes): raised running a graph it loaded, they come
# from the file's graph (a hy-edge file's graph runs; one from elsewhere, or edited, may not)
_ORT_ERRORS = tuple(
    e for e in vars(ort.capi.onnxruntime_pybind11_state).values() if isinstance(e, type) and issubclass(e, Exception)
)


# bytes a sub-byte FP weight takes in an onnxruntime session at its peak, counted as `folded` below counts (then
# doubled): its float32 value, and the table decode's temporaries (convert/graph.py) that the folding holds.
# Measured on SmolLM2-135M, every linear in the format: peak RSS 2,039 MB (e2m1), 3,470 MB (e2m3) against
# 1,233 MB for the E4M3 file (x86-64, onnxruntime 1.32)
SUBBYTE_FOLD_BYTES = {"e2m1": 14, "e2m3": 25, "e3m2": 25}
# GGUF's 5- and 6-bit-coded blocks (Q5_0, Q5_1, Q5_K, Q6_K kept) go through a decode like FP6's: counted as FP6
SUBBYTE_FOLD_BYTES.update(dict.fromkeys(("int5", "uint5", "q5k", "q6k"), 25))


def ort_memory_plan(spec: ModelSpec, tensors: dict[str, Tensor]) -> MemoryPlan:
    """What an InferenceSession on this file holds (`tensors`: its initializers, model_file.read_tensors).

    Weights: onnxruntime folds DequantizeLinear when the session loads (session.disable_quant_qdq) and
    keeps every weight as float32 but the FP16 embedding the Gather reads (a head tied to it is a folded
    float32 copy); while MatMul pre-packs them a second copy exists. Measured on SmolLM2-135M (FP8
    head copy, or the head tied to the FP16 embedding): 595 MB of initializers kept, peak RSS 1,188 /
    1,187 MB = the runtime (85 MB) + 2.0 x 595 MB; its Q4_1 file kept as blocks (one DequantizeLinear a
    weight; uint4 folds to 8 bytes a stored byte; the head tied to the embedding folds to a transposed
    float32 copy of its own beside the Gather's table): initializers 650 MB, peak 1,432 MB loaded 1,265
    (x86-64, AVX-512; 1,436 MB on another CI machine). Per token: the KV cache twice
    (the past inputs and the present outputs are both alive during a call, float32), the logits row and
    the activations of a prompt token (the whole prompt runs as one call)."""

    def folded(t: Tensor) -> int:  # bytes kept for a tensor: float32, but the Gather's FP16 embedding
        if t.name == F.EMBED and t.storage == "fp16":
            return 2 * t.data.size
        if t.storage in SUBBYTE_FOLD_BYTES:  # packed codes: 32 weights a block, and the decode's
            weights = 32 * t.data.size // F.BLOCK_STORAGES[t.storage].code_bytes  # temporaries while it folds
            return weights * SUBBYTE_FOLD_BYTES[t.storage] // 2
        return (8 if t.storage in ("uint4", "q4k") else 4) * t.data.size  # uint4 / q4k: two weights a byte

    kept = sum(folded(t) for t in tensors.values())
    if F.LM_HEAD not in tensors and F.LM_HEAD + F.QWEIGHT not in tensors:  # a tied head: a float32 copy
        kept += 4 * spec.vocab_size * spec.hidden_size
    C, F_, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    kv = 2 * len(spec.attention_layers) * spec.num_key_value_heads * spec.head_dim * 4
    activations = (8 * max(C, F_, spec.num_attention_heads * spec.head_dim) + V) * 4
    conv = len(spec.conv_layers) * C * spec.conv_kernel_size * 4 * 2
    return MemoryPlan(
        weights=2 * kept, fixed=conv, per_token=2 * kv + activations, runtime=runtime_overhead("onnxruntime", 0)
    )


class OrtSession:
    """Backend interface: spec, max_context, n_cached, forward(ids), truncate(n), reset()."""

    def __init__(
        self,
        path: Path | str,
        threads: int | None = None,
        max_context: int | None = None,
        max_memory: int = DEFAULT_BUDGET,
    ):
        path = self.path = Path(path)
        header = read_header(path)  # checked as load() checks it
        self.spec = header.spec
        self.quantization = header.quantization
        tensors = read_tensors(header.proto, path, header.quantization)  # sizes checked; nothing read
        self.plan = ort_memory_plan(self.spec, tensors)
        del header, tensors
        # checked before onnxruntime folds the weights (the allocation the budget is about)
        self.max_context = plan_context(self.plan, max_memory, max_context, self.spec.max_position_embeddings)
        opts = ort.SessionOptions()
        # no busy-waiting between calls: the generator's Python and other thread pools share the cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Fold DequantizeLinear on the FP8 initializers at load (onnxruntime otherwise keeps it for QDQ
        # fusion and dequantizes every weight on every call): SmolLM2 FP8 decode 1.5 -> 22.6 tok/s and
        # peak RSS 1.9 -> 1.2 GB. The session then holds fp32 weights; the numba backend keeps FP8 bytes.
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelFileError(f"{path}: onnxruntime cannot load it: {str(e).splitlines()[0]}") from None
        self.reset()

    def reset(self) -> None:
        s = self.spec
        self.n_cached = 0
        self._past: dict[str, np.ndarray] = {}
        for i in range(s.num_hidden_layers):
            if s.layer_types[i] == "attention":
                empty = np.zeros((1, s.num_key_value_heads, 0, s.head_dim), np.float32)  # (B, Hkv, P, D)
                self._past[F.past_key(i)] = self._past[F.past_value(i)] = empty
            else:
                self._past[F.past_conv(i)] = np.zeros((1, s.hidden_size, s.conv_kernel_size - 1), np.float32)

    def truncate(self, n: int) -> int:
        """Keep the first n cached tokens; returns how many were kept. A conv state cannot be rewound,
        so a model with dwconv layers starts over unless nothing is dropped."""
        n = max(0, min(n, self.n_cached))
        if n == self.n_cached:
            return n
        if self.spec.conv_layers:
            self.reset()
            return 0
        for name in list(self._past):
            self._past[name] = self._past[name][:, :, :n]
        self.n_cached = n
        return n

    def forward(self, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Logits of the last token (V,), or of all T tokens (T, V)."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        T = ids.shape[1]
        if self.n_cached + T > self.max_context:
            raise BudgetError(f"context of {self.n_cached + T} tokens exceeds the limit of {self.max_context}")
        positions = np.arange(self.n_cached, self.n_cached + T, dtype=np.int64).reshape(1, -1)
        try:
            outputs = self.session.run(None, {F.INPUT_IDS: ids, F.POSITION_IDS: positions, **self._past})
        except _ORT_ERRORS as e:
            why = " ".join(str(e).split())[:200]
            raise ModelFileError(f"{self.path}: onnxruntime cannot run its graph: {why}") from None
        names = [o.name for o in self.session.get_outputs()]
        result = dict(zip(names, outputs, strict=True))
        for i in range(self.spec.num_hidden_layers):
            if self.spec.layer_types[i] == "attention":
                self._past[F.past_key(i)] = result[F.present_key(i)]
                self._past[F.past_value(i)] = result[F.present_value(i)]
            else:
                self._past[F.past_conv(i)] = result[F.present_conv(i)]
        self.n_cached += T
        logits = result[F.LOGITS][0]  # (T, V)
        return logits if all_logits else logits[-1]
