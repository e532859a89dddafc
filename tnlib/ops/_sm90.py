"""Compile Triton kernels for sm_90 (Hopper) without a GPU, and read their register use.

The sm_90 shorthands of :mod:`tnlib.ops._compile` (any target) used by ``tests/test_kernels_compile.py``
and ``tools/kernel_registers.py``, and the representative integer arguments of the model's Lightning
launches.
"""
from __future__ import annotations

from ._compile import compile_kernel, kernel_usage

BF16, FP32, I32 = "*bf16", "*fp32", "*i32"


def compile_sm90(fn, constexprs: dict, ptr_types: dict, num_warps: int = 4, num_stages: int = 2,
                 int_values: dict | None = None):
    """``tnlib.ops._compile.compile_kernel`` for sm_90."""
    return compile_kernel(fn, constexprs, ptr_types, 90, num_warps, num_stages, int_values)


def ptxas_usage(kernel) -> dict:
    """Registers per thread, spill bytes and shared memory of a compiled kernel (``kernel_usage``)."""
    return kernel_usage(kernel)


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
