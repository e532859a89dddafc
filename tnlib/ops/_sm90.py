"""Compile Triton kernels for sm_90 (Hopper) without a GPU, and read their register use.

``triton.compile`` with a ``GPUTarget`` runs the whole GPU toolchain (frontend, MLIR passes, PTX,
ptxas) on any machine. ``tests/test_kernels_compile.py`` uses it to catch what the interpreter
accepts but the GPU compiler rejects; ``tools/kernel_registers.py`` uses :func:`ptxas_usage` to
report registers and spills per kernel configuration.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

BF16, FP32, I32 = "*bf16", "*fp32", "*i32"


def compile_sm90(fn, constexprs: dict, ptr_types: dict, num_warps: int = 4, num_stages: int = 2,
                 int_values: dict | None = None):
    """``triton.compile`` the ``@triton.jit`` function ``fn`` for sm_90: arguments named in
    ``constexprs`` are compile-time constants (constexpr parameters left out keep their defaults),
    those in ``ptr_types`` get that type (``"*bf16"``, ``"fp32"``, ...), every other one is ``i32``.

    Like a real launch, pointers are taken as 16-byte aligned, and the integers given in
    ``int_values`` (representative values, e.g. the strides of the shape to study) are specialized
    as the JIT would: 1 becomes a constant, multiples of 16 carry ``tt.divisibility = 16`` (without
    that, Triton neither vectorizes nor software-pipelines the loads)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    int_values = int_values or {}
    for name, v in int_values.items():
        if v == 1:
            constexprs[name] = 1
    for p in fn.params:
        if p.is_constexpr and p.name not in constexprs:
            constexprs[p.name] = p.default
    sig = {n: ("constexpr" if n in constexprs else ptr_types.get(n, "i32")) for n in fn.arg_names}
    div16 = [["tt.divisibility", 16]]
    attrs = {(i,): div16 for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*")
             or (n in int_values and n not in constexprs and int_values[n] % 16 == 0)}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_usage(kernel) -> dict:
    """Registers per thread and spill bytes of a compiled kernel (``ptxas -v`` on its PTX)."""
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        out = ""
        for exe in ("ptxas-blackwell", "ptxas"):  # the one that reads this Triton's PTX version
            path = os.path.join(bindir, exe)
            if os.path.exists(path):
                r = subprocess.run([path, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                   capture_output=True, text=True)
                out = r.stdout + r.stderr
                if r.returncode == 0:
                    break
    finally:
        os.unlink(f.name)

    def num(pattern):
        m = re.search(pattern, out)
        return int(m.group(1)) if m else None

    return dict(registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
                shared=kernel.metadata.shared)


def lightning_launch_ints(B: int = 16, T: int = 2048, H: int = 8, D: int = 128) -> dict:
    """Representative integer arguments of the Lightning kernels on the model's packed path (q, k from
    the ``[B, T, 2*H*D]`` activation buffer, v and the gradients in ``[B, T, 3*H*D]``), per kernel:
    ``{"forward", "dq", "dkdv", "state"}`` -> ``{argument: value}`` (no initial/final state)."""
    d = H * D
    zeros = {n: 0 for n in ("si_b si_h si_k si_v sl_b sl_h sl_s sl_k sl_v "
                            "sf_b sf_h sf_k sf_v se_b se_t se_h").split()}
    fwd = dict(T=T, H=H, seg_len=T, sa_b=T * 2 * d, sa_t=2 * d, sa_h=D, sb_b=T * 2 * d, sb_t=2 * d, sb_h=D,
               sc_b=T * 3 * d, sc_t=3 * d, sc_h=D, so_b=T * d, so_t=d, so_h=D, **zeros)
    dq = dict(fwd, sa_b=T * d, sa_t=d, sa_h=D, sb_b=T * 3 * d, sb_t=3 * d, sb_h=D,
              sc_b=T * 2 * d, sc_t=2 * d, sc_h=D,
              so_b=T * 3 * d, so_t=3 * d, so_h=D, se_b=T * 3 * d, se_t=3 * d, se_h=D)
    dkdv = dict(T=T, H=H, seg_len=T, sq_b=T * 2 * d, sq_t=2 * d, sq_h=D, sk_b=T * 2 * d, sk_t=2 * d, sk_h=D,
                sv_b=T * 3 * d, sv_t=3 * d, sv_h=D, sd_b=T * d, sd_t=d, sd_h=D,
                sgk_b=T * 3 * d, sgk_t=3 * d, sgk_h=D,
                sgv_b=T * 3 * d, sgv_t=3 * d, sgv_h=D, **dict(zeros, se_b=T * 3 * d, se_t=3 * d, se_h=D))
    state = dict(T=T, H=H, seg_len=T // 2, sb_b=T * 2 * d, sb_t=2 * d, sb_h=D,
                 sc_b=T * 3 * d, sc_t=3 * d, sc_h=D,
                 sl_b=H * D * D, sl_h=D * D, sl_s=D * D, sl_k=D, sl_v=1)
    return dict(forward=fwd, dq=dq, dkdv=dkdv, state=state)
