"""Weights of a converted .onnx file, memory-mapped from its external data.

The file's header is parsed and checked without its external data (edge_runtime.engine.model_file); every external
initializer becomes a numpy view into one read-only `np.memmap` of `model.onnx.data` (offsets are
64 KiB-aligned by the converter), so the weights are never copied wholesale and only the pages a
kernel touches become resident. The small tensors are read from the header or with read(2) (norm
weights into private copies at load, scales when a session folds them into its own), and the
embedding's token rows are read from the file (`RowReader`): nothing but the matrices is read through
the map, which refuses huge pages (memory.refuse_huge_pages).

Storage follows `hy_edge_format.format`: FP8 weights are `W.qweight` (uint8 view of FLOAT8E4M3FN / FLOAT8E5M2)
plus `W.scale` (reshaped here to (N, G)); FP16 weights keep their raw half bits as uint16.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hy_edge_format import format as fmt
from hy_edge_format.errors import ModelFileError
from hy_edge_format.spec import ModelSpec

from .memory import drop_pages, lazy_zeros
from .model_file import Tensor

# hy_edge_ops.blockq: its storages and their code bytes per block of 32
BLOCK_BYTES = {name: b.code_bytes for name, b in fmt.BLOCK_STORAGES.items()}
BLOCK_STORAGES = tuple(BLOCK_BYTES)


@dataclass(frozen=True)
class Linear:
    """A 2-D weight a matmul reads, in its stored form (y = x @ W^T, W (N, K))."""

    name: str
    storage: str  # e4m3 | e5m2 | fp16 | fp32 | a block storage (format.BLOCK_STORAGES)
    # (N, K) uint8 FP8 codes | int8 block codes | uint16 half bits | float32; uint4 / q4k: (N, K/2) uint8
    # bytes; other block storages: (N, K/32 * code bytes) packed bytes (hy_edge_ops.blockq)
    w: np.ndarray
    # (N, G) float32, FP8 only; column k uses scales[n, k // ceil(K/G)]; block codes: uint16 half bits
    # (N, K/32, or K/256 for the K-quants). May view the data file: read it with read_private (a touch
    # through the map maps the matrix's pages around it)
    scales: np.ndarray | None = None
    input_scale: float | None = None  # static activation scale (FP8 only, optional)
    offsets: np.ndarray | None = None  # block storages with an offset: uint16 half bits, as the scales
    subs: tuple = ()  # the K-quants: (sub_scales,) or (sub_scales, sub_offsets), bytes (format.BLOCK_STORAGES)

    @property
    def shape(self) -> tuple[int, int]:
        n_rows, n_cols = self.w.shape
        block = fmt.BLOCK_STORAGES.get(self.storage)
        if block is not None and block.codes != "int8":  # packed bytes: 32 weights a block
            return n_rows, n_cols // block.code_bytes * 32
        return n_rows, n_cols

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.w, self.scales, self.offsets, *self.subs) if a is not None)


# -- the tensors a ModelSpec needs ---------------------------------------------------------------


def _float_tensor(tensors: dict[str, Tensor], name: str, shape: tuple, path: Path) -> Tensor:
    """The fp32/fp16 tensor `name` of this shape, or ModelFileError naming what is wrong."""
    t = tensors.get(name)
    if t is None:
        raise ModelFileError(f"{path.name}: tensor '{name}' is missing")
    if t.storage not in ("fp32", "fp16"):
        raise ModelFileError(f"{path.name}: tensor '{name}' has storage {t.storage}, expected fp32 or fp16")
    if t.data.shape != shape:
        raise ModelFileError(f"{path.name}: tensor '{name}' has shape {t.data.shape}, expected {shape}")
    return t


def read_private(a: np.ndarray, name: str = "a weight") -> np.ndarray:
    """A private copy of a small array; one that views the memory-mapped data file (norm weights,
    scales) is read from the file with read(2), not through the map. A page cache of large folios
    (ext4 and xfs on recent kernels, after a cold read) maps a whole folio, up to 2 MB of matrices, on
    the first touch of any byte of it: reading SmolLM2-135M's ~400 scales through the map made its
    matrices resident while a session loaded its kernels (a start-up peak of 297 MB instead of 234), and
    each norm read brought back the padding beside it."""
    root = _mapping(a)
    if root is None or not a.flags.c_contiguous:
        return np.array(a)
    offset = root.offset + (a.ctypes.data - root.ctypes.data)
    try:
        out = np.fromfile(root.filename, a.dtype, a.size, offset=offset)
    except OSError as e:
        raise ModelFileError(f"cannot read {name} from {root.filename} ({e.strerror or e})") from None
    if out.size != a.size:
        raise ModelFileError(f"{name} lies outside {root.filename} (a truncated data file)")
    return out.reshape(a.shape)


def read_blocks(lin: Linear) -> tuple:
    """Private copies of a block linear's scales: (half scales, half offsets or None, sub-scales or None,
    sub-offsets or None) as hy_edge_ops.linear.prepare takes them, the halves checked finite (a converted
    file never holds others)."""
    out = []
    for what, a in (("scale", lin.scales), ("offset", lin.offsets)):
        if a is None:
            out.append(None)
            continue
        h = read_private(a, f"the {what}s of '{lin.name}'")
        if not np.isfinite(h.view(np.float16)).all():
            raise ModelFileError(f"tensor '{lin.name}.{what}' holds a non-finite value: the file is corrupt")
        out.append(h)
    subs = [read_private(a, f"the sub-scales of '{lin.name}'") for a in lin.subs]
    return (*out, *subs, *[None] * (2 - len(subs)))


def read_scales(lin: Linear) -> np.ndarray:
    """A private copy of an FP8 linear's scales, checked: finite, not negative, and within what the
    kernels can fold (format.MAX_SCALE). A file converted by this converter never holds others; one
    that does is corrupt (or was converted before checksums covered it)."""
    s = read_private(lin.scales, f"the scales of '{lin.name}'")
    limit = fmt.MAX_SCALE[lin.storage]
    good = (s >= 0) & (s <= limit)  # False for NaN too
    if not good.all():
        bad = float(s[~good].reshape(-1)[0])
        raise ModelFileError(
            f"tensor '{lin.name}{fmt.SCALE}' holds the scale {bad:.4g}, outside 0..{limit:.3g}: the file is corrupt"
        )
    return s


def _float_vector(tensors: dict[str, Tensor], name: str, shape: tuple, path: Path) -> np.ndarray:
    """Norm weights and conv kernels: small, float; returned as private contiguous float32."""
    t = _float_tensor(tensors, name, shape, path)
    data = read_private(t.data, f"tensor '{name}'")  # read by every forward: resident, not mapped
    return data.view(np.float16).astype(np.float32) if t.storage == "fp16" else data


def _norm_vector(spec: ModelSpec, tensors: dict[str, Tensor], name: str, shape: tuple, path: Path) -> np.ndarray:
    """An RMSNorm's weight as the kernels apply it: 1 + w for the families that store w so (Gemma)."""
    w = _float_vector(tensors, name, shape, path)
    return np.add(w, np.float32(1.0), dtype=np.float32) if spec.norm_plus_one else w


