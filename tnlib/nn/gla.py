"""Gated Linear Attention (the token mixer) and SGLU (the channel mixer). See ``notebooks/05_gating``.

GLA (arXiv 2307.14995; the details as in the official code, ``docs/sources.md``)::

    q, k, v, u = split(x W_qkvu)                  one fused projection, no biases
    q, k = phi(q), phi(k)                          SiLU by default ("1+elu" / "none" as ablations)
    q, k = LRPE(q), LRPE(k)                        layer 0 only in the default "mix" scheme
    o = DecayLinearAttention(q, k, v; slope)       no 1/sqrt(d) scaling, no softmax, no denominator
    out = (SRMSNorm(o over the full width) * u) W_o

SGLU (arXiv 2307.14995, Table 7): ``((x W_v) * (x W_u)) W_o`` with no activation (``glu_act="silu"`` is the ablation).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from .. import ops as _ops
from .decay import decay_slopes
from .linear import Linear, linear
from .lrpe import LRPE
from .norm import build_norm

__all__ = ["GatedLinearAttention", "SGLU"]


def _qk_activation(name: str):
    """The q/k feature map ``phi`` by config name ("silu", "1+elu", "none"): the one definition in
    ``tnlib.ops.lightning`` that the packed path applies too."""
    if name not in _ops.lightning.ACT_CODES:
        raise ValueError(f"unknown q/k activation {name!r}")
    return functools.partial(_ops.lightning.feature_map_reference, act=_ops.lightning.ACT_CODES[name])


def _is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed`` DTensor (a weight split by ``tnlib.parallel``)."""
    return isinstance(t, DTensor)


