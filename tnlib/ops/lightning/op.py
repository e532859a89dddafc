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

from .._checks import check_attention_inputs
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
    tuple (None for an absent one). The one place where the kernels' strides are taken."""
    out = {}
    for name, x in tensors.items():
        out[name] = x
        out[_STRIDES[name]] = None if x is None else tuple(x.stride()[:3] if name in _ROWS else x.stride())
    return out


def _precision(x):
    """``DOT_PREC`` and ``UPCAST``: tf32 dots for 16-bit inputs, exact fp32 dots for fp32 inputs; on
    the CPU bf16 operands go to the dots as fp32 copies (the interpreter's bf16 dot is wrong)."""
    return dict(DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
                UPCAST=x.device.type == "cpu" and x.dtype == torch.bfloat16)


_cached_config = functools.lru_cache(maxsize=256)(launch_config)  # a cache: ~20 us per call otherwise


def _config(cfg: list[int], q, v) -> LaunchConfig:
    """The call's launch config: ``cfg`` (``LaunchConfig.to_ints``), or empty for the default of the
    tensors' shapes, dtype and device (``targets.device_target``: the GPU's compute capability)."""
    if cfg:
        return LaunchConfig.from_ints(cfg)
    dims = (*q.shape, v.shape[3])
    target = device_target(q.device)
    if all(isinstance(d, int) for d in dims):
        return _cached_config(*dims, q.dtype, target)
    return launch_config(*dims, q.dtype, target)  # symbolic sizes: a fake implementation under torch.compile


def _launch(name: str, grid, tile: Tile, **args):
    """Launch kernel ``name`` of :mod:`.kernels` with ``tile``'s warps and stages (``_triton.launch``: the
    compile options every tnlib launch requests)."""
    launch(getattr(_kernels(), name), grid, num_warps=tile.num_warps, num_stages=tile.num_stages, **args)


def _transposed(state):
    """``S^T`` of a ``[..., K, V]`` state (None stays None): the dq and dk passes start from transposes."""
    return None if state is None else state.transpose(-1, -2)


