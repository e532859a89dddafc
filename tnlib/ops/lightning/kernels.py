"""Triton kernels for Lightning Attention (spec section 6.3), forward and hand-derived backward.

Notebook: ``notebooks/04_lightning_attention`` teaches the block algorithm these kernels implement.

One generic kernel serves the forward pass and all three gradient passes. It computes, for a
"query" ``a``, "key" ``b`` and "value" ``c`` (all ``[B, T, H, *]``) and a per-head decay
``lambda = exp(-slope)``::

    o_t = a_t ( lambda^(t+1-z) X + sum_{s <= t} lambda^(t-s) b_s^T c_s )

with ``X`` an optional start state and ``z = 0`` (``INIT_DECAY``) or ``z = 1``. With ``REVERSE``
time runs backwards (``t -> T-1-t``), which turns the causal sum into an anti-causal one. Then

    forward    o  = attn(q,  k,  v,  S0,   decay)           final state S_{T-1}
    dq         dq = attn(dO, v,  k,  S0^T, decay)
    dv         dv = attn(k,  q,  dO, G,    no decay, reverse)  final D_0, dS0 = lambda D_0
    dk         dk = attn(v,  dO, q,  G^T,  no decay, reverse)

where ``G`` is the gradient flowing into the returned final state. The derivation is in the
docstring of :mod:`tnlib.ops.lightning`.

Inside a kernel the sequence is cut into chunks of ``C`` tokens. The running state is kept in the
"shifted" convention ``P = lambda * S_{start-1}`` (fp32, ``[DK, BV]``, in registers) so that a start
state that should not decay on the first token (``G`` above) needs no ``1/lambda``. Per chunk
(0-based in-chunk index ``r``, chunk length ``m``)::

    o_r  = [(A B^T) * M] C  +  lambda^r a_r P          M[r, c] = lambda^(r-c) for r >= c
    U    = lambda^(m-1) P + (diag(lambda^(m-1-c)) B)^T C   (inclusive state at the chunk end)
    P    = lambda U

Only powers ``lambda^j`` with ``0 <= j <= C`` are ever formed inside a chunk. For long sequences
with few (batch, head) pairs the sequence is also cut into *segments* that run in parallel: a
first kernel computes each segment's local end state from a zero start, and each CTA of the main
kernel folds the local states of the segments before its own into its start state.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation; UPCAST feeds fp32 copies (the CPU interpreter's bf16 dot is broken)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    """fp32 logistic function; ``FAST``: ``0.5 + 0.5 tanh(x / 2)`` with one ``tanh.approx.f32``
    (relative error ~2^-11, below bf16's resolution) instead of an exp and a division, whose two
    special-function-unit operations per element would dominate the kernel's epilogue."""
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x * 0.5], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return 0.5 + 0.5 * t
    else:
        return tl.sigmoid(x)


@triton.jit
def _act_grad(x, ACT: tl.constexpr, FAST: tl.constexpr):
    """The q/k feature map's derivative at the pre-activation ``x`` (fp32): 1: SiLU, 2: 1+elu."""
    xf = x.to(tl.float32)
    if ACT == 1:
        sg = _sigmoid(xf, FAST)
        return sg * (1.0 + xf * (1.0 - sg))
    else:
        return tl.where(xf > 0, 1.0, tl.exp(tl.minimum(xf, 0.0)))


