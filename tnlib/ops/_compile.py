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

__all__ = ["compile_kernel", "heuristic_constexprs", "jit_function", "kernel_usage", "ptr_type", "ptxas_arch"]

_PTR = {"torch.bfloat16": "*bf16", "torch.float16": "*fp16", "torch.float32": "*fp32", "torch.int64": "*i64",
        "torch.int32": "*i32"}


def ptr_type(dtype) -> str:
    """Triton's pointer type name for a torch dtype (``torch.bfloat16`` -> ``"*bf16"``)."""
    return _PTR[str(dtype)]


def ptxas_arch(capability: int) -> str:
    """ptxas's ``--gpu-name`` for a capability, as Triton compiles it (``sm_90a`` from 90 up)."""
    return f"sm_{capability}{'a' if capability >= 90 else ''}"


def jit_function(fn):
    """The ``@triton.jit`` function under ``@triton.heuristics`` / ``@triton.autotune`` wrappers."""
    while not hasattr(fn, "params"):
        fn = fn.fn
    return fn


def heuristic_constexprs(fn, args: dict) -> dict:
    """The constexprs ``@triton.heuristics`` wrappers of ``fn`` compute from a launch's arguments ``args``
    (by name; every parameter not named there counts as None), as their ``run`` does at a launch."""
    out = {}
    while not hasattr(fn, "params"):
        values = getattr(fn, "values", None)
        if values:
            given = {n: args.get(n) for n in jit_function(fn).arg_names}
            for name, rule in values.items():
                out[name] = rule({**given, **out})
        fn = fn.fn
    return out


def compile_kernel(fn, constexprs: dict, ptr_types: dict, capability: int = 90, num_warps: int = 4,
                   num_stages: int = 2, int_values: dict | None = None, enable_fp_fusion: bool | None = None):
    """``triton.compile`` the ``@triton.jit`` function ``fn`` (or a heuristics/autotune wrapper of one) for
    ``sm_<capability>``: arguments named in ``constexprs`` are compile-time constants (a None there is an
    absent optional tensor, as a launch passes it; constexpr parameters left out keep their defaults, or
    take what ``fn``'s ``@triton.heuristics`` compute), those in ``ptr_types`` get that type
    (``"*bf16"``, ``"fp32"``, ...), every other one is ``i32``. ``enable_fp_fusion``: default, what every
    tnlib launch requests (``tnlib.ops._triton.LAUNCH_OPTIONS``).

    Like a real launch, pointers are taken as 16-byte aligned, and the integers given in
    ``int_values`` (representative values, e.g. the strides of the shape to study; a tuple of them for a
    tuple parameter) are specialized as the JIT would: 1 becomes a constant, multiples of 16 carry
    ``tt.divisibility = 16`` (without that, Triton neither vectorizes nor software-pipelines the loads). Raises what Triton raises
    (``ImportError``/``FileNotFoundError`` where this Triton build has no CUDA backend or ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._triton import LAUNCH_OPTIONS

    constexprs = dict(constexprs)
    int_values = int_values or {}
    present = {**{n: True for n in ptr_types}, **int_values, **constexprs}
    for name, v in heuristic_constexprs(fn, present).items():
        constexprs.setdefault(name, v)
    fn = jit_function(fn)
    for p in fn.params:
        if p.is_constexpr and p.name not in constexprs:
            constexprs[p.name] = p.default
    sig, consts, attrs = {}, {}, {}
    div16 = [["tt.divisibility", 16]]

    def integer(path, v):  # as the JIT specializes an integer argument: 1 a constant, multiples of 16 aligned
        if v == 1:
            consts[path] = 1
            return "constexpr"
        if v % 16 == 0:
            attrs[path] = div16
        return "i32" if -2**31 <= v < 2**31 else "i64"

    for i, n in enumerate(fn.arg_names):
        if n in constexprs:
            sig[n], consts[(i,)] = "constexpr", constexprs[n]
        elif n in ptr_types:
            sig[n] = ptr_types[n]
            if ptr_types[n].startswith("*"):
                attrs[(i,)] = div16
        elif isinstance(int_values.get(n), tuple):  # a tuple of integers (a tensor's strides)
            sig[n] = tuple(integer((i, j), v) for j, v in enumerate(int_values[n]))
        elif n in int_values:
            sig[n] = integer((i,), int_values[n])
        else:
            sig[n] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    fusion = LAUNCH_OPTIONS["enable_fp_fusion"] if enable_fp_fusion is None else enable_fp_fusion
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": fusion})


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
