"""The kernels release the GIL: while the engine's thread runs a prefill piece or a batched decode step, another
Python thread (the server's HTTP thread: /health, accepting, streaming) runs too.

Every compiled kernel that the numba session calls from Python during a prefill and a batched decode step (the
compiled layer loop and the head; or, on the Python layer loop, each linear, attention, norm and activation
kernel) is recorded with its arguments, then called again while a second thread counts. Python's switch
interval is raised for the check, so a thread holding the GIL keeps it until it releases it: without
`nogil=True` the counter cannot move between the two reads around a kernel call, on any machine, however
slow (numpy calls between kernels release the GIL, which is why the kernels are called alone). With it, the
counter moves during one of the calls (the counting thread sleeps 0.5 ms between iterations; the call is
repeated until it has moved or PATIENCE has passed: a bound on the loop, not a time the test measures)."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from hy_edge_ops import activation, attention, blockq, conv, fp8, gemm, linear, norm, rope
from numba.core.registry import CPUDispatcher
from runtime_helpers import converted
from serve_helpers import seconds

import edge_runtime
from edge_runtime.engine import layers
from edge_runtime.engine.numba_session import NumbaSession

PATIENCE = seconds(3)
MODULES = (layers, linear, gemm, attention, norm, activation, conv, rope, blockq, fp8)


def _others_run_during(kernel, args) -> bool:
    """Whether a second thread advanced its counter while `kernel(*args)` ran, in one of the calls."""
    count, done = [0], threading.Event()

    def counter() -> None:
        while not done.is_set():
            count[0] += 1
            time.sleep(0.0005)  # releases the GIL; taking it back needs the caller to have released it

    thread = threading.Thread(target=counter, daemon=True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)  # no forced hand-over: the GIL changes hands only where it is released
    try:
        thread.start()
        while count[0] == 0:
            time.sleep(0.001)
        end = time.monotonic() + PATIENCE
        while True:
            before = count[0]
            kernel(*args)
            if count[0] != before:
                return True
            if time.monotonic() > end:
                return False
    finally:
        sys.setswitchinterval(interval)
        done.set()
        thread.join()


@pytest.fixture(scope="module")
def model(llama_dir):
    return edge_runtime.load(converted(llama_dir, "e4m3"), threads=1)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-layers", "python-layers"])
def test_every_kernel_of_a_prefill_and_a_decode_step_lets_other_threads_run(model, compiled, monkeypatch):
    session = NumbaSession(model.spec, model.weights, slots=2, max_context=160, threads=1, compiled=compiled)
    assert (session._compiled is not None) == compiled  # both layer loops of the numba session are covered
    calls: dict[str, tuple] = {}  # kernel name -> (dispatcher, the arguments of its first call from Python)
    for module in MODULES:
        for name, fn in list(vars(module).items()):
            if isinstance(fn, CPUDispatcher):

                def record(*args, _fn=fn, _name=f"{module.__name__}.{name}"):
                    calls.setdefault(_name, (_fn, args))
                    return _fn(*args)

                monkeypatch.setattr(module, name, record)
    prompt = np.arange(128, dtype=np.int64) % model.spec.vocab_size
    session.forward(prompt, slot=0)  # a prefill piece
    session.forward(prompt[:16], slot=1)
    session.decode_batch(np.array([1, 2], np.int64), np.array([0, 1], np.int64))  # a batched decode step
    monkeypatch.undo()
    expected = {"edge_runtime.engine.layers.forward_layers"} if compiled else {"hy_edge_ops.gemm.mm_prefill"}
    assert expected <= calls.keys() and "hy_edge_ops.linear._mm" in calls
    held = [name for name, (fn, args) in sorted(calls.items()) if not _others_run_during(fn, args)]
    assert not held, f"these kernels hold the GIL from start to end: {', '.join(held)}"
