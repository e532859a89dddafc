"""Pure-PyTorch references: the correctness ladder every fast kernel is tested against.

Taught in ``notebooks/01_linear_attention.ipynb`` (and ``03_decay`` for the decay mask).

All functions take the layout ``[B, T, H, D]`` and any float dtype. Arithmetic runs in float64 when
the inputs are float64 and in float32 otherwise (bf16/fp16 inputs are upcast); the output has the
dtype of ``v`` and the recurrent state is float32 (float64 for float64 inputs).

Decayed causal linear attention, with ``lambda_h = exp(-slope_h)``::

    S_t = lambda * S_{t-1} + k_t^T v_t        (S_{-1} = initial_state or 0)
    o_t = q_t S_t  =  sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s  +  lambda^(t+1) q_t S_{-1}

Three forms compute it: quadratic (masked left product), recurrent (right product, token by
token) and chunked (Lightning Attention-2's block algorithm: intra-block masked product plus an
inter-block state).

Each also takes packed sequences, ``cu_seqlens`` (int32/int64 ``[N + 1]``, from 0 to ``T``, strictly
increasing; flash-linear-attention's convention): ``q, k, v`` are ``[1, T, H, D]`` with sequence ``n`` in rows
``cu_seqlens[n] : cu_seqlens[n + 1]``, ``initial_state`` and the final state ``[N, H, K, V]``. The references
run the form on each sequence separately (a loop over sequences: the definition the kernels are tested
against, not a fast path).
"""
from __future__ import annotations

import math

import torch

from ._checks import check_attention_inputs, compute_dtype

__all__ = [
    "softmax_attention",
    "decay_mask",
    "linear_attention_quadratic",
    "linear_attention_recurrent",
    "linear_attention_chunked",
]


def softmax_attention(q, k, v, causal: bool = True, scale: float | None = None):
    """Causal softmax attention in ``[B, T, H, D]``: where notebook 01 starts."""
    B, T, H, K, V = check_attention_inputs(q, k, v, name="softmax_attention")
    cd = compute_dtype(q)
    scale = 1.0 / math.sqrt(K) if scale is None else scale
    qh, kh, vh = (x.to(cd).transpose(1, 2) for x in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2)) * scale  # [B, H, T, T]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    o = scores.softmax(dim=-1) @ vh
    return o.transpose(1, 2).to(v.dtype)


def _slope_or_zero(slope, H, dtype, device):
    if slope is None:
        return torch.zeros(H, dtype=dtype, device=device)
    return slope.to(dtype)


def decay_mask(slope: torch.Tensor, T: int, dtype=None) -> torch.Tensor:
    """``M[h, t, s] = exp(-slope_h (t - s))`` for ``s <= t``, else 0: shape ``[H, T, T]``."""
    dtype = dtype or (torch.float64 if slope.dtype == torch.float64 else torch.float32)
    t = torch.arange(T, device=slope.device)
    diff = (t[:, None] - t[None, :]).to(dtype)
    causal = diff >= 0
    # clamp before exp so masked (negative) distances never produce inf * 0 = nan
    m = torch.exp(-slope.to(dtype)[:, None, None] * diff.clamp(min=0))
    return m * causal


def _finish(o, state, v, output_final_state):
    o = o.transpose(1, 2).to(v.dtype)
    return (o, state) if output_final_state else o


def _per_sequence(form, q, k, v, slope, initial_state, output_final_state, cu_seqlens, **kw):
    """``form`` (a rung of the ladder) on each packed sequence of ``cu_seqlens`` on its own, from its own
    initial state; outputs concatenated along time, final states stacked ``[N, H, K, V]``."""
    check_attention_inputs(q, k, v, slope, initial_state, name=form.__name__, cu_seqlens=cu_seqlens)
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        s0 = None if initial_state is None else initial_state[n : n + 1]
        o, S = form(q[:, a:b], k[:, a:b], v[:, a:b], slope, s0, True, **kw)
        outs.append(o)
        states.append(S)
    o = torch.cat(outs, 1)
    return (o, torch.cat(states, 0)) if output_final_state else o


