"""Seeded mutations of the headers of a small GGUF, a safetensors checkpoint and a converted .onnx, and the
check every one of them must pass: `hy-edge` ends in exit 0, or in exit 2 with one error line that names
the file (and, for a mutation aimed at a field, that field), no traceback, nothing half-written.

Used by tests/test_hardening_fuzz.py (a few dozen cases per format, in CI) and, as a script, for the long
run (not in CI):

    python tests/header_fuzz.py --cases 1000 [--seed 0] [--formats gguf safetensors onnx]

Mutations: bit flips and truncation anywhere in a header; a value of another type, an edge value
(0, -1, 2**63, NaN, inf, huge strings) or deep nesting for one named field (a GGUF key, a safetensors
entry, a config.json field, a field of the .onnx's JSON metadata); changed tensor tables (dims, types,
offsets, locations). A mutated .onnx is saved with its header checksum re-stamped (as a converter that
wrote those values would have), or without checksums, so that the checks behind the checksum are reached.
"""

from __future__ import annotations

import faulthandler
import json
import random
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import gguf_edit as ge  # noqa: E402

FORMATS = ("gguf", "safetensors", "onnx")
# lines a command may print on stderr besides its one error line
NOTES = ("hy-edge: note:", "converting")


@dataclass
class Case:
    fmt: str
    kind: str  # what was mutated, for the report
    path: Path  # the file (or checkpoint directory) the command is given
    named: tuple[str, ...]  # what the error line must name: the file, and the field when aimed at one
    args: tuple[str, ...]  # the hy-edge command line


# -- values ------------------------------------------------------------------------------------------------

EDGE_NUMBERS = [0, 1, -1, 2, 3, 7, 255, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**53 + 1, 2**63 - 1, 10**9]
EDGE_FLOATS = [0.0, -0.0, -1.0, 1e-45, 1e38, 3.4e38, float("nan"), float("inf"), float("-inf"), 0.5]


def json_value(rng: random.Random, depth_max: int = 200) -> object:
    """A JSON value of any type, often a wrong one: numbers at their edges, strings, lists, objects, deep
    nesting."""
    kind = rng.choice(["int", "float", "str", "bool", "null", "list", "dict", "nest", "numstr", "bigint"])
    if kind == "int":
        return rng.choice(EDGE_NUMBERS) * rng.choice([1, -1])
    if kind == "float":
        return rng.choice(EDGE_FLOATS)
    if kind == "str":
        return rng.choice(["", "abc", "x" * rng.randint(1, 5000), "\u2603", "1e9", "null"])
    if kind == "bool":
        return rng.choice([True, False])
    if kind == "null":
        return None
    if kind == "list":
        return [json_value(rng, 2) for _ in range(rng.randint(0, 4))] if depth_max > 2 else [1, "a"]
    if kind == "dict":
        return {"a": 1, "content": rng.choice([1, "x", None])}
    if kind == "numstr":
        return str(rng.choice(EDGE_NUMBERS))
    if kind == "bigint":
        return 10 ** rng.randint(19, 4000)  # json.dumps writes at most 4,300 digits
    depth = rng.choice([3, 10, 65, rng.randint(2, depth_max)])
    value: object = 1
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def dumps(value) -> str:
    """JSON text as json.dumps writes it, but deep values too (json.dumps recurses once per level)."""
    try:
        return json.dumps(value, allow_nan=True)
    except RecursionError:  # a value built deeper than this interpreter's stack: write it out iteratively
        opens = closes = ""
        while isinstance(value, (list, dict)):
            if isinstance(value, list):
                opens, closes, value = opens + "[", "]" + closes, value[0]
            else:
                opens, closes, value = opens + '{"k":', "}" + closes, value["k"]
        return opens + json.dumps(value) + closes


def flip_bits(data: bytes, rng: random.Random, start: int, end: int, n: int) -> bytes:
    out = bytearray(data)
    for _ in range(n):
        i = rng.randrange(start, max(start + 1, min(end, len(out))))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


# -- GGUF ----------------------------------------------------------------------------------------------------

_GGUF_TYPES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12]  # scalars and string


