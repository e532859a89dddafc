"""Representative Lightning kernel launches, recorded from tnlib's launchers, to compile without a GPU.

Test and tool support (``tests/test_kernels_compile.py``, ``tools/kernel_registers.py``,
``tools/tile_sweep.py``; it was ``tnlib/ops/_sm90.py``). The launches come from the library's own
launchers run on ``meta`` tensors with each kernel replaced by a recorder (``tnlib.gpucheck.record_launches``),
so their arguments (the stride tuples, the absent tensors as None, the compile options) are the ones a
real launch passes: nothing here spells a stride. :func:`compile_variant` compiles one of them for a
target, with constexprs, warps or stages changed (``tnlib.ops._compile.compile_kernel``).

    import importlib.util  # a tools/ file is imported by path
    spec = importlib.util.spec_from_file_location("kernel_launches", "tools/kernel_launches.py")
"""
from __future__ import annotations

import dataclasses
import importlib

import torch

from tnlib.gpucheck import Launch, record_launches
from tnlib.ops._compile import compile_kernel, heuristic_constexprs, kernel_usage
from tnlib.ops.lightning import op
from tnlib.ops.lightning.plan import launch_config
from tnlib.ops.targets import parse_target

__all__ = ["lightning_launches", "compile_variant", "general_ints", "kernel_usage"]


def _one(launches: list[Launch], name: str, **constexprs) -> Launch:
    found = [l for l in launches if l.name == name and all(l.constexprs.get(k) == v for k, v in constexprs.items())]
    if len(found) != 1:
        raise LookupError(f"{len(found)} launches of {name} with {constexprs}")
    return found[0]


def lightning_launches(B: int = 16, T: int = 2048, H: int = 8, D: int = 128, dtype=torch.bfloat16,
                       target: str = "sm_90") -> dict[str, Launch]:
    """The Lightning launches of a tnl-385m-shaped layer (``H`` heads of ``D``), planned for ``target``:

    ``forward``, ``dq``, ``dkdv``: the packed training path (q | k from the ``[B, T, 2*H*D]`` activation
    buffer, v and the gradients in ``[B, T, 3*H*D]``; the dq pass and the fused dk/dv with the SiLU
    derivative); ``state``: the segment-state kernel (two segments); ``prefill``: a forward from a start
    state with two segments, storing the final state; ``dv``: the two-pass backward's reverse pass (from
    G, storing D_0); ``lrpe``: the LRPE layer's forward (``K = 2 * D``, v a view of the projection)."""
    t = parse_target(target)
    meta = dict(device="meta", dtype=dtype)
    slope = torch.empty(H, device="meta", dtype=torch.float32)
    cfg = launch_config(B, T, H, D, D, dtype, t)
    two = dataclasses.replace(cfg, seg_len=T // 2)

    def packed():
        qkv = torch.empty(B, T, 3 * H * D, **meta)
        o, qk, local = op._packed_forward(qkv, slope, H, 1, cfg.to_ints())
        op._packed_backward_impl(torch.empty_like(o), qkv, qk, slope, H, 1, local, cfg.to_ints())

    def unpacked():
        q, k, v = (torch.empty(B, T, H, D, **meta) for _ in range(3))
        s0 = torch.empty(B, H, D, D, device="meta", dtype=torch.float32)
        op._forward_impl(q, k, v, slope, two, initial_state=s0, output_final_state=True)  # segments, prefill
        g = torch.empty(B, H, D, D, device="meta", dtype=torch.float32)
        op._backward_impl(torch.empty_like(v), q, k, v, slope, dataclasses.replace(cfg, dkdv=None), dfinal=g,
                          initial_state=s0, need_ds0=True)

    def lrpe():
        K = 2 * D
        q, k = torch.empty(B, T, H, K, **meta), torch.empty(B, T, H, K, **meta)
        v = torch.empty(B, T, 4 * H * D, **meta)[..., 2 * H * D: 3 * H * D].unflatten(-1, (H, D))
        op._forward_impl(q, k, v, slope, launch_config(B, T, H, K, D, dtype, t))

    p, u, r = record_launches(packed), record_launches(unpacked), record_launches(lrpe)
    return dict(
        forward=_one(p, "_lightning_kernel", GRAD_ACT=0), dq=_one(p, "_lightning_kernel", GRAD_ACT=1),
        dkdv=_one(p, "_dkdv_kernel"), state=_one(u, "_segment_state_kernel", REVERSE=False),
        prefill=_one(u, "_lightning_kernel", HAS_INIT=True, STORE_FINAL=True, REVERSE=False),
        dv=_one(u, "_lightning_kernel", REVERSE=True, STORE_FINAL=True), lrpe=_one(r, "_lightning_kernel"))


def general_ints(ints: dict) -> dict:
    """``ints`` with every integer made one the JIT does not specialize (3: neither 1 nor a multiple of 16):
    the general code a launch with unaligned strides gets."""
    return {n: tuple(3 for _ in v) if isinstance(v, tuple) else 3 for n, v in ints.items()}


def compile_variant(launch: Launch, capability: int = 90, num_warps: int | None = None, num_stages: int | None = None,
                    ptr_types: dict | None = None, int_values: dict | None = None, **constexprs):
    """Compile a recorded ``launch`` for ``sm_<capability>`` with ``constexprs`` (and warps, stages, pointer
    types or integers) changed; returns Triton's compiled kernel (``kernel_usage`` reads what it uses). A
    tensor made absent (``INIT=None``) or present (a pointer type) changes the flags the kernel's
    ``@triton.heuristics`` derive, unless ``constexprs`` sets them."""
    fn = getattr(importlib.import_module(launch.module), launch.name)
    derived = heuristic_constexprs(fn, {})  # flags @triton.heuristics derive (HAS_INIT, ...): derived again
    given = {**(ptr_types or {}), **(int_values or {})}  # a tensor the launch lacked (None) made present
    kept = {k: v for k, v in launch.constexprs.items() if k not in derived and not (v is None and k in given)}
    return compile_kernel(fn, {**kept, **constexprs}, {**launch.ptr_types, **(ptr_types or {})},
                          capability, num_warps or launch.num_warps, num_stages or launch.num_stages,
                          launch.int_values if int_values is None else int_values,
                          launch.options.get("enable_fp_fusion"))
