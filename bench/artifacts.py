"""What the bench measures, built once into bench/out (git-ignored) and reused:

- the random Hunyuan-0.5B checkpoint (bench/make_random_hunyuan.py) and its hy-edge conversions, one per
  variant (label, QuantPolicy fields);
- the llama.cpp GGUFs (Q8_0, F16), written by llama.cpp's own convert_hf_to_gguf.py from the
  llama-cpp-python sdist of the pinned version, extracted here at bench time;
- the synthetic tokenizer that converter needs (see `write_gguf_tokenizer`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
LLAMA_CPP_PYTHON = "0.3.36"  # the `bench` extra pins the same version
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
VOCAB = 120818  # Hunyuan-0.5B-Instruct


class ArtifactError(Exception):
    """An artifact could not be built; the message is one line for the user."""


def checkpoint(layers: int = 24) -> Path:
    ckpt = OUT / ("hunyuan-0.5b-random" if layers == 24 else f"hunyuan-0.5b-random-{layers}l")
    if not (ckpt / "model.safetensors").exists():
        cmd = [sys.executable, str(HERE / "make_random_hunyuan.py"), str(ckpt), "--layers", str(layers)]
        subprocess.run(cmd, check=True)
    return ckpt


def hy_edge_model(ckpt: Path, policy_fields: dict) -> Path:
    """The hy-edge conversion of `ckpt` under QuantPolicy(**policy_fields), cached under a name derived from
    the full policy (defaults included), so a changed converter default or variant list converts again."""
    from hy_edge_convert import QuantPolicy, convert

    policy = QuantPolicy(**policy_fields)
    stamp = json.dumps(dataclasses.asdict(policy), sort_keys=True)
    model = ckpt.parent / f"{ckpt.name}.{hashlib.sha1(stamp.encode()).hexdigest()[:10]}.onnx"
    data = Path(str(model) + ".data")
    source = ckpt if ckpt.is_file() else ckpt / "model.safetensors"  # a GGUF file, or a checkpoint directory
    if model.exists() and data.exists() and model.stat().st_mtime >= source.stat().st_mtime:
        return model
    report = convert(ckpt, model, policy)
    Path(str(model) + ".policy.json").write_text(stamp + "\n")  # what the hashed name stands for
    size = (report.onnx_bytes + report.data_bytes) / 1e6
    print(f"converted {ckpt.name} -> {model.name}: {size:.0f} MB in {report.seconds:.1f} s", file=sys.stderr)
    return model


def llama_cpp_source() -> Path:
    """vendor/llama.cpp of the pinned sdist, extracted under bench/out (pip downloads the sdist if absent)."""
    root = OUT / SDIST / "vendor" / "llama.cpp"
    if (root / "convert_hf_to_gguf.py").exists():
        return root
    archive = OUT / f"{SDIST}.tar.gz"
    if not archive.exists():
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(OUT)]
        r = subprocess.run([*cmd, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], capture_output=True, text=True)
        if r.returncode != 0 or not archive.exists():
            raise ArtifactError(f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (pip download)")
    prefix = f"{SDIST}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
    tmp = OUT / f"{SDIST}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = [
            m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
        ]
        tar.extractall(tmp, members=members, filter="data")
    shutil.rmtree(OUT / SDIST, ignore_errors=True)
    os.replace(tmp / SDIST, OUT / SDIST)
    tmp.rmdir()
    return root


# llama.cpp's CPU backend for an AVX2 machine (no AVX-512): the same version built with its native tuning
# off and the x86 features an AVX2 + FMA CPU has (Haswell and later, AMD Zen 1-3)
LLAMA_CPP_CMAKE = {
    "avx2": "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
    "-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF",
}


def llama_cpp_site(isa: str) -> Path | None:
    """A directory to put first on PYTHONPATH so that `import llama_cpp` loads llama-cpp-python built for
    `isa` (built once into bench/out, about 5 minutes); None: the installed build (the host's own ISA)."""
    if isa not in LLAMA_CPP_CMAKE:
        return None
    site = OUT / f"llama-cpp-python-{LLAMA_CPP_PYTHON}-{isa}"
    if (site / "llama_cpp" / "__init__.py").exists():
        return site
    tmp = OUT / f"{site.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"building llama-cpp-python {LLAMA_CPP_PYTHON} for {isa} into {site} (once, about 5 minutes)", file=sys.stderr
    )
    env = {**os.environ, "CMAKE_ARGS": LLAMA_CPP_CMAKE[isa], "FORCE_CMAKE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-cache-dir",
        "--no-binary",
        "llama-cpp-python",
    ]
    r = subprocess.run([*cmd, "--target", str(tmp), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], env=env,
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0 or not (tmp / "llama_cpp" / "__init__.py").exists():
        (OUT / f"llama-cpp-python-{isa}.log").write_text(r.stdout + r.stderr)
        raise ArtifactError(f"llama-cpp-python did not build for {isa} (see bench/out/llama-cpp-python-{isa}.log)")
    os.replace(tmp, site)
    return site


def llama_server(isa: str | None = None) -> Path:
    """llama.cpp's own `llama-server` of the pinned sdist, built once into bench/out (about 10 minutes on 2
    cores): tuned for this host (GGML_NATIVE, as the installed llama-cpp-python), or for `isa` with the
    flags of LLAMA_CPP_CMAKE."""
    where = OUT / f"llama-server-{LLAMA_CPP_PYTHON}-{isa or 'native'}"
    binary = where / "llama-server"
    if binary.exists():
        return binary
    llama_cpp_source()  # the sdist, downloaded if absent
    src, build = OUT / f"{SDIST}-full", OUT / f"{where.name}.build"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        shutil.rmtree(src, ignore_errors=True)
        with tarfile.open(OUT / f"{SDIST}.tar.gz") as tar:
            tar.extractall(OUT / f"{SDIST}.unpack", filter="data")
        os.replace(OUT / f"{SDIST}.unpack" / SDIST, src)
        (OUT / f"{SDIST}.unpack").rmdir()
    print(f"building llama-server {LLAMA_CPP_PYTHON} ({isa or 'native'}) into {where} (once, ~10 minutes)",
          file=sys.stderr)  # fmt: skip
    flags = LLAMA_CPP_CMAKE[isa].split() if isa else ["-DGGML_NATIVE=ON"]
    configure = [
        "cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF",
        "-DBUILD_SHARED_LIBS=OFF", *flags,
    ]  # fmt: skip
    log = OUT / f"{where.name}.log"
    with open(log, "w") as f:
        for cmd in (configure, ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count())]):
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise ArtifactError(f"llama-server did not build (see {log})")
    built = build / "bin" / "llama-server"
    if not built.exists():
        raise ArtifactError(f"llama-server did not build (see {log})")
    tmp = OUT / f"{where.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(built, tmp / "llama-server")
    os.replace(tmp, where)
    shutil.rmtree(build, ignore_errors=True)
    return binary