def _gguf_scalar(rng: random.Random, t: int):
    if t in (6, 12):
        return rng.choice(EDGE_FLOATS)
    if t == 7:
        return rng.choice([True, False])
    if t == 8:
        return rng.choice(["", "abc", "x" * rng.randint(1, 3000), "llama", "gpt2", "{{ x }}"])
    bits, signed = {0: (8, 0), 1: (8, 1), 2: (16, 0), 3: (16, 1), 4: (32, 0), 5: (32, 1), 10: (64, 0), 11: (64, 1)}[t]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return max(lo, min(hi, rng.choice(EDGE_NUMBERS + [lo, hi])))


def _gguf_value(rng: random.Random) -> tuple[int, object]:
    if rng.random() < 0.25:
        et = rng.choice(_GGUF_TYPES)
        return ge.ARRAY, (et, [_gguf_scalar(rng, et) for _ in range(rng.choice([0, 1, 3, 50]))])
    t = rng.choice(_GGUF_TYPES)
    return t, _gguf_scalar(rng, t)


def _kind(tv: tuple[int, object]) -> str:
    t, v = tv
    if t == ge.ARRAY:
        return f"array of {_kind((v[0], None))}"
    return {6: "float", 12: "float", 7: "bool", 8: "str"}.get(t, "int")


def gguf_case(base: bytes, rng: random.Random, work: Path) -> Case:
    g = ge.parse(base)
    header_end = len(base) - len(g.data)
    path = work / "model.gguf"
    kind = rng.choice(["bitflip", "truncate", "type", "type", "nest", "value", "tensor", "count", "drop"])
    named: tuple[str, ...] = ()
    data = None
    if kind == "bitflip":
        data = flip_bits(base, rng, 0, header_end, rng.randint(1, 8))
    elif kind == "truncate":
        data = base[: rng.randrange(0, header_end + 64)]
    elif kind in ("type", "nest", "value", "drop"):
        key = rng.choice(list(g.kv))
        t, v = g.kv[key]
        if kind == "type":
            g.kv[key] = _gguf_value(rng)
            # another type of the same kind (u32 -> i16) is no type error: its value may fail elsewhere
            named = (key,) if _kind(g.kv[key]) != _kind((t, v)) else ()
        elif kind == "nest":
            value: tuple = (ge.ARRAY, (4, [1]))
            for _ in range(rng.choice([1, 2, 30, 200])):  # the emitter recurses twice per level
                value = (ge.ARRAY, (ge.ARRAY, [value[1]]))
            g.kv[key] = value
            named = (key,)
        elif kind == "value" and t != ge.ARRAY:
            g.kv[key] = (t, _gguf_scalar(rng, t))
        else:
            del g.kv[key]
    elif kind == "tensor":
        i = rng.randrange(len(g.tensors))
        name, dims, ty, off = g.tensors[i]
        what = rng.choice(["dims", "type", "offset", "name", "ndims"])
        if what == "dims":
            dims = [rng.choice([0, 1, 32, 64, 2**31, 2**62, d * 2]) for d in dims]
        elif what == "ndims":
            dims = dims + [1] * rng.choice([1, 3, 10]) if rng.random() < 0.5 else []
        elif what == "type":
            ty = rng.choice([0, 1, 2, 3, 8, 12, 30, 31, 40, 2**31])
        elif what == "offset":
            off = rng.choice([0, 1, 31, 2**40, off + 32, 2**64 - 1])
        else:
            name = rng.choice([t[0] for t in g.tensors])
        g.tensors[i] = (name, dims, ty, off)
    if data is None:
        data = ge.emit(g)
        if kind == "count":  # the tensor or key count of the header itself
            data = data[:8] + struct.pack("<Q", rng.choice([0, 1, 2**20, 2**63])) + data[16:]
            if rng.random() < 0.5:
                data = data[:16] + struct.pack("<Q", rng.choice([0, 2**20, 2**63])) + data[24:]
    path.write_bytes(data)
    return Case("gguf", kind, path, (path.name, *named), ("convert", str(path), "-o", str(work / "out" / "m.onnx")))


# -- safetensors -----------------------------------------------------------------------------------------


