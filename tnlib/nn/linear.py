"""``Linear``: ``nn.Linear`` that decodes through the Triton matrix-vector kernel.

Training and prefill (many rows, or autograd) run ``F.linear`` exactly as ``nn.Linear`` does. A
product on at most ``tnlib.ops.gemv.GEMV_MAX_ROWS`` rows (a decode step at batch 1-4), outside
autograd, inside ``torch.compile`` or a CUDA-graph capture, runs ``tnlib.ops.gemv.gemv``, which reads
the weight once at a higher bandwidth than cuBLAS's tiles for one row. Plain eager calls keep cuBLAS:
there each Triton launch costs more Python time than the product itself. ``gemv=False`` keeps cuBLAS
everywhere (a model's ``Implementation(decode_gemv=False)`` sets it on each of its ``Linear``). Same
parameters, state-dict keys and initialisation as ``nn.Linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import gemv as _gemv

__all__ = ["Linear", "linear", "use_gemv", "autotune_gemv"]


def _traced_or_captured(x: torch.Tensor) -> bool:
    """Inside ``torch.compile`` or while a CUDA graph is being captured: where a kernel launch is free."""
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` goes through ``tnlib.ops.gemv`` (see the module docstring)."""
    return _traced_or_captured(x) and _gemv.gemv_supported(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gemv: bool = True) -> torch.Tensor:
    """``F.linear``; with ``gemv`` (and no bias) through the GEMV kernel where ``use_gemv`` says so."""
    if gemv and bias is None and use_gemv(x, weight):
        return _gemv.gemv_op(x, weight)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear``; ``gemv`` lets decode steps use the GEMV kernel (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gemv: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        self.gemv = gemv

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.gemv)


def autotune_gemv(weights, rows: int) -> None:
    """Run the GEMV kernel once per distinct weight shape and dtype at ``rows`` rows.

    Triton autotunes a kernel on its first call per shape, which synchronizes the device: that is not
    allowed inside a CUDA-graph capture, so a decoder that captures an eager step calls this first.
    """
    seen = set()
    with torch.no_grad():
        for w in weights:
            key = (tuple(w.shape), w.dtype, w.device)
            if key in seen:
                continue
            seen.add(key)
            x = torch.zeros(rows, w.shape[1], dtype=w.dtype, device=w.device)
            if _gemv.gemv_supported(x, w):
                _gemv.gemv_op(x, w)
