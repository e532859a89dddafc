"""Registers and spills of tnlib's Lightning kernels per configuration, on any machine (no GPU).

Each configuration is compiled for sm_90 with the installed Triton (``tnlib.ops._sm90``) and its
PTX run through ``ptxas -v``. Use it before spending GPU time on a kernel change: a config that
spills heavily is worth a look, one that stops spilling is worth timing. Run it with the Triton of
the GPU machine (e.g. ``pip install --target DIR triton==3.6.0 --no-deps``, then ``PYTHONPATH=DIR``)
to see what that machine compiles.

Usage: PYTHONPATH=$PWD python3 tools/kernel_registers.py [--out FILE.json]
"""
import argparse
import json

from tnlib.ops.lightning import kernels as K
from tnlib.ops._sm90 import BF16, FP32, compile_sm90, lightning_launch_ints, ptxas_usage

MAIN_PTRS = dict(A=BF16, Bp=BF16, Cp=BF16, O=BF16, INIT=FP32, LOCAL=FP32, FINAL=FP32, slope_ptr=FP32, E=BF16)
MAIN_BASE = dict(DK=128, BV=64, CH=64, HAS_INIT=False, INIT_DECAY=True, HAS_LOCAL=False, STORE_FINAL=False,
                 REVERSE=False, DOT_PREC="tf32", UPCAST=False, GRAD_ACT=0, FAST=True, SCALE_C=True)
DKDV_PTRS = dict(Q=BF16, K=BF16, V=BF16, DO=BF16, DK_out=BF16, DV_out=BF16, INIT=FP32, LOCAL=FP32, FINAL=FP32,
                 slope_ptr=FP32, E=BF16)
DKDV_BASE = dict(DK=128, DV=128, CH=64, HAS_INIT=False, HAS_LOCAL=False, STORE_FINAL=False, DOT_PREC="tf32",
                 UPCAST=False, GRAD_ACT=0, FAST=True)

# Representative integer arguments (strides, lengths) of tnl-385m's attention at T=2K on the packed path
# (B=16, H=8, D=128; q, k from the [B, T, 2*H*D] activation buffer, v and the gradients in [B, T, 3*H*D]):
# the JIT specializes integers (1 -> constant, multiples of 16 -> divisibility), which decides whether
# loads are vectorized and software-pipelined, so a report without them is not what runs.
B, T, H, D = 16, 2048, 8, 128
_INTS = lightning_launch_ints(B, T, H, D)
FWD_INTS, DQ_INTS, DKDV_INTS, STATE_INTS = _INTS["forward"], _INTS["dq"], _INTS["dkdv"], _INTS["state"]

# (label, kernel, constexprs on top of the base, num_warps, num_stages); the first of each kernel is
# what tnlib launches for bf16 D=128 (tnlib.ops.lightning.plan.launch_config)
CASES = [
    ("forward (default 64/64/w4/s2)", "main", {}, 4, 2),
    ("forward, segments", "main", dict(HAS_LOCAL=True), 4, 2),
    ("dq pass + SiLU derivative", "main", dict(GRAD_ACT=1), 4, 2),
    ("forward 8 warps", "main", {}, 8, 2),
    ("forward BV=32", "main", dict(BV=32), 4, 2),
    ("forward BV=128, 8 warps", "main", dict(BV=128), 8, 2),
    ("forward chunk 32", "main", dict(CH=32), 4, 2),
    ("LRPE shape K=256 BV=32", "main", dict(DK=256, BV=32), 4, 1),
    ("LRPE shape K=256 BV=32, key-scaled (launched)", "main", dict(DK=256, BV=32, SCALE_C=False), 4, 1),
    ("dk/dv (default 64/w8/s2)", "dkdv", {}, 8, 2),
    ("dk/dv + SiLU derivative", "dkdv", dict(GRAD_ACT=1), 8, 2),
    ("dk/dv chunk 32", "dkdv", dict(CH=32), 8, 2),
    ("segment state (64/128/w8/s2)", "state", {}, 8, 2),
]

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import triton

    rows = []
    print(f"triton {triton.__version__}, target sm_90")
    print(f"{'configuration':34s} {'regs':>5s} {'spill st/ld B':>14s} {'stack B':>8s} {'smem KB':>8s} {'pipelined':>9s}")
    for label, kind, extra, nw, ns in CASES:
        if kind == "main":
            ints = DQ_INTS if extra.get("GRAD_ACT") else FWD_INTS
            k = compile_sm90(K._lightning_kernel, {**MAIN_BASE, **extra}, MAIN_PTRS, nw, ns, ints)
        elif kind == "dkdv":
            k = compile_sm90(K._dkdv_kernel, {**DKDV_BASE, **extra}, DKDV_PTRS, nw, ns, DKDV_INTS)
        else:
            k = compile_sm90(K._segment_state_kernel, dict(DK=128, BV=128, CH=64, REVERSE=False, DOT_PREC="tf32",
                                                           UPCAST=False), dict(Bp=BF16, Cp=BF16, slope_ptr=FP32, LOCAL=FP32),
                             nw, ns, STATE_INTS)
        pipelined = "async_copy" in k.asm["ttgir"]
        u = ptxas_usage(k)
        rows.append(dict(config=label, num_warps=nw, num_stages=ns, **extra, **u, pipelined_loads=pipelined))
        print(f"{label:34s} {u['registers']!s:>5s} {u['spill_stores']!s:>6s}/{u['spill_loads']!s:<7s} {u['stack']!s:>8s} "
              f"{u['shared'] / 1024:8.1f} {'yes' if pipelined else 'no':>9s}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90", "shape": dict(B=B, T=T, H=H, D=D),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