def safetensors_case(base_dir: Path, rng: random.Random, work: Path) -> Case:
    d = work / "ckpt"
    shutil.copytree(base_dir, d)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    kind = rng.choice(["bitflip", "truncate", "type", "type", "value", "nest", "length", "config", "config"])
    named: tuple[str, ...] = ()
    target = f
    if kind == "bitflip":
        f.write_bytes(flip_bits(raw, rng, 8, 8 + n, rng.randint(1, 8)))
    elif kind == "truncate":
        f.write_bytes(raw[: rng.randrange(0, len(raw))])
    elif kind == "length":
        f.write_bytes(struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**63, 2**64 - 1, len(raw)])) + raw[8:])
    elif kind == "config":
        target = d / "config.json"
        cfg = json.loads(target.read_text())
        key = rng.choice(list(cfg) + ["rope_scaling", "layer_types", "shared_layers"])
        old, cfg[key] = cfg.get(key), json_value(rng)
        target.write_text(dumps(cfg))
        named = (key,) if key in _TYPED_CONFIG and _wrong_type(old, cfg[key]) else ()
    else:
        name = rng.choice(names + ["__metadata__"])
        deep = None
        if kind == "nest":  # written as text: json.dumps itself recurses once per level
            depth = rng.choice([4, 70, 1000, 100_000])
            header[name], deep = "__deep__", "[" * depth + "1" + "]" * depth
        elif name == "__metadata__":
            header[name] = json_value(rng)
            named = (name,)
        elif kind == "type":
            field = rng.choice(["dtype", "shape", "data_offsets"])
            header[name][field] = json_value(rng)
            named = (name,)
        else:
            entry = header[name]
            what = rng.choice(["dtype", "shape", "offsets"])
            if what == "dtype":
                entry["dtype"] = rng.choice(["F64", "I8", "BF16", "F16", "F8_E4M3", "U8", "bf16", ""])
            elif what == "shape":
                entry["shape"] = [rng.choice([0, 1, 2, 2**31, 2**62]) for _ in entry["shape"] or [1]]
            else:
                b, e = entry["data_offsets"]
                entry["data_offsets"] = rng.choice([[e, b], [b, b], [b + 1, e + 1], [0, e * 2], [b, 2**63]])
            named = (name,)
        text = dumps(header)
        text = (text.replace('"__deep__"', deep) if deep else text).encode()
        text += b" " * (-len(text) % 8)
        f.write_bytes(struct.pack("<Q", len(text)) + text + body)
    out = work / "out" / "m.onnx"
    return Case("safetensors", kind, d, (d.name, *named), ("convert", str(d), "-o", str(out)))


# fields of config.json the spec reads with a type: a value of the wrong type names them
_TYPED_CONFIG = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "hidden_act",
}


# -- .onnx ------------------------------------------------------------------------------------------------

_META = ("hy_edge.spec", "hy_edge.quantization", "hy_edge.tokenizer", "hy_edge.tokenizer_config", "hy_edge.source")


def onnx_case(base: Path, rng: random.Random, work: Path, prompt: Path) -> Case:
    import onnx
    import onnx_edit
    from hy_edge_format import format as F

    d = work / "model"
    d.mkdir()
    path, data_path = d / base.name, d / (base.name + ".data")  # the data file keeps the name the header gives
    shutil.copy(base.with_name(base.name + ".data"), data_path)
    raw = base.read_bytes()
    kind = rng.choice(["bitflip", "bitflip-bare", "truncate", "meta", "meta", "meta", "init", "init", "data"])
    named: tuple[str, ...] = ()
    if kind == "bitflip":
        path.write_bytes(flip_bits(raw, rng, 0, len(raw), rng.randint(1, 8)))
    elif kind == "truncate":
        path.write_bytes(raw[: rng.randrange(0, len(raw))])
    elif kind == "data":
        data = data_path.read_bytes()
        cut = rng.random() < 0.5
        data_path.write_bytes(data[: rng.randrange(len(data))] if cut else flip_bits(data, rng, 0, len(data), 8))
        path.write_bytes(raw)
    else:
        proto = onnx.load_from_string(raw)
        meta = {p.key: p.value for p in proto.metadata_props}
        if kind == "bitflip-bare":  # no checksums: the bytes reach every reader
            del meta[F.META_CHECKSUMS]
            onnx.helper.set_model_props(proto, meta)
            path.write_bytes(flip_bits(proto.SerializeToString(), rng, 0, len(raw), rng.randint(1, 8)))
        else:
            if kind == "meta":
                named = _mutate_meta(meta, rng)
                onnx.helper.set_model_props(proto, meta)
            else:
                named = _mutate_init(proto, rng)
            if rng.random() < 0.2:  # as an older converter wrote it: no checksums at all
                meta = {p.key: p.value for p in proto.metadata_props}
                meta.pop(F.META_CHECKSUMS, None)
                onnx.helper.set_model_props(proto, meta)
            onnx_edit.save(proto, path)
    backend = "onnxruntime" if rng.random() < 0.15 else "numba"
    args = ("run", str(prompt), "--model", str(path), "--max-tokens", "2", "--backend", backend)
    return Case("onnx", kind, path, (path.name, *named), args)


