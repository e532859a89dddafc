"""One TransNormerLLM decode step in five kernel launches per layer (issue 28), and their float64 references.

A decode step reads every weight once: at batch 1 it is bound by memory, and what separates it from
that floor is launches (a few microseconds each) and kernels too small to reach the bandwidth. Per
layer, with ``x`` the residual stream of the ``M`` sequences (fp32 here), the step is::

    K1  qkvu = norm(x) W_qkvu^T                              fused_gemv(norm)
    K2  o    = recurrence(phi(q), phi(k), v; S)  per head     recurrent_step (S updated in place; LRPE too)
    K3  x    = x + (norm(o) * u) W_o^T                       fused_gemv(norm, gate, residual)
    K4  h    = act(norm(x) W_1^T) * (norm(x) W_2^T)          fused_gemv(norm, second weight)
    K5  x    = x + h W_3^T                                   fused_gemv(residual)

plus one embedding gather before the layers and the final norm with the LM head after them
(``fused_gemv(norm)``). Where the eager step (``model.step``) launches ~40 kernels per layer and the
compiled one ~13, this one launches 5.

How the norms fuse: every program of a matrix-vector product reads the whole input row (it loops over
all of ``K`` for its ``BLOCK_N`` outputs), so it sums the squares of that row on the way and scales its
outputs by ``1/rms`` at the end, ``norm(x) W^T = (x W^T) / rms(x)`` (a gain, for ``norm="rms"``,
multiplies ``x`` first). GLA's output norm spans all heads, so a per-head recurrence kernel could not
close it without a grid-wide reduction; it moves into ``W_o``'s product (K3), with the gate ``u``.

Kernels: ``_fused_gemv_kernel`` (one program per ``BLOCK_N`` outputs and ``BLOCK_M`` rows: broadcast
multiply-adds in fp32 for up to 8 rows; ``tl.dot`` on tensor cores from 16 rows, where the multiply-adds
would cost as much as the weights' reads), ``_recurrent_kernel`` (one program per (value block, head,
sequence): the ``[K, BV]`` state tile read, decayed, updated and written once) and ``_embed_kernel``.
Their launch configurations are fixed by :func:`gemv_tile` / :func:`recurrent_tile` (no autotuning: an
autotuner synchronizes, and compiling its candidates is what a cold first call would pay);
``python -m tnlib gpu-check`` compiles every one. Intermediates (``qkvu``, ``o``, ``h``) are fp32;
weights are read in their own dtype. ``pdl=True`` (sm_90+, ``pdl_supported``) launches a kernel with
programmatic dependent launch: it waits for the previous kernel at its start and lets the next one launch
at once (``_gdc``), so that launch latency overlaps work; ``Implementation.decode_pdl`` turns it on for the
fused step. Each kernel has a float64 reference here (``*_reference``), which
``tests/test_decode_kernels.py`` checks it against under the interpreter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton import interpreting, launch
from .targets import device_target
from .lightning.op import feature_map_reference

__all__ = ["GemvTile", "gemv_tile", "recurrent_tile", "fused_gemv", "recurrent_step", "embed", "pdl_supported",
           "fused_gemv_reference", "recurrent_step_reference", "embed_reference", "GLU_ACT_CODES", "norm_eps_for"]

#: SGLU's activation on the first product (``ModelConfig.glu_act``): 0 none, 1 SiLU
GLU_ACT_CODES = {"none": 0, "silu": 1}


def norm_eps_for(dtype: torch.dtype, eps: float) -> float:
    """The norm's epsilon as the model's norms apply it to ``dtype`` activations (fp16: at least 1.6e-5,
    as ``tnlib.ops.srmsnorm``, which keeps ``1/rms`` finite in fp16)."""
    return max(eps, 1.6e-5) if dtype == torch.float16 else eps


@triton.jit
def _act(x, ACT: tl.constexpr):
    """The q/k feature map (``ACT_CODES``: 0 identity, 1 SiLU, 2 ``1 + elu``) of fp32 ``x``."""
    if ACT == 1:
        x = x * tl.sigmoid(x)
    elif ACT == 2:
        x = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    return x


@triton.jit
def _gdc(GDC: tl.constexpr):
    """With GDC (the kernel launched with programmatic dependent launch, sm_90+): wait until the previous
    kernel has finished and its writes are visible, then let the next kernel launch, so that its launch and
    start overlap this one's work. Before the wait nothing is read: the next kernel starts at most one
    kernel early, and only waits there. Without GDC, nothing."""
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _prefetch_rows(W, rows, mask_rows, K, BLOCK_N: tl.constexpr, LINE: tl.constexpr):
    """Hint L2 to fetch rows ``W + rows`` (``[BLOCK_N]`` element offsets; masked rows skipped) over all ``K``
    columns: one ``prefetch.global.L2`` per 128-byte line (``LINE`` elements). A hint: no value is read."""
    offs = tl.arange(0, 16) * LINE
    for k0 in range(0, K, 16 * LINE):
        ok = mask_rows[:, None] & ((k0 + offs[None, :]) < K)
        ptrs = tl.where(ok, W + rows[:, None] + k0 + offs[None, :], W)  # masked lines: W's first line again
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _tile_product(x, w, DOT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``x [BM, BK] (fp32) . w [BN, BK]^T`` summed over BK: ``[BM, BN, BK]`` products for the broadcast
    path (reduced once after the loop), or ``[BM, BN]`` through ``tl.dot`` (UPCAST: fp32 operands, the
    CPU interpreter's bf16 dot is wrong)."""
    if DOT:
        if UPCAST:
            p = tl.dot(x, tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            p = tl.dot(x.to(w.dtype), tl.trans(w), input_precision=DOT_PREC)
    else:
        p = x[:, None, :] * w.to(tl.float32)[None, :, :]
    return p


@triton.heuristics(dict(GATE=lambda args: args["U"] is not None, GAIN=lambda args: args["G"] is not None,
                        PAIR=lambda args: args["W2"] is not None, RESIDUAL=lambda args: args["R"] is not None))
@triton.jit
def _fused_gemv_kernel(
    X, U, G, W, W2, R, Y, M, N, K, sx, su, sw, sr, sy, eps,
    NORM: tl.constexpr, GATE: tl.constexpr, GAIN: tl.constexpr, PAIR: tl.constexpr, RESIDUAL: tl.constexpr,
    GLU_ACT: tl.constexpr, DOT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GDC: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, LINE: tl.constexpr = 64, SPLIT: tl.constexpr = 1,
):
    """``Y[m, n] = epilogue(sum_k in[m, k] W[n, k])`` for the program's rows and ``BLOCK_N`` columns, with
    ``in = X * U (GATE) * G (GAIN)``; NORM scales by ``1 / rms(X[m, :])`` (``eps``), PAIR forms a second
    product with ``W2`` and stores ``act(y) * y2`` (``GLU_ACT``), RESIDUAL adds ``R[m, n]`` (``R`` may be
    ``Y``: each element is read and written by one program). Row strides ``sx, su, sw, sr, sy``
    (``W2``'s is ``sw``); the last dimension of every tensor is contiguous. GDC: launched with programmatic
    dependent launch (``_gdc``); PREFETCH (with GDC): before waiting for the previous kernel, hint L2 to fetch
    the program's weight rows (``LINE`` elements per 128-byte line), which no kernel of a decode step writes.
    SPLIT > 1 (split-K, for products whose epilogue is only the residual add with ``R`` = ``Y`` fp32): the
    third grid axis cuts ``K`` in ``SPLIT`` ranges, each program atomically adds its share into ``Y`` (the
    norm, if any, still over the whole row; the order of the adds, and so the last bits, varies by run)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    if SPLIT > 1:  # this program's range of K, whole blocks
        k_per = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
        k_lo = tl.program_id(2) * k_per
        k_hi = tl.minimum(K, k_lo + k_per)
    else:
        k_lo = 0
        k_hi = K
    if PREFETCH:
        _prefetch_rows(W + k_lo, offs_n.to(tl.int64) * sw, mask_n, k_hi - k_lo, BLOCK_N, LINE)
        if PAIR:
            _prefetch_rows(W2 + k_lo, offs_n.to(tl.int64) * sw, mask_n, k_hi - k_lo, BLOCK_N, LINE)
    _gdc(GDC)
    x_ptr = X + offs_m[:, None].to(tl.int64) * sx + offs_k[None, :]
    w_rows = offs_n[:, None].to(tl.int64) * sw + offs_k[None, :]
    if DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:  # elementwise partial sums, reduced once after the loop (no shuffles inside it)
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if NORM:
        if SPLIT > 1:  # the norm spans the whole row, beyond this program's range
            for k0 in range(0, K, BLOCK_K):
                mask_x = mask_m[:, None] & ((k0 + offs_k) < K)[None, :]
                x = tl.load(x_ptr + k0, mask=mask_x, other=0.0).to(tl.float32)
                sq += x * x
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = (k0 + offs_k) < k_hi
        mask_x = mask_m[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + k0, mask=mask_x, other=0.0).to(tl.float32)
        if NORM:
            if SPLIT == 1:
                sq += x * x
        if GATE:
            x = x * tl.load(U + offs_m[:, None].to(tl.int64) * su + k0 + offs_k[None, :], mask=mask_x,
                            other=0.0).to(tl.float32)
        if GAIN:
            x = x * tl.load(G + k0 + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        mask_w = mask_n[:, None] & mask_k[None, :]
        acc += _tile_product(x, tl.load(W + w_rows + k0, mask=mask_w, other=0.0), DOT, DOT_PREC, UPCAST)
        if PAIR:
            acc2 += _tile_product(x, tl.load(W2 + w_rows + k0, mask=mask_w, other=0.0), DOT, DOT_PREC, UPCAST)
    if DOT:
        y, y2 = acc, acc2
    else:
        y, y2 = tl.sum(acc, axis=2), tl.sum(acc2, axis=2)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / K + eps)
        y = y * rstd[:, None]
        y2 = y2 * rstd[:, None]
    if PAIR:
        if GLU_ACT == 1:
            y = y * tl.sigmoid(y)
        y = y * y2
    mask_y = mask_m[:, None] & mask_n[None, :]
    y_ptr = Y + offs_m[:, None].to(tl.int64) * sy + offs_n[None, :]
    if SPLIT > 1:  # R is Y (the launcher checks): each range's share is added into the residual
        tl.atomic_add(y_ptr, y, mask=mask_y, sem="relaxed")
    else:
        if RESIDUAL:
            y += tl.load(R + offs_m[:, None].to(tl.int64) * sr + offs_n[None, :], mask=mask_y,
                         other=0.0).to(tl.float32)
        tl.store(y_ptr, y.to(Y.dtype.element_ty), mask=mask_y)


@triton.jit
def _state_tile(S, offs_k, offs_v, s_k, s_v):
    """Pointers to rows ``offs_k`` and columns ``offs_v`` of one ``[K, V]`` state with strides ``s_k, s_v``."""
    return S + offs_k[:, None] * s_k + offs_v[None, :] * s_v


@triton.heuristics(dict(LRPE=lambda args: args["THETA"] is not None))
@triton.jit
def _recurrent_kernel(
    QKV, SLOPE, S, O, POS, THETA, H, sqkv, ss, so,
    D: tl.constexpr, BV: tl.constexpr, ACT: tl.constexpr, LRPE: tl.constexpr, GDC: tl.constexpr = False,
):
    """One token of the robust recurrence for (value block, head, sequence) of the grid, in place:
    ``q, k = phi(q), phi(k)`` (with LRPE: ``[q cos | q sin]`` at the sequence's position ``POS[b]``,
    angles in fp64 reduced mod 2 pi as ``tnlib.nn.lrpe`` does), ``S <- lambda S + k^T v``, ``O = q S``.

    ``QKV``: ``[B, >= 3 H D]`` rows ``q | k | v`` (row stride ``sqkv``), ``S``: ``[B, H, K, D]`` fp32 with
    ``K = D`` (``2 D`` with LRPE), strides ``ss = (s_b, s_h, s_k, s_v)``; ``O``: ``[B, H D]`` (row stride ``so``)."""
    _gdc(GDC)
    i_v = tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, D)
    offs_v = i_v * BV + tl.arange(0, BV)
    row = QKV + i_b * sqkv + i_h * D
    q = _act(tl.load(row + offs_d).to(tl.float32), ACT)
    k = _act(tl.load(row + H * D + offs_d).to(tl.float32), ACT)
    v = tl.load(row + 2 * H * D + offs_v).to(tl.float32)
    lam = tl.exp(-tl.load(SLOPE + i_h).to(tl.float32))
    s_ptr = S + i_b * ss[0] + i_h.to(tl.int64) * ss[1]
    tile = _state_tile(s_ptr, offs_d, offs_v, ss[2], ss[3])
    if LRPE:
        two_pi = tl.full([], 6.283185307179586, tl.float64)
        ang = tl.load(POS + i_b).to(tl.float64) * tl.load(THETA + i_h * D + offs_d).to(tl.float64)
        ang = (ang - tl.floor(ang / two_pi) * two_pi).to(tl.float32)
        cos, sin = tl.cos(ang), tl.sin(ang)
        tile2 = tile + D * ss[2]  # rows D..2D-1 of the state: the sine half
        s1 = lam * tl.load(tile) + (k * cos)[:, None] * v[None, :]
        s2 = lam * tl.load(tile2) + (k * sin)[:, None] * v[None, :]
        o = tl.sum((q * cos)[:, None] * s1, axis=0) + tl.sum((q * sin)[:, None] * s2, axis=0)
        tl.store(tile2, s2)
    else:
        s1 = lam * tl.load(tile) + k[:, None] * v[None, :]
        o = tl.sum(q[:, None] * s1, axis=0)
    tl.store(tile, s1)
    tl.store(O + i_b * so + i_h * D + offs_v, o.to(O.dtype.element_ty))


@triton.jit
def _embed_kernel(IDS, E, X, d, se, sx, scale, BLOCK: tl.constexpr, GDC: tl.constexpr = False):
    """``X[m, :] = E[IDS[m], :] * scale`` for (column block, row) of the grid; row strides ``se``, ``sx``."""
    _gdc(GDC)
    i_c = tl.program_id(0)
    i_m = tl.program_id(1).to(tl.int64)
    cols = i_c * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    tok = tl.load(IDS + i_m).to(tl.int64)
    e = tl.load(E + tok * se + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(X + i_m * sx + cols, (e * scale).to(X.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GemvTile:
    """A launch configuration of ``_fused_gemv_kernel``: rows and columns per program, the reduction
    block, warps, pipeline stages, ``split_k`` ranges of the reduction (programs adding atomically into
    the residual; only for in-place residual products); ``dot``: through ``tl.dot`` (``block_m >= 16``)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1

    @property
    def dot(self) -> bool:
        return self.block_m >= 16


def gemv_tile(M: int, N: int, K: int, pair: bool = False, interpreted: bool | None = None,
              in_place: bool = False) -> GemvTile:
    """The configuration of a ``[M, K] x [N, K]^T`` product (the same on every GPU target: ``gpu-check``
    compiles each; the choices were timed by ``tools/tune_decode.py``, see ``results/bench/NOTES-decode.md``).
    One row: 512-wide reductions in 2 warps, at most 64 fp32 partial sums per thread (halved per weight with
    ``pair``), at most ``N / 256`` columns per program so that ~256 programs stream the weights. 2 to 8 rows:
    broadcast multiply-adds, 32 partial sums per thread. More rows: blocks of 16 through ``tl.dot``
    (16 x 32 x 64 tiles; 64 columns from 16,384 outputs). ``in_place``: the product adds into the residual
    it writes (``residual is out``, fp32, no ``weight2``), so its reduction may be split (``split_k``): up to
    16 rows, a long reduction (K >= 2,048) in 2 ranges (one row) or 4 (dot tiles), a short one at 9-16 rows
    in broadcast blocks of 4 rows. ``interpreted`` (default: ``TRITON_INTERPRET=1``): wider blocks, never
    split, as each program costs milliseconds of Python there."""
    interp = interpreting() if interpreted is None else interpreted
    long_k = K >= 2048
    if M > 8:  # a reduction block of 128 spills 230-560 B/thread on sm_75; 64 spills nowhere
        if in_place and M <= 16 and not interp:  # 1,024 outputs make 32 dot programs: too few for the bandwidth
            return GemvTile(16, 32, 64, 4, 3, split_k=4) if long_k else GemvTile(4, 16, 128, 4, 3)
        return GemvTile(16, 64 if N >= 16384 and not interp else 32, 64, 4, 3)
    bm = triton.next_power_of_2(M)
    if bm == 1 and not interp:
        bk = min(512, triton.next_power_of_2(K))
        wide = 1 << max(0, (N // 256).bit_length() - 1)  # the largest power of 2 <= N / 256
        bn = max(1, min(64 * 64 // (2 if pair else 1) // bk, triton.next_power_of_2(N), wide))
        return GemvTile(1, bn, bk, 2, 3, split_k=2 if in_place and long_k else 1)
    bk = min(256 if bm <= 2 else 128, triton.next_power_of_2(K))
    budget, cap = 32 * 128 // (2 if pair else 1), 16  # fp32 partial sums per program (4 warps, 32 per thread)
    if interp:
        budget, cap = budget * 8, 128
    bn = max(1, min(cap, budget // (bm * bk), triton.next_power_of_2(N)))
    return GemvTile(bm, bn, bk, 4, 3)


def recurrent_tile(B: int, H: int, D: int, lrpe: bool = False, interpreted: bool | None = None) -> tuple[int, int]:
    """``(BV, num_warps)`` of ``_recurrent_kernel``: value blocks of 16 columns, 32 from ~256 programs over
    the batch and heads (16 with LRPE, whose state is twice as tall), as timed by ``tools/tune_decode.py``;
    warps for about 32 state elements per thread (a ``[2 D, BV]`` state with LRPE). Interpreted: one
    program per head and sequence."""
    bv = min(D, 16 if lrpe else 32, max(16, triton.next_power_of_2(max(1, B * H * D // 256))))
    if interpreting() if interpreted is None else interpreted:
        bv = D
    return bv, _recurrent_warps(D, bv, lrpe)


def _recurrent_warps(D: int, bv: int, lrpe: bool) -> int:
    """Warps for about 32 elements of the ``[K, BV]`` state tile per thread."""
    return max(1, min(8, triton.next_power_of_2((2 if lrpe else 1) * D * bv // 1024)))


def _row_stride(t: torch.Tensor | None):
    return None if t is None else t.stride(0)


def fused_gemv(x, weight, *, out, norm_eps=None, gain=None, gate=None, weight2=None, glu_act: int = 0,
               residual=None, tile: GemvTile | None = None, pdl: bool = False, prefetch: bool = False) -> torch.Tensor:
    """``out = epilogue(prologue(x) @ weight.T)`` in one launch (see ``fused_gemv_reference`` for the
    formula), for ``x: [M, K]`` rows (any float dtype the kernels take), ``weight``/``weight2``: ``[N, K]``
    (contiguous rows), ``gate``: ``[M, K]``, ``gain``: ``[K]``, ``residual``: ``[M, N]`` (may be ``out``),
    ``out``: ``[M, N]``; every last dimension contiguous. ``pdl``: launch with programmatic dependent launch
    (``pdl_supported``; see ``_gdc``); ``prefetch`` (needs ``pdl``): the weights are hinted into L2 before the
    wait for the previous kernel. Unchecked beyond shapes (a decode step calls it ~120 times per token,
    inside a CUDA graph): returns ``out``."""
    M, K = x.shape
    N = weight.shape[0]
    pair_ok = weight2 is None or weight2.stride() == weight.stride()
    if weight.shape[1] != K or tuple(out.shape) != (M, N) or not pair_ok:
        raise ValueError(f"fused_gemv: x {tuple(x.shape)}, weight {tuple(weight.shape)}, out {tuple(out.shape)}"
                         + ("" if weight2 is None else f", weight2 {tuple(weight2.shape)} strided as weight"))
    in_place = (weight2 is None and residual is not None and residual.data_ptr() == out.data_ptr()
                and residual.stride() == out.stride() and out.dtype == torch.float32)
    t = tile or gemv_tile(M, N, K, weight2 is not None, in_place=in_place)
    if t.split_k > 1 and not in_place:
        raise ValueError(f"fused_gemv: split_k={t.split_k} adds into the residual: it needs residual=out (fp32) "
                         "and no weight2")
    grid = (triton.cdiv(N, t.block_n), triton.cdiv(M, t.block_m), t.split_k)
    launch(_fused_gemv_kernel, grid, X=x, U=gate, G=gain, W=weight, W2=weight2, R=residual, Y=out, M=M, N=N, K=K,
           sx=x.stride(0), su=_row_stride(gate), sw=weight.stride(0), sr=_row_stride(residual), sy=out.stride(0),
           eps=0.0 if norm_eps is None else float(norm_eps), NORM=norm_eps is not None, GLU_ACT=glu_act,
           DOT=t.dot, DOT_PREC="ieee" if weight.dtype == torch.float32 else "tf32",
           UPCAST=x.device.type == "cpu" and weight.dtype != torch.float32, BLOCK_M=t.block_m,
           BLOCK_N=t.block_n, BLOCK_K=t.block_k, SPLIT=t.split_k, num_warps=t.num_warps, num_stages=t.num_stages,
           **_pdl(pdl, x),
           **_prefetch(prefetch, pdl, weight))
    return out


def recurrent_step(qkv, state, slope, *, out, act: int, positions=None, theta=None, bv: int | None = None,
                   pdl: bool = False):
    """One token of every layer-head recurrence in one launch (``_recurrent_kernel``): ``qkv: [B, >= 3 H D]``
    (``q | k | v`` of the fused projection's output, any row stride), ``state: [B, H, K, D]`` fp32,
    updated in place (``K = 2 D`` with ``theta``: LRPE at ``positions: [B]``), ``slope: [H]``, ``out: [B, H D]``;
    ``pdl`` as ``fused_gemv``. Returns ``out``."""
    B, H, Kd, D = state.shape
    if Kd != (2 * D if theta is not None else D) or tuple(out.shape) != (B, H * D) or qkv.shape[1] < 3 * H * D:
        raise ValueError(f"recurrent_step: state {tuple(state.shape)}, qkv {tuple(qkv.shape)}, out {tuple(out.shape)}"
                         f"{', LRPE' if theta is not None else ''}")
    lrpe = theta is not None
    block_v, warps = recurrent_tile(B, H, D, lrpe) if bv is None else (bv, _recurrent_warps(D, bv, lrpe))
    launch(_recurrent_kernel, (D // block_v, H, B), QKV=qkv, SLOPE=slope, S=state, O=out, POS=positions, THETA=theta,
           H=H, sqkv=qkv.stride(0), ss=tuple(state.stride()), so=out.stride(0), D=D, BV=block_v, ACT=act,
           num_warps=warps, **_pdl(pdl, qkv))
    return out


def embed(ids, table, scale: float, *, out, pdl: bool = False) -> torch.Tensor:
    """``out[m] = table[ids[m]] * scale`` in one launch (``ids: [M]`` integers, ``table: [V, d]``, ``out: [M, d]``;
    ``pdl`` as ``fused_gemv``)."""
    M, d = out.shape
    block = min(1024, triton.next_power_of_2(d))
    launch(_embed_kernel, (triton.cdiv(d, block), M), IDS=ids, E=table, X=out, d=d, se=table.stride(0),
           sx=out.stride(0), scale=float(scale), BLOCK=block, num_warps=4, **_pdl(pdl, out))
    return out


def pdl_supported(device) -> bool:
    """Whether kernels on ``device`` can be launched with programmatic dependent launch: a CUDA GPU of
    compute capability 9.0 or newer (Hopper, Blackwell), not the interpreter. No driver query per call
    (``device_target`` looks a device up once)."""
    if interpreting() or torch.device(device).type != "cuda":
        return False
    try:
        return device_target(device).capability >= 90
    except ValueError:  # below sm_75: no tnlib kernel runs there at all
        return False


def _prefetch(prefetch: bool, pdl: bool, weight: torch.Tensor) -> dict:
    """The launch keywords of ``prefetch``: only with ``pdl`` (without it the loads follow at once)."""
    if not prefetch:
        return {}
    if not pdl:
        raise ValueError("prefetch=True needs pdl=True: the weights are hinted into L2 while the kernel waits for "
                         "the previous one, which only a programmatic dependent launch does")
    return {"PREFETCH": True, "LINE": 128 // weight.element_size()}


def _pdl(pdl: bool, t: torch.Tensor) -> dict:
    """The launch keywords of ``pdl``: the kernel's GDC flag and Triton's ``launch_pdl``; a clear error where
    the device cannot."""
    if not pdl:
        return {}
    if not pdl_supported(t.device):
        raise ValueError(f"pdl=True needs a CUDA GPU of compute capability 9.0 or newer, not {t.device}"
                         + (" under the Triton interpreter" if interpreting() else ""))
    return {"GDC": True, "launch_pdl": True}


# --- float64 references: what each kernel computes, for the tests -------------------------------------------


def fused_gemv_reference(x, weight, *, norm_eps=None, gain=None, gate=None, weight2=None, glu_act: int = 0,
                         residual=None) -> torch.Tensor:
    """``fused_gemv`` in float64: ``in = x * gate * gain`` (each if given); ``y = in @ weight.T`` (and
    ``y2 = in @ weight2.T``), both times ``1/sqrt(mean(x^2) + norm_eps)`` with a ``norm_eps``; with
    ``weight2`` the result is ``act(y) * y2`` (``glu_act`` 1: SiLU); plus ``residual``."""
    d = torch.float64
    xd = x.to(d)
    inp = xd * (1.0 if gate is None else gate.to(d)) * (1.0 if gain is None else gain.to(d))
    scale = 1.0 if norm_eps is None else torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + norm_eps)
    y = inp @ weight.to(d).T * scale
    if weight2 is not None:
        y = (torch.nn.functional.silu(y) if glu_act == 1 else y) * (inp @ weight2.to(d).T * scale)
    return y if residual is None else y + residual.to(d)


def recurrent_step_reference(qkv, state, slope, *, act: int, positions=None, theta=None):
    """``recurrent_step`` in float64: returns ``(o [B, H D], new state)`` (the state not modified)."""
    d = torch.float64
    B, H, Kd, D = state.shape
    q, k, v = (qkv[:, i * H * D:(i + 1) * H * D].to(d).reshape(B, H, D) for i in range(3))
    q, k = feature_map_reference(q, act), feature_map_reference(k, act)
    if theta is not None:
        ang = torch.remainder(positions.to(d)[:, None, None] * theta.to(d)[None], 2 * math.pi)
        c, s = torch.cos(ang), torch.sin(ang)
        q, k = torch.cat([q * c, q * s], -1), torch.cat([k * c, k * s], -1)
    new = torch.exp(-slope.to(d))[None, :, None, None] * state.to(d) + k[..., :, None] * v[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q, new).reshape(B, H * D), new


def embed_reference(ids, table, scale: float) -> torch.Tensor:
    """``embed`` in float64."""
    return table.to(torch.float64)[ids.long()] * scale

