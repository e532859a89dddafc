"""``x @ W.T`` for a handful of rows: a Triton matrix-vector kernel for decoding.

At batch 1, a decode step multiplies one token's activations by every weight matrix of the model, so
its cost is reading the weights. cuBLAS picks GEMM tiles for these ``[1, K] x [K, N]`` products that
read the weights well below the memory bandwidth (``results/bench/NOTES-kernels.md``). The kernel
streams each weight matrix exactly once, in its natural ``[N, K]`` row-major layout (loads contiguous along K),
for up to ``GEMV_MAX_ROWS`` rows at a time, accumulating in fp32.

``gemv(x, weight)`` checks its inputs and calls ``gemv_op``, the unchecked ``torch.library`` custom
op (``torch.compile`` and CUDA-graph capture treat it as one opaque kernel); ``tnlib.nn.Linear``
calls it for inference on few rows and falls back to ``F.linear`` everywhere else (training, many
rows, CPU, biases).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import interpreting, launch, use_triton

__all__ = ["gemv", "gemv_op", "gemv_supported", "GEMV_MAX_ROWS"]

#: Up to this many rows (tokens x batch) go through the kernel; more rows are a GEMM's job.
GEMV_MAX_ROWS = 4


def _configs():
    """The autotuner's candidates; the same on every GPU target (at most 8 KB of shared memory and 8 B of
    spills from sm_75 to sm_120: ``python -m tnlib gpu-check`` compiles every one)."""
    if interpreting():  # the interpreter is slow: one small configuration
        return [triton.Config({"BLOCK_N": 8, "BLOCK_K": 32}, num_warps=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((4, 256, 2, 4), (4, 512, 4, 3), (8, 256, 4, 4), (8, 512, 4, 3),
                                 (8, 512, 8, 3), (16, 256, 4, 4), (16, 256, 8, 3), (16, 128, 4, 4),
                                 (32, 128, 4, 4), (32, 256, 8, 3), (2, 1024, 4, 3), (4, 1024, 8, 2))]


@triton.autotune(configs=_configs(), key=["N", "K", "BLOCK_M"])
@triton.jit
def _gemv_kernel(X, W, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``Y[m, n] = sum_k X[m, k] W[n, k]``: one program per ``BLOCK_N`` output columns, all rows."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    w_ptr = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptr = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    # elementwise fp32 partial sums, reduced once at the end (no shuffles inside the loop)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        w = tl.load(w_ptr + k0, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
    y = tl.sum(acc, axis=2)
    y_ptr = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptr, y.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``gemv`` takes this product: CUDA (or the Triton interpreter on CPU), fp16/bf16/fp32
    ``x`` and ``weight`` of one dtype, at most ``GEMV_MAX_ROWS`` rows, no autograd."""
    if x.dtype != weight.dtype or not use_triton(x) or weight.device != x.device:
        return False
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or weight.stride(1) != 1:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return 0 < x.numel() // max(1, x.shape[-1]) <= GEMV_MAX_ROWS


@torch.library.custom_op("tnlib::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _gemv_launch(x, weight)


def _gemv_launch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The custom op's body: ``x @ weight.T`` through the autotuned kernel."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_m = max(1, triton.next_power_of_2(M))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch(_gemv_kernel, grid, X=x2, W=weight, Y=y, M=M, N=N, K=K, stride_xm=x2.stride(0),
           stride_wn=weight.stride(0), stride_ym=y.stride(0), BLOCK_M=block_m)
    return y.reshape(*x.shape[:-1], N)


@gemv_op.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (``F.linear`` without bias), checked, for at most ``GEMV_MAX_ROWS`` rows of ``x``
    (``[..., K]``; ``weight``: ``[N, K]``, contiguous along K), through the Triton kernel.

    No autograd: for inference. Raises ``ValueError`` where ``gemv_supported`` is false."""
    if not gemv_supported(x, weight):
        raise ValueError(
            f"gemv: needs a CUDA (or TRITON_INTERPRET=1 CPU) x [..., K] with <= {GEMV_MAX_ROWS} rows and a weight "
            f"[N, K] of the same fp16/bf16/fp32 dtype, outside autograd; got x {tuple(x.shape)} {x.dtype} "
            f"{x.device}, weight {tuple(weight.shape)} {weight.dtype} {weight.device}")
    return gemv_op(x, weight)