def _mutate_meta(meta: dict, rng: random.Random) -> tuple[str, ...]:
    key = rng.choice(_META + ("hy_edge.format_version", "hy_edge.checksums"))
    text = meta.get(key)
    if text is None or rng.random() < 0.2:  # the whole entry: not JSON, another type, deep
        meta[key] = rng.choice(["", "{", "[]", "null", "1", dumps(json_value(rng, 100000))])
        return ()
    value = json.loads(text) if key != "hy_edge.format_version" else text
    if not isinstance(value, dict) or not value:
        meta[key] = dumps(json_value(rng))
        return ()
    field = rng.choice(list(value))
    old, value[field] = value[field], json_value(rng)
    meta[key] = dumps(value)
    return (field,) if key == "hy_edge.spec" and _wrong_type(old, value[field]) else ()


def _wrong_type(old, new) -> bool:
    """A value of another type than the field had (an integral float for a number, null for a default:
    not a type error; a right-typed value may fail a later check, which names what it checks)."""
    numeric = type(old) in (int, float) and (type(new) is int or (isinstance(new, float) and new.is_integer()))
    return None not in (old, new) and type(new) is not type(old) and not numeric


def _mutate_init(proto, rng: random.Random) -> tuple[str, ...]:
    t = rng.choice(list(proto.graph.initializer))
    what = rng.choice(["dims", "dtype", "external", "raw"])
    if what == "dims":
        dims = [rng.choice([0, 1, 2, 3, 2**31, 2**40, 2**62]) for _ in range(rng.choice([0, 1, 2, 3]))]
        del t.dims[:]
        t.dims.extend(dims)
    elif what == "dtype":
        t.data_type = rng.choice([0, 1, 2, 3, 6, 7, 10, 11, 16, 17, 18, 19, 20, 21, 40])
    elif what == "external" and len(t.external_data):
        e = rng.choice(list(t.external_data))
        e.value = rng.choice(["", "-1", "abc", "1" * 30, "99999999999", "../../etc/passwd", "/etc/passwd", "x.data"])
    elif t.raw_data:
        t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data))]
    if what not in ("dims", "dtype") or t.name.startswith("/const/"):
        return ()  # graph constants are onnxruntime's to check (the numba backend never reads them)
    return (t.name.rsplit(".", 1)[0].removesuffix(".weight"),)


# -- the check ------------------------------------------------------------------------------------------


