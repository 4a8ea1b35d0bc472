"""`--max-memory` means the process (issue 9, case 4): the runtime's own overhead is part of the plan,
both backends refuse what does not fit with the numbers in the message, a run under a budget stays
under it, and a budget that shortens the context says so once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hy_edge_format.errors import BudgetError
from runtime_helpers import converted, make_seed_checkpoint
from serve_helpers import seconds
from smaps import mapped_kb, matrices_kb

import edge_runtime
from edge_runtime.engine import memory
from edge_runtime.engine.memory import (
    BUDGET_FRACTION,
    FALLBACK_BUDGET,
    MB,
    RUNTIME_OVERHEAD,
    WARMUP_OVERHEAD,
    default_budget,
)


@pytest.fixture(scope="module")
def model_file(hunyuan_f32_dir):
    return converted(hunyuan_f32_dir, "e4m3")


def run_json(model_file, tmp_path, *args) -> subprocess.CompletedProcess:
    prompt = tmp_path / "p.txt"
    prompt.write_text("Hello there, how are you today?")
    cmd = [sys.executable, "-m", "edge_runtime", "run", str(prompt), "--model", str(model_file), "--json", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("backend", ["numba", "onnxruntime"])
def test_a_run_under_a_budget_stays_under_it(model_file, tmp_path, backend):
    # the runtime's measured figures (memory.RUNTIME_OVERHEAD while generating, WARMUP_OVERHEAD while the kernels
    # load) hold: a process planned from them stays under them
    budget_mb = max(RUNTIME_OVERHEAD[backend], WARMUP_OVERHEAD[backend]) // MB + 40
    r = run_json(model_file, tmp_path, "--backend", backend, "--max-memory", f"{budget_mb}MB", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["peak_rss_mb"] <= budget_mb


@pytest.mark.parametrize("backend", ["numba", "onnxruntime"])
def test_both_backends_refuse_what_does_not_fit_with_numbers(model_file, tmp_path, backend):
    # a budget that holds the weights and buffers of this 0.2 MB model but not the runtime itself
    r = run_json(model_file, tmp_path, "--backend", backend, "--max-memory", "20MB")
    assert r.returncode == 2  # before: numba ran at ~200 MB peak; onnxruntime ignored the budget
    line = r.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("hy-edge: error: memory budget 20.00 MB is too small")
    for word in ("needs", "weights", "KV cache", "per 1k tokens", "runtime ~"):
        assert word in line, line


def test_onnxruntime_honours_max_context(model_file):
    s = edge_runtime.load(model_file, backend="onnxruntime").session(max_context=8)
    assert s.max_context == 8  # before: the model's limit, whatever was asked
    with pytest.raises(BudgetError):
        s.forward(list(range(9)))


def test_budget_shortening_the_context_is_said_once(model_file, tmp_path):
    model = edge_runtime.load(model_file)
    plan = model.session(max_context=16).plan
    budget = plan.total(100)
    with pytest.warns(UserWarning, match="allows a context of 100 tokens"):
        s = model.session(max_memory=budget)
    assert s.max_context == 100
    r = run_json(model_file, tmp_path, "--max-memory", str(budget), "--max-tokens", "2")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("hy-edge: note:")]
    assert len(notes) == 1 and "allows a context of 100 tokens" in notes[0]


# -- the default budget: what the machine has (issue 11: Pi 5 boards ship with 2 to 16 GB) --------------

GB = 1024**3


def fake_machine(root, available_kb: int, cgroup: str, limits: dict[str, str]):
    """A /proc (meminfo, self/cgroup) and a /sys/fs/cgroup with the given limit files."""
    proc, fs = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:  8000000 kB\nMemFree:  123456 kB\nMemAvailable:  {available_kb} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    for name, value in limits.items():
        (fs / name).parent.mkdir(parents=True, exist_ok=True)
        (fs / name).write_text(value + "\n")
    return proc, fs


def test_default_budget_is_a_fraction_of_available_memory(tmp_path):
    proc, fs = fake_machine(tmp_path, 4 * 1024**2, "0::/user.slice/session-1.scope\n", {"user.slice/memory.max": "max"})
    assert default_budget(proc, fs) == int(BUDGET_FRACTION * 4 * GB) == 3 * GB


@pytest.mark.parametrize(
    "cgroup,limits",
    [
        # systemd's MemoryMax=1G on the service (cgroup v2), nothing on the slice
        ("0::/system.slice/hy-edge.service\n", {"system.slice/hy-edge.service/memory.max": str(GB)}),
        # a limit on an ancestor bounds the service too
        ("0::/a.slice/b.service\n", {"a.slice/memory.max": str(GB), "a.slice/b.service/memory.max": "max"}),
        # cgroup v1 (a container): the memory controller's limit; v1's "unlimited" is a huge number
        (
            "4:memory:/docker/abc\n0::/\n",
            {"memory/docker/abc/memory.limit_in_bytes": str(GB), "memory/memory.limit_in_bytes": str(2**63 - 4096)},
        ),
    ],
)
def test_default_budget_stays_within_the_cgroup_limit(tmp_path, cgroup, limits):
    proc, fs = fake_machine(tmp_path, 4 * 1024**2, cgroup, limits)
    assert default_budget(proc, fs) == int(BUDGET_FRACTION * GB)


def test_default_budget_without_proc_is_the_fallback(tmp_path):
    assert default_budget(tmp_path / "no-proc", tmp_path / "no-cgroup") == FALLBACK_BUDGET


def test_a_session_without_max_memory_uses_the_default_budget(model_file, monkeypatch):
    model = edge_runtime.load(model_file)
    monkeypatch.setattr(memory, "DEFAULT_BUDGET", model.session(max_context=16).plan.total(100))
    with pytest.warns(UserWarning, match="allows a context of 100 tokens"):
        assert model.session().max_context == 100


_LLVM_RESIDENT_KB = """
def llvm_kb(other=False):
    # resident kB of LLVM's library, or (other=True) of every other shared object's read-only mappings
    kb, mine = 0, False
    for line in open('/proc/self/smaps'):
        f = line.split()
        if not f[0].endswith(':'):
            so = len(f) >= 6 and 'w' not in f[1] and (f[5].endswith('.so') or '.so.' in f[5])
            mine = so and (('libllvmlite' in f[5]) != other)
        elif f[0] == 'Rss:' and mine:
            kb += int(f[1])
    return kb
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_session_unmaps_the_compiler_once_its_kernels_are_loaded(tmp_path):
    model_file = converted(make_seed_checkpoint(tmp_path / "seed"), "e4m3")  # no torch: runs on aarch64 too
    code = (
        _LLVM_RESIDENT_KB
        + """
import json, sys
import numba, numpy as np
import edge_runtime
model = edge_runtime.load(sys.argv[1])
libraries = llvm_kb(other=True)  # numpy, onnx, the interpreter...: what loading the model touched
s = model.session(max_context=64)
loaded = llvm_kb()  # after the warm-up, which loaded every kernel through LLVM
first = s.forward(np.arange(1, 9))
for t in range(4):
    s.forward(np.array([t + 1]))
decoded = llvm_kb()
libraries_decoding = llvm_kb(other=True)
s.reset()
again = s.forward(np.arange(1, 9))
double = numba.njit(lambda a: (a * 2.0).sum())  # a kernel compiled after the release
print(json.dumps([loaded, decoded, bool(np.array_equal(first, again)), float(double(np.arange(10.0))), llvm_kb(),
                  libraries, libraries_decoding]))
"""
    )
    before = subprocess.run(
        [sys.executable, "-c", _LLVM_RESIDENT_KB + "import numba\nnumba.njit(lambda a: a + 1)(1)\nprint(llvm_kb())"],
        capture_output=True,
        text=True,
        timeout=seconds(300),
    )
    cmd = [sys.executable, "-c", code, str(model_file)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds(600))
    assert before.returncode == 0 and r.returncode == 0, before.stderr + r.stderr
    compiling = int(before.stdout)  # LLVM's resident pages in a process that compiled one function
    loaded, decoded, same, doubled, after_compile, libraries, libraries_decoding = json.loads(r.stdout)
    assert compiling > 20_000  # kB: tens of MB of compiler code and tables
    assert loaded < compiling / 20 and decoded < compiling / 20, (compiling, loaded, decoded)  # released, and stays
    # the other libraries' pages went too, and only what decoding runs came back (x86-64: 29 MB -> 10)
    assert libraries_decoding < libraries / 2, (libraries, libraries_decoding)
    assert same and doubled == 90.0  # the model and the compiler still work
    assert after_compile > loaded  # compiling maps the pages back in


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_embedding_rows_are_read_from_the_file_not_through_the_map(tmp_path):
    import numpy as np
    from hy_edge_format.errors import ModelFileError

    from edge_runtime.engine.weights import RowReader

    rng = np.random.default_rng(0)
    table = rng.integers(0, 1 << 16, (4096, 1024), dtype=np.uint16)  # 8 MB of fp16 rows after a 64 KiB header
    path = tmp_path / "model.onnx.data"
    path.write_bytes(b"\0" * 65536 + table.tobytes())
    mapped = np.memmap(path, dtype=np.uint8, mode="r")[65536:].view(np.ndarray).view(np.uint16).reshape(table.shape)
    reader = RowReader(mapped, (path, 65536))
    ids = rng.integers(0, 4096, 300)
    out = np.empty((512, 1024), np.uint16)
    rows = reader.read(ids, out)
    assert rows.shape == (300, 1024) and np.array_equal(rows, table[ids])
    assert mapped_kb(path) == 0  # through the map, each row brought in up to 64 KiB around it
    np.asarray(mapped[ids[:50]]).sum()
    assert mapped_kb(path) > 50 * 4  # (the measure sees a gather through the map)
    in_memory = RowReader(table).read(ids[:7], out)
    assert np.array_equal(in_memory, table[ids[:7]])
    with open(path, "r+b") as f:
        f.truncate(65536 + 100 * 2048)
    with pytest.raises(ModelFileError, match="embedding row"):
        reader.read(np.array([3000]), out)