def write_gguf_tokenizer(directory: Path) -> None:
    """A tokenizer the converter's HunYuanDenseV1 class accepts, for a checkpoint that has none.

    That class reads tokenizer.json through transformers and identifies the pre-tokenizer by hashing
    the ids of a fixed test string; an invented BPE matches no known hash and the converter stops. So
    this is SmolLM2's byte-level BPE (49,152 tokens, read from the bundled default model's GGUF), whose
    hash the converter knows ("smollm"); the converter pads the list to the config's 120,818 ids with
    unused [PADn] tokens, so the GGUF's vocabulary, embedding and output matrix have Hunyuan's size.
    Only the tokenizer differs from Hunyuan's, and the bench feeds token ids, never text."""
    from transformers import AutoTokenizer

    from edge_runtime.cli.model import default_gguf

    gguf = default_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = directory.parent / f"{directory.name}.tok.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, directory / f.name)
    tmp.rmdir()


def gguf_source(ckpt: Path) -> Path:
    """`ckpt`'s weights and config (symlinked) plus the synthetic tokenizer, in a sibling directory so the
    hy-edge conversions of `ckpt` stay tokenizer-free."""
    src = ckpt.parent / f"{ckpt.name}-gguf-src"
    src.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        link = src / name
        if not link.exists():
            link.symlink_to(ckpt.resolve() / name)
    if not (src / "tokenizer.json").exists():
        write_gguf_tokenizer(src)
    return src


