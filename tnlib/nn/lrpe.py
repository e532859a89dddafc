"""LRPE-d's relative-position feature map (as the official code computes it, ``docs/sources.md``),
taught in ``notebooks/02_lrpe_d.ipynb``.

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


def _check(x, theta, offset):
    if x.dim() != 4:
        raise ValueError(f"lrpe: x must be [B, T, H, D], got shape {tuple(x.shape)}")
    B, T, H, D = x.shape
    if tuple(theta.shape) != (H, D):
        raise ValueError(f"lrpe: theta must have shape [H, D] = {(H, D)}, got {tuple(theta.shape)}")
    if isinstance(offset, torch.Tensor) and tuple(offset.shape) not in ((B,), (B, T)):
        raise ValueError(f"lrpe: a tensor offset must have shape [B] = [{B}] (each sequence's first position) or "
                         f"[B, T] = [{B}, {T}] (every token's position), got {tuple(offset.shape)}")


def _cos_sin(x, theta, offset):
    """``cos(theta t), sin(theta t)`` for the positions of ``x``'s tokens, ``[B|1, T, H, D]``.

    Angles are formed in float64 and reduced mod 2*pi before the cos/sin in the working precision:
    a float32 angle near 1e6 would carry ~0.06 rad of error and break the shift invariance.
    """
    B, T = x.shape[:2]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    pos = torch.arange(T, device=x.device, dtype=torch.float64)
    if isinstance(offset, torch.Tensor) and offset.dim() == 2:  # every token's own position (packed prompts)
        pos = offset.to(device=x.device, dtype=torch.float64)  # [B, T]
    elif isinstance(offset, torch.Tensor):
        pos = offset.to(device=x.device, dtype=torch.float64)[:, None] + pos[None, :]  # [B, T]
    else:
        pos = (pos + int(offset))[None, :]  # [1, T]
    angle = pos[:, :, None, None] * theta.to(torch.float64)[None, None]  # [B|1, T, H, D]
    angle = torch.remainder(angle, 2 * math.pi).to(cd)
    return torch.cos(angle), torch.sin(angle)


def _apply(x, cos, sin):
    xc = x.to(cos.dtype)
    return torch.cat([xc * cos, xc * sin], dim=-1).to(x.dtype)


def lrpe(x: torch.Tensor, theta: torch.Tensor, offset=0) -> torch.Tensor:
    """Apply LRPE to ``x: [B, T, H, D]`` with ``theta: [H, D]``; returns ``[B, T, H, 2D]``.

    ``offset`` (an int, or a tensor ``[B]`` of per-sequence offsets) is the absolute position of
    token 0: decoding passes the number of tokens already in the state. A tensor ``[B, T]`` gives every
    token's position instead (prompts packed back to back, whose positions restart at each prompt's start).
    """
    _check(x, theta, offset)
    return _apply(x, *_cos_sin(x, theta, offset))


class LRPE(nn.Module):
    """Learnable-theta LRPE feature map (layer 0 of TransNormerLLM). See ``notebooks/02_lrpe_d.ipynb``."""

    def __init__(self, num_heads: int, head_dim: int, learnable: bool = True):
        super().__init__()
        theta = lrpe_theta_init(num_heads, head_dim)
        if learnable:
            self.theta = nn.Parameter(theta)
        else:
            self.register_buffer("theta", theta)

    def local_theta(self) -> torch.Tensor:
        """``theta``, or this rank's heads of it when ``tnlib.parallel`` split it (a DTensor) over ranks."""
        t = self.theta
        return t.to_local() if hasattr(t, "to_local") else t

    def forward(self, x: torch.Tensor, offset=0) -> torch.Tensor:
        return lrpe(x, self.local_theta(), offset)

    def pair(self, q: torch.Tensor, k: torch.Tensor, offset=0):
        """``(lrpe(q), lrpe(k))`` with the angles computed once (q and k share positions)."""
        if q.shape != k.shape:
            raise ValueError(f"LRPE.pair: q and k must share a shape, got {tuple(q.shape)} and {tuple(k.shape)}")
        theta = self.local_theta()
        _check(q, theta, offset)
        cos, sin = _cos_sin(q, theta, offset)
        return _apply(q, cos, sin), _apply(k, cos, sin)
