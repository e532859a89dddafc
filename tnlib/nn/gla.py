"""Gated Linear Attention (the token mixer) and SGLU (the channel mixer). See ``notebooks/05_gating``.

GLA (spec section 3)::

    q, k, v, u = split(x W_qkvu)                  one fused projection, no biases
    q, k = phi(q), phi(k)                          SiLU by default ("1+elu" / "none" as ablations)
    q, k = LRPE(q), LRPE(k)                        layer 0 only in the default "mix" scheme
    o = DecayLinearAttention(q, k, v; slope)       no 1/sqrt(d) scaling, no softmax, no denominator
    out = (SRMSNorm(o over the full width) * u) W_o

SGLU (spec section 8): ``((x W_v) * (x W_u)) W_o`` with no activation (``glu_act="silu"`` is the ablation).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops as _ops
from .decay import decay_slopes
from ..ops.gemv import GEMV_MAX_ROWS
from .linear import Linear, linear
from .lrpe import LRPE
from .norm import build_norm

__all__ = ["GatedLinearAttention", "SGLU", "attention_backend"]

#: How the one-token decode step forms ``o = q S``: ``"einsum"`` (a batched matrix-vector product,
#: the measured default) or ``"sum"`` (multiply and reduce over K: under ``torch.compile`` it can fuse
#: with the state update into one kernel instead of a separate cuBLAS call per layer; to be timed).
STEP_MATVEC = "einsum"

#: Training path without LRPE (every layer but 0 in the paper's scheme): hand the pre-activation
#: ``q | k | v`` block of the projection to :func:`tnlib.ops.lightning_attention_packed`, whose backward
#: kernels return the gradient of that block as one buffer (the feature map's derivative applied
#: inside them), and compute ``u`` with its own product from the same fused weight (so no gradient
#: concatenation is needed).
#: False keeps the unfused form (one product, split, activation, attention) for comparison.
USE_PACKED = True

#: SGLU: compute ``l1(x)`` and ``l2(x)`` with one matrix product over the two weights side by side (one
#: larger GEMM forward and backward) instead of two. Same parameters; a benchmark switch.
FUSED_SGLU = False


def _qk_activation(name: str):
    """The q/k feature map ``phi`` by config name ("silu", "1+elu", "none"): the one definition in
    ``tnlib.ops.lightning`` that the packed kernel path applies too."""
    if name not in _ops.lightning.ACT_CODES:
        raise ValueError(f"unknown q/k activation {name!r}")
    return functools.partial(_ops.lightning.feature_map_reference, act=_ops.lightning.ACT_CODES[name])


def _is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed`` DTensor (a weight split by ``tnlib.parallel``)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def attention_backend():
    """The decayed linear attention used by the model: the Triton kernel when available, else chunked."""
    fn = getattr(_ops, "lightning_attention", None)
    if fn is not None:
        return fn

    def chunked(q, k, v, slope, initial_state=None, output_final_state=False):
        return _ops.linear_attention_chunked(q, k, v, slope, initial_state, output_final_state, block_size=64)

    return chunked


class GatedLinearAttention(nn.Module):
    """TransNormerLLM's token mixer for one layer (``layer_idx`` sets LRPE and the decay)."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        d, H = cfg.d_model, cfg.n_heads
        self.n_heads, self.head_dim, self.layer_idx = H, cfg.head_dim, layer_idx
        self.gate = cfg.gate
        self.qkvu_proj = Linear(d, (4 if cfg.gate else 3) * d, bias=False)
        self.out_proj = Linear(d, d, bias=False)
        self.qk_act = cfg.qk_act
        self.act = _qk_activation(cfg.qk_act)
        self.lrpe = LRPE(H, cfg.head_dim, learnable=cfg.lrpe_learnable) if cfg.lrpe_on(layer_idx) else None
        if cfg.uses_decay:
            slope = decay_slopes(H, layer_idx, cfg.n_layers, cfg.decay_formula, cfg.layer_temperature)
        else:
            slope = torch.zeros(H)
        self.register_buffer("slope", slope, persistent=False)  # fixed, recomputed from the config
        self.norm = build_norm(cfg.norm, d, cfg.norm_eps)

    def forward(self, x, state=None, offset=0, return_state=False, pad_mask=None):
        """``x: [B, T, d]`` -> ``[B, T, d]`` (and the final recurrent state if ``return_state``).

        ``state`` (``[B, H, K, V]`` fp32) continues a sequence; ``offset`` (int or ``[B]``) is the LRPE
        position of token 0; ``pad_mask`` (``[B, T]`` bool, True = real token) zeroes the values of
        padding so it contributes nothing to the state (spec section 3.3).
        """
        B, T, d = x.shape
        H, D = self.n_heads, self.head_dim
        if (USE_PACKED and self.lrpe is None and state is None and not return_state and pad_mask is None
                and not _is_dtensor(self.qkvu_proj.weight)  # tensor parallel: the projection's hooks split heads
                and _ops.lightning._use_kernel(x) and attention_backend() is _ops.lightning_attention):
            return self._forward_packed(x)
        parts = self.qkvu_proj(x).chunk(4 if self.gate else 3, dim=-1)
        q, k, v = (p.reshape(B, T, H, D) for p in parts[:3])
        q, k = self.act(q), self.act(k)
        if pad_mask is not None:
            v = v * pad_mask[:, :, None, None].to(v.dtype)
        if self.lrpe is not None:
            q, k = self.lrpe.pair(q, k, offset)
        slope = self.slope.float()  # stays fp32 even after model.to(bfloat16)
        if T == 1 and state is not None:
            o, state = self.recurrent_step(q[:, 0], k[:, 0], v[:, 0], slope, state)
            o = o[:, None]
        elif state is not None or return_state:
            o, state = attention_backend()(q, k, v, slope, initial_state=state, output_final_state=True)
        else:
            o, state = attention_backend()(q, k, v, slope), None
        o = self.norm(o.reshape(B, T, H * D))  # H * D < d when tensor parallelism gave this rank H of the heads
        if self.gate:
            o = o * parts[3]
        out = self.out_proj(o)
        return (out, state) if return_state else out

    def _forward_packed(self, x):
        """The same layer through the packed kernel path (see ``USE_PACKED``): identical parameters."""
        B, T, d = x.shape
        w = self.qkvu_proj.weight
        o = _ops.lightning_attention_packed(linear(x, w[: 3 * d]), self.slope.float(), self.n_heads, self.qk_act)
        o = self.norm(o.reshape(B, T, d))
        if self.gate:
            o = o * linear(x, w[3 * d:])
        return self.out_proj(o)

    @staticmethod
    def recurrent_step(q, k, v, slope, state):
        """The robust recurrence for one token (spec section 7.2): ``S <- lambda S + k^T v``, ``o = q S``.

        ``q, k: [B, H, K]``, ``v: [B, H, V]``, ``state: [B, H, K, V]`` (fp32, or fp64 for fp64 inputs).
        Only ``lambda <= 1`` is ever applied, so nothing overflows however long the context.
        """
        cd = state.dtype
        lam = torch.exp(-slope.to(cd))[None, :, None, None]
        state = lam * state + k.to(cd)[..., :, None] * v.to(cd)[..., None, :]
        if STEP_MATVEC == "sum":
            o = (q.to(cd)[..., :, None] * state).sum(-2)
        else:
            o = torch.einsum("bhk,bhkv->bhv", q.to(cd), state)
        return o.to(v.dtype), state


class SGLU(nn.Module):
    """``l3(act(l1(x)) * l2(x))``; ``act`` is the identity for SGLU (the paper's choice)."""

    def __init__(self, d_model: int, glu_dim: int, act: str = "none"):
        super().__init__()
        self.l1 = Linear(d_model, glu_dim, bias=False)
        self.l2 = Linear(d_model, glu_dim, bias=False)
        self.l3 = Linear(glu_dim, d_model, bias=False)
        if act not in ("none", "silu"):
            raise ValueError(f"unknown GLU activation {act!r}; choose 'none' or 'silu'")
        self.act = act

    def forward(self, x):
        if FUSED_SGLU and x.shape[:-1].numel() > GEMV_MAX_ROWS:  # decode steps keep the per-weight GEMV
            a, b = linear(x, torch.cat([self.l1.weight, self.l2.weight])).chunk(2, dim=-1)
            return self.l3((F.silu(a) if self.act == "silu" else a) * b)
        a = self.l1(x)
        if self.act == "silu":
            a = F.silu(a)
        return self.l3(a * self.l2(x))
