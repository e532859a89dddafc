"""LRPE-d's relative-position feature map (spec section 5.2), taught in ``notebooks/02_lrpe_d.ipynb``.

``x_t -> [x_t * cos(theta t) || x_t * sin(theta t)]`` doubles the head dim, and then
``q~_t . k~_s = sum_j q_tj k_sj cos(theta_j (t - s))`` depends on positions only through ``t - s``.
The decay ("-d") is applied by the attention kernel, not here.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["lrpe_theta_init", "lrpe", "LRPE"]


def lrpe_theta_init(num_heads: int, head_dim: int) -> torch.Tensor:
    """``theta[h, j] = 10000^(-2 (h*head_dim + j) / d)`` with ``d = H * head_dim``: shape ``[H, head_dim]``.

    The exponent runs over the whole width, so each head gets its own frequency band (unlike RoPE).
    """
    if num_heads < 1 or head_dim < 1:
        raise ValueError(f"num_heads and head_dim must be positive, got {num_heads}, {head_dim}")
    d = num_heads * head_dim
    idx = torch.arange(d, dtype=torch.float64).reshape(num_heads, head_dim)
    return (10000.0 ** (-2.0 * idx / d)).to(torch.float32)


def lrpe(x: torch.Tensor, theta: torch.Tensor, offset=0) -> torch.Tensor:
    """Apply LRPE to ``x: [B, T, H, D]`` with ``theta: [H, D]``; returns ``[B, T, H, 2D]``.

    ``offset`` (an int, or a tensor ``[B]`` of per-sequence offsets) is the absolute position of
    token 0: decoding passes the number of tokens already in the state.
    """
    if x.dim() != 4:
        raise ValueError(f"lrpe: x must be [B, T, H, D], got shape {tuple(x.shape)}")
    B, T, H, D = x.shape
    if tuple(theta.shape) != (H, D):
        raise ValueError(f"lrpe: theta must have shape [H, D] = {(H, D)}, got {tuple(theta.shape)}")
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    # Angles are formed in float64 and reduced mod 2*pi before the cos/sin in `cd`: a float32 angle
    # near 1e6 would carry ~0.06 rad of error and break the shift invariance at long positions.
    pos = torch.arange(T, device=x.device, dtype=torch.float64)
    if isinstance(offset, torch.Tensor):
        if offset.dim() != 1 or offset.shape[0] != B:
            raise ValueError(f"lrpe: a tensor offset must have shape [B] = [{B}], got {tuple(offset.shape)}")
        pos = offset.to(device=x.device, dtype=torch.float64)[:, None] + pos[None, :]  # [B, T]
    else:
        pos = (pos + int(offset))[None, :]  # [1, T]
    angle = pos[:, :, None, None] * theta.to(torch.float64)[None, None]  # [B|1, T, H, D]
    angle = torch.remainder(angle, 2 * math.pi).to(cd)
    xc = x.to(cd)
    out = torch.cat([xc * torch.cos(angle), xc * torch.sin(angle)], dim=-1)
    return out.to(x.dtype)


class LRPE(nn.Module):
    """Learnable-theta LRPE feature map (layer 0 of TransNormerLLM). See ``notebooks/02_lrpe_d.ipynb``."""

    def __init__(self, num_heads: int, head_dim: int, learnable: bool = True):
        super().__init__()
        theta = lrpe_theta_init(num_heads, head_dim)
        if learnable:
            self.theta = nn.Parameter(theta)
        else:
            self.register_buffer("theta", theta)

    def forward(self, x: torch.Tensor, offset=0) -> torch.Tensor:
        return lrpe(x, self.theta, offset)
