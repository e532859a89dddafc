"""Triton kernels for Lightning Attention-2 (arXiv 2401.04658), forward and hand-derived backward.

Notebook ``04_lightning_attention`` writes a tutorial-sized forward kernel (one program per
(batch, head), the chunk loop, the state in registers). The production kernels add:

* value blocks (``BV``): a ``[DK, BV]`` slice of the state per program, so a 128x128 state fits in
  registers and B*H small still fills the GPU;
* segments (``seg_len``, ``LOCAL``): long sequences cut into parallel segments whose start states
  come from ``_segment_state_kernel``, so a few (batch, head) pairs at 32K tokens still fill the GPU;
* one generic kernel for the forward and the gradient passes (``REVERSE``, start state ``INIT``,
  ``INIT_DECAY``, final state): the backward is three more decayed linear attentions;
* ``_dkdv_kernel``: dk and dv from one reverse sweep sharing the state, so q, k, v, dO are read once;
* a fused feature-map derivative epilogue (``GRAD_ACT``): the packed path's backward writes the
  gradient of the pre-activation projection directly, with no separate elementwise pass;
* strided rows: q, k, v read as views of the fused projection's output, with no copy;
* packed sequences (``ITEMS``, ``VARLEN``): ``[1, total, H, D]`` rows holding many sequences back to
  back (``cu_seqlens``). Each program then takes one work item, one segment of one sequence (the table
  ``op._work_items`` builds on the device: sequence ``n``, segment ``j``, first row, length, index of the
  sequence's first segment state), and runs the same chunk loop over that sequence's rows only, from
  its own start state (``INIT[n]``), storing its own final state (``FINAL[n]``): chunks are cut from each
  sequence's start, so no chunk, state or score spans two sequences, whatever the lengths (down to 1).
  ``VARLEN`` is a constexpr (from ``ITEMS`` being given): without it every kernel compiles to the code it
  compiled to before packed sequences existed.

Interfaces. Each tensor argument comes with one tuple of its strides in elements (``sa`` for ``A``,
...): ``(s_b, s_t, s_h)`` for a ``[B, T, H, D]`` tensor (its last dimension contiguous), ``(s_b, s_h,
s_k, s_v)`` for a ``[B, H, K, V]`` state, ``(s_b, s_h, s_seg, s_k, s_v)`` for the segment states. An
optional tensor that is absent is None, with None strides; ``@triton.heuristics`` derive the flags the
kernel body reads (``HAS_INIT``, ``HAS_LOCAL``, ``STORE_FINAL``, ``VARLEN``) from that. The work table
``ITEMS`` (``[M, 5]`` int32, contiguous) has no strides. The launchers of
:mod:`.op` pass every argument by keyword (``_attn(..., init=..., init_decay=..., reverse=...)``).

The generic kernel computes, for a "query" ``a``, "key" ``b`` and "value" ``c`` (all
``[B, T, H, *]``) and a per-head decay ``lambda = exp(-slope)``::

    o_t = a_t ( lambda^(t+1-z) X + sum_{s <= t} lambda^(t-s) b_s^T c_s )

with ``X`` an optional start state and ``z = 0`` (``INIT_DECAY``) or ``z = 1``. With ``REVERSE``
time runs backwards (``t -> T-1-t``), which turns the causal sum into an anti-causal one. Then

    forward    o  = attn(q,  k,  v,  S0,   decay)           final state S_{T-1}
    dq         dq = attn(dO, v,  k,  S0^T, decay)
    dv         dv = attn(k,  q,  dO, G,    no decay, reverse)  final D_0, dS0 = lambda D_0
    dk         dk = attn(v,  dO, q,  G^T,  no decay, reverse)

where ``G`` is the gradient flowing into the returned final state (derivation: the docstring of
:mod:`tnlib.ops.lightning.op`).

Inside a kernel the sequence is cut into chunks of ``C`` tokens. The running state is kept in the
"shifted" convention ``P = lambda * S_{start-1}`` (fp32, ``[DK, BV]``, in registers) so that a start
state that should not decay on the first token (``G`` above) needs no ``1/lambda``. Per chunk
(0-based in-chunk index ``r``, chunk length ``m``)::

    o_r  = [(A B^T) * M] C  +  lambda^r a_r P          M[r, c] = lambda^(r-c) for r >= c
    U    = lambda^(m-1) P + (diag(lambda^(m-1-c)) B)^T C   (inclusive state at the chunk end)
    P    = lambda U

Only powers ``lambda^j`` with ``0 <= j <= C`` are ever formed inside a chunk.
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
def _fold_earlier_segments(P, LOCAL, i_b, i_h, seg, seg_len, slope, lam, offs_k, offs_v, sl):
    """Start state of segment ``seg`` (shifted convention): fold in the local end states of segments
    ``0 .. seg-1`` (``LOCAL``, strides ``sl = (s_b, s_h, s_seg, s_k, s_v)``), each decayed over the
    segments after it."""
    l_base = _state_ptrs(LOCAL, i_b, i_h, sl[0], sl[1], sl[3], sl[4], offs_k, offs_v)
    seg_decay = tl.exp(-slope * seg_len.to(tl.float32))  # underflows to 0 for long segments: exact enough
    for j in range(0, seg):
        P = P * seg_decay + lam * tl.load(l_base + j * sl[2])
    return P


@triton.jit
def _row_base(X, i_b, i_h, s):
    """Start of (batch, head) in a ``[B, T, H, D]`` tensor with strides ``s = (s_b, s_t, s_h)``: row ``t``
    of it is at ``+ t * s[1]``, its ``D`` elements contiguous."""
    return X + i_b.to(tl.int64) * s[0] + i_h.to(tl.int64) * s[2]


@triton.jit
def _seq_row_base(X, bos, i_h, s):
    """Start of head ``i_h`` of the sequence whose first row is ``bos`` in a ``[1, total, H, D]`` tensor with
    strides ``s = (s_b, s_t, s_h)``: row ``t`` of the sequence is at ``+ t * s[1]``."""
    return X + bos.to(tl.int64) * s[1] + i_h.to(tl.int64) * s[2]


@triton.jit
def _work_item(ITEMS, item):
    """Row ``item`` of the packed-sequence work table: ``(n, j, bos, length, loc0)``, segment ``j`` of sequence
    ``n``, which starts at row ``bos``, and the index of its segment 0 among the segment states (a padding
    row is all zeros: length 0, nothing to do)."""
    row = ITEMS + item.to(tl.int64) * 5
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)


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
                 SCALE_C: tl.constexpr):
    """What a chunk of length ``m`` adds to the state at its end: ``(diag(lambda^(m-1-c)) B)^T C``.

    ``SCALE_C`` computes it as ``B^T (diag(lambda^(m-1-c)) C)`` (the same product): where the value
    tile is the narrower one (forward, dq pass) its scaled copy is smaller and ptxas spills less; the
    dk/dv kernel (equal widths) spills less scaling ``B``. The launch config chooses (``plan.Tile``)."""
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
                   SCALE_C: tl.constexpr):
    """End of a chunk of length ``m``: the inclusive state
    ``U = lambda^(m-1) P + (diag(lambda^(m-1-c)) B)^T C`` and the next start state ``P = lambda U``."""
    U = P * tl.exp(-slope * (m - 1).to(tl.float32))
    U += _chunk_state(bt, ct, valid, m, rows, slope, DOT_PREC, UPCAST, SCALE_C)
    return U, U * lam


@triton.heuristics(dict(VARLEN=lambda args: args["ITEMS"] is not None))
@triton.jit
def _segment_state_kernel(
    Bp, Cp, slope_ptr, LOCAL, ITEMS, T, H, seg_len, sb, sc, sl,
    DK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
    REVERSE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SCALE_C: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """LOCAL[b, h, seg, :, vblk] = sum_{s in seg} lambda^(end-1-s) b_s^T c_s (zero start state); ``SCALE_C``
    as in ``_chunk_state`` (the plan's state tiles scale the value tile). ``VARLEN``: grid (value block,
    head, work item); the state of segment ``j`` of a sequence goes to ``LOCAL[0, h, loc0 + j]``, and a
    sequence's last segment stores nothing (no later segment folds it in)."""
    pid_v = tl.program_id(0)
    if VARLEN:
        i_h = tl.program_id(1)
        i_b, seg, bos, T, loc0 = _work_item(ITEMS, tl.program_id(2))
    else:
        seg = tl.program_id(1)
        pid_bh = tl.program_id(2)
        i_b = pid_bh // H
        i_h = pid_bh % H
    slope = tl.load(slope_ptr + i_h).to(tl.float32)

    rows = tl.arange(0, CH)
    offs_k = tl.arange(0, DK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    if VARLEN:
        b_base = _seq_row_base(Bp, bos, i_h, sb)
        c_base = _seq_row_base(Cp, bos, i_h, sc)
    else:
        b_base = _row_base(Bp, i_b, i_h, sb)
        c_base = _row_base(Cp, i_b, i_h, sc)

    seg_start = seg * seg_len
    seg_end = tl.minimum(seg_start + seg_len, T)
    if VARLEN:  # the sequence's last segment (or a padding item): an empty sweep
        seg_end = tl.where(seg_end < T, seg_end, seg_start)
    acc = tl.zeros([DK, BV], dtype=tl.float32)
    for start in range(seg_start, seg_end, CH):
        valid, t_phys, m = _chunk_rows(start, rows, seg_end, T, CH, REVERSE)
        bt = tl.load(b_base + t_phys[:, None] * sb[1] + offs_k[None, :], mask=valid[:, None], other=0.0)
        ct = tl.load(c_base + t_phys[:, None] * sc[1] + offs_v[None, :], mask=valid[:, None], other=0.0)
        acc = acc * tl.exp(-slope * m.to(tl.float32))
        acc += _chunk_state(bt, ct, valid, m, rows, slope, DOT_PREC, UPCAST, SCALE_C)
    if VARLEN:
        if seg_end > seg_start:
            l_ptr = _state_ptrs(LOCAL, 0 * i_h, i_h, sl[0], sl[1], sl[3], sl[4], offs_k, offs_v)
            tl.store(l_ptr + (loc0 + seg).to(tl.int64) * sl[2], acc)
    else:
        l_ptr = _state_ptrs(LOCAL, i_b, i_h, sl[0], sl[1], sl[3], sl[4], offs_k, offs_v) + seg.to(tl.int64) * sl[2]
        tl.store(l_ptr, acc)


@triton.heuristics(dict(HAS_INIT=lambda args: args["INIT"] is not None,
                        HAS_LOCAL=lambda args: args["LOCAL"] is not None,
                        STORE_FINAL=lambda args: args["FINAL"] is not None,
                        VARLEN=lambda args: args["ITEMS"] is not None))
@triton.jit
def _lightning_kernel(
    A, Bp, Cp, O, INIT, LOCAL, FINAL, slope_ptr, E, ITEMS, T, H, seg_len, sa, sb, sc, so, si, sl, sf, se,
    DK: tl.constexpr, BV: tl.constexpr, CH: tl.constexpr,
    HAS_INIT: tl.constexpr, INIT_DECAY: tl.constexpr, HAS_LOCAL: tl.constexpr,
    STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    GRAD_ACT: tl.constexpr, FAST: tl.constexpr, SCALE_C: tl.constexpr, VARLEN: tl.constexpr,
):
    """One pass (see the module docstring) for the (value block, segment, batch*head) of the grid:
    start state, earlier segments folded in, then the chunk sweep. ``GRAD_ACT`` (1: SiLU, 2: 1+elu)
    multiplies the output by the q/k feature map's derivative at ``E`` (the pre-activation at the
    output's positions; None without ``GRAD_ACT``): the dq pass of the packed path then returns the
    gradient of the projection's q block. ``INIT``, ``LOCAL`` and ``FINAL`` may be None (absent; the
    ``HAS_INIT``, ``HAS_LOCAL`` and ``STORE_FINAL`` flags follow from that). ``VARLEN`` (``ITEMS`` given):
    the grid is (value block, head, work item) over packed sequences, ``INIT`` and ``FINAL`` hold one
    state per sequence and ``LOCAL`` is ``[1, H, G, K, V]`` (see the module docstring)."""
    pid_v = tl.program_id(0)
    if VARLEN:  # one segment of one sequence: T is its length from here on
        i_h = tl.program_id(1)
        i_b, seg, bos, T, loc0 = _work_item(ITEMS, tl.program_id(2))
    else:
        seg = tl.program_id(1)
        pid_bh = tl.program_id(2)
        i_b = pid_bh // H
        i_h = pid_bh % H
    slope = tl.load(slope_ptr + i_h).to(tl.float32)
    lam = tl.exp(-slope)

    rows = tl.arange(0, CH)
    offs_k = tl.arange(0, DK)
    offs_v = pid_v * BV + tl.arange(0, BV)

    # start state P = lambda * S_{seg_start - 1}
    if HAS_INIT:
        P = tl.load(_state_ptrs(INIT, i_b, i_h, si[0], si[1], si[2], si[3], offs_k, offs_v)).to(tl.float32)
        if INIT_DECAY:
            P = P * lam
    else:
        P = tl.zeros([DK, BV], dtype=tl.float32)

    if VARLEN:
        a_base = _seq_row_base(A, bos, i_h, sa)
        b_base = _seq_row_base(Bp, bos, i_h, sb)
        c_base = _seq_row_base(Cp, bos, i_h, sc)
        o_base = _seq_row_base(O, bos, i_h, so)
        if GRAD_ACT != 0:
            e_base = _seq_row_base(E, bos, i_h, se)
    else:
        a_base = _row_base(A, i_b, i_h, sa)
        b_base = _row_base(Bp, i_b, i_h, sb)
        c_base = _row_base(Cp, i_b, i_h, sc)
        o_base = _row_base(O, i_b, i_h, so)
        if GRAD_ACT != 0:
            e_base = _row_base(E, i_b, i_h, se)
    seg_start = seg * seg_len
    seg_end = tl.minimum(seg_start + seg_len, T)

    if HAS_LOCAL:
        if VARLEN:  # this sequence's earlier segments: states loc0 .. loc0 + seg - 1 of LOCAL[0, h]
            P = _fold_earlier_segments(P, LOCAL + loc0.to(tl.int64) * sl[2], 0 * i_h, i_h, seg, seg_len, slope,
                                       lam, offs_k, offs_v, sl)
        else:
            P = _fold_earlier_segments(P, LOCAL, i_b, i_h, seg, seg_len, slope, lam, offs_k, offs_v, sl)
    mask_dec, qdec = _chunk_decays(rows, slope)
    U = P
    for start in range(seg_start, seg_end, CH):
        valid, t_phys, m = _chunk_rows(start, rows, seg_end, T, CH, REVERSE)
        at = tl.load(a_base + t_phys[:, None] * sa[1] + offs_k[None, :], mask=valid[:, None], other=0.0)
        bt = tl.load(b_base + t_phys[:, None] * sb[1] + offs_k[None, :], mask=valid[:, None], other=0.0)
        ct = tl.load(c_base + t_phys[:, None] * sc[1] + offs_v[None, :], mask=valid[:, None], other=0.0)
        if GRAD_ACT != 0:  # issued with the other loads, so its latency hides behind the dots
            et = tl.load(e_base + t_phys[:, None] * se[1] + offs_v[None, :], mask=valid[:, None], other=0.0)
        # inter-chunk part: lambda^r a_r P
        o = _dot(at, P.to(at.dtype), DOT_PREC, UPCAST) * qdec[:, None]
        # intra-chunk part: [(A B^T) * M] C
        s = _dot(at, tl.trans(bt), DOT_PREC, UPCAST) * mask_dec
        o += _dot(s.to(ct.dtype), ct, DOT_PREC, UPCAST)
        if GRAD_ACT != 0:
            o = o * _act_grad(et, GRAD_ACT, FAST)
        tl.store(o_base + t_phys[:, None] * so[1] + offs_v[None, :], o.to(O.dtype.element_ty),
                 mask=valid[:, None])
        U, P = _advance_state(P, bt, ct, valid, m, rows, slope, lam, DOT_PREC, UPCAST, SCALE_C)

    if STORE_FINAL:
        if VARLEN:
            if (T > 0) & (seg_end == T):  # the sequence's last segment (T = 0: a padding item)
                tl.store(_state_ptrs(FINAL, i_b, i_h, sf[0], sf[1], sf[2], sf[3], offs_k, offs_v), U)
        else:
            if seg == tl.num_programs(1) - 1:
                tl.store(_state_ptrs(FINAL, i_b, i_h, sf[0], sf[1], sf[2], sf[3], offs_k, offs_v), U)


@triton.heuristics(dict(HAS_INIT=lambda args: args["INIT"] is not None,
                        HAS_LOCAL=lambda args: args["LOCAL"] is not None,
                        STORE_FINAL=lambda args: args["FINAL"] is not None,
                        VARLEN=lambda args: args["ITEMS"] is not None))
@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK_out, DV_out, INIT, LOCAL, FINAL, slope_ptr, E, ITEMS, T, H, seg_len,
    sq, sk, sv, sd, sgk, sgv, si, sl, sf, se,
    DK: tl.constexpr, DV: tl.constexpr, CH: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_LOCAL: tl.constexpr, STORE_FINAL: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, GRAD_ACT: tl.constexpr, FAST: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """dk and dv in one reverse-time sweep sharing the state D (full [DK, DV] per CTA).

    In reverse time, with P = lambda * D_prev (shifted convention, as in _lightning_kernel)::

        dv = [(K Q^T) * M] dO + lambda^r K P          dk = [(V dO^T) * M] Q + lambda^r V P^T
        U  = lambda^(m-1) P + (diag(lambda^(m-1-c)) Q)^T dO,   P = lambda U

    With ``GRAD_ACT`` the stored dk is multiplied by the feature map's derivative at ``E`` (the
    pre-activation k; None without it): the gradient of the projection's k block. ``INIT`` (G), ``LOCAL``
    (the segment states of ``q^T dO``, reverse time) and ``FINAL`` (D_0) may be None, and ``VARLEN`` (packed
    sequences, ``ITEMS`` given) works as in ``_lightning_kernel``.
    """
    if VARLEN:  # one segment of one sequence (its reversed time): T is its length from here on
        i_h = tl.program_id(1)
        i_b, seg, bos, T, loc0 = _work_item(ITEMS, tl.program_id(2))
    else:
        seg = tl.program_id(1)
        pid_bh = tl.program_id(2)
        i_b = pid_bh // H
        i_h = pid_bh % H
    slope = tl.load(slope_ptr + i_h).to(tl.float32)
    lam = tl.exp(-slope)

    rows = tl.arange(0, CH)
    offs_k = tl.arange(0, DK)
    offs_v = tl.arange(0, DV)

    if HAS_INIT:
        P = tl.load(_state_ptrs(INIT, i_b, i_h, si[0], si[1], si[2], si[3], offs_k, offs_v)).to(tl.float32)
    else:
        P = tl.zeros([DK, DV], dtype=tl.float32)

    if VARLEN:
        q_base = _seq_row_base(Q, bos, i_h, sq)
        k_base = _seq_row_base(K, bos, i_h, sk)
        v_base = _seq_row_base(V, bos, i_h, sv)
        d_base = _seq_row_base(DO, bos, i_h, sd)
        gk_base = _seq_row_base(DK_out, bos, i_h, sgk)
        gv_base = _seq_row_base(DV_out, bos, i_h, sgv)
        if GRAD_ACT != 0:
            e_base = _seq_row_base(E, bos, i_h, se)
    else:
        q_base = _row_base(Q, i_b, i_h, sq)
        k_base = _row_base(K, i_b, i_h, sk)
        v_base = _row_base(V, i_b, i_h, sv)
        d_base = _row_base(DO, i_b, i_h, sd)
        gk_base = _row_base(DK_out, i_b, i_h, sgk)
        gv_base = _row_base(DV_out, i_b, i_h, sgv)
        if GRAD_ACT != 0:
            e_base = _row_base(E, i_b, i_h, se)

    seg_start = seg * seg_len
    seg_end = tl.minimum(seg_start + seg_len, T)
    if HAS_LOCAL:
        if VARLEN:
            P = _fold_earlier_segments(P, LOCAL + loc0.to(tl.int64) * sl[2], 0 * i_h, i_h, seg, seg_len, slope,
                                       lam, offs_k, offs_v, sl)
        else:
            P = _fold_earlier_segments(P, LOCAL, i_b, i_h, seg, seg_len, slope, lam, offs_k, offs_v, sl)
    mask_dec, qdec = _chunk_decays(rows, slope)
    U = P
    for start in range(seg_start, seg_end, CH):
        valid, t_phys, m = _chunk_rows(start, rows, seg_end, T, CH, True)
        qt = tl.load(q_base + t_phys[:, None] * sq[1] + offs_k[None, :], mask=valid[:, None], other=0.0)
        kt = tl.load(k_base + t_phys[:, None] * sk[1] + offs_k[None, :], mask=valid[:, None], other=0.0)
        vt = tl.load(v_base + t_phys[:, None] * sv[1] + offs_v[None, :], mask=valid[:, None], other=0.0)
        dot_ = tl.load(d_base + t_phys[:, None] * sd[1] + offs_v[None, :], mask=valid[:, None], other=0.0)
        Pc = P.to(kt.dtype)
        # dv
        dv = _dot(kt, Pc, DOT_PREC, UPCAST) * qdec[:, None]
        s1 = _dot(kt, tl.trans(qt), DOT_PREC, UPCAST) * mask_dec
        dv += _dot(s1.to(dot_.dtype), dot_, DOT_PREC, UPCAST)
        tl.store(gv_base + t_phys[:, None] * sgv[1] + offs_v[None, :], dv.to(DV_out.dtype.element_ty),
                 mask=valid[:, None])
        # dk
        dk = _dot(vt, tl.trans(Pc), DOT_PREC, UPCAST) * qdec[:, None]
        s2 = _dot(vt, tl.trans(dot_), DOT_PREC, UPCAST) * mask_dec
        dk += _dot(s2.to(qt.dtype), qt, DOT_PREC, UPCAST)
        if GRAD_ACT != 0:  # loaded here: with the full [DK, DV] state live, an earlier load spills more
            et = tl.load(e_base + t_phys[:, None] * se[1] + offs_k[None, :], mask=valid[:, None], other=0.0)
            dk = dk * _act_grad(et, GRAD_ACT, FAST)
        tl.store(gk_base + t_phys[:, None] * sgk[1] + offs_k[None, :], dk.to(DK_out.dtype.element_ty),
                 mask=valid[:, None])
        # state D (reverse time) from q^T dO
        U, P = _advance_state(P, qt, dot_, valid, m, rows, slope, lam, DOT_PREC, UPCAST, False)

    if STORE_FINAL:
        if VARLEN:
            if (T > 0) & (seg_end == T):
                tl.store(_state_ptrs(FINAL, i_b, i_h, sf[0], sf[1], sf[2], sf[3], offs_k, offs_v), U)
        else:
            if seg == tl.num_programs(1) - 1:
                tl.store(_state_ptrs(FINAL, i_b, i_h, sf[0], sf[1], sf[2], sf[3], offs_k, offs_v), U)
