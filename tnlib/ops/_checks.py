"""Input validation shared by every attention implementation (references and Triton kernels).

One layout at every boundary: ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``, ``slope: [H]``,
``initial_state: [B, H, K, V]``; with packed sequences (``cu_seqlens``, ``[N + 1]``) ``B = 1`` and
``initial_state: [N, H, K, V]``.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (the accumulation dtype)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def check_slope_values(slope: torch.Tensor, *, name: str = "slope") -> None:
    """Raise ``ValueError`` unless every ``slope = -ln(lambda)`` is finite and ``>= 0``. It reads the values on
    the host: a device sync for a GPU tensor, so it runs where a slope is made (the model's decay, at
    construction) and on CPU tensors, not in every kernel call."""
    if not torch.isfinite(slope).all() or (slope < 0).any():
        raise ValueError(
            f"{name}: slope = -ln(lambda) must be finite and >= 0 (0 means no decay), got {slope.tolist()}"
        )


def check_cu_seqlens(cu_seqlens, total: int, *, name: str = "cu_seqlens", device=None, values: bool = True) -> int:
    """Check packed-sequence boundaries (flash-linear-attention's ``cu_seqlens`` convention): a 1-D int32 or
    int64 tensor ``[N + 1]`` (on ``device`` when given) that starts at 0, ends at ``total`` and strictly
    increases (every sequence holds at least one token). Returns ``N``. ``values``: also read the values,
    on the host (a device sync for a GPU tensor; the shape, dtype and device checks cost nothing). Raises
    ``TypeError`` / ``ValueError`` naming what is wrong."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name}: cu_seqlens must be a torch.Tensor of int32 or int64, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{name}: cu_seqlens must have shape [N + 1] with N >= 1 sequences, got "
                         f"{tuple(cu_seqlens.shape)}")
    if device is not None and cu_seqlens.device != torch.device(device):
        raise ValueError(f"{name}: cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if values and cu_seqlens.device.type != "meta":
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != total:
            raise ValueError(f"{name}: cu_seqlens must start at 0 and end at the total length {total}, got "
                             f"{cu[0]} ... {cu[-1]}")
        bad = next((i for i in range(len(cu) - 1) if cu[i + 1] <= cu[i]), None)
        if bad is not None:
            raise ValueError(f"{name}: cu_seqlens must strictly increase (sequences of at least one token), but "
                             f"cu_seqlens[{bad}] = {cu[bad]} and cu_seqlens[{bad + 1}] = {cu[bad + 1]}")
    return cu_seqlens.shape[0] - 1


def check_attention_inputs(q, k, v, slope=None, initial_state=None, *, name="attention", slope_values=True,
                           cu_seqlens=None, cu_values=True):
    """Validate the ``[B, T, H, D]`` layout, dtypes and devices; return ``(B, T, H, K, V)``. ``slope_values``:
    also the slope's values (:func:`check_slope_values`), else only its shape, dtype and device.
    ``cu_seqlens``: packed sequences (:func:`check_cu_seqlens`; its values read when ``cu_values``): then
    ``B`` must be 1 and ``initial_state`` is ``[N, H, K, V]``."""
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name}: {arg} must have 4 dims in layout [B, T, H, D], got shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name}: {arg} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{name}: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{name}: v must share [B, T, H] = {tuple(q.shape[:3])} with q, got {tuple(v.shape)} "
            "(layout is [B, T, H, D])"
        )
    if T < 1:
        raise ValueError(f"{name}: sequence length must be at least 1, got T={T}")
    V = v.shape[3]
    n_states = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"{name}: with cu_seqlens, q, k, v hold the sequences back to back as [1, total, H, D]; "
                             f"got batch size {B} (flatten it: x.reshape(1, B * T, H, D), cu_seqlens over B * T)")
        n_states = check_cu_seqlens(cu_seqlens, T, name=name, device=q.device, values=cu_values)
    if slope is not None:
        if not isinstance(slope, torch.Tensor):
            raise TypeError(f"{name}: slope must be a tensor of shape [H], got {type(slope).__name__}")
        if slope.dim() != 1 or slope.shape[0] != H:
            hint = ""
            if slope.dim() == 1 and slope.shape[0] == T:
                hint = " (slope length equals dim 1: did you pass [B, H, T, D] instead of [B, T, H, D]?)"
            raise ValueError(
                f"{name}: slope must have shape [H] = [{H}] for layout [B, T, H, D], "
                f"got {tuple(slope.shape)}{hint}"
            )
        if not slope.dtype.is_floating_point:
            raise TypeError(f"{name}: slope must be floating point (fp32 recommended), got {slope.dtype}")
        if slope.device != q.device:
            raise ValueError(f"{name}: slope is on {slope.device} but q is on {q.device}")
        if slope_values:
            check_slope_values(slope, name=name)
    if initial_state is not None:
        lead = "B" if cu_seqlens is None else "N"  # one start state per sequence
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError(f"{name}: initial_state must be a tensor [{lead}, H, K, V]")
        if tuple(initial_state.shape) != (n_states, H, K, V):
            raise ValueError(
                f"{name}: initial_state must have shape [{lead}, H, K, V] = {(n_states, H, K, V)}, "
                f"got {tuple(initial_state.shape)}"
            )
        if not initial_state.dtype.is_floating_point:
            raise TypeError(f"{name}: initial_state must be floating point (fp32), got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"{name}: initial_state is on {initial_state.device} but q is on {q.device}")
    return B, T, H, K, V
