"""The compiled layer loop (edge_runtime/engine/layers.py) runs the same kernels in the same order as the Python loop
of NumbaSession: every logit must be bit-identical, for prefill chunks, decode steps and batched steps."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from runtime_helpers import PROMPT_IDS, converted

import edge_runtime
from edge_runtime.engine.numba_session import NumbaSession


# Hunyuan in FP8 and in float; Gemma 3 for what only it has (sandwich norms, sliding windows on their own
# RoPE tables, a scaled embedding, GeGLU)
@pytest.fixture(
    scope="module", params=[("hunyuan_f32_dir", "e4m3"), ("hunyuan_f32_dir", "none"), ("gemma3_dir", "e4m3")]
)
def model(request):
    src, fmt = request.param
    return edge_runtime.load(converted(request.getfixturevalue(src), fmt, lm_head_fp8=fmt != "none"))


def sessions(model, **kw):
    fast = NumbaSession(model.spec, model.weights, compiled=True, **kw)
    slow = NumbaSession(model.spec, model.weights, compiled=False, **kw)
    assert fast._compiled is not None and slow._compiled is None
    return fast, slow


def test_prefill_and_decode_bit_identical(model):
    fast, slow = sessions(model, prefill_chunk=16)
    ids = np.asarray(PROMPT_IDS)
    np.testing.assert_array_equal(fast.forward(ids, all_logits=True), slow.forward(ids, all_logits=True))
    for t in (3, 7, 1):  # decode steps, and a short chunk below the prefill kernel's threshold
        np.testing.assert_array_equal(fast.forward(ids[:t]), slow.forward(ids[:t]))


def test_batched_step_bit_identical(model):
    fast, slow = sessions(model, slots=3)
    for s in (fast, slow):
        for slot in range(3):
            s.forward(np.asarray(PROMPT_IDS[slot : slot + 5]), slot=slot)
    for step in range(3):
        ids, slots = [5 + step, 9, 11], [2, 0, 1]
        np.testing.assert_array_equal(fast.decode_batch(ids, slots), slow.decode_batch(ids, slots))


def test_a_model_the_compiled_loop_cannot_run_says_so_once(hunyuan_f32_dir, tmp_path):
    """A dwconv model runs the Python layer loop, and the session says so (a warning the CLI prints as one
    note line); an attention-only model says nothing."""
    import warnings

    from click.testing import CliRunner
    from runtime_helpers import make_seed_checkpoint

    from edge_runtime.cli import main
    from edge_runtime.engine.backend import PythonLayerLoop

    with warnings.catch_warnings():
        warnings.simplefilter("error", PythonLayerLoop)
        assert edge_runtime.load(converted(hunyuan_f32_dir, "e4m3")).session()._compiled is not None
    src = make_seed_checkpoint(
        tmp_path / "seed", tokenizer_from=hunyuan_f32_dir, layer_types=["dwconv", "attention", "dwconv", "attention"]
    )
    conv = converted(src, "e4m3")
    with pytest.warns(PythonLayerLoop, match=r"cannot run this model \(dwconv layers\)"):
        assert edge_runtime.load(conv).session()._compiled is None
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    r = CliRunner().invoke(main, ["run", str(prompt), "--model", str(conv), "--max-tokens", "2", "--raw"])
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.stderr.splitlines() if "compiled layer loop" in ln]
    assert notes == ["hy-edge: note: the compiled layer loop cannot run this model (dwconv layers): the Python layer "
                     "loop does, about 1.3 ms slower per token"]  # fmt: skip


_COMPILED_AT_START = r"""
import gc, json, sys
import edge_runtime
from numba.core.registry import CPUDispatcher

session = edge_runtime.load(sys.argv[1]).session()
assert session._compiled is not None
# every kernel a session start needed and did not find in the JIT cache (uncached ones included)
missed = [f"{d.py_func.__module__}.{d.py_func.__qualname__}" for d in gc.get_objects()
          if isinstance(d, CPUDispatcher) and sum(d.stats.cache_misses.values())]
print(json.dumps(sorted(missed)))
"""


def test_a_session_start_compiles_nothing_once_the_cache_is_warm(hunyuan_f32_dir):
    """Starting a session on a warm JIT cache loads every kernel from it: nothing is compiled in the
    process (numba's typed.List([...]) from Python used to compile its helpers at every start)."""
    path = converted(hunyuan_f32_dir, "e4m3", lm_head_fp8=True)

    def start() -> list[str]:
        proc = subprocess.run(
            [sys.executable, "-c", _COMPILED_AT_START, str(path)], capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    start()  # warms the cache for this model's shapes if this run has not yet
    assert start() == []