@triton.jit
def _feature_map_kernel(X, Y, n_rows, n_cols, sx, sy, ACT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """``Y = phi(X)`` over a ``[rows, cols]`` block with row strides ``sx``, ``sy`` (the q | k columns
    of the packed projection into a dense buffer): 1: SiLU, 2: 1+elu, computed in fp32."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (r[:, None] < n_rows) & (c[None, :] < n_cols)
    x = tl.load(X + r[:, None].to(tl.int64) * sx + c[None, :], mask=m, other=0.0).to(tl.float32)
    if ACT == 1:
        y = x * tl.sigmoid(x)
    else:
        y = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    tl.store(Y + r[:, None].to(tl.int64) * sy + c[None, :], y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _state_ptrs(S, i_b, i_h, s_b, s_h, s_k, s_v, offs_k, offs_v):
    """Pointers to the ``[DK, BV]`` tile of a ``[B, H, (...,) K, V]`` state tensor for (batch, head)."""
    return (S + i_b.to(tl.int64) * s_b + i_h.to(tl.int64) * s_h
            + offs_k[:, None] * s_k + offs_v[None, :] * s_v)


@triton.jit
def _fold_earlier_segments(P, LOCAL, i_b, i_h, seg, seg_len, slope, lam, offs_k, offs_v,
                           sl_b, sl_h, sl_s, sl_k, sl_v, flags, flag_stride, WAIT: tl.constexpr):
    """Start state of segment ``seg`` (shifted convention): fold in the local end states of segments
    ``0 .. seg-1``, each decayed over the segments after it. ``WAIT``: each state is published by
    another program of this launch; wait for its flag (``flags + j * flag_stride``) and read it from L2."""
    l_base = _state_ptrs(LOCAL, i_b, i_h, sl_b, sl_h, sl_k, sl_v, offs_k, offs_v)
    seg_decay = tl.exp(-slope * seg_len.to(tl.float32))  # underflows to 0 for long segments: exact enough
    for j in range(0, seg):
        if WAIT:
            while tl.atomic_add(flags + j * flag_stride, 0, sem="acquire") == 0:
                pass
            loc = tl.load(l_base + j * sl_s, cache_modifier=".cg")
        else:
            loc = tl.load(l_base + j * sl_s)
        P = P * seg_decay + lam * loc
    return P


@triton.jit
def _program_ids(SYNC, FUSED_STATE: tl.constexpr):
    """(value block, segment, batch*head) of this program: its grid position, or with ``FUSED_STATE``
    a ticket from the counter ``SYNC[0]``, so that programs number themselves in the order they
    started and every program a segment waits on (an earlier segment) started before it."""
    if FUSED_STATE:
        n_v = tl.num_programs(0)
        n_seg = tl.num_programs(1)
        ticket = tl.atomic_add(SYNC, 1)
        pid_v, seg, pid_bh = ticket % n_v, (ticket // n_v) % n_seg, ticket // (n_v * n_seg)
    else:
        pid_v, seg, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    return pid_v, seg, pid_bh


@triton.jit
def _segment_local_state(acc, b_base, sb_t, c_base, sc_t, seg_start, seg_end, T, slope, rows, offs_k, offs_v,
                         CH: tl.constexpr, REVERSE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc`` plus the end state of one segment from a zero start: its chunks' ``b^T c``, each decayed
    to the segment's end."""
    for start in range(seg_start, seg_end, CH):
        valid, t_phys, m = _chunk_rows(start, rows, seg_end, T, CH, REVERSE)
        bt = tl.load(b_base + t_phys[:, None] * sb_t + offs_k[None, :], mask=valid[:, None], other=0.0)
        ct = tl.load(c_base + t_phys[:, None] * sc_t + offs_v[None, :], mask=valid[:, None], other=0.0)
        acc = acc * tl.exp(-slope * m.to(tl.float32))
        acc += _chunk_state(bt, ct, valid, m, rows, slope, DOT_PREC, UPCAST, True)
    return acc


@triton.jit
def _publish_local_state(SYNC, LOCAL, b_base, sb_t, c_base, sc_t, i_b, i_h, pid_bh, pid_v, seg, n_seg, n_v,
                         seg_start, seg_end, T, slope, rows, offs_k, offs_v, sl_b, sl_h, sl_s, sl_k, sl_v,
                         BV: tl.constexpr, DK: tl.constexpr, CH: tl.constexpr, REVERSE: tl.constexpr,
                         DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Compute segment ``seg``'s local end state (``b^T c`` decayed over the segment, zero start) for one
    (batch, head, value block), store it in ``LOCAL`` and raise its flag in ``SYNC`` (release)."""
    acc = _segment_local_state(tl.zeros([DK, BV], dtype=tl.float32), b_base, sb_t, c_base, sc_t, seg_start,
                               seg_end, T, slope, rows, offs_k, offs_v, CH, REVERSE, DOT_PREC, UPCAST)
    l_ptr = _state_ptrs(LOCAL, i_b, i_h, sl_b, sl_h, sl_k, sl_v, offs_k, offs_v) + seg.to(tl.int64) * sl_s
    tl.store(l_ptr, acc)
    tl.debug_barrier()  # every thread's part of the state is written before the flag goes up
    flags = SYNC + 1 + (pid_bh * n_seg) * n_v + pid_v
    tl.atomic_xchg(flags + seg * n_v, 1, sem="release")


@triton.jit
def _segments_into_start(P, SYNC, LOCAL, b_base, sb_t, c_base, sc_t, i_b, i_h, pid_bh, pid_v, seg, n_seg, n_v,
                         seg_start, seg_end, seg_len, T, slope, lam, rows, offs_k, offs_v,
                         sl_b, sl_h, sl_s, sl_k, sl_v, PUBLISH: tl.constexpr, WAIT: tl.constexpr,
                         CH: tl.constexpr, REVERSE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """The start state ``P`` of segment ``seg`` with the earlier segments folded in. Their local states
    come from the segment-state kernel, or (``WAIT``) from other programs of this launch, which raise
    one flag per (batch, head, segment, value block) in ``SYNC``: wait for the flags of segments
    ``0 .. seg-1`` of this (batch, head, value block). ``PUBLISH``: first compute and publish this
    segment's own local state (``FUSED_STATE``: every program does its segment's state pass, then its
    output pass)."""
    if PUBLISH:
        if seg < n_seg - 1:  # the last segment's state is never needed
            _publish_local_state(SYNC, LOCAL, b_base, sb_t, c_base, sc_t, i_b, i_h, pid_bh, pid_v, seg, n_seg, n_v,
                                 seg_start, seg_end, T, slope, rows, offs_k, offs_v, sl_b, sl_h, sl_s, sl_k, sl_v,
                                 P.shape[1], P.shape[0], CH, REVERSE, DOT_PREC, UPCAST)
    flags = SYNC + 1 + (pid_bh * n_seg) * n_v + pid_v
    return _fold_earlier_segments(P, LOCAL, i_b, i_h, seg, seg_len, slope, lam, offs_k, offs_v,
                                  sl_b, sl_h, sl_s, sl_k, sl_v, flags, n_v, WAIT)


@triton.jit
def _chunk_rows(start, rows, seg_end, T, CH: tl.constexpr, REVERSE: tl.constexpr):
    """The chunk of logical times ``start + rows`` in a segment ending at ``seg_end``: which rows are
    real, their physical time index (time runs backwards with ``REVERSE``; 0 for padding rows, which
    are masked) and the chunk length ``m``."""
    t_log = start + rows
    valid = t_log < seg_end
    if REVERSE:
        t_phys = T - 1 - t_log
    else:
        t_phys = t_log
    t_phys = tl.where(valid, t_phys, 0).to(tl.int64)
    return valid, t_phys, tl.minimum(seg_end - start, CH)


@triton.jit
def _chunk_decays(rows, slope):
    """Constants of a full chunk: the decay mask ``M[r, c] = lambda^(r-c)`` (``r >= c``, else 0) and
    the query decay ``lambda^r``."""
    diff = rows[:, None] - rows[None, :]
    mask_dec = tl.where(diff >= 0, tl.exp(-slope * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    qdec = tl.exp(-slope * rows.to(tl.float32))
    return mask_dec, qdec


@triton.jit
def _chunk_state(bt, ct, valid, m, rows, slope, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                 SCALE_C: tl.constexpr = True):
    """What a chunk of length ``m`` adds to the state at its end: ``(diag(lambda^(m-1-c)) B)^T C``.

    ``SCALE_C`` computes it as ``B^T (diag(lambda^(m-1-c)) C)`` (the same product): where the value
    tile is the narrower one (forward, dq pass) its scaled copy is smaller and ``B`` goes to the
    product as loaded. With the launch's alignment, ptxas reports for tnl-385m's shape: forward
    104 -> 0 B/thread of spills, dq pass 120 -> 36; the dk/dv kernel (equal widths) spills more that
    way (228 -> 312) and scales ``B`` (``scripts/kernel_registers.py``). The generic kernel's launcher
    picks it per call (``lightning._scale_value_tile``; at ``DK = 256`` the value-scaled form faulted);
    the segment-state kernel always scales ``C``."""
    kdec = tl.where(valid, tl.exp(-slope * tl.maximum(m - 1 - rows, 0).to(tl.float32)), 0.0)
    if SCALE_C:
        ct_s = (ct.to(tl.float32) * kdec[:, None]).to(ct.dtype)
        out = _dot(tl.trans(bt), ct_s, DOT_PREC, UPCAST)
    else:
        bt_s = (bt.to(tl.float32) * kdec[:, None]).to(bt.dtype)
        out = _dot(tl.trans(bt_s), ct, DOT_PREC, UPCAST)
    return out


@triton.jit
def _advance_state(P, bt, ct, valid, m, rows, slope, lam, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                   SCALE_C: tl.constexpr = True):
    """End of a chunk of length ``m``: the inclusive state ``U = lambda^(m-1) P + (diag(lambda^(m-1-c)) B)^T C``
    and the next start state ``P = lambda U``."""
    U = P * tl.exp(-slope * (m - 1).to(tl.float32))
    U += _chunk_state(bt, ct, valid, m, rows, slope, DOT_PREC, UPCAST, SCALE_C)
    return U, U * lam


@triton.jit
def _segment_state_kernel(
    Bp, Cp, slope_ptr, LOCAL,
    T, H, seg_len,
    sb_b, sb_t, sb_h,
    sc_b, sc_t, sc_h,
    sl_b, sl_h, sl_s, sl_k, sl_v,
    DK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
    REVERSE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """LOCAL[b, h, seg, :, vblk] = sum_{s in seg} lambda^(end-1-s) b_s^T c_s (zero start state)."""
    pid_v = tl.program_id(0)
    seg = tl.program_id(1)
    pid_bh = tl.program_id(2)
    i_b = pid_bh // H
    i_h = pid_bh % H
    slope = tl.load(slope_ptr + i_h).to(tl.float32)

    rows = tl.arange(0, CH)
    offs_k = tl.arange(0, DK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    b_base = Bp + i_b.to(tl.int64) * sb_b + i_h.to(tl.int64) * sb_h
    c_base = Cp + i_b.to(tl.int64) * sc_b + i_h.to(tl.int64) * sc_h

    seg_start = seg * seg_len
    seg_end = tl.minimum(seg_start + seg_len, T)
    acc = _segment_local_state(tl.zeros([DK, BV], dtype=tl.float32), b_base, sb_t, c_base, sc_t, seg_start,
                               seg_end, T, slope, rows, offs_k, offs_v, CH, REVERSE, DOT_PREC, UPCAST)
    l_ptr = _state_ptrs(LOCAL, i_b, i_h, sl_b, sl_h, sl_k, sl_v, offs_k, offs_v) + seg.to(tl.int64) * sl_s
    tl.store(l_ptr, acc)


@triton.jit
def _attn_item(pid_v, seg, pid_bh, n_seg, n_v,
               A, Bp, Cp, O, INIT, LOCAL, FINAL, slope_ptr, E, SYNC, T, H, seg_len,
               sa_b, sa_t, sa_h, sb_b, sb_t, sb_h, sc_b, sc_t, sc_h, so_b, so_t, so_h,
               si_b, si_h, si_k, si_v, sl_b, sl_h, sl_s, sl_k, sl_v, sf_b, sf_h, sf_k, sf_v, se_b, se_t, se_h,
               DK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
               HAS_INIT: tl.constexpr, INIT_DECAY: tl.constexpr, HAS_LOCAL: tl.constexpr,
               STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
               GRAD_ACT: tl.constexpr, FAST: tl.constexpr, PUBLISH: tl.constexpr, WAIT: tl.constexpr,
               SCALE_C: tl.constexpr):
    """The generic kernel's work for one (value block, segment, batch*head) of ``n_v`` value blocks and
    ``n_seg`` segments: start state (with the earlier segments folded in), then the chunk sweep."""
    i_b = pid_bh // H
    i_h = pid_bh % H
    slope = tl.load(slope_ptr + i_h).to(tl.float32)
    lam = tl.exp(-slope)

    rows = tl.arange(0, CH)
    offs_k = tl.arange(0, DK)
    offs_v = pid_v * BV + tl.arange(0, BV)

    # start state P = lambda * S_{seg_start - 1}
    if HAS_INIT:
        P = tl.load(_state_ptrs(INIT, i_b, i_h, si_b, si_h, si_k, si_v, offs_k, offs_v)).to(tl.float32)
        if INIT_DECAY:
            P = P * lam
    else:
        P = tl.zeros([DK, BV], dtype=tl.float32)

    a_base = A + i_b.to(tl.int64) * sa_b + i_h.to(tl.int64) * sa_h
    b_base = Bp + i_b.to(tl.int64) * sb_b + i_h.to(tl.int64) * sb_h
    c_base = Cp + i_b.to(tl.int64) * sc_b + i_h.to(tl.int64) * sc_h
    o_base = O + i_b.to(tl.int64) * so_b + i_h.to(tl.int64) * so_h
    e_base = E + i_b.to(tl.int64) * se_b + i_h.to(tl.int64) * se_h
    seg_start = seg * seg_len
    seg_end = tl.minimum(seg_start + seg_len, T)

    if HAS_LOCAL:
        P = _segments_into_start(P, SYNC, LOCAL, b_base, sb_t, c_base, sc_t, i_b, i_h, pid_bh, pid_v, seg, n_seg,
                                 n_v, seg_start, seg_end, seg_len, T, slope, lam, rows, offs_k, offs_v,
                                 sl_b, sl_h, sl_s, sl_k, sl_v, PUBLISH, WAIT, CH, REVERSE, DOT_PREC, UPCAST)
    mask_dec, qdec = _chunk_decays(rows, slope)
    U = P
    for start in range(seg_start, seg_end, CH):
        valid, t_phys, m = _chunk_rows(start, rows, seg_end, T, CH, REVERSE)
        at = tl.load(a_base + t_phys[:, None] * sa_t + offs_k[None, :], mask=valid[:, None], other=0.0)
        bt = tl.load(b_base + t_phys[:, None] * sb_t + offs_k[None, :], mask=valid[:, None], other=0.0)
        ct = tl.load(c_base + t_phys[:, None] * sc_t + offs_v[None, :], mask=valid[:, None], other=0.0)
        if GRAD_ACT != 0:  # issued with the other loads, so its latency hides behind the dots
            et = tl.load(e_base + t_phys[:, None] * se_t + offs_v[None, :], mask=valid[:, None], other=0.0)
        # inter-chunk part: lambda^r a_r P
        o = _dot(at, P.to(at.dtype), DOT_PREC, UPCAST) * qdec[:, None]
        # intra-chunk part: [(A B^T) * M] C
        s = _dot(at, tl.trans(bt), DOT_PREC, UPCAST) * mask_dec
        o += _dot(s.to(ct.dtype), ct, DOT_PREC, UPCAST)
        if GRAD_ACT != 0:
            o = o * _act_grad(et, GRAD_ACT, FAST)
        tl.store(o_base + t_phys[:, None] * so_t + offs_v[None, :], o.to(O.dtype.element_ty), mask=valid[:, None])
        U, P = _advance_state(P, bt, ct, valid, m, rows, slope, lam, DOT_PREC, UPCAST, SCALE_C)

    if STORE_FINAL:
        if seg == n_seg - 1:
            tl.store(_state_ptrs(FINAL, i_b, i_h, sf_b, sf_h, sf_k, sf_v, offs_k, offs_v), U)


@triton.jit
def _lightning_kernel(
    A, Bp, Cp, O, INIT, LOCAL, FINAL, slope_ptr, E, SYNC,
    T, H, seg_len,
    sa_b, sa_t, sa_h,
    sb_b, sb_t, sb_h,
    sc_b, sc_t, sc_h,
    so_b, so_t, so_h,
    si_b, si_h, si_k, si_v,
    sl_b, sl_h, sl_s, sl_k, sl_v,
    sf_b, sf_h, sf_k, sf_v,
    se_b, se_t, se_h,
    DK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
    HAS_INIT: tl.constexpr, INIT_DECAY: tl.constexpr, HAS_LOCAL: tl.constexpr,
    STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    GRAD_ACT: tl.constexpr = 0, FAST: tl.constexpr = True, FUSED_STATE: tl.constexpr = False,
    SCALE_C: tl.constexpr = True,
):
    """One pass (see the module docstring). ``GRAD_ACT`` (1: SiLU, 2: 1+elu) multiplies the output
    by the q/k feature map's derivative at ``E`` (the pre-activation at the output's positions): the
    dq pass of the packed path then returns the gradient of the projection's q block.

    ``FUSED_STATE`` (with ``HAS_LOCAL``): the segment states come from this launch instead of a
    separate kernel. Each program takes a ticket from ``SYNC[0]`` (so programs number themselves in
    the order they actually started), computes its segment's local end state into ``LOCAL`` and
    raises its flag in ``SYNC``, then waits for the flags of the earlier segments of its (batch,
    head, value block) — all held by programs that started before it, so the wait always ends — and
    folds their states in before its output pass. The state pass of one program overlaps the output
    passes of others instead of running as a launch of its own."""
    pid_v, seg, pid_bh = _program_ids(SYNC, FUSED_STATE)
    _attn_item(pid_v, seg, pid_bh, tl.num_programs(1), tl.num_programs(0),
               A, Bp, Cp, O, INIT, LOCAL, FINAL, slope_ptr, E, SYNC, T, H, seg_len,
               sa_b, sa_t, sa_h, sb_b, sb_t, sb_h, sc_b, sc_t, sc_h, so_b, so_t, so_h,
               si_b, si_h, si_k, si_v, sl_b, sl_h, sl_s, sl_k, sl_v, sf_b, sf_h, sf_k, sf_v, se_b, se_t, se_h,
               DK, BV, CH, HAS_INIT, INIT_DECAY, HAS_LOCAL, STORE_FINAL, REVERSE, DOT_PREC, UPCAST,
               GRAD_ACT, FAST, FUSED_STATE, FUSED_STATE, SCALE_C)


@triton.jit
def _lightning_queue_kernel(
    A, Bp, Cp, O, INIT, LOCAL, FINAL, slope_ptr, E, SYNC,
    T, H, seg_len, n_seg, n_bh, lead,
    sa_b, sa_t, sa_h,
    sb_b, sb_t, sb_h,
    sc_b, sc_t, sc_h,
    so_b, so_t, so_h,
    si_b, si_h, si_k, si_v,
    sl_b, sl_h, sl_s, sl_k, sl_v,
    sf_b, sf_h, sf_k, sf_v,
    se_b, se_t, se_h,
    DK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, CH: tl.constexpr,
    HAS_INIT: tl.constexpr, INIT_DECAY: tl.constexpr,
    STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    GRAD_ACT: tl.constexpr = 0, FAST: tl.constexpr = True, SCALE_C: tl.constexpr = True,
):
    """The generic pass over ``n_seg`` segments with its segment states made in the same launch, by a
    work queue: a fixed number of programs take tickets from ``SYNC[0]`` until the queue is empty.
    The queue is a sequence of rounds ``r = 0, 1, ...`` of ``2 * n_bh * NV`` tickets each: first the
    local end state of segment ``r`` (``b^T c`` over the segment from a zero start, for every (batch,
    head, value block); published in ``LOCAL`` with a flag in ``SYNC``), then the output pass of
    segment ``r - lead`` (which waits for the flags of the segments before it and folds their states
    in). So the bandwidth-bound state items and the output items run side by side on the GPU, and an
    output item's states were queued ``lead`` rounds or more before it. A ticket is only taken by a
    running program and waits only on earlier tickets, so every wait ends. Tickets that name no work
    (no state for the last segment; no output item in the first ``lead`` rounds) are skipped."""
    n_items = n_bh * NV
    n_tickets = (n_seg + lead) * 2 * n_items
    ticket = tl.atomic_add(SYNC, 1)
    while ticket < n_tickets:
        rnd = ticket // (2 * n_items)
        w = ticket % (2 * n_items)
        is_state = w < n_items
        idx = tl.where(is_state, w, w - n_items)
        pid_bh = idx // NV
        pid_v = idx % NV
        if is_state:
            seg = rnd
            if seg < n_seg - 1:
                i_b = pid_bh // H
                i_h = pid_bh % H
                slope = tl.load(slope_ptr + i_h).to(tl.float32)
                seg_start = seg * seg_len
                seg_end = tl.minimum(seg_start + seg_len, T)
                _publish_local_state(SYNC, LOCAL, Bp + i_b.to(tl.int64) * sb_b + i_h.to(tl.int64) * sb_h, sb_t,
                                     Cp + i_b.to(tl.int64) * sc_b + i_h.to(tl.int64) * sc_h, sc_t, i_b, i_h,
                                     pid_bh, pid_v, seg, n_seg, NV, seg_start, seg_end, T, slope, tl.arange(0, CH),
                                     tl.arange(0, DK), pid_v * BV + tl.arange(0, BV), sl_b, sl_h, sl_s, sl_k, sl_v,
                                     BV, DK, CH, REVERSE, DOT_PREC, UPCAST)
        else:
            seg = rnd - lead
            if seg >= 0:
                if seg < n_seg:
                    _attn_item(pid_v, seg, pid_bh, n_seg, NV,
                               A, Bp, Cp, O, INIT, LOCAL, FINAL, slope_ptr, E, SYNC, T, H, seg_len,
                               sa_b, sa_t, sa_h, sb_b, sb_t, sb_h, sc_b, sc_t, sc_h, so_b, so_t, so_h,
                               si_b, si_h, si_k, si_v, sl_b, sl_h, sl_s, sl_k, sl_v, sf_b, sf_h, sf_k, sf_v,
                               se_b, se_t, se_h,
                               DK, BV, CH, HAS_INIT, INIT_DECAY, True, STORE_FINAL, REVERSE, DOT_PREC, UPCAST,
                               GRAD_ACT, FAST, False, True, SCALE_C)
        ticket = tl.atomic_add(SYNC, 1)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK_out, DV_out, INIT, LOCAL, FINAL, slope_ptr, E, SYNC,
    T, H, seg_len,
    sq_b, sq_t, sq_h,
    sk_b, sk_t, sk_h,
    sv_b, sv_t, sv_h,
    sd_b, sd_t, sd_h,
    sgk_b, sgk_t, sgk_h,
    sgv_b, sgv_t, sgv_h,
    si_b, si_h, si_k, si_v,
    sl_b, sl_h, sl_s, sl_k, sl_v,
    sf_b, sf_h, sf_k, sf_v,
    se_b, se_t, se_h,
    DK: tl.constexpr, DV: tl.constexpr, CH: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_LOCAL: tl.constexpr, STORE_FINAL: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    GRAD_ACT: tl.constexpr = 0, FAST: tl.constexpr = True, FUSED_STATE: tl.constexpr = False,
):
    """dk and dv in one reverse-time sweep sharing the state D (full [DK, DV] per CTA).

    In reverse time, with P = lambda * D_prev (shifted convention, as in _lightning_kernel)::

        dv = [(K Q^T) * M] dO + lambda^r K P          dk = [(V dO^T) * M] Q + lambda^r V P^T
        U  = lambda^(m-1) P + (diag(lambda^(m-1-c)) Q)^T dO,   P = lambda U

    With ``GRAD_ACT`` the stored dk is multiplied by the feature map's derivative at ``E`` (the
    pre-activation k): the gradient of the projection's k block. ``FUSED_STATE``: the segment states
    of ``q^T dO`` are computed in this launch (see ``_lightning_kernel``).
    """
    n_seg = tl.num_programs(1)
    pid_v, seg, pid_bh = _program_ids(SYNC, FUSED_STATE)
    i_b = pid_bh // H
    i_h = pid_bh % H
    slope = tl.load(slope_ptr + i_h).to(tl.float32)
    lam = tl.exp(-slope)

    rows = tl.arange(0, CH)
    offs_k = tl.arange(0, DK)
    offs_v = tl.arange(0, DV)

    if HAS_INIT:
        P = tl.load(_state_ptrs(INIT, i_b, i_h, si_b, si_h, si_k, si_v, offs_k, offs_v)).to(tl.float32)
    else:
        P = tl.zeros([DK, DV], dtype=tl.float32)

    q_base = Q + i_b.to(tl.int64) * sq_b + i_h.to(tl.int64) * sq_h
    k_base = K + i_b.to(tl.int64) * sk_b + i_h.to(tl.int64) * sk_h
    v_base = V + i_b.to(tl.int64) * sv_b + i_h.to(tl.int64) * sv_h
    d_base = DO + i_b.to(tl.int64) * sd_b + i_h.to(tl.int64) * sd_h
    gk_base = DK_out + i_b.to(tl.int64) * sgk_b + i_h.to(tl.int64) * sgk_h
    gv_base = DV_out + i_b.to(tl.int64) * sgv_b + i_h.to(tl.int64) * sgv_h
    e_base = E + i_b.to(tl.int64) * se_b + i_h.to(tl.int64) * se_h

    seg_start = seg * seg_len
    seg_end = tl.minimum(seg_start + seg_len, T)
    if HAS_LOCAL:  # states of q^T dO, reverse time
        P = _segments_into_start(P, SYNC, LOCAL, q_base, sq_t, d_base, sd_t, i_b, i_h, pid_bh, pid_v, seg, n_seg,
                                 tl.num_programs(0), seg_start, seg_end, seg_len, T, slope, lam, rows, offs_k, offs_v,
                                 sl_b, sl_h, sl_s, sl_k, sl_v, FUSED_STATE, FUSED_STATE, CH, True, DOT_PREC, UPCAST)
    mask_dec, qdec = _chunk_decays(rows, slope)
    U = P
    for start in range(seg_start, seg_end, CH):
        valid, t_phys, m = _chunk_rows(start, rows, seg_end, T, CH, True)
        qt = tl.load(q_base + t_phys[:, None] * sq_t + offs_k[None, :], mask=valid[:, None], other=0.0)
        kt = tl.load(k_base + t_phys[:, None] * sk_t + offs_k[None, :], mask=valid[:, None], other=0.0)
        vt = tl.load(v_base + t_phys[:, None] * sv_t + offs_v[None, :], mask=valid[:, None], other=0.0)
        dot_ = tl.load(d_base + t_phys[:, None] * sd_t + offs_v[None, :], mask=valid[:, None], other=0.0)
        Pc = P.to(kt.dtype)
        # dv
        dv = _dot(kt, Pc, DOT_PREC, UPCAST) * qdec[:, None]
        s1 = _dot(kt, tl.trans(qt), DOT_PREC, UPCAST) * mask_dec
        dv += _dot(s1.to(dot_.dtype), dot_, DOT_PREC, UPCAST)
        tl.store(gv_base + t_phys[:, None] * sgv_t + offs_v[None, :], dv.to(DV_out.dtype.element_ty),
                 mask=valid[:, None])
        # dk
        dk = _dot(vt, tl.trans(Pc), DOT_PREC, UPCAST) * qdec[:, None]
        s2 = _dot(vt, tl.trans(dot_), DOT_PREC, UPCAST) * mask_dec
        dk += _dot(s2.to(qt.dtype), qt, DOT_PREC, UPCAST)
        if GRAD_ACT != 0:  # loaded here: with the full [DK, DV] state live, an earlier load spills more
            et = tl.load(e_base + t_phys[:, None] * se_t + offs_k[None, :], mask=valid[:, None], other=0.0)
            dk = dk * _act_grad(et, GRAD_ACT, FAST)
        tl.store(gk_base + t_phys[:, None] * sgk_t + offs_k[None, :], dk.to(DK_out.dtype.element_ty),
                 mask=valid[:, None])
        # state D (reverse time) from q^T dO
        U, P = _advance_state(P, qt, dot_, valid, m, rows, slope, lam, DOT_PREC, UPCAST, False)

    if STORE_FINAL:
        if seg == n_seg - 1:
            tl.store(_state_ptrs(FINAL, i_b, i_h, sf_b, sf_h, sf_k, sf_v, offs_k, offs_v), U)
