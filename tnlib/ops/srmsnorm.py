"""SRMSNorm, ``y = x / sqrt(mean(x^2) + eps)`` (no gain), as a fused Triton forward+backward.

Taught in ``notebooks/06_srmsnorm.ipynb``. ``srms_norm(x)`` normalises over the last dimension:

* CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``: the Triton kernels below (one program
  per row, fp32 arithmetic, the per-row ``1/rms`` saved for the backward);
* otherwise (CPU), and while ``torch.compile`` traces (Inductor fuses the PyTorch form itself):
  ``srms_norm_reference``.

Backward, with ``r = (mean(x^2) + eps)^(-1/2)`` and ``y = x r``::

    dx = r dy - x r^3 mean(dy * x)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import launch, use_triton

__all__ = ["srms_norm", "srms_norm_reference", "srms_norm_triton"]


def srms_norm_reference(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PyTorch SRMSNorm: computed in fp32 (fp64 for fp64 input), cast back to ``x.dtype``."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(cd)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@triton.jit
def _srms_fwd_kernel(X, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(Y + row * stride_y + cols, (x * rstd).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _srms_bwd_kernel(X, DY, DX, RSTD, stride_x, stride_dy, stride_dx, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    c = tl.sum(dy * x, axis=0) / N
    dx = rstd * dy - x * (rstd * rstd * rstd) * c
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _launch_config(N: int):
    """``(BLOCK, num_warps)`` for rows of ``N``; the same on every GPU target (the row lives in registers,
    shared memory holds only the reduction's scratch: ``python -m tnlib gpu-check`` compiles it for each)."""
    block = triton.next_power_of_2(N)
    if block > 65536:
        raise ValueError(f"srms_norm: rows of {N} elements exceed the kernel's 65536 limit")
    warps = 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16
    return block, warps


class _SRMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M, N = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block, warps = _launch_config(N)
        if M > 0:
            launch(_srms_fwd_kernel, (M,), X=x2, Y=y, RSTD=rstd, stride_x=x2.stride(0), stride_y=y.stride(0), N=N,
                   eps=eps, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x2, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(-1, N)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        block, warps = _launch_config(N)
        if M > 0:
            launch(_srms_bwd_kernel, (M,), X=x2, DY=dy2, DX=dx, RSTD=rstd, stride_x=x2.stride(0),
                   stride_dy=dy2.stride(0), stride_dx=dx.stride(0), N=N, BLOCK=block, num_warps=warps)
        return dx.reshape(ctx.shape), None


def srms_norm_triton(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The Triton path, unconditionally (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if x.dtype == torch.float16:
        eps = max(eps, 1.6e-5)  # as the official kernel: keeps 1/rms finite in fp16
    return _SRMSNormFn.apply(x, eps)


def srms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SRMSNorm over the last dim: the Triton kernel where it can run, else the PyTorch reference."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"srms_norm: expected a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"srms_norm: the last dimension must be non-empty, got shape {tuple(x.shape)}")
    if use_triton(x) and not torch.compiler.is_compiling():  # compiled: Inductor fuses the reference
        return srms_norm_triton(x, eps)
    return srms_norm_reference(x, eps)