def gguf(ckpt: Path, outtype: str) -> Path:
    """`ckpt` as a GGUF of `outtype` (q8_0, f16) via llama.cpp's convert_hf_to_gguf.py."""
    out = ckpt.parent / f"{ckpt.name}.{outtype}.gguf"
    if out.exists() and out.stat().st_mtime >= (ckpt / "model.safetensors").stat().st_mtime:
        return out
    converter = llama_cpp_source() / "convert_hf_to_gguf.py"
    src = gguf_source(ckpt)
    tmp = out.with_suffix(".partial")
    cmd = [sys.executable, str(converter), str(src), "--outtype", outtype, "--outfile", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not tmp.exists():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        (OUT / f"convert_hf_to_gguf.{outtype}.log").write_text(r.stdout + r.stderr)
        raise ArtifactError(f"convert_hf_to_gguf.py --outtype {outtype} failed: {last}")
    os.replace(tmp, out)
    print(f"converted {ckpt.name} -> {out.name}: {out.stat().st_size / 1e6:.0f} MB", file=sys.stderr)
    return out


def llama_cpp_quantize(src: Path, dst: Path, ftype: str) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize), requantizing if `src` is quantized."""
    import llama_cpp

    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL' if ftype == 'F32' else 'MOSTLY'}_{ftype}")
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    t0 = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        tmp.unlink(missing_ok=True)
        raise ArtifactError(f"llama.cpp could not quantize {src.name} to {ftype}")
    os.replace(tmp, dst)
    print(f"llama.cpp {ftype}: quantized in {time.perf_counter() - t0:.0f} s -> {dst.name}", file=sys.stderr)
    return dst


def gguf_quantized(ckpt: Path, ftype: str) -> Path:
    """`ckpt` in llama.cpp's quant type `ftype` (Q4_0, Q4_K_M, ...), made by llama.cpp's own quantizer from
    its F16 conversion."""
    return llama_cpp_quantize(gguf(ckpt, "f16"), ckpt.parent / f"{ckpt.name}.{ftype.lower()}.gguf", ftype)


def hy_edge_bytes_per_token(model: Path) -> int:
    """Weight bytes one decode step reads: every initializer once, except that a tied model with its own
    FP8 lm_head reads that instead of the FP16 embedding (decode gathers one embedding row)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    sizes = {}
    for t in proto.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data)
    total = sum(sizes.values())
    embed = [n for n in sizes if "embed_tokens" in n]
    head = [n for n in sizes if "lm_head" in n]
    if embed and head:
        total -= sum(sizes[n] for n in embed)
    return total


def gguf_bytes_per_token(path: Path) -> int:
    """Every tensor once (token_embd serves as the output matrix when there is no output.weight)."""
    sys.path.insert(0, str(llama_cpp_source() / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    total = sum(sizes.values())
    if "output.weight" in sizes:
        total -= sizes.get("token_embd.weight", 0)
    return total


def where_measured() -> dict:
    """When and on what a figure was measured: date, CPU, the kernels' vector ISA, the load before it."""
    from hy_edge_ops.isa import ISA

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else None
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return {"date": date, "machine": platform.machine(), "cpu": cpu, "isa": ISA, "load_average": load}


def write_json(out: Path, doc: dict) -> None:
    """Write a result file under a temporary name, then rename it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"written {out}")