class GatedLinearAttention(nn.Module):
    """TransNormerLLM's token mixer for one layer (``layer_idx`` sets LRPE and the decay).

    ``packed`` (the model's ``Implementation.packed_attention``): on a GPU, layers without LRPE run their
    stateless (training) forward through ``tnlib.ops.lightning_attention_packed`` (the activation's
    backward and the q|k|v gradient as one buffer inside the kernels; ``u`` from its own product with the
    same fused weight). Same parameters and outputs either way; on a CPU the unfused form does the same
    work in one product. ``gemv``: the projections' ``Linear.gemv`` (``Implementation.decode_gemv``).
    """

    def __init__(self, cfg, layer_idx: int, packed: bool = True, gemv: bool = True):
        super().__init__()
        d, H = cfg.d_model, cfg.n_heads
        self.n_heads, self.head_dim, self.layer_idx = H, cfg.head_dim, layer_idx
        self.gate = cfg.gate
        self.packed = packed
        self.qkvu_proj = Linear(d, (4 if cfg.gate else 3) * d, bias=False, gemv=gemv)
        self.out_proj = Linear(d, d, bias=False, gemv=gemv)
        self.qk_act = cfg.qk_act
        self.act = _qk_activation(cfg.qk_act)
        self.lrpe = LRPE(H, cfg.head_dim, learnable=cfg.lrpe_learnable) if cfg.lrpe_on(layer_idx) else None
        self.register_buffer("slope", self.decay_slope(cfg, layer_idx), persistent=False)  # fixed by the config
        self.tp_size = 1  # how many ranks share its heads (keep_heads, under tnlib.parallel's tensor parallelism)
        self.norm = build_norm(cfg.norm, d, cfg.norm_eps)

    def keep_heads(self, rank: int, tp: int) -> tuple[int, int]:
        """Tensor parallelism over ``tp`` ranks: this rank keeps heads ``h0:h1`` of ``tp`` equal groups, with
        their decay slopes (and LRPE's theta when it is a fixed buffer; a learnable theta is a parameter,
        sharded by ``tnlib.parallel``, which also splits the projections). Returns ``(h0, h1)``."""
        H = self.n_heads
        h0, h1 = rank * H // tp, (rank + 1) * H // tp
        self.n_heads, self.tp_size = h1 - h0, tp
        self.slope = self.slope[h0:h1].clone()
        if self.lrpe is not None and not isinstance(self.lrpe.theta, nn.Parameter):
            self.lrpe.theta = self.lrpe.theta[h0:h1].clone()
        return h0, h1

    @staticmethod
    def decay_slope(cfg, layer_idx: int) -> torch.Tensor:
        """The fixed decay of layer ``layer_idx`` as ``slope = -ln(lambda)`` per head (fp32 ``[H]``, on the
        default device, as every other buffer and parameter: ``with torch.device("cuda"): create_model(...)``
        builds it there; zeros where the config has no decay). Its values are made and checked on the CPU
        (finite, >= 0: ``tnlib.ops.check_slope_values``; no device sync), so the attention kernels check only
        its shape, dtype and device once it is on the GPU."""
        device = torch.get_default_device()
        with torch.device("cpu"):
            if cfg.uses_decay:
                slope = decay_slopes(cfg.n_heads, layer_idx, cfg.n_layers, cfg.decay_formula, cfg.layer_temperature)
            else:
                slope = torch.zeros(cfg.n_heads)
        _ops.check_slope_values(slope, name=f"layer {layer_idx}'s decay")
        return slope.to(device)

    def forward(self, x, state=None, offset=0, return_state=False, pad_mask=None, cu_seqlens=None):
        """``x: [B, T, d]`` -> ``[B, T, d]`` (and the final recurrent state if ``return_state``).

        ``state`` (``[B, H, K, V]`` fp32) continues a sequence; ``offset`` (int or ``[B]``) is the LRPE
        position of token 0 (a ``[B, T]`` tensor: every token's position, ``tnlib.nn.lrpe.lrpe``); ``pad_mask``
        (``[B, T]`` bool, True = real token) zeroes the values of padding so it contributes nothing to the
        state (as the official code does). ``cu_seqlens`` (``tnlib.ops.lightning_attention``'s convention: a
        tensor, or a ``tnlib.ops.PackedSequences`` that the model's layers share): ``x`` is ``[1, total, d]``
        holding sequences back to back, each attending to itself only; ``state`` and the returned state are
        then ``[N, H, K, V]``. LRPE positions need no restart per sequence for the outputs (its score depends
        on ``t - s`` only), but the returned states hold each key at its position: a prefill that decodes on
        from them passes every token's position in its own sequence as ``offset``
        (``TransNormerLLM.step(..., cu_seqlens=...)``).
        """
        B, T, d = x.shape
        H, D = self.n_heads, self.head_dim
        if cu_seqlens is not None and pad_mask is not None:
            raise ValueError("GatedLinearAttention: pad_mask and cu_seqlens exclude each other (packed sequences "
                             "need no padding)")
        if (self.packed and x.is_cuda and self.lrpe is None and state is None and not return_state
                and pad_mask is None
                and not _is_dtensor(self.qkvu_proj.weight)):  # tensor parallel: the projection's hooks split heads
            return self._forward_packed(x, cu_seqlens)
        parts = self.qkvu_proj(x).chunk(4 if self.gate else 3, dim=-1)
        q, k, v = (p.reshape(B, T, H, D) for p in parts[:3])
        q, k = self.act(q), self.act(k)
        if pad_mask is not None:
            v = v * pad_mask[:, :, None, None].to(v.dtype)
        if self.lrpe is not None:
            q, k = self.lrpe.pair(q, k, offset)
        slope = self.slope.float()  # stays fp32 even after model.to(bfloat16)
        if T == 1 and state is not None and cu_seqlens is None:
            o, state = self.recurrent_step(q[:, 0], k[:, 0], v[:, 0], slope, state)
            o = o[:, None]
        elif state is not None or return_state:
            o, state = _ops.lightning_attention(q, k, v, slope, initial_state=state, output_final_state=True,
                                                cu_seqlens=cu_seqlens)
        else:
            o, state = _ops.lightning_attention(q, k, v, slope, cu_seqlens=cu_seqlens), None
        o = self.norm(o.reshape(B, T, H * D))  # H * D < d when tensor parallelism gave this rank H of the heads
        if self.gate:
            o = o * parts[3]
        out = self.out_proj(o)
        return (out, state) if return_state else out

    def _forward_packed(self, x, cu_seqlens=None):
        """The same layer through ``lightning_attention_packed`` (see the class docstring)."""
        B, T, d = x.shape
        w, gemv = self.qkvu_proj.weight, self.qkvu_proj.gemv
        o = _ops.lightning_attention_packed(linear(x, w[: 3 * d], gemv=gemv), self.slope.float(), self.n_heads,
                                            self.qk_act, cu_seqlens=cu_seqlens)
        o = self.norm(o.reshape(B, T, d))
        if self.gate:
            o = o * linear(x, w[3 * d:], gemv=gemv)
        return self.out_proj(o)

    @staticmethod
    def recurrent_step(q, k, v, slope, state):
        """The paper's robust recurrence for one token (arXiv 2307.14995): ``S <- lambda S + k^T v``, ``o = q S``.

        ``q, k: [B, H, K]``, ``v: [B, H, V]``, ``state: [B, H, K, V]`` (fp32, or fp64 for fp64 inputs).
        Only ``lambda <= 1`` is ever applied, so nothing overflows however long the context.
        """
        cd = state.dtype
        lam = torch.exp(-slope.to(cd))[None, :, None, None]
        state = lam * state + k.to(cd)[..., :, None] * v.to(cd)[..., None, :]
        o = torch.einsum("bhk,bhkv->bhv", q.to(cd), state)
        return o.to(v.dtype), state


class SGLU(nn.Module):
    """``l3(act(l1(x)) * l2(x))``; ``act`` is the identity for SGLU (the paper's choice)."""

    def __init__(self, d_model: int, glu_dim: int, act: str = "none", gemv: bool = True):
        super().__init__()
        self.l1 = Linear(d_model, glu_dim, bias=False, gemv=gemv)
        self.l2 = Linear(d_model, glu_dim, bias=False, gemv=gemv)
        self.l3 = Linear(glu_dim, d_model, bias=False, gemv=gemv)
        if act not in ("none", "silu"):
            raise ValueError(f"unknown GLU activation {act!r}; choose 'none' or 'silu'")
        self.act = act

    def forward(self, x):
        a = self.l1(x)
        if self.act == "silu":
            a = F.silu(a)
        return self.l3(a * self.l2(x))
