"""A software prefetch for the linear kernels' weight streams.

`emit_prefetch_l2` asks the CPU to bring one 64-byte line into its L2 cache (x86 `prefetcht1`, ARM
`prfm pldl2keep`), for intrinsics that stream their rows (hy_edge_ops.dot prefetches AHEAD bytes on in the
row it reads, line by line). A hint only: it never faults, changes no result, and compiles to nothing
where a CPU has no prefetch.

Why: a thread of the one-token GEMV reads its rows as one sequential stream, but hardware prefetchers
do not cross a 4 KiB page boundary and have to find the stream again on each page (a 1 KiB row of
Hunyuan-0.5B is a quarter page). The decode's 169 GEMVs and the head, read from memory on 2 threads of
a Zen 4 host: 18.7 ms without, 15.6 ms with the rows 8 KiB ahead (4 or 16 KiB ahead: 16.4 ms; into L1
instead of L2, 4 KiB ahead: 19.1 ms); on 1 thread 41.7 against 28.9 ms. (The prefill GEMM, hy_edge_ops.gemm,
reads each row once per call into its float32 panel and needs none.)
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

AHEAD = 8192  # bytes past the row being read


def emit_prefetch_l2(builder, ptr) -> None:
    """llvm.prefetch(address, read, locality 2 = keep in L2 and out, data cache) of the byte at `ptr`,
    for intrinsics that stream their own rows (hy_edge_ops.dot)."""
    # LLVM's pointers are opaque (typed pointers are gone since LLVM 17): the intrinsic takes any `ptr`
    # as it is, under its opaque-pointer name (the typed `.p0i8` name parses only through auto-upgrade)
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [ir.PointerType(), i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [ptr, i32(0), i32(2), i32(1)])
