"""``Linear``: ``nn.Linear`` that decodes through the Triton matrix-vector kernel.

Training and prefill (many rows, or autograd) run ``F.linear`` exactly as ``nn.Linear`` does. Inference
on at most ``tnlib.ops.gemv.GEMV_MAX_ROWS`` rows (a decode step at batch 1-4) on a GPU, inside
``torch.compile`` or in ``tnlib.generate.GraphDecoder``'s captured step, runs ``tnlib.ops.gemv.gemv``, which reads the weight once at
a higher bandwidth than cuBLAS's tiles for one row. Plain eager calls keep cuBLAS: there each Triton
launch costs tens of microseconds of Python, more than the product itself (``GEMV_EAGER = True`` forces
the kernel anyway, e.g. to test it). Same parameters, state-dict keys and initialisation as ``nn.Linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import gemv as _gemv

__all__ = ["Linear", "USE_GEMV", "GEMV_EAGER", "use_gemv"]

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


class Linear(nn.Linear):
    def forward(self, x):
        if self.bias is None and use_gemv(x, self.weight):
            return _gemv.gemv(x, self.weight)
        return F.linear(x, self.weight, self.bias)
