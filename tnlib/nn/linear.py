"""``Linear``: ``nn.Linear`` that decodes through the Triton matrix-vector kernel.

Training and prefill (many rows, or autograd) run ``F.linear`` exactly as ``nn.Linear`` does; inference
on at most ``tnlib.ops.gemv.GEMV_MAX_ROWS`` rows (a decode step at batch 1-4) on a GPU runs
``tnlib.ops.gemv.gemv``, which reads the weight once at near memory bandwidth. Same parameters,
same state-dict keys, same initialisation as ``nn.Linear``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..ops import gemv as _gemv

__all__ = ["Linear", "USE_GEMV"]

#: Switch for the decode kernel (False: always ``F.linear``, e.g. to time cuBLAS against it).
USE_GEMV = True


class Linear(nn.Linear):
    def forward(self, x):
        if USE_GEMV and self.bias is None and _gemv.gemv_supported(x, self.weight):
            return _gemv.gemv(x, self.weight)
        return F.linear(x, self.weight, self.bias)
