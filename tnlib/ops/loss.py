"""Language-model loss without the ``[tokens, vocab]`` logits: LM head + cross-entropy in row chunks.

With 32,768 tokens per step and a 50,272-token vocabulary, the usual ``F.cross_entropy(logits.float())``
materializes 3.3 GB of bf16 logits, a 6.6 GB fp32 copy and a 6.6 GB fp32 gradient, and streams them
through memory several times. Here each chunk of rows computes its logits, its loss *and its gradient*
in one go (softmax minus one-hot is the gradient of the mean cross-entropy with respect to the
logits), and only ``dh`` (``[N, d]``) and ``dW`` (``[V, d]``) are kept for the backward. The
arithmetic is the usual one: logits rounded to the compute dtype exactly as an autocast ``F.linear``
would, then fp32 log-sum-exp; the same three matrix products as autograd would run.

On a GPU (or the CPU under ``TRITON_INTERPRET=1``) each chunk's softmax, loss and gradient are one
Triton kernel that reads the chunk's logits twice and overwrites them with the gradient, instead of
the separate PyTorch passes (cast, max, subtract, exp, sum, gather, scatter, scale, cast) that the
CPU path runs. The chunk's three products and the kernel run as one opaque custom op
(``tnlib::head_xent_chunk``) returning new tensors, so that ``torch.compile`` neither copies the
logits before the in-place kernel nor decomposes the weight gradient's mixed-precision GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton import launch, use_triton

__all__ = ["linear_cross_entropy", "xent_grad_", "XentConfig", "xent_config"]


@triton.jit
def _xent_grad_kernel(L, TGT, NLL, stride_l, V, scale, BLOCK: tl.constexpr):
    """One row: ``lse = logsumexp(l)`` (online, fp32), ``nll = lse - l[t]`` (NaN for a target outside
    ``[0, V)``), then ``l <- scale * (softmax(l) - onehot(t))`` in place (the gradient of ``scale * nll``
    with respect to ``l``)."""
    row = tl.program_id(0).to(tl.int64)
    base = L + row * stride_l
    tgt = tl.load(TGT + row)
    ok = (tgt >= 0) & (tgt < V)
    m = tl.full([], float("-inf"), tl.float32)
    ssum = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        ssum = ssum * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(ssum)
    xt = tl.load(base + tgt, mask=ok, other=0.0).to(tl.float32)
    tl.store(NLL + row, tl.where(ok, lse - xt, float("nan")))
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse)
        g = tl.where(cols == tgt, g - 1.0, g) * scale
        tl.store(base + cols, g.to(L.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class XentConfig:
    """Launch of the cross-entropy kernel: ``block`` columns per step, ``num_warps`` per row."""

    block: int
    num_warps: int


def xent_config(V: int) -> XentConfig:
    """The default launch for rows of ``V`` logits (wide programs: fewer rows in flight, so the
    gradient pass's second read of a row comes from L2; tuned by ``tools/tune_xent.py``). The same on
    every GPU target: no shared memory beyond a reduction's scratch (``python -m tnlib gpu-check``)."""
    block = min(8192, triton.next_power_of_2(V))
    return XentConfig(block, 16 if block >= 8192 else 8 if block >= 2048 else 4)


def _xent_launch(logits: torch.Tensor, targets: torch.Tensor, scale: float,
                 config: Optional[XentConfig] = None) -> torch.Tensor:
    n, V = logits.shape
    nll = torch.empty(n, dtype=torch.float32, device=logits.device)
    c = config or xent_config(V)
    launch(_xent_grad_kernel, (n,), L=logits, TGT=targets, NLL=nll, stride_l=logits.stride(0), V=V, scale=scale,
           BLOCK=c.block, num_warps=c.num_warps)
    return nll


def _accumulate_dw(dw: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dw + g^T x`` with ``dw`` in the accumulation dtype: on CUDA one mixed-precision GEMM straight
    into ``dw`` (no product in the inputs' dtype, cast and add); traced by torch.compile, where
    Inductor's decomposition of that GEMM fails, and on the CPU, the product cast and added."""
    if dw.dtype != g.dtype and g.is_cuda and not torch.compiler.is_compiling():
        return torch.addmm(dw, g.t(), x, out_dtype=dw.dtype)
    return dw + (g.t() @ x).to(dw.dtype)


@torch.library.custom_op("tnlib::head_xent_chunk", mutates_args=())
def _head_xent_chunk_op(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, scale: float,
                        dw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of rows: logits ``g = x w^T`` (compute dtype), the kernel's loss and gradient over them,
    then ``dh = g w`` and ``dw + g^T x``. Returns ``(nll, dh, dw_new)``; inputs are not modified."""
    g = x @ w.t()
    nll = _xent_launch(g, targets, scale)
    return nll, g @ w, _accumulate_dw(dw, g, x)


@_head_xent_chunk_op.register_fake
def _(x, w, targets, scale, dw):
    return x.new_empty((x.shape[0],), dtype=torch.float32), torch.empty_like(x), torch.empty_like(dw)


def xent_grad_(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1.0,
               config: Optional[XentConfig] = None) -> torch.Tensor:
    """Per-row cross-entropy of ``logits`` (``[n, V]``, rows contiguous) against ``targets`` (``[n]``
    long), returned in fp32; ``logits`` is overwritten with ``scale * (softmax - onehot)``, the
    gradient of ``scale * sum(nll)``. Arithmetic in fp32 whatever the logits' dtype. A target outside
    ``[0, V)`` gives a NaN loss for its row. The kernel alone (eager; ``config`` instead of
    ``xent_config``'s): CUDA, or CPU with ``TRITON_INTERPRET=1``."""
    if (logits.dim() != 2 or logits.stride(1) != 1 or targets.shape != (logits.shape[0],)
            or targets.dtype != torch.long):
        raise ValueError(f"xent_grad_: logits [n, V] (contiguous rows) and long targets [n] expected, got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)} {targets.dtype}")
    if not use_triton(logits) or targets.device != logits.device:
        raise ValueError("xent_grad_: needs fp16/bf16/fp32 logits and targets on one CUDA device "
                         "(or the CPU with TRITON_INTERPRET=1)")
    return _xent_launch(logits, targets, float(scale), config)


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


def _chunk_logits(x, w):
    return (x @ w.t()).to(torch.promote_types(x.dtype, torch.float32))


def _chunk_nll(logits, tgt):
    """Summed negative log-likelihood of a chunk, and its log-sum-exp (for the softmax)."""
    lse = torch.logsumexp(logits, dim=-1)
    return (lse - logits.gather(1, tgt[:, None]).squeeze(1)).sum(), lse


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype):
        N = h.shape[0]
        hc, wc = h.to(dtype), weight.to(dtype)
        dh = torch.empty_like(hc)
        acc = torch.promote_types(dtype, torch.float32)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        total = torch.zeros((), dtype=acc, device=h.device)
        kernel = use_triton(hc)
        for s in range(0, N, chunk):
            x, tgt = hc[s : s + chunk], targets[s : s + chunk]
            if kernel:  # products and kernel in one op that returns new tensors
                nll, dh[s : s + chunk], dw = _head_xent_chunk_op(x, wc, tgt, 1.0 / N, dw)
                total = total + nll.sum()
                continue
            logits = _chunk_logits(x, wc)
            nll, lse = _chunk_nll(logits, tgt)
            total = total + nll
            g = torch.exp(logits - lse[:, None])  # softmax, in place of the logits
            g.scatter_add_(1, tgt[:, None], torch.full_like(tgt[:, None], -1, dtype=g.dtype))
            g = (g / N).to(dtype)
            dh[s : s + chunk] = g @ wc
            dw = _accumulate_dw(dw, g, x)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total / N

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (dh * grad_out).to(h_dtype), (dw * grad_out).to(w_dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 8192) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, without materializing the logits.

    ``h``: ``[N, d]`` final hidden states; ``weight``: ``[V, d]`` (the LM head); ``targets``: ``[N]``
    class ids in ``[0, V)``. Equals ``F.cross_entropy(F.linear(h, weight).float(), targets)`` (with
    ``F.linear`` in the autocast dtype when autocast is on). Gradients flow to ``h`` and ``weight``;
    ``chunk`` rows are processed at a time (peak extra memory about ``2 * chunk * V * 4`` bytes).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h [N, d] and weight [V, d] expected, got {tuple(h.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != (h.shape[0],) or targets.dtype != torch.long:
        raise ValueError(f"linear_cross_entropy: targets must be a long tensor of shape [{h.shape[0]}], got "
                         f"{tuple(targets.shape)} {targets.dtype}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be a positive int, got {chunk!r}")
    dtype = _compute_dtype(h, weight)
    with torch.autocast(h.device.type, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, targets, chunk, dtype)
        hc, wc = h.to(dtype), weight.to(dtype)  # evaluation: the loss alone, still chunked
        total = h.new_zeros((), dtype=torch.promote_types(dtype, torch.float32))
        for s in range(0, h.shape[0], chunk):
            total = total + _chunk_nll(_chunk_logits(hc[s : s + chunk], wc), targets[s : s + chunk])[0]
        return total / h.shape[0]
