"""Lightning Attention as ``torch.library`` custom ops: launchers, autograd and fake implementations.

Contract (layout ``[B, T, H, D]`` everywhere)::

    S_t = lambda_h S_{t-1} + k_t^T v_t        S_{-1} = initial_state or 0   ([B, H, K, V], fp32)
    o_t = q_t S_t                             lambda_h = exp(-slope_h)

Backward, derived by hand. With ``dO`` the output gradient and ``G`` the gradient flowing into
the returned final state ``S_{T-1}`` (zero when unused)::

    S_t   = lambda^(t+1) S_{-1} + sum_{s<=t} lambda^(t-s) k_s^T v_s
    D_t   = lambda^(T-1-t) G + sum_{s>=t} lambda^(s-t) q_s^T dO_s          (dKV in arXiv 2401.04658)
    dq_t  = dO_t S_t^T        dk_t = v_t D_t^T        dv_t = k_t D_t       dS_{-1} = lambda D_0

Each of the three gradient lines is itself a decayed linear attention: ``dq`` runs forward in
time with query ``dO``, key ``v``, value ``k`` and start state ``S_{-1}^T``; ``dv`` runs backward
in time with query ``k``, key ``q``, value ``dO`` and start state ``G``, entering undecayed;
``dk`` runs backward with query ``v``, key ``dO``, value ``q`` and start state ``G^T``. So one
generic kernel (:mod:`.kernels`) serves all four passes; ``_dkdv_kernel`` fuses the last two.

Packed sequences (``cu_seqlens``, ``[N + 1]``): ``[1, total, H, D]`` rows hold ``N`` sequences back to back; every
line above holds per sequence (its own ``S_{-1}``, ``G``, ``D``, ``dS_{-1}``; ``[N, H, K, V]``). The launchers hand
the kernels a work table (``_work_items``: one row per segment of a sequence) and the same passes run over it.
A ``PackedSequences`` holds boundaries checked once and their tables, built once per segment length, for the many
calls of one model step (every layer, forward and backward); a plain ``cu_seqlens`` tensor is checked and gets its
table at each call.

Dispatch (``tnlib.ops._triton.use_triton``): fp16/bf16/fp32 tensors on CUDA, or on the CPU under
``TRITON_INTERPRET=1``, run the kernels through custom ops (opaque to ``torch.compile``, with fake
implementations and registered autograd). Everything else takes
:func:`tnlib.ops.linear_attention_chunked` (pure PyTorch, differentiable). ``slope`` receives no
gradient from the kernel path (it is a fixed buffer in TransNormerLLM).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .._checks import check_attention_inputs, check_cu_seqlens
from .._triton import interpreting, launch, use_triton
from ..reference import linear_attention_chunked
from ..targets import device_target
from .plan import LaunchConfig, Tile, launch_config

SUPPORTED_K = (16, 32, 64, 128, 256)
SUPPORTED_V = (16, 32, 64, 128)
#: Feature-map codes (the kernels' GRAD_ACT argument; 0 = identity).
ACT_CODES = {"none": 0, "silu": 1, "1+elu": 2}


def _kernels():
    from . import kernels  # imported late: Triton reads TRITON_INTERPRET when the kernels are decorated

    return kernels


def _alloc(shape, dtype, device):
    """Every kernel output is allocated here (tests fill it with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_f32(like):
    """A placeholder output: custom-op outputs must be tensors, and distinct ones (no aliasing)."""
    return like.new_empty((0,), dtype=torch.float32)


def _last_contig(x):
    """``x``, or a copy of it where its last dimension is not contiguous (the kernels read rows of ``D``)."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


#: Each tensor parameter of the kernels and the parameter of its stride tuple. Row tensors ``[B, T, H, D]``
#: (``_ROWS``) take ``(s_b, s_t, s_h)`` (their last dimension contiguous); state tensors every stride.
_STRIDES = dict(A="sa", Bp="sb", Cp="sc", O="so", E="se", Q="sq", K="sk", V="sv", DO="sd", DK_out="sgk",
                DV_out="sgv", INIT="si", LOCAL="sl", FINAL="sf")
_ROWS = ("A", "Bp", "Cp", "O", "E", "Q", "K", "V", "DO", "DK_out", "DV_out")


def _tensors(**tensors):
    """The kernel arguments of ``tensors`` (by parameter name; None: absent): each tensor and its stride
    tuple (None for an absent one). The one place where the kernels' strides are taken. ``ITEMS`` (the
    packed-sequence work table, contiguous ``[M, 5]``) goes without strides."""
    out = {}
    for name, x in tensors.items():
        out[name] = x
        if name != "ITEMS":
            out[_STRIDES[name]] = None if x is None else tuple(x.stride()[:3] if name in _ROWS else x.stride())
    return out


#: Work items a launch over packed sequences may have: grid axis 2 of CUDA's launch limits.
MAX_WORK_ITEMS = 65535


def _n_work_items(n_seqs: int, total: int, seg_len: int) -> int:
    """Rows of the work table: an upper bound on the segments of ``n_seqs`` sequences of ``total`` tokens
    (``sum ceil(len / seg_len) <= n_seqs + total // seg_len``), known from shapes alone."""
    return n_seqs + total // seg_len


def _n_seqs(items, total: int, seg_len: int) -> int:
    """The number of sequences behind a work table (the inverse of ``_n_work_items``)."""
    return items.shape[0] - total // seg_len


def _n_local(total: int, seg_len: int) -> int:
    """Segment states packed sequences may need: every segment but a sequence's last is ``seg_len`` tokens,
    so at most ``total // seg_len`` of them (0: no sequence can be split, no state pass)."""
    return total // seg_len


def _work_items(cu_seqlens, total: int, seg_len: int):
    """The work table of packed sequences (``cu_seqlens``, ``total`` tokens) cut into segments of ``seg_len``
    tokens: ``[M, 5]`` int32 rows ``(n, j, bos, length, loc0)``, segment ``j`` of sequence ``n`` (first row
    ``bos``) and the index of the sequence's segment 0 among the segment states (``loc0 + j`` for ``j`` below
    its last segment). ``M = _n_work_items(...)``; rows past the real segments are zeros (length 0: the
    kernels skip them). Rows are ordered longest segment first, so the programs with the most tokens start
    first and short ones fill in behind them. Built on the device with a few tensor ops: no host sync,
    no loop over sequences."""
    cu = cu_seqlens.to(torch.int64)
    n_seqs = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    nseg = (lens + seg_len - 1) // seg_len
    ends = torch.cumsum(nseg, 0)  # work items of sequences 0 .. n
    item = torch.arange(_n_work_items(n_seqs, total, seg_len), device=cu.device)
    n = torch.searchsorted(ends, item, right=True)
    real = n < n_seqs
    n = n.clamp(max=n_seqs - 1)
    j = item - (ends - nseg)[n]
    loc0 = (torch.cumsum(nseg - 1, 0) - (nseg - 1))[n]
    rows = torch.stack([n, j, cu[:-1][n], lens[n], loc0], 1) * real[:, None]
    tokens = (rows[:, 3] - j * seg_len).clamp(max=seg_len) * real  # tokens of the segment
    order = torch.argsort(tokens, descending=True, stable=True)
    return rows[order].to(torch.int32).contiguous()


def _precision(x):
    """``DOT_PREC`` and ``UPCAST``: tf32 dots for 16-bit inputs, exact fp32 dots for fp32 inputs; on
    the CPU bf16 operands go to the dots as fp32 copies (the interpreter's bf16 dot is wrong)."""
    return dict(DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
                UPCAST=x.device.type == "cpu" and x.dtype == torch.bfloat16)


_cached_config = functools.lru_cache(maxsize=256)(launch_config)  # a cache: ~20 us per call otherwise


def _config(cfg: list[int], q, v, varlen: bool = False) -> LaunchConfig:
    """The call's launch config: ``cfg`` (``LaunchConfig.to_ints``), or empty for the default of the
    tensors' shapes, dtype and device (``targets.device_target``: the GPU's compute capability);
    ``varlen``: ``q`` holds packed sequences (``cu_seqlens``)."""
    if cfg:
        return LaunchConfig.from_ints(cfg)
    dims = (*q.shape, v.shape[3])
    target = device_target(q.device)
    if all(isinstance(d, int) for d in dims):
        return _cached_config(*dims, q.dtype, target, varlen)
    return launch_config(*dims, q.dtype, target, varlen)  # symbolic sizes: a fake implementation under torch.compile


def _launch(name: str, grid, tile: Tile, **args):
    """Launch kernel ``name`` of :mod:`.kernels` with ``tile``'s warps and stages (``_triton.launch``: the
    compile options every tnlib launch requests)."""
    launch(getattr(_kernels(), name), grid, num_warps=tile.num_warps, num_stages=tile.num_stages, **args)


def _transposed(state):
    """``S^T`` of a ``[..., K, V]`` state (None stays None): the dq and dk passes start from transposes."""
    return None if state is None else state.transpose(-1, -2)


def _local_states(b, c, slope, cfg: LaunchConfig, *, reverse: bool, items=None):
    """End states of segments ``0 .. nseg-2`` from a zero start, ``[B, H, nseg-1, DK, DV]`` fp32, or
    None for one segment (the last segment's state is never needed: a segment folds in earlier ones).
    ``items``: packed sequences (``_work_items``): ``[1, H, G, DK, DV]`` with ``G = _n_local(...)``, or None
    where no sequence can be split."""
    B, T, H, DK = b.shape
    DV, t = c.shape[3], cfg.state
    if items is None:
        nseg = cfg.n_seg(T)
        if nseg == 1:
            return None
        shape, grid = (B, H, nseg - 1, DK, DV), (DV // t.block_v, nseg - 1, B * H)
    else:
        if _n_local(T, cfg.seg_len) == 0:
            return None
        shape, grid = (1, H, _n_local(T, cfg.seg_len), DK, DV), (DV // t.block_v, H, items.shape[0])
    loc = _alloc(shape, torch.float32, b.device)
    _launch("_segment_state_kernel", grid, t,
            **_tensors(Bp=b, Cp=c, LOCAL=loc, ITEMS=items), slope_ptr=slope, T=T, H=H, seg_len=cfg.seg_len,
            DK=DK, BV=t.block_v, CH=t.chunk, REVERSE=reverse, **_precision(b), SCALE_C=t.scale_value)
    return loc


def _attn(a, b, c, slope, tile: Tile, *, seg_len: int, out_dtype, init=None, init_decay: bool,
          reverse: bool = False, want_final: bool = False, local=None, grad_act: int = 0, pre=None, out=None,
          items=None):
    """One pass of the generic kernel, one row of the table in :mod:`.kernels`: ``o_t = a_t (lambda^(t+1-z)
    init + sum_{s <= t} lambda^(t-s) b_s^T c_s)`` (``z = 0`` with ``init_decay``, else 1), in reversed time
    with ``reverse``; returns ``(o, the state after the last token if want_final, else None)``.

    ``local``: segment states to fold in (``seg_len`` tokens per segment); ``grad_act``: multiply
    the output by the q/k feature map's derivative at ``pre`` (``[B, T, H, DV]``, see ``ACT_CODES``);
    ``out``: write into this (possibly strided) tensor instead of a new one; ``items``: packed sequences
    (``_work_items``), with one start and one final state per sequence."""
    B, T, H, DK = a.shape
    DV = c.shape[3]
    o = _alloc((B, T, H, DV), out_dtype, a.device) if out is None else out
    n_states, grid = (B, (DV // tile.block_v, -(-T // seg_len), B * H)) if items is None else \
        (_n_seqs(items, T, seg_len), (DV // tile.block_v, H, items.shape[0]))
    final = _alloc((n_states, H, DK, DV), torch.float32, a.device) if want_final else None
    _launch("_lightning_kernel", grid, tile,
            **_tensors(A=a, Bp=b, Cp=c, O=o, INIT=init, LOCAL=local, FINAL=final, E=pre if grad_act else None,
                       ITEMS=items),
            slope_ptr=slope, T=T, H=H, seg_len=seg_len, DK=DK, BV=tile.block_v, CH=tile.chunk,
            INIT_DECAY=init_decay, REVERSE=reverse, **_precision(a), GRAD_ACT=grad_act, FAST=not interpreting(),
            SCALE_C=tile.scale_value)
    return o, final


def _dkdv(q, k, v, do, slope, tile: Tile, *, seg_len: int, dfinal=None, need_ds0: bool = False, local=None,
          grad_act: int = 0, k_pre=None, dk=None, dv=None, items=None):
    """dk and dv from one reverse-time sweep sharing the state D (see ``_dkdv_kernel``): the table's dv and
    dk rows at once, D starting from ``dfinal`` (G); returns ``(dk, dv, D_0 if need_ds0 else None)``. With
    ``grad_act`` dk is taken through the feature map's derivative at ``k_pre``; ``items`` as in ``_attn``."""
    B, T, H, DK = q.shape
    DV = v.shape[3]
    dk = _alloc((B, T, H, DK), k.dtype, q.device) if dk is None else dk
    dv = _alloc((B, T, H, DV), v.dtype, q.device) if dv is None else dv
    n_states, grid = (B, (1, -(-T // seg_len), B * H)) if items is None else \
        (_n_seqs(items, T, seg_len), (1, H, items.shape[0]))
    final = _alloc((n_states, H, DK, DV), torch.float32, q.device) if need_ds0 else None
    _launch("_dkdv_kernel", grid, tile,
            **_tensors(Q=q, K=k, V=v, DO=do, DK_out=dk, DV_out=dv, INIT=dfinal, LOCAL=local, FINAL=final,
                       E=k_pre if grad_act else None, ITEMS=items),
            slope_ptr=slope, T=T, H=H, seg_len=seg_len, DK=DK, DV=DV, CH=tile.chunk, **_precision(q),
            GRAD_ACT=grad_act, FAST=not interpreting())
    return dk, dv, final


def _table(cu_seqlens, items, total: int, seg_len: int):
    """The work table of a launch over packed sequences: ``items`` where the caller built it (for ``seg_len``),
    else one from ``cu_seqlens`` (None without packed sequences)."""
    if items is not None or cu_seqlens is None:
        return items
    return _work_items(cu_seqlens, total, seg_len)


def _forward_impl(q, k, v, slope, cfg: LaunchConfig, *, initial_state=None, output_final_state: bool = False,
                  cu_seqlens=None, items=None):
    """``(o, final state or None, k/v segment states or None)``: the table's forward row. ``cu_seqlens``: q, k, v
    hold packed sequences (``[1, total, H, D]``; states one per sequence); ``items``: their work table for
    ``cfg.seg_len`` (``_work_items``), or None to build it here."""
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    slope = slope.contiguous()
    items = _table(cu_seqlens, items, q.shape[1], cfg.seg_len)
    local = _local_states(k, v, slope, cfg, reverse=False, items=items)
    o, final = _attn(q, k, v, slope, cfg.forward, init=initial_state, init_decay=True,
                     want_final=output_final_state, local=local, seg_len=cfg.seg_len, out_dtype=v.dtype, items=items)
    return o, final, local


def _backward_impl(do, q, k, v, slope, cfg: LaunchConfig, *, dfinal=None, initial_state=None, need_ds0: bool = False,
                   loc_kv=None, grad_act: int = 0, pre=None, grads=None, cu_seqlens=None, items=None):
    """dq, dk, dv (and dS0 if ``need_ds0``): the table's dq, dv and dk rows. ``dfinal``: G, the gradient into
    the returned final state (None: zero). ``loc_kv``: the forward's k/v segment states (recomputed if None). With
    ``grad_act`` and ``pre = (q_pre, k_pre)`` (q and k being the feature map of those) dq and dk are the
    gradients of the pre-activations. ``grads``: three tensors (views of one buffer in the packed path)
    to write dq, dk, dv into. ``cu_seqlens``, ``items``: packed sequences, as in ``_forward_impl`` (each
    sequence's reverse passes run in its own reversed time, from its own G)."""
    do = _last_contig(do.to(v.dtype))
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    slope = slope.contiguous()
    dq_out, dk_out, dv_out = grads if grads is not None else (None, None, None)
    q_pre, k_pre = pre if pre is not None else (None, None)
    T, seg = q.shape[1], cfg.seg_len
    items = _table(cu_seqlens, items, T, seg)
    multi = cfg.n_seg(T) > 1 if items is None else _n_local(T, seg) > 0
    # dq_t = dO_t S_t^T: forward in time, query dO, key v, value k, start S_{-1}^T; the forward's
    # plan, so the k/v segment states it kept serve here
    if multi and loc_kv is None:
        loc_kv = _local_states(k, v, slope, cfg, reverse=False, items=items)
    dq, _ = _attn(do, v, k, slope, cfg.dq, init=_transposed(initial_state), init_decay=True,
                  local=_transposed(loc_kv if multi else None), seg_len=seg, out_dtype=q.dtype,
                  grad_act=grad_act, pre=q_pre, out=dq_out, items=items)
    del loc_kv
    # D_t (reverse in time) from q^T dO, start G entering undecayed
    loc_qdo = _local_states(q, do, slope, cfg, reverse=True, items=items)
    if cfg.dkdv is not None:
        dk, dv, d0 = _dkdv(q, k, v, do, slope, cfg.dkdv, dfinal=dfinal, need_ds0=need_ds0, local=loc_qdo,
                           seg_len=seg, grad_act=grad_act, k_pre=k_pre, dk=dk_out, dv=dv_out, items=items)
    else:
        dv, d0 = _attn(k, q, do, slope, cfg.dv, init=dfinal, init_decay=False, reverse=True, want_final=need_ds0,
                       local=loc_qdo, seg_len=seg, out_dtype=v.dtype, out=dv_out, items=items)
        dk, _ = _attn(v, do, q, slope, cfg.dk, init=_transposed(dfinal), init_decay=False, reverse=True,
                      local=_transposed(loc_qdo), seg_len=seg, out_dtype=k.dtype, grad_act=grad_act, pre=k_pre,
                      out=dk_out, items=items)
    ds0 = d0 * torch.exp(-slope.float())[None, :, None, None] if need_ds0 else None
    return dq, dk, dv, ds0


# ----------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with fake (meta) implementations. ``config`` is
# ``LaunchConfig.to_ints()`` or empty for the default (resolved from the shapes, also symbolic ones).
# ``items``: the work table of ``cu_seqlens`` for the config's segments, built by the caller (the public
# functions, outside torch.compile; saved for the backward, so forward and backward share it) or None (each op
# builds its own: the forward's and the backward's, under torch.compile).
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tnlib::lightning_fwd", mutates_args=())
def _lightning_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
    initial_state: Optional[torch.Tensor], output_final_state: bool, config: list[int],
    cu_seqlens: Optional[torch.Tensor] = None, items: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(o, final state or empty, segment states or empty)``; the segment states of k, v
    are kept for the backward's dq pass, which needs exactly them."""
    o, final, local = _forward_impl(q, k, v, slope, _config(config, q, v, cu_seqlens is not None),
                                    initial_state=initial_state, output_final_state=output_final_state,
                                    cu_seqlens=cu_seqlens, items=items)
    return o, (_empty_f32(q) if final is None else final), (_empty_f32(q) if local is None else local)


def _fake_states(q, v, config, cu_seqlens, output_final_state: bool):
    """The fake (shape-only) final and segment states of a forward: what ``_forward_impl`` allocates."""
    B, T, H, K = q.shape
    V = v.shape[3]
    cfg = _config(config, q, v, cu_seqlens is not None)
    if cu_seqlens is None:
        n_states, nloc = B, cfg.n_seg(T) - 1
        loc_shape = (B, H, nloc, K, V)
    else:
        n_states, nloc = cu_seqlens.shape[0] - 1, _n_local(T, cfg.seg_len)
        loc_shape = (1, H, nloc, K, V)
    final = q.new_empty((n_states, H, K, V) if output_final_state else (0,), dtype=torch.float32)
    local = q.new_empty(loc_shape if nloc > 0 else (0,), dtype=torch.float32)
    return final, local


@_lightning_fwd_op.register_fake
def _(q, k, v, slope, initial_state, output_final_state, config, cu_seqlens=None, items=None):
    final, local = _fake_states(q, v, config, cu_seqlens, output_final_state)
    B, T, H, _ = q.shape
    return v.new_empty((B, T, H, v.shape[3])), final, local


@torch.library.custom_op("tnlib::lightning_bwd", mutates_args=())
def _lightning_bwd_op(
    do: torch.Tensor, dfinal: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, slope: torch.Tensor, initial_state: Optional[torch.Tensor], need_ds0: bool,
    local_kv: torch.Tensor, config: list[int], cu_seqlens: Optional[torch.Tensor] = None,
    items: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loc = local_kv if local_kv.dim() == 5 else None
    cfg = _config(config, q, v, cu_seqlens is not None)
    dq, dk, dv, ds0 = _backward_impl(do, q, k, v, slope, cfg, dfinal=dfinal, initial_state=initial_state,
                                     need_ds0=need_ds0, loc_kv=loc, cu_seqlens=cu_seqlens, items=items)
    if ds0 is None:
        ds0 = _empty_f32(q)
    elif initial_state is not None:
        ds0 = ds0.to(initial_state.dtype)
    return dq, dk, dv, ds0


@_lightning_bwd_op.register_fake
def _(do, dfinal, q, k, v, slope, initial_state, need_ds0, local_kv, config, cu_seqlens=None, items=None):
    ds0 = initial_state.new_empty(initial_state.shape) if need_ds0 else _empty_f32(q)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds0


def _setup_context(ctx, inputs, output):
    q, k, v, slope, initial_state, output_final_state, config, cu_seqlens, items = inputs
    ctx.has_init, ctx.output_final_state, ctx.config = initial_state is not None, output_final_state, config
    ctx.save_for_backward(q, k, v, slope, initial_state, output[2], cu_seqlens, items)


def _backward(ctx, do, dfinal, _dlocal):
    q, k, v, slope, initial_state, local_kv, cu_seqlens, items = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    if not ctx.output_final_state or dfinal is None or dfinal.numel() == 0:
        dfinal = None
    need_ds0 = ctx.has_init and ctx.needs_input_grad[4]
    dq, dk, dv, ds0 = _lightning_bwd_op(do, dfinal, q, k, v, slope, initial_state if ctx.has_init else None,
                                        need_ds0, local_kv, ctx.config, cu_seqlens, items)
    return dq, dk, dv, None, (ds0 if need_ds0 else None), None, None, None, None


_lightning_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# The packed path: q | k | v straight from the projection, the feature map's derivative in the kernels
# ----------------------------------------------------------------------------------------------


def _split_packed(x, n_heads: int):
    """Views ``q, k, v: [B, T, H, D]`` of the three equal column blocks of ``x: [B, T, 3*H*D]``."""
    d = x.shape[-1] // 3
    return tuple(x[..., i * d:(i + 1) * d].unflatten(-1, (n_heads, d // n_heads)) for i in range(3))


def _split_qk(qk, n_heads: int):
    """Views ``q, k: [B, T, H, D]`` of ``qk: [B, T, 2*H*D]``."""
    return tuple(t.unflatten(-1, (n_heads, t.shape[-1] // n_heads)) for t in qk.chunk(2, dim=-1))


def feature_map_reference(x, act: int):
    """The q/k feature map in PyTorch (``ACT_CODES``: 0 identity, 1 SiLU, 2 ``1 + elu``); the
    model's GLA layers and every non-kernel path use this one definition."""
    if act == 1:
        return torch.nn.functional.silu(x)
    if act == 2:
        return 1 + torch.nn.functional.elu(x)
    return x


def _feature_map(x, act: int):
    """The q/k feature map (codes of ``ACT_CODES``) of ``x: [B, T, C]`` into a dense new tensor: one
    Triton pass when the rows have one stride (ATen's elementwise kernels run a strided view at
    about half the bandwidth), else :func:`feature_map_reference`."""
    B, T, C = x.shape
    if act in (1, 2) and x.stride(-1) == 1 and x.stride(0) == T * x.stride(1):
        y = torch.empty((B, T, C), dtype=x.dtype, device=x.device)
        BR, BC = 4, 1024
        launch(_kernels()._feature_map_kernel, (-(-B * T // BR), -(-C // BC)),
               X=x, Y=y, n_rows=B * T, n_cols=C, sx=x.stride(1), sy=C, ACT=act, BR=BR, BC=BC, num_warps=4)
        return y
    return feature_map_reference(x, act)


def _packed_forward(qkv, slope, n_heads: int, act: int, config: list[int], cu_seqlens=None, items=None):
    """``(o, phi(q | k) or None, k/v segment states or None)`` of the packed path (the custom op's body)."""
    q, k, v = _split_packed(qkv, n_heads)
    qk = None
    if act:
        qk = _feature_map(qkv[..., : 2 * (qkv.shape[-1] // 3)], act)
        q, k = _split_qk(qk, n_heads)
    o, _, local = _forward_impl(q, k, v, slope, _config(config, q, v, cu_seqlens is not None), cu_seqlens=cu_seqlens,
                                items=items)
    return o, qk, local


def _packed_backward_impl(do, qkv, qk, slope, n_heads: int, act: int, local_kv, config: list[int], cu_seqlens=None,
                          items=None):
    """The gradient of ``qkv`` as one buffer (the custom op's body); ``qk``: the forward's ``phi(q | k)``
    (None without a feature map), ``local_kv``: its segment states (None: one segment)."""
    dqkv = _alloc(qkv.shape, qkv.dtype, qkv.device)
    q_pre, k_pre, v = _split_packed(qkv, n_heads)
    q, k = _split_qk(qk, n_heads) if act else (q_pre, k_pre)
    _backward_impl(do, q, k, v, slope, _config(config, q, v, cu_seqlens is not None), loc_kv=local_kv, grad_act=act,
                   pre=(q_pre, k_pre), grads=_split_packed(dqkv, n_heads), cu_seqlens=cu_seqlens, items=items)
    return dqkv


@torch.library.custom_op("tnlib::lightning_packed_fwd", mutates_args=())
def _packed_fwd_op(qkv: torch.Tensor, slope: torch.Tensor, n_heads: int, act: int,
                   config: list[int], cu_seqlens: Optional[torch.Tensor] = None,
                   items: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, phi(q | k) or empty, segment states of k, v or empty)`` for the pre-activation ``qkv``.

    The feature map is one elementwise pass over the q | k columns (applying it inside the Lightning
    kernels was measured slower: each CTA recomputes it for its tiles on the special-function units);
    its output is kept for the backward, like the unfused model's activations."""
    o, qk, local = _packed_forward(qkv, slope, n_heads, act, config, cu_seqlens, items)
    return o, (_empty_f32(qkv) if qk is None else qk), (_empty_f32(qkv) if local is None else local)


@_packed_fwd_op.register_fake
def _(qkv, slope, n_heads, act, config, cu_seqlens=None, items=None):
    q, k, v = _split_packed(qkv, n_heads)
    B, T, H, D = q.shape
    _, local = _fake_states(q, v, config, cu_seqlens, False)
    qk = qkv.new_empty((B, T, 2 * H * D)) if act else _empty_f32(qkv)
    return qkv.new_empty((B, T, H, D)), qk, local


@torch.library.custom_op("tnlib::lightning_packed_bwd", mutates_args=())
def _packed_bwd_op(do: torch.Tensor, qkv: torch.Tensor, qk: torch.Tensor, slope: torch.Tensor, n_heads: int,
                   act: int, local_kv: torch.Tensor, config: list[int],
                   cu_seqlens: Optional[torch.Tensor] = None, items: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient of the packed ``qkv`` in one buffer: the kernels write its three column blocks
    directly (dq and dk already through the feature map's derivative), so nothing is concatenated."""
    return _packed_backward_impl(do, qkv, qk if act else None, slope, n_heads, act,
                                 local_kv if local_kv.dim() == 5 else None, config, cu_seqlens, items)


@_packed_bwd_op.register_fake
def _(do, qkv, qk, slope, n_heads, act, local_kv, config, cu_seqlens=None, items=None):
    return qkv.new_empty(qkv.shape)


def _packed_setup_context(ctx, inputs, output):
    qkv, slope, n_heads, act, config, cu_seqlens, items = inputs
    ctx.n_heads, ctx.act, ctx.config = n_heads, act, config
    ctx.save_for_backward(qkv, output[1], slope, output[2], cu_seqlens, items)


def _packed_backward(ctx, do, _dqk, _dlocal):
    qkv, qk, slope, local_kv, cu_seqlens, items = ctx.saved_tensors
    dqkv = _packed_bwd_op(do, qkv, qk, slope, ctx.n_heads, ctx.act, local_kv, ctx.config, cu_seqlens, items)
    return dqkv, None, None, None, None, None, None


_packed_fwd_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions: input checks, then the kernel path or the PyTorch fallback
# ----------------------------------------------------------------------------------------------

class PackedSequences:
    """Packed-sequence boundaries made ready once for the many attention calls of one model step.

    ``PackedSequences(cu_seqlens, total)``: ``cu_seqlens`` in ``lightning_attention``'s convention (int32 or int64
    ``[N + 1]``, from 0 to ``total``, strictly increasing). Its values are checked here, once
    (``tnlib.ops.check_cu_seqlens``: one host read, a device sync for a GPU tensor; none under ``torch.compile``,
    where they are their maker's to check). ``device``: where the attention runs; the boundaries are checked
    where they are, then copied there, so boundaries made on the CPU (``document_cu_seqlens``) cost no sync.

    Passed as ``cu_seqlens=`` to ``lightning_attention`` or ``lightning_attention_packed`` in place of the tensor,
    it spares each call the value check and keeps the work tables it builds (``_work_items``: the kernels' one
    row per segment of a sequence, a dozen small device ops), one per segment length, from the first call that
    needs it: the layers of a step, forward and backward (and a checkpointed block's recompute), share them.
    ``TransNormerLLM.forward`` makes one per step. Under ``torch.compile`` the calls read only ``cu_seqlens``
    from it and their ops build their own tables (the launch plan is resolved inside the ops, not in traced
    code); nothing is kept then.

    Contract: ``cu_seqlens`` is not changed after construction (the tables would no longer match it). The
    object holds nothing but the boundaries and its tables, and goes with the step that made it.
    """

    def __init__(self, cu_seqlens, total: int, *, device=None):
        self.n_seqs = check_cu_seqlens(cu_seqlens, total, name="PackedSequences",
                                       values=not torch.compiler.is_compiling())
        self.cu_seqlens = cu_seqlens if device is None else cu_seqlens.to(device, non_blocking=True)
        self.total = total
        self._tables: dict = {}  # segment length -> work table

    def work_items(self, seg_len: int) -> torch.Tensor:
        """The work table for segments of ``seg_len`` tokens (``_work_items``): built at the first call, then kept."""
        if seg_len not in self._tables:
            self._tables[seg_len] = _work_items(self.cu_seqlens, self.total, seg_len)
        return self._tables[seg_len]

    def __repr__(self) -> str:
        return (f"PackedSequences({self.n_seqs} sequences, {self.total} tokens, on {self.cu_seqlens.device}; "
                f"work tables for segment lengths {sorted(self._tables)})")


def _boundaries(cu_seqlens):
    """The boundary tensor of ``cu_seqlens`` (a tensor or a ``PackedSequences``; None stays None)."""
    return cu_seqlens.cu_seqlens if isinstance(cu_seqlens, PackedSequences) else cu_seqlens


def _check_inputs(q, k, v, slope, initial_state, name, cu_seqlens=None):
    """``check_attention_inputs``: shapes, dtypes and devices, and the slope's values (finite, >= 0) only where
    reading them costs nothing, a CPU tensor outside ``torch.compile``. On a GPU that read is a device sync per
    call (and under ``torch.compile`` a graph break), so a GPU slope's values are checked where it is made:
    the model's decay at construction (``GatedLinearAttention.decay_slope``), any other with
    ``tnlib.ops.check_slope_values``. A plain ``cu_seqlens`` tensor's values are read at every call outside
    ``torch.compile`` (a device sync on a GPU): wrong boundaries would make the kernels read and write outside
    the tensors, not just compute wrong numbers. A ``PackedSequences`` was checked when it was made: here only
    its length against q's. Under ``torch.compile`` check them where they are made (``PackedSequences``, or
    ``tnlib.ops.check_cu_seqlens``). Nothing is written onto the caller's tensors."""
    compiling = torch.compiler.is_compiling()
    values = isinstance(slope, torch.Tensor) and slope.device.type == "cpu" and not compiling
    seqs = cu_seqlens if isinstance(cu_seqlens, PackedSequences) else None
    dims = check_attention_inputs(q, k, v, slope, initial_state, name=name, slope_values=values,
                                  cu_seqlens=_boundaries(cu_seqlens), cu_values=seqs is None and not compiling)
    if seqs is not None and seqs.total != dims[1]:
        raise ValueError(f"{name}: the PackedSequences cover {seqs.total} tokens, but q holds {dims[1]}")
    return dims


def _fallback(q, k, v, slope, initial_state=None, output_final_state=False, cu_seqlens=None):
    """The PyTorch path: Lightning Attention-2's block algorithm (differentiable; packed sequences one by one)."""
    return linear_attention_chunked(q, k, v, slope, initial_state, output_final_state, block_size=64,
                                    cu_seqlens=_boundaries(cu_seqlens))


def _work_table(cu_seqlens, q, v, config: Optional[LaunchConfig], name: str):
    """The work table a kernel call over packed sequences hands its op: the ``PackedSequences``' own (built once
    per segment length) or, for a plain tensor, a new one; first a clear error where it would need more work
    items than a grid axis holds. None without packed sequences, and under ``torch.compile``, where the op
    builds it (the plan's cache is not for traced code)."""
    if cu_seqlens is None or torch.compiler.is_compiling():
        return None
    total, seg_len = q.shape[1], (config if config is not None else _config([], q, v, True)).seg_len
    n_seqs = _boundaries(cu_seqlens).shape[0] - 1
    m = _n_work_items(n_seqs, total, seg_len)
    if m > MAX_WORK_ITEMS:
        raise ValueError(f"{name}: {n_seqs} sequences of {total} tokens make up to {m} work items "
                         f"(segments of {seg_len} tokens), more than the {MAX_WORK_ITEMS} one launch takes: "
                         f"split the batch")
    if isinstance(cu_seqlens, PackedSequences):
        return cu_seqlens.work_items(seg_len)
    return _work_items(cu_seqlens, total, seg_len)


def lightning_attention(q, k, v, slope, initial_state=None, output_final_state=False,
                        config: Optional[LaunchConfig] = None, *, cu_seqlens=None):
    """Causal linear attention with per-head decay ``exp(-slope)``, Triton Lightning Attention-2.

    ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, ``slope: [H]`` (fp32, finite and >= 0: checked here for a
    CPU tensor; a GPU tensor's values are its maker's to check, ``tnlib.ops.check_slope_values``, as the
    model does at construction), ``initial_state: [B, H, K, V]`` (fp32). Returns ``o`` ``[B, T, H, V]`` in ``v``'s dtype, or ``(o, S_{T-1})``
    with the fp32 final state when ``output_final_state``. Supported head dims: K in
    {16, 32, 64, 128, 256}, V in {16, 32, 64, 128}. ``config``: launches instead of
    ``plan.launch_config``'s (tuning, tests). Notebook: ``04_lightning_attention``.

    ``cu_seqlens`` (int32 or int64 ``[N + 1]``, from 0 to ``T``, strictly increasing; flash-linear-attention's
    ``chunk_simple_gla`` convention): ``q, k, v`` hold ``N`` sequences back to back (``B = 1``; sequence ``n``
    is rows ``cu_seqlens[n] : cu_seqlens[n + 1]``), ``initial_state`` and the final state are ``[N, H, K, V]``,
    one per sequence, and no state crosses a boundary: the result is the attention of each sequence on its
    own, forward and backward (the gradient of each initial state included). A plain tensor's values are
    checked before any launch, at every call (outside ``torch.compile``; a device sync for a GPU tensor:
    ``tnlib.ops.check_cu_seqlens``), and the kernels' work table is built for the call (forward and backward
    share it). ``cu_seqlens`` may instead be a :class:`PackedSequences` made once from that tensor: checked
    when made, its work tables built once and shared by every call that gets it (the model's layers in a step).
    """
    if slope is None:
        raise ValueError("lightning_attention: slope [H] is required (use zeros for no decay)")
    B, T, H, K, V = _check_inputs(q, k, v, slope, initial_state, "lightning_attention", cu_seqlens)
    if K not in SUPPORTED_K or V not in SUPPORTED_V:
        raise ValueError(
            f"lightning_attention: unsupported head dims K={K}, V={V}; supported K in {SUPPORTED_K}, "
            f"V in {SUPPORTED_V} (pad the head dim or use tnlib.ops.linear_attention_chunked)"
        )
    if not use_triton(q):
        return _fallback(q, k, v, slope, initial_state, output_final_state, cu_seqlens)
    if config is not None:
        config.check(K, V)
    items = _work_table(cu_seqlens, q, v, config, "lightning_attention")
    cfg = config.to_ints() if config is not None else []
    o, final, _ = _lightning_fwd_op(q, k, v, slope.to(torch.float32), initial_state, bool(output_final_state),
                                    cfg, _boundaries(cu_seqlens), items)
    return (o, final) if output_final_state else o


def lightning_attention_packed(qkv, slope, n_heads: int, qk_act: str = "silu",
                               config: Optional[LaunchConfig] = None, *, cu_seqlens=None):
    """``lightning_attention(phi(q), phi(k), v, slope)`` for ``q | k | v`` packed in ``qkv``.

    ``qkv: [B, T, 3*H*D]`` holds the pre-activation q, k and v column blocks side by side, as one
    projection produces them (read in place, with its row stride); ``phi`` is ``qk_act`` (``"silu"``,
    ``"1+elu"`` or ``"none"``). Returns ``o: [B, T, H, D]``. On the kernel path the backward writes the
    gradient of ``qkv`` as one buffer, with the feature map's derivative applied inside the Lightning
    kernels, so the model needs no separate activation-backward and concatenation pass. Elsewhere it
    is the same computation in PyTorch. No initial or final state: this is the training path;
    ``lightning_attention`` serves the rest. ``config`` as in ``lightning_attention``; ``cu_seqlens``: packed
    sequences as there, a tensor or a :class:`PackedSequences` (``B = 1``; each sequence attends to itself
    only: documents packed in a window).
    """
    if qk_act not in ACT_CODES:
        raise ValueError(f"lightning_attention_packed: unknown qk_act {qk_act!r}; "
                         f"choose one of {sorted(ACT_CODES)}")
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"lightning_attention_packed: qkv must be [B, T, 3*H*D], got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    W = qkv.shape[-1]
    if n_heads < 1 or W % (3 * n_heads):
        raise ValueError(f"lightning_attention_packed: last dim {W} is not 3 * n_heads ({n_heads}) * head_dim")
    D = W // (3 * n_heads)
    if D not in SUPPORTED_V:
        raise ValueError(f"lightning_attention_packed: head dim {D} unsupported; supported {SUPPORTED_V}")
    qkv = _last_contig(qkv)
    q, k, v = _split_packed(qkv, n_heads)
    _check_inputs(q, k, v, slope, None, "lightning_attention_packed", cu_seqlens)
    act = ACT_CODES[qk_act]
    if not use_triton(qkv):
        return _fallback(feature_map_reference(q, act), feature_map_reference(k, act), v, slope, cu_seqlens=cu_seqlens)
    if config is not None:
        config.check(D, D)
    items = _work_table(cu_seqlens, q, v, config, "lightning_attention_packed")
    cfg = config.to_ints() if config is not None else []
    return _packed_fwd_op(qkv, slope.to(torch.float32), int(n_heads), act, cfg, _boundaries(cu_seqlens), items)[0]
