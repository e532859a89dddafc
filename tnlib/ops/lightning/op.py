"""Lightning Attention: our Triton forward and hand-derived backward (spec section 6.3).

Notebook: ``notebooks/04_lightning_attention`` derives the block algorithm and benchmarks it.

Contract (layout ``[B, T, H, D]`` everywhere)::

    S_t = lambda_h S_{t-1} + k_t^T v_t        S_{-1} = initial_state or 0   ([B, H, K, V], fp32)
    o_t = q_t S_t                             lambda_h = exp(-slope_h)

Backward, derived by hand. With ``dO`` the output gradient and ``G`` the gradient flowing into
the returned final state ``S_{T-1}`` (zero when unused)::

    S_t   = lambda^(t+1) S_{-1} + sum_{s<=t} lambda^(t-s) k_s^T v_s
    D_t   = lambda^(T-1-t) G + sum_{s>=t} lambda^(s-t) q_s^T dO_s          (the dKV of the spec)
    dq_t  = dO_t S_t^T        dk_t = v_t D_t^T        dv_t = k_t D_t       dS_{-1} = lambda D_0

Each of the three gradient lines is itself a decayed linear attention: ``dq`` runs forward in
time with query ``dO``, key ``v``, value ``k`` and start state ``S_{-1}^T``; ``dv`` runs backward
in time with query ``k``, key ``q``, value ``dO`` and start state ``G``, entering undecayed;
``dk`` runs backward with query ``v``, key ``dO``, value ``q`` and start state ``G^T``. So one
Triton kernel (:mod:`tnlib.ops._lightning_kernels`) serves all four passes.

Dispatch: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` is set, run the Triton
kernels through a ``torch.library`` custom op (opaque to ``torch.compile``, with a fake
implementation and a registered autograd formula). float64 inputs and CPU tensors without the
interpreter take :func:`tnlib.ops.linear_attention_chunked` (pure PyTorch, differentiable).
``slope`` receives no gradient from the kernel path (it is a fixed buffer in TransNormerLLM).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from ._checks import check_attention_inputs
from ._triton import interpreting, kernel_device, triton
from .reference import linear_attention_chunked

__all__ = ["lightning_attention", "lightning_attention_packed", "SUPPORTED_K", "SUPPORTED_V"]

SUPPORTED_K = (16, 32, 64, 128, 256)
SUPPORTED_V = (16, 32, 64, 128)

#: Test hook: fill every kernel output with NaN before launch, so unwritten elements fail tests.
_POISON = False
#: Test/tuning hook: force the segment length (tokens per parallel segment); None = automatic.
_SEG_LEN: Optional[int] = None
#: Tuning hook: {(DK, DV, is_fp32): (chunk, BV, num_warps, num_stages)} overrides _config().
_CONFIG_OVERRIDE: dict = {}
#: Split sequences into parallel segments only when the forward has fewer CTAs than this, and then
#: aim for about ``_TARGET_CTAS``. Measured on the H200 (results/bench/variants-h200.json): with 256
#: CTAs an unsplit T=8K runs as fast as T=1K, while at 128 CTAs splitting into 4-8 segments wins.
_SPLIT_BELOW = 256
_TARGET_CTAS = 512
#: Tuning hook: (chunk, BV, num_warps, num_stages) of the dq pass instead of the forward's config.
_DQ_CONFIG_OVERRIDE: Optional[tuple] = None
#: Tuning hook: (chunk, num_warps, num_stages) of the fused dk/dv kernel instead of the defaults.
_DKDV_CONFIG_OVERRIDE: Optional[tuple] = None
#: Tuning hook: (chunk, BV, num_warps, num_stages) of the segment-state kernel (scripts/tune_segment_states.py).
_LOCAL_CONFIG_OVERRIDE: Optional[tuple] = None
#: Compute the segment states inside the forward's output kernel and the fused dk/dv kernel (one
#: launch each, programs wait on each other's flags) instead of separate segment-state kernels.
#: Measured slower on the H200 at every target and length tried (32K: forward 0.62 vs 0.54 ms;
#: results/bench/variants-fused-state-h200.json): off, kept as a tested variant for re-measurement.
_FUSED_STATE = False
#: Forward with segments: one launch of a fixed number of programs working through a queue in which the
#: segment-state items and the output items alternate (``_lightning_queue_kernel``), instead of the
#: segment-state kernel followed by the output kernel. ``_QUEUE_LEAD``: rounds by which a segment's state
#: items run ahead of the output items that need them; ``_QUEUE_PROGRAMS``: programs per SM. Measured
#: slower on the H200 (D=128, 16K: 0.61-0.66 vs 0.53 ms; 32K: 0.63 vs 0.55; results/bench/
#: variants-queue-h200.json): off, kept as a tested variant.
_QUEUE_STATE = False
_QUEUE_LEAD = 2
_QUEUE_PROGRAMS = 2
#: Backward: dk and dv from one fused reverse sweep (True) or two passes of the generic kernel.
_FUSED_DKDV = True
#: Generic kernel's state update: scale the value tile (True) or the key tile (False); see _chunk_state
#: and :func:`_scale_value_tile`, the one place that decides per launch.
_SCALE_C = True
_MIN_SEG = 512


def _kernels():
    # imported lazily: triton reads TRITON_INTERPRET when the kernels are decorated
    from . import _lightning_kernels

    return _lightning_kernels


def _config(DK: int, DV: int, fp32: bool):
    """(chunk, BV, num_warps, num_stages) for a pass with state ``[DK, DV]``."""
    if _CONFIG_OVERRIDE:  # (not looked up otherwise: under torch.compile DK, DV may be SymInts)
        key = (int(DK), int(DV), fp32)
        if key in _CONFIG_OVERRIDE:
            return _CONFIG_OVERRIDE[key]
    if fp32:
        ch = 32 if DK >= 128 else 64
        bv = min(DV, 32)
        return ch, bv, 4, 1
    # winners of scripts/tune_lightning.py on one H200 (bf16, B*T = 65536, T = 4096)
    if DK >= 256:
        return 64, min(DV, 32), 4, 1
    return 64, min(DV, 64), 4, 2


def _seg_plan(B: int, H: int, T: int, n_vblocks: int = 2) -> tuple[int, int]:
    """(segment length, number of segments): split long sequences when B*H alone gives few CTAs.

    ``n_vblocks`` is the forward kernel's number of value blocks (CTAs per (batch, head) and
    segment); it is counted as at least 2, the value the plan was first tuned with on the H200.
    """
    if _SEG_LEN is not None:
        seg = int(_SEG_LEN)
    elif n_vblocks * B * H >= _SPLIT_BELOW:
        seg = T
    else:
        want = -(-_TARGET_CTAS // (max(2, n_vblocks) * B * H))
        seg = T if want <= 1 else max(_MIN_SEG, -(-T // want))
        seg = -(-seg // 128) * 128
    seg = max(seg, 1)
    return seg, -(-T // seg)


def _plan_for(q, v):
    """The segment plan of one call, from the forward kernel's value blocks (shared by all passes)."""
    B, T, H, DK = q.shape
    DV = v.shape[3]
    bv = _config(DK, DV, q.dtype == torch.float32)[1]
    return _seg_plan(B, H, T, DV // bv)


def _upcast(x):
    # Triton's CPU interpreter (3.9) computes garbage for bf16 tl.dot: feed it fp32 copies of the
    # bf16-rounded operands instead (same values, exact products).
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def _alloc(shape, dtype, device):
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_f32(like):
    """A placeholder output: custom-op outputs must be tensors, and distinct ones (no aliasing)."""
    return like.new_empty((0,), dtype=torch.float32)


def _strides3(x):
    s = x.stride()
    return s[0], s[1], s[2]


def _last_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _local_config(DK: int, DV: int, fp32: bool):
    """(chunk, BV, num_warps, num_stages) of the segment-state kernel (one dot per chunk)."""
    if _LOCAL_CONFIG_OVERRIDE is not None:
        return _LOCAL_CONFIG_OVERRIDE
    if fp32:
        return _config(DK, DV, fp32)
    return 64, min(DV, 128 if DK <= 128 else 64), 8, 2


def _local_states(b, c, slope, seg_len, nseg, reverse):
    """End states of segments ``0 .. nseg-2`` from a zero start: ``[B, H, nseg-1, DK, DV]`` fp32.

    The last segment's state is never needed (a segment folds in only the ones before it), so its
    ``b`` and ``c`` are not read a second time."""
    K = _kernels()
    B, T, H, DK = b.shape
    DV = c.shape[3]
    fp32 = b.dtype == torch.float32
    ch, bv, nw, ns = _local_config(DK, DV, fp32)
    if bv > DV or DV % bv:  # (only an override can get here: the grid would skip value columns)
        raise ValueError(f"segment-state config: value block {bv} must divide the value width {DV}")
    loc = _alloc((B, H, nseg - 1, DK, DV), torch.float32, b.device)
    grid = (DV // bv, nseg - 1, B * H)
    K._segment_state_kernel[grid](
        b, c, slope, loc, T, H, seg_len,
        *_strides3(b), *_strides3(c), *loc.stride(),
        DK=DK, BV=bv, CH=ch, REVERSE=reverse, DOT_PREC="ieee" if fp32 else "tf32", UPCAST=_upcast(b),
        num_warps=nw, num_stages=ns,
    )
    return loc


def _segment_states(b, c, slope, seg_len, nseg, reverse, fused):
    """The local end states a multi-segment pass folds in (``None`` for one segment): computed by the
    segment-state kernel, or with ``fused`` an empty buffer that the pass's own kernel fills."""
    if nseg == 1:
        return None
    if fused:
        B, _, H, DK = b.shape
        return _alloc((B, H, nseg - 1, DK, c.shape[3]), torch.float32, b.device)
    return _local_states(b, c, slope, seg_len, nseg, reverse)


def _optional(t, stand_in, ndim):
    """A kernel argument that may be absent: ``(tensor, strides)``, or a stand-in pointer and zeros."""
    return (t, t.stride()) if t is not None else (stand_in, (0,) * ndim)


def _scale_value_tile(DK: int, fp32: bool) -> bool:
    """Whether the generic kernel's state update scales the value tile (``SCALE_C``): only for 16-bit
    inputs with state heights DK <= 128, the configurations timed and tested at full size on the H200.
    At DK = 256 (the LRPE layer's forward, chunk 64, one stage) Triton 3.6's code for it faults with an
    illegal memory access on the H200 from ~8x1024 tokens x 8 heads up (scripts/debug_illegal_access.py,
    results/bench/NOTES-kernels.md); the key-scaled form does not, and fp32 inputs (one-stage configs
    too) keep it. The segment-state kernel has its own configs and always scales the value tile; it has
    run at full size at every benchmark shape (K=256 at 16K-32K, fp32 at T=131,072)."""
    return _SCALE_C and DK <= 128 and not fp32


def _epilogue_and_sync(grad_act, pre, local, fused_state, n_programs, stand_in):
    """The launchers' optional kernel arguments: the pre-activation read by the derivative epilogue
    (``E`` and its strides, or a stand-in), and for single-launch segment states (``FUSED_STATE``, only
    with segments) a zeroed ``SYNC`` buffer: ticket counter + one flag per program."""
    pre_t, se = (pre, _strides3(pre)) if grad_act else (stand_in, (0, 0, 0))
    fused = bool(fused_state and local is not None)
    sync = torch.zeros(1 + n_programs, dtype=torch.int32, device=stand_in.device) if fused else stand_in
    return pre_t, se, fused, sync


def _attn(a, b, c, slope, init, init_decay, reverse, want_final, local, seg_len, nseg, out_dtype,
          grad_act=0, pre=None, out=None, cfg=None, fused_state=False, queue=False):
    """One pass of the generic kernel (see the module docstring of ``_lightning_kernels``).

    ``grad_act``: multiply the output by the q/k feature map's derivative at ``pre`` (``[B, T, H, DV]``,
    see ``ACT_CODES``); ``out``: write into this (possibly strided) tensor instead of a new one;
    ``cfg``: (chunk, BV, num_warps, num_stages) instead of ``_config``'s; ``fused_state``: ``local``
    is an output, filled by this launch (see ``FUSED_STATE`` in the kernel); ``queue`` (with segments):
    the same, by the work-queue launch ``_lightning_queue_kernel`` (``_QUEUE_STATE``)."""
    K = _kernels()
    B, T, H, DK = a.shape
    DV = c.shape[3]
    fp32 = a.dtype == torch.float32
    ch, bv, nw, ns = cfg if cfg is not None else _config(DK, DV, fp32)
    o = _alloc((B, T, H, DV), out_dtype, a.device) if out is None else out
    final_t, sf = _optional(_alloc((B, H, DK, DV), torch.float32, a.device) if want_final else None, o, 4)
    init_t, si = _optional(init, o, 4)
    loc_t, sl = _optional(local, o, 5)
    nv = DV // bv
    strides = (*_strides3(a), *_strides3(b), *_strides3(c), *_strides3(o), *si, *sl, *sf)
    meta = dict(DK=DK, BV=bv, CH=ch, HAS_INIT=init is not None, INIT_DECAY=init_decay, STORE_FINAL=want_final,
                REVERSE=reverse, DOT_PREC="ieee" if fp32 else "tf32", UPCAST=_upcast(a), GRAD_ACT=grad_act,
                FAST=not interpreting(), SCALE_C=_scale_value_tile(DK, fp32), num_warps=nw, num_stages=ns)
    if queue:
        pre_t, se, _, _ = _epilogue_and_sync(grad_act, pre, None, False, 0, o)
        lead = int(_QUEUE_LEAD)
        sync = torch.zeros(1 + B * H * nseg * nv, dtype=torch.int32, device=a.device)  # ticket counter + flags
        K._lightning_queue_kernel[(_n_programs(a.device, (nseg + lead) * 2 * B * H * nv),)](
            a, b, c, o, init_t, local, final_t, slope, pre_t, sync, T, H, seg_len, nseg, B * H, lead,
            *strides, *se, NV=nv, **meta)
    else:
        pre_t, se, fused, sync = _epilogue_and_sync(grad_act, pre, local, fused_state, B * H * nseg * nv, o)
        K._lightning_kernel[(nv, nseg, B * H)](
            a, b, c, o, init_t, loc_t, final_t, slope, pre_t, sync, T, H, seg_len, *strides, *se,
            HAS_LOCAL=local is not None, FUSED_STATE=fused, **meta)
    return o, (final_t if want_final else None)


def _n_programs(device, n_tickets: int) -> int:
    """Programs of a queue launch: ``_QUEUE_PROGRAMS`` per SM (a few under the interpreter)."""
    if device.type != "cuda":
        return min(n_tickets, 3)
    return min(n_tickets, _QUEUE_PROGRAMS * torch.cuda.get_device_properties(device).multi_processor_count)


def _use_fused_dkdv(DK: int, DV: int, fp32: bool) -> bool:
    """dk and dv in one sweep needs the whole state [DK, DV] in one CTA's registers."""
    if not _FUSED_DKDV or DK > 128 or DV > 128:
        return False
    return not fp32 or DK * DV <= 64 * 64


def _dkdv(q, k, v, do, slope, dfinal, need_ds0, local, seg_len, nseg, grad_act=0, k_pre=None, dk=None, dv=None,
          fused_state=False):
    """dk and dv from one reverse-time kernel sharing the state D (see ``_dkdv_kernel``); with
    ``grad_act`` dk is taken through the feature map's derivative at ``k_pre``."""
    K = _kernels()
    B, T, H, DK = q.shape
    DV = v.shape[3]
    fp32 = q.dtype == torch.float32
    nw = 8 if DK * DV >= 128 * 128 else 4
    ch, ns = (32 if fp32 else 64), (1 if fp32 else 2)
    if _DKDV_CONFIG_OVERRIDE is not None:
        ch, nw, ns = _DKDV_CONFIG_OVERRIDE
    dk = _alloc((B, T, H, DK), k.dtype, q.device) if dk is None else dk
    dv = _alloc((B, T, H, DV), v.dtype, q.device) if dv is None else dv
    final, sf = _optional(_alloc((B, H, DK, DV), torch.float32, q.device) if need_ds0 else None, dk, 4)
    init_t, si = _optional(dfinal, dk, 4)
    loc_t, sl = _optional(local, dk, 5)
    pre_t, se, fused, sync = _epilogue_and_sync(grad_act, k_pre, local, fused_state, B * H * nseg, dk)
    K._dkdv_kernel[(1, nseg, B * H)](
        q, k, v, do, dk, dv, init_t, loc_t, final, slope, pre_t, sync, T, H, seg_len,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
        *si, *sl, *sf, *se,
        DK=DK, DV=DV, CH=ch, HAS_INIT=dfinal is not None, HAS_LOCAL=local is not None,
        STORE_FINAL=need_ds0, DOT_PREC="ieee" if fp32 else "tf32", UPCAST=_upcast(q),
        GRAD_ACT=grad_act, FAST=not interpreting(), FUSED_STATE=fused, num_warps=nw, num_stages=ns,
    )
    return dk, dv, (final if need_ds0 else None)


def _forward_impl(q, k, v, slope, initial_state, output_final_state):
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    slope = slope.contiguous()
    seg_len, nseg = _plan_for(q, v)
    queue = _QUEUE_STATE and nseg > 1
    local = _segment_states(k, v, slope, seg_len, nseg, False, _FUSED_STATE or queue)
    o, final = _attn(q, k, v, slope, initial_state, True, False, output_final_state, local, seg_len, nseg, v.dtype,
                     fused_state=_FUSED_STATE, queue=queue)
    return o, final, local


def _backward_impl(do, dfinal, q, k, v, slope, initial_state, need_ds0, loc_kv=None, grad_act=0, pre=None,
                   grads=None):
    """dq, dk, dv (and dS0). With ``grad_act`` and ``pre = (q_pre, k_pre)`` (q and k being the feature
    map of those) dq and dk are the gradients of the pre-activations. ``grads``: three tensors (views
    of one buffer in the packed path) to write dq, dk, dv into."""
    do = _last_contig(do.to(v.dtype))
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    slope = slope.contiguous()
    dq_out, dk_out, dv_out = grads if grads is not None else (None, None, None)
    q_pre, k_pre = pre if pre is not None else (None, None)
    B, T, H, _ = q.shape
    seg_len, nseg = _plan_for(q, v)  # the dk/dv passes' plan
    multi = nseg > 1
    # dq_t = dO_t S_t^T: forward in time, query dO, key v, value k, start S_{-1}^T. Its plan is the
    # forward's, so the k/v segment states the forward kept serve here.
    if not multi:
        loc_kv = None
    elif loc_kv is None or loc_kv.shape[2] != nseg - 1:  # not saved by the forward
        loc_kv = _local_states(k, v, slope, seg_len, nseg, False)
    s0t = initial_state.transpose(-1, -2) if initial_state is not None else None
    dq, _ = _attn(do, v, k, slope, s0t, True, False, False,
                  loc_kv.transpose(-1, -2) if loc_kv is not None else None, seg_len, nseg, q.dtype,
                  grad_act=grad_act, pre=q_pre, out=dq_out, cfg=_DQ_CONFIG_OVERRIDE)
    del loc_kv
    # D_t (reverse in time) from q^T dO, start G entering undecayed
    fused_dkdv = _use_fused_dkdv(q.shape[3], v.shape[3], q.dtype == torch.float32)
    loc_qdo = _segment_states(q, do, slope, seg_len, nseg, True, fused_dkdv and _FUSED_STATE)
    if fused_dkdv:
        dk, dv, d0 = _dkdv(q, k, v, do, slope, dfinal, need_ds0, loc_qdo, seg_len, nseg, grad_act, k_pre,
                           dk_out, dv_out, fused_state=_FUSED_STATE)
    else:
        dv, d0 = _attn(k, q, do, slope, dfinal, False, True, need_ds0, loc_qdo, seg_len, nseg, v.dtype, out=dv_out)
        gt = dfinal.transpose(-1, -2) if dfinal is not None else None
        dk, _ = _attn(v, do, q, slope, gt, False, True, False,
                      loc_qdo.transpose(-1, -2) if multi else None, seg_len, nseg, k.dtype,
                      grad_act=grad_act, pre=k_pre, out=dk_out)
    ds0 = None
    if need_ds0:
        ds0 = d0 * torch.exp(-slope.float())[None, :, None, None]
    return dq, dk, dv, ds0


# ----------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile, with fake (meta) implementations
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tnlib::lightning_fwd", mutates_args=())
def _lightning_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
    initial_state: Optional[torch.Tensor], output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(o, final state or empty, segment states or empty)``; the segment states of k, v
    are kept for the backward's dq pass, which needs exactly them."""
    o, final, local = _forward_impl(q, k, v, slope, initial_state, output_final_state)
    return o, (_empty_f32(q) if final is None else final), (_empty_f32(q) if local is None else local)


@_lightning_fwd_op.register_fake
def _(q, k, v, slope, initial_state, output_final_state):
    B, T, H, K = q.shape
    V = v.shape[3]
    o = v.new_empty((B, T, H, V))
    final = q.new_empty((B, H, K, V) if output_final_state else (0,), dtype=torch.float32)
    nseg = _plan_for(q, v)[1]
    local = q.new_empty((B, H, nseg - 1, K, V) if nseg > 1 else (0,), dtype=torch.float32)
    return o, final, local


@torch.library.custom_op("tnlib::lightning_bwd", mutates_args=())
def _lightning_bwd_op(
    do: torch.Tensor, dfinal: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, slope: torch.Tensor, initial_state: Optional[torch.Tensor], need_ds0: bool,
    local_kv: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loc = local_kv if local_kv is not None and local_kv.dim() == 5 else None
    dq, dk, dv, ds0 = _backward_impl(do, dfinal, q, k, v, slope, initial_state, need_ds0, loc)
    if ds0 is None:
        ds0 = _empty_f32(q)
    elif initial_state is not None:
        ds0 = ds0.to(initial_state.dtype)
    return dq, dk, dv, ds0


@_lightning_bwd_op.register_fake
def _(do, dfinal, q, k, v, slope, initial_state, need_ds0, local_kv=None):
    if need_ds0:
        ds0 = initial_state.new_empty(initial_state.shape)
    else:
        ds0 = _empty_f32(q)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds0


def _setup_context(ctx, inputs, output):
    q, k, v, slope, initial_state, output_final_state = inputs
    ctx.has_init = initial_state is not None
    ctx.output_final_state = output_final_state
    ctx.save_for_backward(q, k, v, slope, initial_state if initial_state is not None else None, output[2])


def _backward(ctx, do, dfinal, _dlocal):
    q, k, v, slope, initial_state, local_kv = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    if not ctx.output_final_state or dfinal is None or dfinal.numel() == 0:
        dfinal = None
    need_ds0 = ctx.has_init and ctx.needs_input_grad[4]
    dq, dk, dv, ds0 = _lightning_bwd_op(
        do, dfinal, q, k, v, slope, initial_state if ctx.has_init else None, need_ds0, local_kv
    )
    return dq, dk, dv, None, (ds0 if need_ds0 else None), None


_lightning_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# The packed path: q | k | v straight from the projection, the feature map's derivative in the kernels
# ----------------------------------------------------------------------------------------------

#: Feature-map codes (the kernels' GRAD_ACT argument; 0 = identity).
ACT_CODES = {"none": 0, "silu": 1, "1+elu": 2}


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
        _kernels()._feature_map_kernel[(triton.cdiv(B * T, BR), triton.cdiv(C, BC))](
            x, y, B * T, C, x.stride(1), C, ACT=act, BR=BR, BC=BC, num_warps=4)
        return y
    return feature_map_reference(x, act)


@torch.library.custom_op("tnlib::lightning_packed_fwd", mutates_args=())
def _packed_fwd_op(qkv: torch.Tensor, slope: torch.Tensor, n_heads: int, act: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, phi(q | k) or empty, segment states of k, v or empty)`` for the pre-activation ``qkv``.

    The feature map is one elementwise pass over the q | k columns (applying it inside the Lightning
    kernels was measured 2.5x slower there: each CTA recomputes it for its tiles on the special-function
    units); its output is kept for the backward, like the unfused model's activations."""
    q, k, v = _split_packed(qkv, n_heads)
    qk = None
    if act:
        qk = _feature_map(qkv[..., : 2 * (qkv.shape[-1] // 3)], act)
        q, k = _split_qk(qk, n_heads)
    o, _, local = _forward_impl(q, k, v, slope, None, False)
    return o, (_empty_f32(qkv) if qk is None else qk), (_empty_f32(qkv) if local is None else local)


@_packed_fwd_op.register_fake
def _(qkv, slope, n_heads, act):
    q, k, v = _split_packed(qkv, n_heads)
    B, T, H, D = q.shape
    nseg = _plan_for(q, v)[1]
    local = qkv.new_empty((B, H, nseg - 1, D, D) if nseg > 1 else (0,), dtype=torch.float32)
    qk = qkv.new_empty((B, T, 2 * H * D)) if act else _empty_f32(qkv)
    return qkv.new_empty((B, T, H, D)), qk, local


@torch.library.custom_op("tnlib::lightning_packed_bwd", mutates_args=())
def _packed_bwd_op(do: torch.Tensor, qkv: torch.Tensor, qk: torch.Tensor, slope: torch.Tensor, n_heads: int,
                   act: int, local_kv: torch.Tensor) -> torch.Tensor:
    """The gradient of the packed ``qkv`` in one buffer: the kernels write its three column blocks
    directly (dq and dk already through the feature map's derivative), so nothing is concatenated."""
    dqkv = _alloc(qkv.shape, qkv.dtype, qkv.device)
    q_pre, k_pre, v = _split_packed(qkv, n_heads)
    q, k = _split_qk(qk, n_heads) if act else (q_pre, k_pre)
    loc = local_kv if local_kv.dim() == 5 else None
    _backward_impl(do, None, q, k, v, slope, None, False, loc, act, (q_pre, k_pre), _split_packed(dqkv, n_heads))
    return dqkv


@_packed_bwd_op.register_fake
def _(do, qkv, qk, slope, n_heads, act, local_kv):
    return qkv.new_empty(qkv.shape)


def _packed_setup_context(ctx, inputs, output):
    qkv, slope, n_heads, act = inputs
    ctx.n_heads, ctx.act = n_heads, act
    ctx.save_for_backward(qkv, output[1], slope, output[2])


def _packed_backward(ctx, do, _dqk, _dlocal):
    qkv, qk, slope, local_kv = ctx.saved_tensors
    return _packed_bwd_op(do, qkv, qk, slope, ctx.n_heads, ctx.act, local_kv), None, None, None


_packed_fwd_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


def lightning_attention_packed(qkv, slope, n_heads: int, qk_act: str = "silu"):
    """``lightning_attention(phi(q), phi(k), v, slope)`` for ``q | k | v`` packed in ``qkv``.

    ``qkv: [B, T, 3*H*D]`` holds the pre-activation q, k and v column blocks side by side, as one
    projection produces them; ``phi`` is ``qk_act`` (``"silu"``, ``"1+elu"`` or ``"none"``). Returns
    ``o: [B, T, H, D]``. On the kernel path the backward writes the gradient of ``qkv`` as one buffer,
    with the feature map's derivative applied inside the Lightning kernels, so the model needs no
    separate activation-backward and concatenation pass. Elsewhere (float64, or a CPU without
    the interpreter) it is the same computation in PyTorch. No initial or final state: this is the
    training path; ``lightning_attention`` serves the rest.
    """
    if qk_act not in ACT_CODES:
        raise ValueError(f"lightning_attention_packed: unknown qk_act {qk_act!r}; choose one of {sorted(ACT_CODES)}")
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"lightning_attention_packed: qkv must be [B, T, 3*H*D], got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    W = qkv.shape[-1]
    if n_heads < 1 or W % (3 * n_heads):
        raise ValueError(f"lightning_attention_packed: last dim {W} is not 3 * n_heads ({n_heads}) * head_dim")
    D = W // (3 * n_heads)
    if D not in SUPPORTED_V:
        raise ValueError(f"lightning_attention_packed: head dim {D} unsupported; supported {SUPPORTED_V}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q, k, v = _split_packed(qkv, n_heads)
    _check_inputs(q, k, v, slope, None, "lightning_attention_packed")
    act = ACT_CODES[qk_act]
    if not _use_kernel(qkv):
        return _fallback(feature_map_reference(q, act), feature_map_reference(k, act), v, slope)
    o, _, _ = _packed_fwd_op(qkv, slope.to(torch.float32), int(n_heads), act)
    return o


_VALIDATED: dict = {}


def _slope_validated(slope) -> bool:
    """True if this very tensor, unmodified since, already passed the value check."""
    hit = _VALIDATED.get(id(slope))
    return hit is not None and hit[0]() is slope and hit[1] == slope._version


def _remember_slope(slope) -> None:
    if len(_VALIDATED) > 256:
        _VALIDATED.clear()
    try:
        _VALIDATED[id(slope)] = (weakref.ref(slope), slope._version)
    except TypeError:  # not weak-referenceable: just check every time
        pass


def _check_inputs(q, k, v, slope, initial_state, name):
    """``check_attention_inputs``; the slope's value check (finite, >= 0) needs its values on the host,
    a device sync (in a traced graph also a graph break per layer and a recompile per slope tensor), so
    it runs once per slope tensor and never under ``torch.compile``: then only its shape and device."""
    if torch.compiler.is_compiling() or _slope_validated(slope):
        dims = check_attention_inputs(q, k, v, None, initial_state, name=name)
        if not isinstance(slope, torch.Tensor) or tuple(slope.shape) != (dims[2],) or slope.device != q.device:
            dims = check_attention_inputs(q, k, v, slope, initial_state, name=name)
    else:
        dims = check_attention_inputs(q, k, v, slope, initial_state, name=name)
        _remember_slope(slope)
    return dims


def _use_kernel(q: torch.Tensor) -> bool:
    return q.dtype != torch.float64 and kernel_device(q)


def _fallback(q, k, v, slope, initial_state=None, output_final_state=False):
    """The CPU path: Lightning Attention-2's block algorithm in PyTorch (differentiable)."""
    return linear_attention_chunked(q, k, v, slope, initial_state, output_final_state, block_size=64)


def lightning_attention(q, k, v, slope, initial_state=None, output_final_state=False):
    """Causal linear attention with per-head decay ``exp(-slope)``, Triton Lightning Attention-2.

    ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, ``slope: [H]`` (fp32), ``initial_state:
    [B, H, K, V]`` (fp32). Returns ``o`` ``[B, T, H, V]`` in ``v``'s dtype, or ``(o, S_{T-1})``
    with the fp32 final state when ``output_final_state``. Supported head dims: K in
    {16, 32, 64, 128, 256}, V in {16, 32, 64, 128}. Notebook: ``04_lightning_attention``.
    """
    if slope is None:
        raise ValueError("lightning_attention: slope [H] is required (use zeros for no decay)")
    B, T, H, K, V = _check_inputs(q, k, v, slope, initial_state, "lightning_attention")
    if K not in SUPPORTED_K or V not in SUPPORTED_V:
        raise ValueError(
            f"lightning_attention: unsupported head dims K={K}, V={V}; supported K in {SUPPORTED_K}, "
            f"V in {SUPPORTED_V} (pad the head dim or use tnlib.ops.linear_attention_chunked)"
        )
    if not _use_kernel(q):
        return _fallback(q, k, v, slope, initial_state, output_final_state)
    slope32 = slope.to(torch.float32)
    o, final, _ = _lightning_fwd_op(q, k, v, slope32, initial_state, bool(output_final_state))
    return (o, final) if output_final_state else o
