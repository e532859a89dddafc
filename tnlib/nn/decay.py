"""Fixed per-(layer, head) exponential decay: ``lambda = exp(-slope)``.

Taught in ``notebooks/03_decay.ipynb``. Two formulas (``docs/sources.md``, "Decay slopes"):

* ``"official"`` (default, the OpenNLPLab code that trained the released weights):
  ALiBi base slopes ``m_h = 2^(-8h/H)`` (h = 1..H, with ALiBi's interleaving for non-powers of two)
  times the layer factor ``1 - l/(L-1) + 1e-5`` (l = 0..L-1).
* ``"paper"`` (the paper's equation read literally): ``slope = (8h/H) (1 - l/L)`` with h = 1..H,
  l = 1..L (so the last layer has no decay and larger h decays faster).

``layer_temperature=False`` drops the layer factor (the ablation of arXiv 2307.14995, Table 4).
"""
from __future__ import annotations

import math

import torch

__all__ = ["alibi_slopes", "decay_slopes", "decay_table", "half_life", "DECAY_FORMULAS"]

DECAY_FORMULAS = ("official", "paper")


def _check_heads(num_heads):
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's geometric head slopes ``2^(-8h/H)``, h = 1..H, any number of heads.

    For H not a power of two: the 2^floor(log2 H) slopes, then every other slope of the
    2 * 2^floor(log2 H) list until there are H values (H=20: 2^-0.5 .. 2^-8, then 2^-0.25, 2^-0.75, ...).
    """
    _check_heads(num_heads)

    def pow2(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    if math.log2(num_heads).is_integer():
        return pow2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return pow2(closest) + pow2(2 * closest)[0::2][: num_heads - closest]


def decay_slopes(
    num_heads: int,
    layer_idx: int = 0,
    num_layers: int = 1,
    formula: str = "official",
    layer_temperature: bool = True,
) -> torch.Tensor:
    """Per-head ``slope = -ln(lambda)`` (float32, shape ``[H]``) for layer ``layer_idx`` of ``num_layers``."""
    _check_heads(num_heads)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(layer_idx, int) or not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in [0, {num_layers}), got {layer_idx!r}")
    if formula == "official":
        base = torch.tensor(alibi_slopes(num_heads), dtype=torch.float64)
        # 0-based layers; a single-layer model has factor 1 (+1e-5) rather than 0/0
        frac = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
        factor = 1.0 - frac + 1e-5
    elif formula == "paper":
        h = torch.arange(1, num_heads + 1, dtype=torch.float64)
        base = 8.0 * h / num_heads
        factor = 1.0 - (layer_idx + 1) / num_layers
    else:
        raise ValueError(f"unknown decay formula {formula!r}; choose one of {DECAY_FORMULAS}")
    if not layer_temperature:
        factor = 1.0
    return (base * factor).to(torch.float32)


def decay_table(num_heads: int, num_layers: int, formula: str = "official", layer_temperature: bool = True):
    """All slopes of a model: ``[L, H]`` float32."""
    return torch.stack(
        [decay_slopes(num_heads, l, num_layers, formula, layer_temperature) for l in range(num_layers)]
    )


def half_life(slope: torch.Tensor) -> torch.Tensor:
    """Tokens until ``lambda^n = 1/2``: ``ln 2 / slope`` (inf where there is no decay)."""
    slope = torch.as_tensor(slope, dtype=torch.float64)
    return torch.where(slope > 0, math.log(2.0) / slope.clamp(min=1e-300), torch.full_like(slope, math.inf))
