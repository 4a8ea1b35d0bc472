"""Open a checkpoint — a Hugging Face directory (config.json + safetensors) or a .gguf file — as one
HF-named tensor table plus config and tokenizer, reading tensors lazily one at a time.

    with open_checkpoint("Hunyuan-0.5B-Instruct-FP8") as ckpt:
        spec = spec_from_hf_config(ckpt.config)
        w = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].load()  # uint8 FP8 codes

The compressed-tensors FP8 layout needs no translation: its tensors are already named
`<x>.weight` (F8_E4M3 codes), `<x>.weight_scale` and `<x>.input_scale` (F32), and are exposed as
stored so the converter can carry them over byte-exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hy_edge_format import safe_json
from hy_edge_format.errors import CheckpointError
from hy_edge_format.families import family

from .gguf_reader import (
    BLOCK_TYPES,
    ROPE_FREQS,
    GGUFFile,
    gguf_config,
    gguf_tensors,
    rope_freq_factors,
    unpermute_qk,
)
from .gguf_tokenizer import tokenizer_from_gguf
from .safetensors_reader import SafetensorsFile, bf16_to_f32

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorRef:
    name: str  # Hugging Face name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]
    dtype: str  # source storage: "f32" | "f16" | "bf16" | "f8_e4m3" (GGUF block types load as "f32")
    _load: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)
    nbytes: int = 0  # bytes it takes in the file (a GGUF block type: fewer than its float32 load)
    # a GGUF block type kept exactly when the policy allows (gguf_reader.BLOCK_TYPES)
    block_type: str | None = None
    _load_blocks: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)

    def load(self) -> np.ndarray:
        """float32 for float dtypes (bf16 expanded exactly); uint8 raw codes for f8_e4m3."""
        if self._load is None:
            raise CheckpointError(f"tensor '{self.name}' has no data source")
        return self._load()

    def load_blocks(self) -> np.ndarray:
        """uint8 (N, bytes per row): the source's blocks as they are (block_type says which)."""
        if self._load_blocks is None:
            raise CheckpointError(f"tensor '{self.name}' is not block-quantized")
        return self._load_blocks()


@dataclass(frozen=True)
class TokenizerData:
    kind: str  # "tokenizers" (tokenizer.json text) | "sentencepiece" (tokenizer.model bytes)
    data: bytes
    # chat_template (str | None), bos_token, eos_token (str | None), add_bos_token, add_eos_token
    # (bool, or None when the directory does not say: tokenizer.json's post-processor decides),
    # eos_token_ids (list[int]: union of config, generation_config and the tokenizer's eos token);
    # for sentencepiece also legacy, add_prefix_space (bool | None), added_tokens (added_tokens_decoder
    # as [{"id", "content", "special", "lstrip", "rstrip", "single_word"}]), additional_special_tokens
    config: dict


class Checkpoint:
    def __init__(
        self,
        path: Path,
        kind: str,
        config: dict,
        tensors: dict[str, TensorRef],
        tokenizer: TokenizerData | None,
        files: list | None = None,
    ):
        self.path = path
        self.kind = kind  # "safetensors" | "gguf"
        self.config = config  # HF config.json dict (synthesized for GGUF)
        self.tensors = tensors
        self.tokenizer = tokenizer
        self._files = files or []  # readers whose memory maps close() releases

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, kind={self.kind!r}, tensors={len(self.tensors)})"


def open_checkpoint(path: Path | str) -> Checkpoint:
    """A checkpoint directory (config.json + model.safetensors or a sharded index) or a .gguf file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        return _open_directory(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if magic == b"GGUF":
        return _open_gguf(path)
    raise CheckpointError(f"{path}: not a GGUF file (expected a checkpoint directory or a .gguf file)")


# -- Hugging Face directories -------------------------------------------------------------------


MAX_JSON_BYTES = 256 << 20  # a tokenizer.json of a 256k vocabulary is ~35 MB; a config a few KB


def _read_json(path: Path) -> Any:
    """A JSON file of the checkpoint, bounded in size and nesting (safe_json)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(
            f"{path}: larger than {MAX_JSON_BYTES >> 20} MB, too large for a JSON file of a checkpoint"
        )
    try:
        return safe_json.loads(data)
    except safe_json.JSONInputError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _read_json_object(path: Path) -> dict:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: top level should be a JSON object")
    return data