def _block_linear(tensors: dict[str, Tensor], q: Tensor, name: str, shape: tuple, path: Path) -> Linear:
    """Block codes with their scales (format.BLOCK_STORAGES: half scales and offsets per block, or per
    super-block with byte sub-scales)."""
    N, K = shape
    block = fmt.BLOCK_STORAGES[q.storage]
    codes = q.data.reshape(q.data.shape[0], -1) if q.data.ndim else q.data
    unit = max(per for _, _, per in block.parts)  # 32, or a K-quant's 256
    if K % unit or codes.shape != (N, K // 32 * block.code_bytes):
        raise ModelFileError(f"{path.name}: tensor '{q.name}' has shape {q.data.shape}, expected blocks of {shape}")
    parts = {}
    for suffix, storage, per in block.parts:
        t = tensors.get(name + suffix)
        if t is None:
            raise ModelFileError(f"{path.name}: tensor '{name}{suffix}' is missing")
        if t.storage != storage or t.data.shape != (N, K // per):
            raise ModelFileError(
                f"{path.name}: tensor '{t.name}' should be {storage} of shape {(N, K // per)}, "
                f"got {t.storage} {t.data.shape}"
            )
        parts[suffix] = t.data
    subs = tuple(parts[s] for s in (fmt.SUB_SCALE, fmt.SUB_OFFSET) if s in parts)
    lin = Linear(name, q.storage, codes, parts[fmt.SCALE], offsets=parts.get(fmt.OFFSET), subs=subs)
    try:
        read_blocks(lin)  # checked here, where the file can be named
    except ModelFileError as e:
        raise ModelFileError(f"{path.name}: {e}") from None
    return lin


def _linear(tensors: dict[str, Tensor], name: str, shape: tuple, path: Path) -> Linear:
    q = tensors.get(name + fmt.QWEIGHT)
    if q is not None and q.storage in BLOCK_STORAGES:
        return _block_linear(tensors, q, name, shape, path)
    if q is not None:
        if q.storage not in ("e4m3", "e5m2"):
            raise ModelFileError(f"{path.name}: tensor '{q.name}' has storage {q.storage}, expected FP8")
        if q.data.shape != shape:
            raise ModelFileError(f"{path.name}: tensor '{q.name}' has shape {q.data.shape}, expected {shape}")
        lin = Linear(name, q.storage, q.data, _scales(tensors, name, shape, path), _input_scale(tensors, name, path))
        try:
            read_scales(lin)  # checked here, where the file can be named; a session reads them again to fold them
        except ModelFileError as e:
            raise ModelFileError(f"{path.name}: {e}") from None
        return lin
    t = _float_tensor(tensors, name, shape, path)
    return Linear(name, t.storage, t.data)


def _scales(tensors: dict[str, Tensor], name: str, shape: tuple, path: Path) -> np.ndarray:
    """`W.scale` as (N, G): () per tensor → (N, 1) filled, (N,) per channel → (N, 1), (N, G) per block.
    The last two view the data file: a session reads them once, with `read_private`, to fold them into
    its kernels' own scales, so they are never resident twice."""
    N, K = shape
    s = tensors.get(name + fmt.SCALE)
    if s is None:
        raise ModelFileError(f"{path.name}: tensor '{name}{fmt.SCALE}' is missing")
    if s.storage != "fp32":
        raise ModelFileError(f"{path.name}: tensor '{s.name}' has storage {s.storage}, expected fp32")
    d = s.data
    if d.ndim == 0 or d.shape == (1,):
        return np.full((N, 1), float(read_private(d, f"tensor '{s.name}'").reshape(())), np.float32)
    if d.shape == (N,):
        return np.ascontiguousarray(d.reshape(N, 1))
    if d.ndim == 2 and d.shape[0] == N and 1 <= d.shape[1] <= K:
        return np.ascontiguousarray(d)
    raise ModelFileError(f"{path.name}: tensor '{s.name}' has shape {d.shape}, expected (), ({N},) or ({N}, G)")


def _input_scale(tensors: dict[str, Tensor], name: str, path: Path) -> float | None:
    s = tensors.get(name + fmt.INPUT_SCALE)
    if s is None:
        return None
    if s.storage != "fp32" or s.data.size != 1:
        raise ModelFileError(f"{path.name}: tensor '{s.name}' should be one float32")
    value = float(read_private(s.data, f"tensor '{s.name}'").reshape(()))
    if not 0 < value < np.inf:
        raise ModelFileError(f"{path.name}: tensor '{s.name}' holds the scale {value}: the model file is corrupt")
    return value


LINEAR_FIELDS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LayerWeights:
    """The weights one layer owns (shared layers point at their owner's)."""

    input_layernorm: np.ndarray  # (C,)
    post_attention_layernorm: np.ndarray  # (C,) before the MLP; with sandwich norms, on the attention's output
    gate_proj: Linear  # (F, C)
    up_proj: Linear  # (F, C)
    down_proj: Linear  # (C, F)
    q_proj: Linear | None = None  # (H*D, C)
    k_proj: Linear | None = None  # (Hkv*D, C)
    v_proj: Linear | None = None  # (Hkv*D, C)
    o_proj: Linear | None = None  # (C, H*D)
    query_layernorm: np.ndarray | None = None  # (D,) the per-head q/k norms (Qwen3's q_norm, k_norm)
    key_layernorm: np.ndarray | None = None  # (D,)
    q_bias: np.ndarray | None = None  # (H*D,) q/k/v projection biases (Qwen2)
    k_bias: np.ndarray | None = None  # (Hkv*D,)
    v_bias: np.ndarray | None = None  # (Hkv*D,)
    conv: np.ndarray | None = None  # (C, k) depthwise kernel
    out_proj: Linear | None = None  # (C, C) pointwise
    pre_feedforward_layernorm: np.ndarray | None = None  # (C,) sandwich norms (Gemma): before the MLP
    post_feedforward_layernorm: np.ndarray | None = None  # (C,) and on its output

    def linears(self) -> list[Linear]:
        return [x for x in (getattr(self, f) for f in LINEAR_FIELDS) if x is not None]


class RowReader:
    """Copies rows of a (V, C) table into a caller's buffer: the embedding lookup.

    Rows of a table in the data file are read with positional reads (one pread per token), not through
    the memory map: on a page fault in a file mapping Linux maps the cached pages around it too (64 KiB,
    `fault_around_bytes`; madvise does not change that), so each token looked up through the map made 16
    pages of the embedding resident: 37 MB after the bench's ~700 prompt tokens on Hunyuan-0.5B, up to
    the whole 236 MB table over a long chat, when only the FP8 lm_head is needed whole. A table held in
    memory (inline, or when pread is missing) is gathered from the array."""

    def __init__(self, table: np.ndarray, source: tuple[Path, int] | None = None, blocks: Linear | None = None):
        self.table = table
        self._row_bytes = table.shape[1] * table.itemsize
        self._fd = None
        # block codes (int8 / uint4): rows are read as codes, then decoded to float32 with their scales
        self._blocks = None
        if blocks is not None:
            from hy_edge_ops import blockq  # numba: imported by the numba backend only

            halves = blockq.pack_scales(blocks.storage, *read_blocks(blocks)).view(np.uint16)
            self._blocks = (blocks.storage, halves, np.empty((0, table.shape[1]), table.dtype))
        if source is not None and hasattr(os, "preadv"):
            self._path, self._offset = source
            self._fd = os.open(source[0], os.O_RDONLY)
            weakref.finalize(self, os.close, self._fd)  # closed with the reader, like the memory map

    @property
    def reads_file(self) -> bool:
        """Rows come from the file (pread), not from the table's pages."""
        return self._fd is not None

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the rows `read` writes: the table's, float32 for block codes."""
        return np.dtype(np.float32) if self._blocks is not None else self.table.dtype

    def read(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[t] = table[ids[t]] for ids (T,) already checked to lie in 0..V-1; out (>= T, C), `dtype`,
        C-contiguous. Returns out[:T]."""
        T = ids.shape[0]
        if self._blocks is not None:
            from hy_edge_ops import blockq

            storage, halves, codes = self._blocks
            if codes.shape[0] < T:
                codes = np.empty((T, self.table.shape[1]), self.table.dtype)
                self._blocks = (storage, halves, codes)
            self._read_rows(ids, codes)
            blockq.decode_rows(blockq.code_view(codes[:T], storage), halves, ids, out[:T])
            return out[:T]
        return self._read_rows(ids, out)

    def _read_rows(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        T = ids.shape[0]
        if self._fd is None:
            return np.take(self.table, ids, axis=0, out=out[:T])
        fd, size, base = self._fd, self._row_bytes, self._offset
        for t, i in enumerate(ids.tolist()):
            if os.preadv(fd, (out[t],), base + i * size) != size:
                raise ModelFileError(f"{self._path}: embedding row {i} could not be read (file truncated?)")
        return out[:T]


@dataclass(frozen=True)
class Weights:
    embed: Linear  # (V, C) rows are gathered; also the output projection when lm_head is None
    norm: np.ndarray  # (C,)
    lm_head: Linear | None  # (V, C), None when tied and not stored separately
    layers: tuple[LayerWeights, ...]  # (L,) layers[i] is the owner's weights for shared layers
    embed_rows: RowReader  # reads embed's token rows

    @property
    def output(self) -> Linear:
        return self.lm_head if self.lm_head is not None else self.embed

    def unique_linears(self) -> list[Linear]:
        seen: dict[int, Linear] = {}
        for x in [self.embed, self.lm_head] + [lin for layer in self.layers for lin in layer.linears()]:
            if x is not None:
                seen.setdefault(id(x), x)
        return list(seen.values())

    def blank(self) -> Weights:
        """These weights with every matrix replaced by zeros of the same dtype, shape, order and
        writeable flag (the same numba types, so the same kernel specializations), on fresh anonymous
        pages: reading them maps the kernel's shared zero page, which no RSS counts. Norms and scales are
        shared. A session warms its kernels up on these (NumbaSession._warm_up)."""
        lins: dict[int, Linear] = {}

        def lin(x: Linear | None) -> Linear | None:
            if x is not None and id(x) not in lins:
                lins[id(x)] = dataclasses.replace(x, w=_zero_pages(x.w))
            return None if x is None else lins[id(x)]

        layers: dict[int, LayerWeights] = {}
        for layer in self.layers:  # shared layers stay shared
            if id(layer) not in layers:
                layers[id(layer)] = dataclasses.replace(layer, **{f: lin(getattr(layer, f)) for f in LINEAR_FIELDS})
        embed = lin(self.embed)
        return Weights(
            embed=embed,
            norm=self.norm,
            lm_head=lin(self.lm_head),
            layers=tuple(layers[id(layer)] for layer in self.layers),
            embed_rows=RowReader(embed.w, blocks=embed if embed.storage in BLOCK_STORAGES else None),
        )

    def release_padding(self, near: Linear | None = None) -> int:
        """Drop the resident pages of the memory-mapped data file that hold no matrix a kernel reads:
        the padding between tensors (their offsets are 64 KiB-aligned) and the embedding (read by rows
        with pread). A fault in a file mapping maps the cached pages around it too (64 KiB, or the whole
        large folio the page cache holds), so a pass over the weights made every tensor's padding
        resident: 19 MB of SmolLM2-135M's 149 MB. All of it, or only the gaps beside `near` (a pass
        calls it after each matrix, so that at most one's padding is resident at a time). Mapped bytes
        dropped (resident or not)."""
        gaps = self._padding.get(id(near), []) if near is not None else self._padding[0]
        return sum(b - a for a, b in gaps if drop_pages(a, b))

    @functools.cached_property
    def _padding(self) -> dict[int, list[tuple[int, int]]]:
        """id(Linear) -> the page ranges beside it that hold no read matrix; key 0 -> all of them."""
        page = mmap.PAGESIZE
        maps: dict[int, tuple] = {}  # id(mapping) -> (mapping, [(start, end, id(Linear))] page-rounded)
        for lin in [self.output] + [x for layer in self.layers for x in layer.linears()]:
            root = _mapping(lin.w)
            if root is not None:
                a, b = lin.w.ctypes.data, lin.w.ctypes.data + lin.w.nbytes
                maps.setdefault(id(root), (root, []))[1].append((a // page * page, -(-b // page) * page, id(lin)))
        out: dict[int, list] = {0: []}
        for root, spans in maps.values():
            pos, owner = root.ctypes.data, None
            for a, b, key in sorted(spans) + [(root.ctypes.data + root.nbytes, 0, None)]:
                if a > pos:
                    out[0].append((pos, a))
                    for k in (owner, key):
                        if k is not None:
                            out.setdefault(k, []).append((pos, a))
                if b > pos:
                    pos, owner = b, key
        return out

    @property
    def resident_nbytes(self) -> int:
        """Bytes of weights a generation makes resident: all it reads, but an embedding whose token rows
        are read from the file (RowReader, when the output projection is another tensor)."""
        by_rows = self.lm_head is not None and self.embed_rows.reads_file
        return self.nbytes - (self.embed.nbytes if by_rows else 0)

    @property
    def nbytes(self) -> int:
        """Bytes of every weight the forward pass reads (each shared tensor once)."""
        small = self.norm.nbytes + sum(
            a.nbytes
            for layer in {id(x): x for x in self.layers}.values()
            for a in (
                layer.input_layernorm,
                layer.post_attention_layernorm,
                layer.pre_feedforward_layernorm,
                layer.post_feedforward_layernorm,
                layer.query_layernorm,
                layer.key_layernorm,
                layer.q_bias,
                layer.k_bias,
                layer.v_bias,
                layer.conv,
            )
            if a is not None
        )
        return small + sum(x.nbytes for x in self.unique_linears())


def _mapping(a: np.ndarray) -> np.memmap | None:
    """The memory map of the whole data file that `a` views, or None if `a` is not memory-mapped."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a if isinstance(a, np.memmap) else None


def _zero_pages(a: np.ndarray) -> np.ndarray:
    """Zeros typed as `a`, never resident (memory.lazy_zeros, on huge pages: they are only read)."""
    if not a.flags.c_contiguous or a.nbytes == 0:
        return a  # not a layout the weights have (they are C views of the file); keep it as it is
    z = lazy_zeros(a.shape, a.dtype, huge_pages=True)
    z.flags.writeable = a.flags.writeable
    return z


def build_weights(spec: ModelSpec, tensors: dict[str, Tensor], path: Path) -> Weights:
    """Check every tensor `format.model_tensors(spec)` names (presence, storage, shape) and arrange
    them per layer. Raises ModelFileError naming the first bad tensor."""
    expected = fmt.model_tensors(spec)
    owners: dict[int, LayerWeights] = {}
    layers = []
    for i in range(spec.num_hidden_layers):
        j = spec.shared_layers[i]
        if j not in owners:
            owners[j] = _layer(spec, tensors, j, expected, path)
        layers.append(owners[j])
    lm_head = None
    if fmt.LM_HEAD in tensors or fmt.LM_HEAD + fmt.QWEIGHT in tensors or not spec.tie_word_embeddings:
        lm_head = _linear(tensors, fmt.LM_HEAD, (spec.vocab_size, spec.hidden_size), path)
    q = tensors.get(fmt.EMBED + fmt.QWEIGHT)
    if q is not None and q.storage in BLOCK_STORAGES:  # rows decoded from their blocks
        embed = _block_linear(tensors, q, fmt.EMBED, expected[fmt.EMBED], path)
        rows = RowReader(embed.w, q.source, blocks=embed)
    else:
        t = _float_tensor(tensors, fmt.EMBED, expected[fmt.EMBED], path)  # gathered by rows: fp16 or fp32
        embed = Linear(fmt.EMBED, t.storage, t.data)
        rows = RowReader(t.data, t.source)
    return Weights(
        embed=embed,
        norm=_norm_vector(spec, tensors, fmt.FINAL_NORM, expected[fmt.FINAL_NORM], path),
        lm_head=lm_head,
        layers=tuple(layers),
        embed_rows=rows,
    )


def _layer(spec: ModelSpec, tensors: dict, i: int, expected: dict, path: Path) -> LayerWeights:
    p = fmt.layer_prefix(i)

    def lin(short: str) -> Linear:
        name = f"{p}.{short}.weight"
        return _linear(tensors, name, expected[name], path)

    def vec(short: str, kind: str = "weight") -> np.ndarray:
        name = f"{p}.{short}.{kind}"
        if short.endswith("norm"):
            return _norm_vector(spec, tensors, name, expected[name], path)
        return _float_vector(tensors, name, expected[name], path)

    sandwich = {}
    if spec.sandwich_norms:
        sandwich = {n: vec(n) for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")}
    common = dict(
        **sandwich,
        input_layernorm=vec("input_layernorm"),
        post_attention_layernorm=vec("post_attention_layernorm"),
        gate_proj=lin("mlp.gate_proj"),
        up_proj=lin("mlp.up_proj"),
        down_proj=lin("mlp.down_proj"),
    )
    if spec.layer_types[i] == "attention":
        qk = {}
        if spec.use_qk_norm:
            qn, kn = fmt.qk_norm_names(spec)
            qk = dict(query_layernorm=vec(f"self_attn.{qn}"), key_layernorm=vec(f"self_attn.{kn}"))
        if spec.qkv_bias:
            qk.update({f"{x}_bias": vec(f"self_attn.{x}_proj", "bias") for x in "qkv"})
        return LayerWeights(
            **common,
            q_proj=lin("self_attn.q_proj"),
            k_proj=lin("self_attn.k_proj"),
            v_proj=lin("self_attn.v_proj"),
            o_proj=lin("self_attn.o_proj"),
            **qk,
        )
    return LayerWeights(**common, conv=vec("mixer.conv"), out_proj=lin("mixer.out_proj"))
