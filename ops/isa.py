"""The vector ISA numba compiles our kernels for, and the register blocks chosen for it.

The kernels' shapes (lanes per accumulator, rows x tokens per block) follow the vector registers of the
code numba emits, not the CPU's /proc/cpuinfo: numba compiles for the host unless NUMBA_CPU_NAME /
NUMBA_CPU_FEATURES name another CPU (portable caches, or AVX2 code measured on an AVX-512 host), and
with NUMBA_CPU_NAME alone it still passes the host's features to LLVM.

- avx512: 32 registers of 512 bits (x86 with AVX-512F);
- avx2:   16 registers of 256 bits (x86 with AVX2 and FMA, no AVX-512: most laptops, desktops, VMs);
- neon:   32 registers of 128 bits (aarch64: the Raspberry Pi 5's Cortex-A76);
- generic: anything else (SSE-only x86, other architectures): the neon shapes, whatever LLVM makes of them.

`codegen_env(isa)` gives the environment that makes numba compile for a narrower x86 ISA on this host
(`make bench ISA=avx2`, and the tests that check the AVX2 kernels on an AVX-512 machine).
"""

from __future__ import annotations

import platform

from llvmlite import binding as llvm

ISAS = ("avx512", "avx2", "neon", "generic")
_WIDE_X86 = ("avx512", "avx10", "amx", "evex512")  # feature families an AVX2 build must not use


def _features() -> dict[str, bool]:
    # what numba hands LLVM: NUMBA_CPU_FEATURES when set, else the host's (numba.core.codegen)
    from numba.core import config

    if config.CPU_FEATURES is not None:
        out = {}
        for item in config.CPU_FEATURES.split(","):
            item = item.strip()
            if item[:1] in "+-" and len(item) > 1:
                out[item[1:]] = item[0] == "+"
        return out
    feats = dict(llvm.get_host_cpu_features())
    if not config.ENABLE_AVX:  # numba drops every avx* feature then
        feats = {k: v and not k.startswith("avx") for k, v in feats.items()}
    return feats


def _detect() -> str:
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "neon"
    if machine not in ("x86_64", "amd64"):
        return "generic"
    f = _features()
    if f.get("avx512f"):
        return "avx512"
    if f.get("avx2") and f.get("fma"):
        return "avx2"
    return "generic"


def has_feature(name: str) -> bool:
    """Whether the code numba emits may use the LLVM target feature `name` (e.g. "avx512vnni")."""
    return bool(_features().get(name))


ISA = _detect()
VECTOR_BITS = {"avx512": 512, "avx2": 256, "neon": 128, "generic": 128}[ISA]


def codegen_env(isa: str) -> dict[str, str]:
    """Environment variables under which numba compiles for `isa` on this x86 host ({} for the host's
    own ISA). Only narrowing is possible: "avx2" on an AVX-512 host keeps the host CPU's tuning and
    turns off every AVX-512 feature. Raises ValueError for an ISA this host cannot run."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    if isa == ISA:
        return {}
    if isa != "avx2" or ISA != "avx512":
        raise ValueError(f"cannot compile for {isa} on this {ISA} host")
    feats = dict(llvm.get_host_cpu_features())
    flat = ",".join(("-" if k.startswith(_WIDE_X86) or not v else "+") + k for k, v in sorted(feats.items()))
    return {"NUMBA_CPU_NAME": llvm.get_host_cpu_name(), "NUMBA_CPU_FEATURES": flat}