def test_blank_weights_are_typed_as_the_weights_and_hold_zeros(tmp_path):
    import numba

    model = edge_runtime.load(converted(make_seed_checkpoint(tmp_path / "seed"), "e4m3"))
    w, blank = model.weights, model.weights.blank()
    pairs = list(zip(w.unique_linears(), blank.unique_linears(), strict=True))
    assert len(pairs) > 1
    for real, zero in pairs:
        assert numba.typeof(zero.w) == numba.typeof(real.w), real.name  # the same kernel specializations
        assert zero.w.shape == real.w.shape and not zero.w.any() and real.w.any()
        assert zero.scales is real.scales
    assert blank.lm_head is None and blank.output is blank.embed


_START_UP = """
import json, sys
import edge_runtime

def status():
    lines = open('/proc/self/status').read().splitlines()
    return {l.split(':')[0]: int(l.split()[1]) // 1024 for l in lines if l.startswith(('VmRSS', 'VmHWM'))}

model = edge_runtime.load(sys.argv[1])
loaded = status()
s = model.session(max_context=64)
print(json.dumps([loaded, status(), model.weights.nbytes // 2**20]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_session_start_up_peaks_at_its_settled_memory(tmp_path):
    # 73 MB of FP8 weights, more than LLVM's ~70 MB resident while the warm-up loads the kernels: were the
    # two resident together (a warm-up on the real weights), the start-up peak would pass the settled RSS
    # by about LLVM's share (66 MB on x86-64)
    src = make_seed_checkpoint(tmp_path / "seed", hidden_size=1024, intermediate_size=6144, num_hidden_layers=4)
    model_file = converted(src, "e4m3")
    r = subprocess.run(
        [sys.executable, "-c", _START_UP, str(model_file)], capture_output=True, text=True, timeout=seconds(600)
    )
    assert r.returncode == 0, r.stderr
    loaded, opened, weights_mb = json.loads(r.stdout)
    assert weights_mb >= 70
    assert opened["VmRSS"] - loaded["VmRSS"] >= 0.9 * weights_mb  # the weights are resident after the check
    assert opened["VmHWM"] - opened["VmRSS"] < 16, (loaded, opened)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_session_keeps_only_its_matrices_of_the_data_file_resident(tmp_path):
    from pathlib import Path

    import numpy as np

    from edge_runtime.engine.weights import _mapping

    # MLP matrices of 132 KiB at 64 KiB-aligned offsets (60 KiB of padding after each) and an embedding the
    # forward pass reads row by row: the pages mapped around each fault made them resident with the
    # matrices, once the file is in the page cache (as after its checksum was verified)
    seed = make_seed_checkpoint(tmp_path / "seed", seed=3, hidden_size=128, intermediate_size=1056)
    model = edge_runtime.load(converted(seed, "e4m3"))
    Path(_mapping(model.weights.output.w).filename).read_bytes()
    session = model.session(max_context=32)
    first = session.forward(np.arange(1, 9))
    session.forward(np.array([3]))
    matrices = matrices_kb(model.weights)
    data = _mapping(model.weights.output.w)
    assert data is not None and data.nbytes > 1.3 * matrices * 1024
    assert 0 < mapped_kb(data.filename) <= matrices  # before: the whole file
    session.reset()
    assert np.array_equal(session.forward(np.arange(1, 9)), first)


def _cache_in_large_folios(path) -> bool:
    """Evict `path` from the page cache and read it back through a mapping that asks for huge pages:
    a kernel and filesystem with large folios (ext4 and xfs on Linux 6.16+) then cache it in 2 MB folios,
    as after any cold read. False where the mapping shows no 2 MB mapping (no large folios here)."""
    import mmap
    import os

    import numpy as np

    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
        view = np.frombuffer(mm, np.uint8)
        int(view[:: mmap.PAGESIZE].sum())
        pmd = mapped_kb(path, "FilePmdMapped:")
        del view
        return pmd > 0
    finally:
        mm.close()


_LARGE_FOLIOS = """
import json, sys
import numpy as np
import edge_runtime
from edge_runtime.engine.weights import _mapping
sys.path.insert(0, sys.argv[2])
from smaps import mapped_kb, matrices_kb