def linear_attention_quadratic(q, k, v, slope=None, initial_state=None, output_final_state=False, *,
                               cu_seqlens=None):
    """Left product ``O = [(Q K^T) * M] V``: O(T^2) time and memory, fully parallel.

    Returns ``o`` (``[B, T, H, V]``) or ``(o, S_{T-1})`` with the state ``[B, H, K, V]`` computed in
    closed form (``sum_s lambda^(T-1-s) k_s^T v_s + lambda^T S_{-1}``), not by recurrence.
    ``cu_seqlens``: packed sequences (module docstring).
    """
    if cu_seqlens is not None:
        return _per_sequence(linear_attention_quadratic, q, k, v, slope, initial_state, output_final_state,
                             cu_seqlens)
    B, T, H, K, V = check_attention_inputs(q, k, v, slope, initial_state, name="linear_attention_quadratic")
    cd = compute_dtype(q, initial_state)
    s = _slope_or_zero(slope, H, cd, q.device)
    qh, kh, vh = (x.to(cd).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    o = ((qh @ kh.transpose(-1, -2)) * decay_mask(s, T, cd)) @ vh
    pos = torch.arange(T, device=q.device, dtype=cd)
    if initial_state is not None:
        s0 = initial_state.to(cd)
        o = o + torch.exp(-s[:, None, None] * (pos[:, None] + 1)) * (qh @ s0)
    state = None
    if output_final_state:
        w = torch.exp(-s[:, None] * (T - 1 - pos))  # [H, T]: lambda^(T-1-s)
        state = (kh * w[..., None]).transpose(-1, -2) @ vh
        if initial_state is not None:
            state = state + torch.exp(-s * T)[:, None, None] * initial_state.to(cd)
    return _finish(o, state, v, output_final_state)


def linear_attention_recurrent(q, k, v, slope=None, initial_state=None, output_final_state=False, *,
                               cu_seqlens=None):
    """Right product token by token: ``S_t = lambda S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``.

    O(T K V) time, O(K V) state, sequential in T: the robust recurrence used for decoding. ``cu_seqlens``:
    packed sequences (module docstring): the recurrence restarts from each sequence's own initial state.
    """
    if cu_seqlens is not None:
        return _per_sequence(linear_attention_recurrent, q, k, v, slope, initial_state, output_final_state,
                             cu_seqlens)
    B, T, H, K, V = check_attention_inputs(q, k, v, slope, initial_state, name="linear_attention_recurrent")
    cd = compute_dtype(q, initial_state)
    lam = torch.exp(-_slope_or_zero(slope, H, cd, q.device))[None, :, None, None]  # [1, H, 1, 1]
    S = (
        initial_state.to(cd).clone()
        if initial_state is not None
        else torch.zeros(B, H, K, V, dtype=cd, device=q.device)
    )
    qc, kc, vc = (x.to(cd) for x in (q, k, v))
    outs = []
    for t in range(T):
        S = lam * S + kc[:, t, :, :, None] * vc[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qc[:, t], S))
    o = torch.stack(outs, dim=2)  # [B, H, T, V]
    return _finish(o, S, v, output_final_state)


def linear_attention_chunked(
    q, k, v, slope=None, initial_state=None, output_final_state=False, block_size: int = 64, *, cu_seqlens=None
):
    """Lightning Attention-2's block algorithm (arXiv 2401.04658) in PyTorch, 0-based in-block index.

    For each block of ``m <= block_size`` tokens starting after state ``S``::

        O_intra = [(Q_i K_i^T) * M] V_i                      M[r, c] = lambda^(r-c), r >= c
        O_inter = diag(lambda^(r+1)) Q_i S
        S      <- lambda^m S + (diag(lambda^(m-1-c)) K_i)^T V_i

    Any ``T`` (the last block may be partial) and any ``block_size >= 1``. ``cu_seqlens``: packed sequences
    (module docstring), each cut into blocks from its own start.
    """
    if cu_seqlens is not None:
        return _per_sequence(linear_attention_chunked, q, k, v, slope, initial_state, output_final_state,
                             cu_seqlens, block_size=block_size)
    B, T, H, K, V = check_attention_inputs(q, k, v, slope, initial_state, name="linear_attention_chunked")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"linear_attention_chunked: block_size must be a positive int, got {block_size!r}")
    cd = compute_dtype(q, initial_state)
    s = _slope_or_zero(slope, H, cd, q.device)
    qh, kh, vh = (x.to(cd).transpose(1, 2) for x in (q, k, v))
    S = (
        initial_state.to(cd)
        if initial_state is not None
        else torch.zeros(B, H, K, V, dtype=cd, device=q.device)
    )
    mask_full = decay_mask(s, min(block_size, T), cd)  # [H, Bk, Bk]
    outs = []
    for start in range(0, T, block_size):
        m = min(block_size, T - start)
        Qi, Ki, Vi = qh[:, :, start : start + m], kh[:, :, start : start + m], vh[:, :, start : start + m]
        r = torch.arange(m, device=q.device, dtype=cd)
        q_decay = torch.exp(-s[:, None] * (r + 1))[..., None]  # [H, m, 1]: lambda^(r+1)
        k_decay = torch.exp(-s[:, None] * (m - 1 - r))[..., None]  # [H, m, 1]: lambda^(m-1-r)
        o_intra = ((Qi @ Ki.transpose(-1, -2)) * mask_full[:, :m, :m]) @ Vi
        o_inter = (Qi * q_decay) @ S
        outs.append(o_intra + o_inter)
        S = torch.exp(-s * m)[:, None, None] * S + (Ki * k_decay).transpose(-1, -2) @ Vi
    o = torch.cat(outs, dim=2)
    return _finish(o, S, v, output_final_state)