def _safetensors_loader(f: SafetensorsFile, name: str, kind: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        if kind == "bf16":
            return f.read(name, bf16_to_f32)
        if kind == "f16":
            return f.read(name, lambda v: v.astype(np.float32))
        return f.read(name)  # f32, or f8_e4m3 codes

    return load


def _open_directory(path: Path) -> Checkpoint:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing (a checkpoint directory needs config.json)")
    config = _read_json_object(config_path)
    _check_quantization(config, config_path)

    if (path / SAFETENSORS).is_file():
        shards = {None: path / SAFETENSORS}
        weight_map = None
    elif (path / SAFETENSORS_INDEX).is_file():
        index_path = path / SAFETENSORS_INDEX
        weight_map = _read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map'")
        for name, file in weight_map.items():
            if not isinstance(file, str):
                raise CheckpointError(
                    f"{index_path}: weight_map entry '{name}' should name a file, got {safe_json.show(file)}"
                )
        shards = {}
        for file in sorted(set(weight_map.values())):
            shard = path / str(file)
            if not shard.is_file() or shard.resolve().parent != path.resolve():
                raise CheckpointError(f"{shard}: missing (named by {SAFETENSORS_INDEX})")
            shards[file] = shard
    else:
        raise CheckpointError(f"{path}: no weights ({SAFETENSORS} or {SAFETENSORS_INDEX})")

    files: list[SafetensorsFile] = []
    tensors: dict[str, TensorRef] = {}
    try:
        for key, shard in shards.items():
            f = SafetensorsFile(shard)
            files.append(f)
            for name, (kind, shape, np_dtype, _) in f.entries.items():
                if weight_map is not None and weight_map.get(name) != key:
                    continue  # listed under another shard, or not at all
                nbytes = math.prod(shape) * np_dtype.itemsize
                tensors[name] = TensorRef(name, shape, kind, _safetensors_loader(f, name, kind), nbytes)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise CheckpointError(
                    f"{path / SAFETENSORS_INDEX}: tensor '{missing[0]}' is not in {weight_map[missing[0]]}"
                )
        tokenizer = _directory_tokenizer(path, config)
    except BaseException:
        for f in files:
            f.close()
        raise
    return Checkpoint(path, "safetensors", config, tensors, tokenizer, files)


def _check_quantization(config: dict, config_path: Path) -> None:
    q = config.get("quantization_config")
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method != "compressed-tensors":
        raise CheckpointError(
            f"{config_path}: quantization_config quant_method {safe_json.show(method)} is not supported "
            "(supported: compressed-tensors FP8)"
        )
    fmt = q.get("format")
    if fmt not in (None, "float-quantized", "naive-quantized"):
        raise CheckpointError(
            f"{config_path}: compressed-tensors format {safe_json.show(fmt)} is not supported "
            "(supported: float-quantized)"
        )
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise CheckpointError(f"{config_path}: quantization_config.config_groups should be an object")
    for name, group in groups.items():
        weights = (group or {}).get("weights") if isinstance(group, dict) else None
        if not isinstance(weights or {}, dict) or not isinstance(group or {}, dict):
            raise CheckpointError(f"{config_path}: quantization_config.config_groups.{name} should be an object")
        weights = weights or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise CheckpointError(
                f"{config_path}: compressed-tensors group '{name}' stores weights as "
                f"{safe_json.show(weights.get('type'))} {safe_json.show(weights.get('num_bits'))}, not FP8 (float 8)"
            )


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _flag(file: Path, tok_config: dict, key: str) -> bool | None:
    try:
        return safe_json.field(tok_config, key, "bool", None)
    except safe_json.JSONInputError as e:
        raise CheckpointError(f"{file}: {e}") from None


def _eos_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _added_tokens(file: Path, tok_config: dict) -> list[dict]:
    """tokenizer_config.json's added_tokens_decoder ({"32000": {"content": ..., "special": ...}})."""
    decoder = tok_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{file}: added_tokens_decoder should be an object")
    out = []
    for key, t in decoder.items():
        t = t if isinstance(t, dict) else {"content": t}
        if not (key.isascii() and key.isdigit() and len(key) <= 9) or not isinstance(t.get("content"), str):
            raise CheckpointError(f"{file}: added_tokens_decoder entry {key!r} is not an id with a content string")
        flags = ("lstrip", "rstrip", "single_word")
        out.append(
            {"id": int(key), "content": t["content"], "special": bool(t.get("special", False))}
            | {f: bool(t.get(f, False)) for f in flags}
        )
    return out


def _additional_special_tokens(file: Path, tok_config: dict) -> list[str]:
    key = next((k for k in ("additional_special_tokens", "extra_special_tokens") if k in tok_config), None)
    tokens = tok_config.get(key) or []
    if isinstance(tokens, dict):  # transformers 5's extra_special_tokens may name them
        tokens = list(tokens.values())
    if not isinstance(tokens, list) or not all(isinstance(_token_str(t), str) for t in tokens):
        raise CheckpointError(f"{file}: {key} should be a list of tokens")
    return [_token_str(t) for t in tokens]


def _chat_template(path: Path, tok_config: dict) -> str | None:
    """transformers 5 saves the template to chat_template.jinja; older ones keep it in the config."""
    if (path / "chat_template.jinja").is_file():
        try:
            return (path / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path / 'chat_template.jinja'}: cannot read ({e})") from None
    template = tok_config.get("chat_template")
    if template is None and (path / "chat_template.json").is_file():
        template = _read_json_object(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {
            t.get("name"): t.get("template") for t in template if isinstance(t, dict) and isinstance(t.get("name"), str)
        }
        template = named.get("default")
    return template if isinstance(template, str) else None


def _directory_tokenizer(path: Path, config: dict) -> TokenizerData | None:
    if (path / "tokenizer.json").is_file():
        kind, file = "tokenizers", path / "tokenizer.json"
    elif (path / "tokenizer.model").is_file():
        kind, file = "sentencepiece", path / "tokenizer.model"
    else:
        return None
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror})") from None
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{file}: larger than {MAX_JSON_BYTES >> 20} MB, too large for a tokenizer")
    tok_config = {}
    if (path / "tokenizer_config.json").is_file():
        tok_config = _read_json_object(path / "tokenizer_config.json")
    generation = {}
    if (path / "generation_config.json").is_file():
        generation = _read_json_object(path / "generation_config.json")

    eos_token = _token_str(tok_config.get("eos_token"))
    eos_ids = _eos_list(config.get("eos_token_id")) + _eos_list(generation.get("eos_token_id"))
    if kind == "tokenizers":
        try:
            tj = safe_json.loads(data)
            if not isinstance(tj, dict):
                raise safe_json.JSONInputError("top level should be a JSON object")
            added = safe_json.field(tj, "added_tokens", "list", [])
            vocab = safe_json.field(tj, "model", "dict", {}).get("vocab")  # a dict (BPE) or a list (Unigram)
        except safe_json.JSONInputError as e:
            raise CheckpointError(f"{file}: {e}") from None
        ids = {
            t.get("content"): t.get("id") for t in added if isinstance(t, dict) and isinstance(t.get("content"), str)
        }
        if eos_token is not None:
            eos_id = ids.get(eos_token)
            if eos_id is None and isinstance(vocab, dict):
                eos_id = vocab.get(eos_token)
            eos_ids += _eos_list(eos_id)
    cfg = {
        "chat_template": _chat_template(path, tok_config),
        "bos_token": _token_str(tok_config.get("bos_token")),
        "eos_token": eos_token,
        "unk_token": _token_str(tok_config.get("unk_token")),
        "pad_token": _token_str(tok_config.get("pad_token")),
        "add_bos_token": _flag(path / "tokenizer_config.json", tok_config, "add_bos_token"),
        "add_eos_token": _flag(path / "tokenizer_config.json", tok_config, "add_eos_token"),
        "eos_token_ids": list(dict.fromkeys(eos_ids)),
    }
    if kind == "sentencepiece":  # what tokenizer.json would otherwise carry
        config_file = path / "tokenizer_config.json"
        switches = {k: tok_config.get(k) for k in ("legacy", "add_prefix_space")}
        cfg |= {k: v if isinstance(v, bool) else None for k, v in switches.items()} | {
            "added_tokens": _added_tokens(config_file, tok_config),
            "additional_special_tokens": _additional_special_tokens(config_file, tok_config),
        }
    return TokenizerData(kind, data, cfg)


