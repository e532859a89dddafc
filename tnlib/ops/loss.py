"""Language-model loss without the ``[tokens, vocab]`` logits: LM head + cross-entropy in row chunks.

With 32,768 tokens per step and a 50,272-token vocabulary, the usual ``F.cross_entropy(logits.float())``
materializes 3.3 GB of bf16 logits, a 6.6 GB fp32 copy and a 6.6 GB fp32 gradient, and streams them
through memory several times. Here each chunk of rows computes its logits, its loss *and its gradient*
in one go (softmax minus one-hot is the gradient of the mean cross-entropy with respect to the
logits), and only ``dh`` (``[N, d]``) and ``dW`` (``[V, d]``) are kept for the backward. The
arithmetic is the usual one: logits rounded to the compute dtype exactly as an autocast ``F.linear``
would, then fp32 log-sum-exp; the same three matrix products as autograd would run.
"""
from __future__ import annotations

import torch

__all__ = ["linear_cross_entropy"]


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
        for s in range(0, N, chunk):
            x, tgt = hc[s : s + chunk], targets[s : s + chunk]
            logits = _chunk_logits(x, wc)
            nll, lse = _chunk_nll(logits, tgt)
            total = total + nll
            g = torch.exp(logits - lse[:, None])  # softmax, in place of the logits
            g.scatter_add_(1, tgt[:, None], torch.full_like(tgt[:, None], -1, dtype=g.dtype))
            g = (g / N).to(dtype)
            dh[s : s + chunk] = g @ wc
            dw += (g.t() @ x).to(acc)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total / N

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (dh * grad_out).to(h_dtype), (dw * grad_out).to(w_dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
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