def _local_states(b, c, slope, cfg: LaunchConfig, *, reverse: bool):
    """End states of segments ``0 .. nseg-2`` from a zero start, ``[B, H, nseg-1, DK, DV]`` fp32, or
    None for one segment (the last segment's state is never needed: a segment folds in earlier ones)."""
    B, T, H, DK = b.shape
    DV, nseg, t = c.shape[3], cfg.n_seg(T), cfg.state
    if nseg == 1:
        return None
    loc = _alloc((B, H, nseg - 1, DK, DV), torch.float32, b.device)
    _launch("_segment_state_kernel", (DV // t.block_v, nseg - 1, B * H), t,
            **_tensors(Bp=b, Cp=c, LOCAL=loc), slope_ptr=slope, T=T, H=H, seg_len=cfg.seg_len,
            DK=DK, BV=t.block_v, CH=t.chunk, REVERSE=reverse, **_precision(b), SCALE_C=t.scale_value)
    return loc


def _attn(a, b, c, slope, tile: Tile, *, seg_len: int, out_dtype, init=None, init_decay: bool,
          reverse: bool = False, want_final: bool = False, local=None, grad_act: int = 0, pre=None, out=None):
    """One pass of the generic kernel, one row of the table in :mod:`.kernels`: ``o_t = a_t (lambda^(t+1-z)
    init + sum_{s <= t} lambda^(t-s) b_s^T c_s)`` (``z = 0`` with ``init_decay``, else 1), in reversed time
    with ``reverse``; returns ``(o, the state after the last token if want_final, else None)``.

    ``local``: segment states to fold in (``seg_len`` tokens per segment); ``grad_act``: multiply
    the output by the q/k feature map's derivative at ``pre`` (``[B, T, H, DV]``, see ``ACT_CODES``);
    ``out``: write into this (possibly strided) tensor instead of a new one."""
    B, T, H, DK = a.shape
    DV = c.shape[3]
    o = _alloc((B, T, H, DV), out_dtype, a.device) if out is None else out
    final = _alloc((B, H, DK, DV), torch.float32, a.device) if want_final else None
    _launch("_lightning_kernel", (DV // tile.block_v, -(-T // seg_len), B * H), tile,
            **_tensors(A=a, Bp=b, Cp=c, O=o, INIT=init, LOCAL=local, FINAL=final, E=pre if grad_act else None),
            slope_ptr=slope, T=T, H=H, seg_len=seg_len, DK=DK, BV=tile.block_v, CH=tile.chunk,
            INIT_DECAY=init_decay, REVERSE=reverse, **_precision(a), GRAD_ACT=grad_act, FAST=not interpreting(),
            SCALE_C=tile.scale_value)
    return o, final


def _dkdv(q, k, v, do, slope, tile: Tile, *, seg_len: int, dfinal=None, need_ds0: bool = False, local=None,
          grad_act: int = 0, k_pre=None, dk=None, dv=None):
    """dk and dv from one reverse-time sweep sharing the state D (see ``_dkdv_kernel``): the table's dv and
    dk rows at once, D starting from ``dfinal`` (G); returns ``(dk, dv, D_0 if need_ds0 else None)``. With
    ``grad_act`` dk is taken through the feature map's derivative at ``k_pre``."""
    B, T, H, DK = q.shape
    DV = v.shape[3]
    dk = _alloc((B, T, H, DK), k.dtype, q.device) if dk is None else dk
    dv = _alloc((B, T, H, DV), v.dtype, q.device) if dv is None else dv
    final = _alloc((B, H, DK, DV), torch.float32, q.device) if need_ds0 else None
    _launch("_dkdv_kernel", (1, -(-T // seg_len), B * H), tile,
            **_tensors(Q=q, K=k, V=v, DO=do, DK_out=dk, DV_out=dv, INIT=dfinal, LOCAL=local, FINAL=final,
                       E=k_pre if grad_act else None),
            slope_ptr=slope, T=T, H=H, seg_len=seg_len, DK=DK, DV=DV, CH=tile.chunk, **_precision(q),
            GRAD_ACT=grad_act, FAST=not interpreting())
    return dk, dv, final


def _forward_impl(q, k, v, slope, cfg: LaunchConfig, *, initial_state=None, output_final_state: bool = False):
    """``(o, final state or None, k/v segment states or None)``: the table's forward row."""
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    slope = slope.contiguous()
    local = _local_states(k, v, slope, cfg, reverse=False)
    o, final = _attn(q, k, v, slope, cfg.forward, init=initial_state, init_decay=True,
                     want_final=output_final_state, local=local, seg_len=cfg.seg_len, out_dtype=v.dtype)
    return o, final, local


def _backward_impl(do, q, k, v, slope, cfg: LaunchConfig, *, dfinal=None, initial_state=None, need_ds0: bool = False,
                   loc_kv=None, grad_act: int = 0, pre=None, grads=None):
    """dq, dk, dv (and dS0 if ``need_ds0``): the table's dq, dv and dk rows. ``dfinal``: G, the gradient into
    the returned final state (None: zero). ``loc_kv``: the forward's k/v segment states (recomputed if None). With
    ``grad_act`` and ``pre = (q_pre, k_pre)`` (q and k being the feature map of those) dq and dk are the
    gradients of the pre-activations. ``grads``: three tensors (views of one buffer in the packed path)
    to write dq, dk, dv into."""
    do = _last_contig(do.to(v.dtype))
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    slope = slope.contiguous()
    dq_out, dk_out, dv_out = grads if grads is not None else (None, None, None)
    q_pre, k_pre = pre if pre is not None else (None, None)
    seg, multi = cfg.seg_len, cfg.n_seg(q.shape[1]) > 1
    # dq_t = dO_t S_t^T: forward in time, query dO, key v, value k, start S_{-1}^T; the forward's
    # plan, so the k/v segment states it kept serve here
    if multi and loc_kv is None:
        loc_kv = _local_states(k, v, slope, cfg, reverse=False)
    dq, _ = _attn(do, v, k, slope, cfg.dq, init=_transposed(initial_state), init_decay=True,
                  local=_transposed(loc_kv if multi else None), seg_len=seg, out_dtype=q.dtype,
                  grad_act=grad_act, pre=q_pre, out=dq_out)
    del loc_kv
    # D_t (reverse in time) from q^T dO, start G entering undecayed
    loc_qdo = _local_states(q, do, slope, cfg, reverse=True)
    if cfg.dkdv is not None:
        dk, dv, d0 = _dkdv(q, k, v, do, slope, cfg.dkdv, dfinal=dfinal, need_ds0=need_ds0, local=loc_qdo,
                           seg_len=seg, grad_act=grad_act, k_pre=k_pre, dk=dk_out, dv=dv_out)
    else:
        dv, d0 = _attn(k, q, do, slope, cfg.dv, init=dfinal, init_decay=False, reverse=True, want_final=need_ds0,
                       local=loc_qdo, seg_len=seg, out_dtype=v.dtype, out=dv_out)
        dk, _ = _attn(v, do, q, slope, cfg.dk, init=_transposed(dfinal), init_decay=False, reverse=True,
                      local=_transposed(loc_qdo), seg_len=seg, out_dtype=k.dtype, grad_act=grad_act, pre=k_pre,
                      out=dk_out)
    ds0 = d0 * torch.exp(-slope.float())[None, :, None, None] if need_ds0 else None
    return dq, dk, dv, ds0


# ----------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with fake (meta) implementations. ``config`` is
# ``LaunchConfig.to_ints()`` or empty for the default (resolved from the shapes, also symbolic ones).
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tnlib::lightning_fwd", mutates_args=())
def _lightning_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor,
    initial_state: Optional[torch.Tensor], output_final_state: bool, config: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(o, final state or empty, segment states or empty)``; the segment states of k, v
    are kept for the backward's dq pass, which needs exactly them."""
    o, final, local = _forward_impl(q, k, v, slope, _config(config, q, v), initial_state=initial_state,
                                    output_final_state=output_final_state)
    return o, (_empty_f32(q) if final is None else final), (_empty_f32(q) if local is None else local)


@_lightning_fwd_op.register_fake
def _(q, k, v, slope, initial_state, output_final_state, config):
    B, T, H, K = q.shape
    V = v.shape[3]
    final = q.new_empty((B, H, K, V) if output_final_state else (0,), dtype=torch.float32)
    nseg = _config(config, q, v).n_seg(T)
    local = q.new_empty((B, H, nseg - 1, K, V) if nseg > 1 else (0,), dtype=torch.float32)
    return v.new_empty((B, T, H, V)), final, local


@torch.library.custom_op("tnlib::lightning_bwd", mutates_args=())
def _lightning_bwd_op(
    do: torch.Tensor, dfinal: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, slope: torch.Tensor, initial_state: Optional[torch.Tensor], need_ds0: bool,
    local_kv: torch.Tensor, config: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    loc = local_kv if local_kv.dim() == 5 else None
    cfg = _config(config, q, v)
    dq, dk, dv, ds0 = _backward_impl(do, q, k, v, slope, cfg, dfinal=dfinal, initial_state=initial_state,
                                     need_ds0=need_ds0, loc_kv=loc)
    if ds0 is None:
        ds0 = _empty_f32(q)
    elif initial_state is not None:
        ds0 = ds0.to(initial_state.dtype)
    return dq, dk, dv, ds0


@_lightning_bwd_op.register_fake
def _(do, dfinal, q, k, v, slope, initial_state, need_ds0, local_kv, config):
    ds0 = initial_state.new_empty(initial_state.shape) if need_ds0 else _empty_f32(q)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds0


def _setup_context(ctx, inputs, output):
    q, k, v, slope, initial_state, output_final_state, config = inputs
    ctx.has_init, ctx.output_final_state, ctx.config = initial_state is not None, output_final_state, config
    ctx.save_for_backward(q, k, v, slope, initial_state, output[2])


def _backward(ctx, do, dfinal, _dlocal):
    q, k, v, slope, initial_state, local_kv = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    if not ctx.output_final_state or dfinal is None or dfinal.numel() == 0:
        dfinal = None
    need_ds0 = ctx.has_init and ctx.needs_input_grad[4]
    dq, dk, dv, ds0 = _lightning_bwd_op(do, dfinal, q, k, v, slope, initial_state if ctx.has_init else None,
                                        need_ds0, local_kv, ctx.config)
    return dq, dk, dv, None, (ds0 if need_ds0 else None), None, None


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


def _packed_forward(qkv, slope, n_heads: int, act: int, config: list[int]):
    """``(o, phi(q | k) or None, k/v segment states or None)`` of the packed path (the custom op's body)."""
    q, k, v = _split_packed(qkv, n_heads)
    qk = None
    if act:
        qk = _feature_map(qkv[..., : 2 * (qkv.shape[-1] // 3)], act)
        q, k = _split_qk(qk, n_heads)
    o, _, local = _forward_impl(q, k, v, slope, _config(config, q, v))
    return o, qk, local


def _packed_backward_impl(do, qkv, qk, slope, n_heads: int, act: int, local_kv, config: list[int]):
    """The gradient of ``qkv`` as one buffer (the custom op's body); ``qk``: the forward's ``phi(q | k)``
    (None without a feature map), ``local_kv``: its segment states (None: one segment)."""
    dqkv = _alloc(qkv.shape, qkv.dtype, qkv.device)
    q_pre, k_pre, v = _split_packed(qkv, n_heads)
    q, k = _split_qk(qk, n_heads) if act else (q_pre, k_pre)
    _backward_impl(do, q, k, v, slope, _config(config, q, v), loc_kv=local_kv, grad_act=act, pre=(q_pre, k_pre),
                   grads=_split_packed(dqkv, n_heads))
    return dqkv


@torch.library.custom_op("tnlib::lightning_packed_fwd", mutates_args=())
def _packed_fwd_op(qkv: torch.Tensor, slope: torch.Tensor, n_heads: int, act: int,
                   config: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, phi(q | k) or empty, segment states of k, v or empty)`` for the pre-activation ``qkv``.

    The feature map is one elementwise pass over the q | k columns (applying it inside the Lightning
    kernels was measured slower: each CTA recomputes it for its tiles on the special-function units);
    its output is kept for the backward, like the unfused model's activations."""
    o, qk, local = _packed_forward(qkv, slope, n_heads, act, config)
    return o, (_empty_f32(qkv) if qk is None else qk), (_empty_f32(qkv) if local is None else local)


@_packed_fwd_op.register_fake
def _(qkv, slope, n_heads, act, config):
    q, k, v = _split_packed(qkv, n_heads)
    B, T, H, D = q.shape
    nseg = _config(config, q, v).n_seg(T)
    local = qkv.new_empty((B, H, nseg - 1, D, D) if nseg > 1 else (0,), dtype=torch.float32)
    qk = qkv.new_empty((B, T, 2 * H * D)) if act else _empty_f32(qkv)
    return qkv.new_empty((B, T, H, D)), qk, local


@torch.library.custom_op("tnlib::lightning_packed_bwd", mutates_args=())
def _packed_bwd_op(do: torch.Tensor, qkv: torch.Tensor, qk: torch.Tensor, slope: torch.Tensor, n_heads: int,
                   act: int, local_kv: torch.Tensor, config: list[int]) -> torch.Tensor:
    """The gradient of the packed ``qkv`` in one buffer: the kernels write its three column blocks
    directly (dq and dk already through the feature map's derivative), so nothing is concatenated."""
    return _packed_backward_impl(do, qkv, qk if act else None, slope, n_heads, act,
                                 local_kv if local_kv.dim() == 5 else None, config)


@_packed_bwd_op.register_fake
def _(do, qkv, qk, slope, n_heads, act, local_kv, config):
    return qkv.new_empty(qkv.shape)


def _packed_setup_context(ctx, inputs, output):
    qkv, slope, n_heads, act, config = inputs
    ctx.n_heads, ctx.act, ctx.config = n_heads, act, config
    ctx.save_for_backward(qkv, output[1], slope, output[2])


def _packed_backward(ctx, do, _dqk, _dlocal):
    qkv, qk, slope, local_kv = ctx.saved_tensors
    dqkv = _packed_bwd_op(do, qkv, qk, slope, ctx.n_heads, ctx.act, local_kv, ctx.config)
    return dqkv, None, None, None, None


_packed_fwd_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions: input checks, then the kernel path or the PyTorch fallback
# ----------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, slope, initial_state, name):
    """``check_attention_inputs``: shapes, dtypes and devices, and the slope's values (finite, >= 0) only where
    reading them costs nothing, a CPU tensor outside ``torch.compile``. On a GPU that read is a device sync per
    call (and under ``torch.compile`` a graph break), so a GPU slope's values are checked where it is made:
    the model's decay at construction (``GatedLinearAttention.decay_slope``), any other with
    ``tnlib.ops.check_slope_values``. Nothing is written onto the caller's tensors."""
    values = isinstance(slope, torch.Tensor) and slope.device.type == "cpu" and not torch.compiler.is_compiling()
    return check_attention_inputs(q, k, v, slope, initial_state, name=name, slope_values=values)


def _fallback(q, k, v, slope, initial_state=None, output_final_state=False):
    """The PyTorch path: Lightning Attention-2's block algorithm (differentiable)."""
    return linear_attention_chunked(q, k, v, slope, initial_state, output_final_state, block_size=64)


def lightning_attention(q, k, v, slope, initial_state=None, output_final_state=False,
                        config: Optional[LaunchConfig] = None):
    """Causal linear attention with per-head decay ``exp(-slope)``, Triton Lightning Attention-2.

    ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, ``slope: [H]`` (fp32, finite and >= 0: checked here for a
    CPU tensor; a GPU tensor's values are its maker's to check, ``tnlib.ops.check_slope_values``, as the
    model does at construction), ``initial_state: [B, H, K, V]`` (fp32). Returns ``o`` ``[B, T, H, V]`` in ``v``'s dtype, or ``(o, S_{T-1})``
    with the fp32 final state when ``output_final_state``. Supported head dims: K in
    {16, 32, 64, 128, 256}, V in {16, 32, 64, 128}. ``config``: launches instead of
    ``plan.launch_config``'s (tuning, tests). Notebook: ``04_lightning_attention``.
    """
    if slope is None:
        raise ValueError("lightning_attention: slope [H] is required (use zeros for no decay)")
    B, T, H, K, V = _check_inputs(q, k, v, slope, initial_state, "lightning_attention")
    if K not in SUPPORTED_K or V not in SUPPORTED_V:
        raise ValueError(
            f"lightning_attention: unsupported head dims K={K}, V={V}; supported K in {SUPPORTED_K}, "
            f"V in {SUPPORTED_V} (pad the head dim or use tnlib.ops.linear_attention_chunked)"
        )
    if not use_triton(q):
        return _fallback(q, k, v, slope, initial_state, output_final_state)
    if config is not None:
        config.check(K, V)
    cfg = config.to_ints() if config is not None else []
    o, final, _ = _lightning_fwd_op(q, k, v, slope.to(torch.float32), initial_state, bool(output_final_state),
                                    cfg)
    return (o, final) if output_final_state else o


def lightning_attention_packed(qkv, slope, n_heads: int, qk_act: str = "silu",
                               config: Optional[LaunchConfig] = None):
    """``lightning_attention(phi(q), phi(k), v, slope)`` for ``q | k | v`` packed in ``qkv``.

    ``qkv: [B, T, 3*H*D]`` holds the pre-activation q, k and v column blocks side by side, as one
    projection produces them (read in place, with its row stride); ``phi`` is ``qk_act`` (``"silu"``,
    ``"1+elu"`` or ``"none"``). Returns ``o: [B, T, H, D]``. On the kernel path the backward writes the
    gradient of ``qkv`` as one buffer, with the feature map's derivative applied inside the Lightning
    kernels, so the model needs no separate activation-backward and concatenation pass. Elsewhere it
    is the same computation in PyTorch. No initial or final state: this is the training path;
    ``lightning_attention`` serves the rest. ``config`` as in ``lightning_attention``.
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
    _check_inputs(q, k, v, slope, None, "lightning_attention_packed")
    act = ACT_CODES[qk_act]
    if not use_triton(qkv):
        return _fallback(feature_map_reference(q, act), feature_map_reference(k, act), v, slope)
    if config is not None:
        config.check(D, D)
    cfg = config.to_ints() if config is not None else []
    return _packed_fwd_op(qkv, slope.to(torch.float32), int(n_heads), act, cfg)[0]