def status():
    lines = open('/proc/self/status').read().splitlines()
    return {l.split(':')[0]: int(l.split()[1]) // 1024 for l in lines if l.startswith(('VmRSS', 'VmHWM'))}

model = edge_runtime.load(sys.argv[1])
s = model.session(max_context=64)
opened = status()
s.forward(np.arange(1, 9))
s.forward(np.array([3]))
data = _mapping(model.weights.output.w).filename
print(json.dumps([opened, mapped_kb(data), matrices_kb(model.weights)]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_page_cache_of_large_folios_maps_only_the_matrices(tmp_path):
    # a first touch of any byte of a cached 2 MB folio mapped all of it: the scales and norms read through
    # the map while the kernels loaded made the matrices resident beside LLVM (start-up peak 54 MB above
    # the settled RSS on this model), and every later fault brought the padding back (SmolLM2-135M:
    # 148 MB of its data file resident against 128 of matrices)
    src = make_seed_checkpoint(tmp_path / "seed", hidden_size=1024, intermediate_size=6144, num_hidden_layers=4)
    model_file = converted(src, "e4m3")
    from pathlib import Path

    if not _cache_in_large_folios(str(model_file) + ".data"):
        pytest.skip("this kernel and filesystem cache no 2 MB folios")
    r = subprocess.run(
        [sys.executable, "-c", _LARGE_FOLIOS, str(model_file), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=seconds(600),
    )
    assert r.returncode == 0, r.stderr
    opened, data, matrices = json.loads(r.stdout)
    assert matrices >= 70 * 1024
    assert opened["VmHWM"] - opened["VmRSS"] < 16, opened  # before: 54 MB above
    assert matrices * 0.95 <= data <= matrices + 1024, (data, matrices)
