"""Compile Triton kernels for any NVIDIA target without a GPU, and read what they use.

``triton.compile`` with a ``GPUTarget`` runs the whole GPU toolchain (frontend, MLIR passes, PTX,
ptxas) on any machine. :func:`compile_kernel` does that for one kernel configuration and a compute
capability (75 for sm_75, 90 for sm_90, ...); :func:`kernel_usage` returns its shared memory (from
Triton's metadata), registers and spills (``ptxas -v`` on its PTX, cached beside Triton's own cache
entry, so a second run of the same configuration costs nothing). Used by ``python -m tnlib
gpu-check`` (``tnlib.gpucheck``), ``tests/test_kernels_compile.py`` and ``tools/kernel_registers.py``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

__all__ = ["compile_kernel", "kernel_usage", "ptr_type", "ptxas_arch"]

_PTR = {"torch.bfloat16": "*bf16", "torch.float16": "*fp16", "torch.float32": "*fp32", "torch.int64": "*i64",
        "torch.int32": "*i32"}


def ptr_type(dtype) -> str:
    """Triton's pointer type name for a torch dtype (``torch.bfloat16`` -> ``"*bf16"``)."""
    return _PTR[str(dtype)]


def ptxas_arch(capability: int) -> str:
    """ptxas's ``--gpu-name`` for a capability, as Triton compiles it (``sm_90a`` from 90 up)."""
    return f"sm_{capability}{'a' if capability >= 90 else ''}"


def compile_kernel(fn, constexprs: dict, ptr_types: dict, capability: int = 90, num_warps: int = 4,
                   num_stages: int = 2, int_values: dict | None = None):
    """``triton.compile`` the ``@triton.jit`` function ``fn`` for ``sm_<capability>``: arguments named
    in ``constexprs`` are compile-time constants (constexpr parameters left out keep their defaults),
    those in ``ptr_types`` get that type (``"*bf16"``, ``"fp32"``, ...), every other one is ``i32``.

    Like a real launch, pointers are taken as 16-byte aligned, and the integers given in
    ``int_values`` (representative values, e.g. the strides of the shape to study) are specialized
    as the JIT would: 1 becomes a constant, multiples of 16 carry ``tt.divisibility = 16`` (without
    that, Triton neither vectorizes nor software-pipelines the loads). Raises what Triton raises
    (``ImportError``/``FileNotFoundError`` where this Triton build has no CUDA backend or ptxas)."""
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
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _ptxas_v(ptx: str, capability: int) -> str:
    """The ``ptxas -v`` report of ``ptx`` for ``capability`` (the ptxas that reads this Triton's PTX)."""
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = ""
    try:
        for exe in ("ptxas-blackwell", "ptxas"):
            path = os.path.join(bindir, exe)
            if os.path.exists(path):
                r = subprocess.run([path, "-v", "--gpu-name", ptxas_arch(capability), f.name, "-o", os.devnull],
                                   capture_output=True, text=True)
                out = r.stdout + r.stderr
                if r.returncode == 0:
                    break
    finally:
        os.unlink(f.name)
    return out


def kernel_usage(kernel) -> dict:
    """What a compiled kernel uses per CTA / thread: ``shared`` (bytes of shared memory, Triton's
    metadata), ``registers``, ``spill_stores``, ``spill_loads`` and ``stack`` (bytes per thread,
    from ``ptxas -v``; None where ptxas reported nothing). Cached by the kernel's hash in Triton's
    cache directory."""
    from triton.runtime.cache import get_cache_manager

    md = kernel.metadata
    capability = int(str(md.target.arch))
    cache = get_cache_manager(md.hash)
    name = f"tnlib-ptxas-usage-{capability}.json"
    hit = cache.get_file(name)
    if hit is not None:
        with open(hit) as f:
            return json.load(f)
    out = _ptxas_v(kernel.asm["ptx"], capability)

    def num(pattern):
        m = re.search(pattern, out)
        return int(m.group(1)) if m else None

    usage = dict(shared=int(md.shared), registers=num(r"Used (\d+) registers"),
                 spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"),
                 stack=num(r"(\d+) bytes stack frame"))
    cache.put(json.dumps(usage), name, binary=False)
    return usage