def check(case: Case, result, work: Path) -> str | None:
    """None when the case passed; otherwise why not. `result`: click's CliRunner result."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        return f"raised {type(result.exception).__name__} (a traceback):\n{tb[-3000:]}"
    if "Traceback" in result.stderr:
        return f"printed a traceback:\n{result.stderr[-3000:]}"
    if result.exit_code not in (0, 2):
        return f"exit {result.exit_code}: {result.stderr[-500:]}"
    out = work / "out"
    if out.exists() and any(p.name.endswith(".partial") or p.name.startswith(".") for p in out.iterdir()):
        return f"left half-written files: {sorted(p.name for p in out.iterdir())}"
    if result.exit_code == 0:
        if out.exists() and sorted(p.name for p in out.iterdir()) not in ([], ["m.onnx", "m.onnx.data"]):
            return f"left {sorted(p.name for p in out.iterdir())}"
        return None
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("hy-edge: error: ")]
    others = [line for line in lines if not line.startswith(("hy-edge: error: ",) + NOTES)]
    if len(errors) != 1 or lines[-1] != errors[0] or others:
        return f"not one error line:\n{result.stderr[-1500:]}"
    if out.exists() and list(out.iterdir()):
        return f"failed but left {sorted(p.name for p in out.iterdir())}"
    missing = [name for name in case.named if name not in errors[0]]
    if missing:
        return f"the error does not name {missing}: {errors[0]}"
    return None


def run_case(case: Case, work: Path):
    from click.testing import CliRunner

    from edge_runtime.cli import main

    (work / "out").mkdir(exist_ok=True)
    return CliRunner().invoke(main, list(case.args))


def make_case(fmt: str, bases: dict, rng: random.Random, work: Path) -> Case:
    if fmt == "gguf":
        return gguf_case(bases["gguf"], rng, work)
    if fmt == "safetensors":
        return safetensors_case(bases["safetensors"], rng, work)
    return onnx_case(bases["onnx"], rng, work, bases["prompt"])


def fuzz(
    fmt: str, bases: dict, cases: int, seed: int, root: Path, log=None, timeout: float = 300
) -> tuple[list[str], dict[str, list[int]]]:
    """Run `cases` seeded mutations of one format: (the failures, described; per kind of mutation
    [exit 0, exit 2, failed] counts). A case still running after `timeout` seconds is a hang: the
    process prints every thread's stack and exits (faulthandler)."""
    import os

    failures, kinds = [], {}
    old_cache = os.environ.get("HY_EDGE_CACHE")
    os.environ["HY_EDGE_CACHE"] = str(root / "cache")  # first-use verification records of the mutated files
    try:
        for i in range(cases):
            rng = random.Random(f"{seed}-{fmt}-{i}")
            work = root / f"{fmt}-{i}"
            work.mkdir(parents=True)
            case = make_case(fmt, bases, rng, work)
            faulthandler.dump_traceback_later(timeout, exit=True)
            try:
                result = run_case(case, work)
            finally:
                faulthandler.cancel_dump_traceback_later()
            why = check(case, result, work)
            outcome = "pass" if why is None else "FAIL"
            kinds.setdefault(case.kind, [0, 0, 0])
            kinds[case.kind][0 if result.exit_code == 0 else 1] += 1
            if why is not None:
                kinds[case.kind][2] += 1
                failures.append(f"{fmt} case {i} ({case.kind}, seed {seed}): {why}")
            if log is not None:
                last = result.stderr.strip().splitlines()[-1:] or [""]
                log(f"{fmt} {i:5d} {case.kind:12s} exit {result.exit_code} {outcome} {last[0][:150]}")
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if old_cache is None:
            os.environ.pop("HY_EDGE_CACHE", None)
        else:
            os.environ["HY_EDGE_CACHE"] = old_cache
    if log is not None:
        for kind, (ok, refused, failed) in sorted(kinds.items()):
            log(f"{fmt} {kind:12s}: {ok + refused:5d} cases, exit 0: {ok}, exit 2: {refused}, failed: {failed}")
    return failures, kinds


def build_bases(root: Path) -> dict:
    """The three small files the mutations start from (as the tests' fixtures build them)."""
    import checkpoints as ck
    from runtime_helpers import converted

    gguf = ck.make_gguf_llama(root / "gguf" / "tiny.gguf", "Q8_0")
    hunyuan = ck.make_hunyuan(root / "hunyuan", "float32")
    prompt = root / "prompt.txt"
    prompt.write_text("Hello")
    return {"gguf": gguf.read_bytes(), "safetensors": hunyuan, "onnx": converted(hunyuan, "e4m3"), "prompt": prompt}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile
    import time

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="mutations per format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--timeout", type=float, default=300, help="seconds a case may take before it is a hang")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="hy-edge-fuzz-"))
    bases = build_bases(root / "bases")
    failures = []
    for fmt in args.formats:
        start = time.monotonic()
        log = lambda s: print(s, flush=True)  # noqa: E731
        failures += fuzz(fmt, bases, args.cases, args.seed, root / "cases", log, args.timeout)[0]
        print(f"{fmt}: {args.cases} cases in {time.monotonic() - start:.0f} s", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    print(f"{len(failures)} failures")
    for f in failures:
        print(f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