# -- GGUF -----------------------------------------------------------------------------------------


def _gguf_loader(f: GGUFFile, info, n_head: int | None, minus_one: bool = False) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        w = f.read(info.name)
        if minus_one:  # a Gemma norm stored as applied (1 + w)
            return w.astype(np.float32) - np.float32(1.0)
        return unpermute_qk(w, n_head) if n_head is not None else w

    return load


def _gguf_block_loader(f: GGUFFile, info, n_head: int | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        rows = f.read_blocks(info.name)  # whole rows of blocks: llama.cpp's q/k row order undone as for floats
        return unpermute_qk(rows, n_head) if n_head is not None else rows

    return load


def _open_gguf(path: Path) -> Checkpoint:
    f = GGUFFile(path)
    try:
        meta = f.metadata
        config = gguf_config(meta, f.tensors, path)
        if ROPE_FREQS in f.tensors:
            config["rope_freq_factors"] = rope_freq_factors(f, config["head_dim"])
        tensors = {}
        for hf, (info, n_head) in gguf_tensors(f, config).items():
            kind = {"f16": "f16", "bf16": "bf16"}.get(info.ggml_type.name.lower(), "f32")
            block = info.ggml_type.name.lower() if info.ggml_type.name.lower() in BLOCK_TYPES else None
            blocks = _gguf_block_loader(f, info, n_head) if block and len(info.shape) == 2 else None
            minus_one = family(config["model_type"]).gguf_norms_plus_one and hf.endswith("norm.weight")
            load = _gguf_loader(f, info, n_head, minus_one)
            tensors[hf] = TensorRef(hf, info.shape, kind, load, info.nbytes, block if blocks else None, blocks)
        built = tokenizer_from_gguf(meta, path)
        tokenizer = None
        if built is not None:
            text, tok_config = built
            tokenizer = TokenizerData("tokenizers", text.encode("utf-8"), tok_config)
    except BaseException:
        f.close()
        raise
    return Checkpoint(path, "gguf", config, tensors, tokenizer, [f])
