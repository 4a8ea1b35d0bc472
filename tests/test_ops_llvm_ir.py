"""The LLVM IR that hy_edge_ops writes by hand (hy_edge_ops.dot, .gemm, .prefetch, .half intrinsics) is in the
form the pinned LLVM reads as written: no intrinsic that only survives LLVM's auto-upgrade (typed-pointer
names such as `llvm.prefetch.p0i8`, renamed when the text is parsed) and no pointer-to-pointer bitcast
(a typed-pointer idiom: with opaque pointers a load or gep names its element type instead). A numba or
llvmlite release that drops the upgrade path or llvmlite's typed-pointer layer then breaks here, in a
named intrinsic, rather than in the kernels' bits.

Each intrinsic's codegen is run alone into a module of its own (numba's CPU target context, no
compile), so only our instructions are checked: numba's own IR still uses typed-pointer forms."""

from __future__ import annotations

import pytest
from hy_edge_ops import dot, gemm, half
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core.registry import cpu_target


def _arr(dtype, ndim: int = 2) -> types.Array:
    return types.Array(dtype, ndim, "C")


def _row_dots(dtype, n_rows: int, n_toks: int) -> tuple:
    f32, ix = types.float32, types.intp
    return (
        dot.row_dots,
        (_arr(dtype), _arr(f32), ix, types.UniTuple(ix, n_rows), _arr(f32), types.UniTuple(ix, n_toks), ix),
    )


# intrinsic, its argument types: every specialization the kernels use (stored types, row x token blocks;
# row_dots emits hy_edge_ops.prefetch's line prefetch)
CASES = {
    **{
        f"row_dots-{d}-{r}x{t}": _row_dots(getattr(types, d), r, t)
        for d in ("int8", "uint8", "uint16", "float32")
        for r, t in ((1, 1), (1, 2), (2, 4))
    },
    **{
        f"gemm-{name}": (
            fn,
            (
                _arr(types.float32),
                types.intp,
                _arr(types.float32, 3),
                types.intp,
                _arr(types.float32),
                types.intp,
                types.intp,
                types.intp,
                types.intp,
                _arr(types.float32),
            ),
        )
        for name, fn in (("tile", gemm._tile), ("tile1", gemm._tile1))
    },  # fmt: skip
    **{
        f"gemm-dequantize-{d}": (
            gemm._dequantize_vectors,
            (
                _arr(getattr(types, d)),
                types.intp,
                types.intp,
                types.intp,
                types.float32,
                types.float32,
                _arr(types.float32),
                types.intp,
            ),
        )
        for d in ("int8", "uint8", "uint16", "float32")
    },  # fmt: skip
    "half_bits_to_f32-uint16": (half._half_bits_to_f32, (types.uint16,)),
    "half_bits_to_f32-int32": (half._half_bits_to_f32, (types.int32,)),
    "f32_to_half_bits-float32": (half._f32_to_half_bits, (types.float32,)),
    "f32_to_half_bits-float64": (half._f32_to_half_bits, (types.float64,)),
    "bits_to_f32-int32": (half._bits_to_f32, (types.int32,)),
    "bits_to_f32-int64": (half._bits_to_f32, (types.int64,)),
    "bits_to_f32-uint8": (half._bits_to_f32, (types.uint8,)),
}


def emit(intrinsic, argtypes: tuple) -> ir.Module:
    """A module holding one function whose body is the intrinsic's codegen for `argtypes`."""
    ctx, typing = cpu_target.target_context, cpu_target.typing_context
    sig, codegen = intrinsic._defn(typing, *argtypes)
    module = ir.Module("probe")
    module.triple = llvm.get_process_triple()
    fnty = ir.FunctionType(ctx.get_value_type(sig.return_type), [ctx.get_value_type(a) for a in sig.args])
    fn = ir.Function(module, fnty, "probe")
    builder = ir.IRBuilder(fn.append_basic_block())
    builder.ret(codegen(ctx, builder, sig, list(fn.args)))
    return module


def upgraded_names(module: ir.Module) -> list[str]:
    """Functions the module declares that LLVM renames when it parses the text (auto-upgrade: an
    intrinsic under an outdated, e.g. typed-pointer, name). The parsed module must also verify."""
    parsed = llvm.parse_assembly(str(module))
    parsed.verify()
    kept = {f.name for f in parsed.functions}
    return [f.name for f in module.functions if f.name not in kept]


def pointer_bitcasts(module: ir.Module) -> list[str]:
    """Bitcasts of a pointer to another pointer type in the module's instructions."""
    return [
        str(i).strip()
        for f in module.functions
        for block in f.blocks
        for i in block.instructions
        if isinstance(i, ir.CastInstr) and i.opname == "bitcast" and isinstance(i.operands[0].type, ir.PointerType)
    ]


def test_the_checks_see_the_deprecated_forms():
    # what ops/prefetch.py emitted before: a typed-pointer intrinsic name and an i8* bitcast
    module = ir.Module("old")
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    old = ir.Function(module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [ir.FloatType().as_pointer()]), "probe")
    builder = ir.IRBuilder(fn.append_basic_block())
    builder.call(old, [builder.bitcast(fn.args[0], i8p), i32(0), i32(2), i32(1)])
    builder.ret_void()
    assert upgraded_names(module) == ["llvm.prefetch.p0i8"]
    assert len(pointer_bitcasts(module)) == 1


@pytest.mark.parametrize("case", CASES)
def test_intrinsics_need_no_auto_upgrade(case):
    intrinsic, argtypes = CASES[case]
    module = emit(intrinsic, argtypes)
    assert upgraded_names(module) == []


@pytest.mark.parametrize("case", CASES)
def test_intrinsics_write_no_pointer_bitcasts(case):
    intrinsic, argtypes = CASES[case]
    assert pointer_bitcasts(emit(intrinsic, argtypes)) == []
