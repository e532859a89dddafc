"""``Linear``: ``nn.Linear`` that decodes through the Triton matrix-vector kernel.

Training and prefill (many rows, or autograd) run ``F.linear`` exactly as ``nn.Linear`` does. Inference
on at most ``tnlib.ops.gemv.GEMV_MAX_ROWS`` rows (a decode step at batch 1-4) on a GPU, inside
``torch.compile`` or in ``tnlib.generate.GraphDecoder``'s captured step, runs ``tnlib.ops.gemv.gemv``,
which reads the weight once at a higher bandwidth than cuBLAS's tiles for one row. Plain eager calls
keep cuBLAS: there each Triton launch costs tens of microseconds of Python, more than the product
itself (``force_gemv()`` uses the kernel anyway, e.g. to test it or to warm it up before a CUDA-graph
capture). Same parameters, state-dict keys and initialisation as ``nn.Linear``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import gemv as _gemv

__all__ = ["Linear", "linear", "USE_GEMV", "GEMV_EAGER", "use_gemv", "force_gemv"]

#: Switch for the decode kernel (False: always ``F.linear``, e.g. to time cuBLAS against it).
USE_GEMV = True
#: Also use it in plain eager calls (slower there: Python launch overhead), not only compiled/captured.
GEMV_EAGER = False


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` should go through ``tnlib.ops.gemv`` (see the module docstring)."""
    if not USE_GEMV:
        return False
    if not (GEMV_EAGER or torch.compiler.is_compiling()):
        return False
    return _gemv.gemv_supported(x, weight)


@contextlib.contextmanager
def force_gemv():
    """Within the block, eager calls take the GEMV kernel too (``GEMV_EAGER``), wherever it applies."""
    global GEMV_EAGER
    saved, GEMV_EAGER = GEMV_EAGER, True
    try:
        yield
    finally:
        GEMV_EAGER = saved


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through the GEMV kernel where ``use_gemv`` says so (no bias)."""
    if bias is None and use_gemv(x, weight):
        return _gemv.gemv_op(x, weight)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight, self.bias)
