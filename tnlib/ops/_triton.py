"""The one rule for every Triton-backed op: can a kernel take this tensor here?

Kernels run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton
was imported (its interpreter; how the tests run them on a machine without a GPU). Each op adds
only what is its own (the GEMV's row count, SRMSNorm leaving ``torch.compile`` to Inductor).
"""
from __future__ import annotations

import os

import torch

__all__ = ["KERNEL_DTYPES", "interpreting", "use_triton"]

# Triton 3.9 warns at the first compile of every process that TRITON_DEFAULT_FP_FUSION is unset: its
# default (fused multiply-adds on) flips to off in 3.10. Our kernels were tested and timed with fusion
# on (the default of every Triton before 3.10), so we state that default here, before any kernel
# compiles (it is read at compile time); a value the user exported wins.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

#: Input dtypes the kernels take (float64 goes to the PyTorch paths, which are exact references).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on the CPU, in its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take ``t``: fp16/bf16/fp32 on CUDA, or on the CPU interpreted."""
    return t.dtype in KERNEL_DTYPES and (t.is_cuda or (t.device.type == "cpu" and interpreting()))
