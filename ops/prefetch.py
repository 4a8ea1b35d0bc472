"""A software prefetch for the linear kernels' weight streams.

`prefetch_rows(w, n, n_bytes)` asks the CPU to bring the rows of `w` that start `n_bytes` past row n
into its L2 cache (x86 `prefetcht1`, ARM `prfm pldl2keep`), one request per 64-byte line of one row;
`emit_prefetch_l2` is the same request for one line, for intrinsics that stream their rows
(hy_edge_ops.dot prefetches AHEAD bytes on in the row it reads, line by line). A hint only: it never
faults, changes no result, and compiles to nothing where a CPU has no prefetch.

Why: a thread of the one-token GEMV reads its rows as one sequential stream, but hardware prefetchers
do not cross a 4 KiB page boundary and have to find the stream again on each page (a 1 KiB row of
Hunyuan-0.5B is a quarter page). The decode's 169 GEMVs and the head, read from memory on 2 threads of
a Zen 4 host: 18.7 ms without, 15.6 ms with the rows 8 KiB ahead (4 or 16 KiB ahead: 16.4 ms; into L1
instead of L2, 4 KiB ahead: 19.1 ms); on 1 thread 41.7 against 28.9 ms. The prefill kernel prefetches
its next 4-row block with `prefetch_rows` (a 128-token prefill: 626 -> 593 ms).
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

AHEAD = 8192  # bytes past the row being read
_LINE = 64


def emit_prefetch_l2(builder, ptr) -> None:
    """llvm.prefetch(address, read, locality 2 = keep in L2 and out, data cache) of the byte at `ptr`,
    for intrinsics that stream their own rows (hy_edge_ops.dot)."""
    # LLVM's pointers are opaque (typed pointers are gone since LLVM 17): the intrinsic takes any `ptr`
    # as it is, under its opaque-pointer name (the typed `.p0i8` name parses only through auto-upgrade)
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [ir.PointerType(), i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [ptr, i32(0), i32(2), i32(1)])


@intrinsic
def _prefetch_l2(typingctx, arr, offset):
    # the prefetch of arr's byte `offset`
    sig = types.void(arr, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        emit_prefetch_l2(builder, builder.gep(ary.data, [args[1]], source_etype=ir.IntType(8)))  # byte offset
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def prefetch_rows(w, n, n_bytes):
    # one row's worth of lines, n_bytes past the start of row n of a C-contiguous (N, K) array, clamped
    # to the array's last row
    row = w.shape[1] * w.itemsize
    ahead = max(1, n_bytes // row)
    start = min(n + ahead, w.shape[0] - 1) * row
    for off in range(0, row, _LINE):
        _prefetch_l2(w, start + off)
