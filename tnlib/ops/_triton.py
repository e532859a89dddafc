"""What the Triton-backed ops share: whether Triton is importable, and where its kernels can run.

Triton is optional at import time so that CPU-only installs without it still work; modules that
define kernels do ``from ._triton import HAS_TRITON, tl, triton`` and guard their definitions with
``if HAS_TRITON:``. Kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set
before Triton was imported (its interpreter; how the tests run them on a machine without a GPU).
"""
from __future__ import annotations

import os

import torch

# Triton 3.9 warns at the first compile of every process that TRITON_DEFAULT_FP_FUSION is unset: its
# default (fused multiply-adds on) flips to off in 3.10. Our kernels were tested and timed with fusion
# on (the default of every Triton before 3.10), so we state that default here, where tnlib imports
# Triton (it is read at compile time); a value the user exported wins.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "triton", "tl", "interpreting", "kernel_device"]


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on the CPU, in its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_device(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take ``t``: Triton installed and ``t`` on CUDA (or the CPU, interpreted)."""
    return HAS_TRITON and (t.is_cuda or (t.device.type == "cpu" and interpreting()))
