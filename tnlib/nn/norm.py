"""The norm family of the ablation (paper Table 7): SRMSNorm (default), RMSNorm, LayerNorm.

Taught in ``notebooks/06_srmsnorm.ipynb``. SRMSNorm has no parameters at all; RMSNorm adds a gain;
LayerNorm subtracts the mean and adds gain and bias.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.srmsnorm import srms_norm

__all__ = ["SRMSNorm", "RMSNorm", "build_norm", "NORMS"]

NORMS = ("srms", "rms", "layer")


class SRMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps)`` over the last dim, no gain (fused Triton kernel on GPU)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x):
        return srms_norm(x, self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"


class RMSNorm(nn.Module):
    """SRMSNorm times a learnable per-channel gain (LLaMA's norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return srms_norm(x, self.eps) * self.weight.to(x.dtype)


def build_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """``"srms"`` | ``"rms"`` | ``"layer"`` -> a norm module over the last ``dim`` channels."""
    if kind == "srms":
        return SRMSNorm(dim, eps)
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")
