"""Registers and spills of tnlib's Lightning kernels per configuration, on any machine (no GPU).

Each configuration is compiled for sm_90 with the installed Triton (``tools/kernel_launches.py``) and
its PTX run through ``ptxas -v``. Use it before spending GPU time on a kernel change: a config that
spills heavily is worth a look, one that stops spilling is worth timing. Run it with the Triton of
the GPU machine (e.g. ``pip install --target DIR triton==3.6.0 --no-deps``, then ``PYTHONPATH=DIR``)
to see what that machine compiles.

Usage: PYTHONPATH=$PWD python3 tools/kernel_registers.py [--out FILE.json]
"""
import argparse
import importlib.util
import json
import os

_spec = importlib.util.spec_from_file_location("kernel_launches", os.path.join(os.path.dirname(__file__),
                                                                                "kernel_launches.py"))
KL = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(KL)

# tnl-385m's attention at T=2K (B=16, H=8, D=128): the launches tnlib makes, recorded from its launchers
# (tools/kernel_launches.py: the packed path's forward, dq pass and fused dk/dv, the segment-state kernel).
# The JIT specializes their integers (1 -> constant, multiples of 16 -> divisibility), which decides
# whether loads are vectorized and software-pipelined, so a report without them is not what runs.
B, T, H, D = 16, 2048, 8, 128

# (label, launch, constexprs changed, num_warps, num_stages); the first of each kernel is what tnlib
# launches for bf16 D=128 (tnlib.ops.lightning.plan.launch_config)
CASES = [
    ("forward (default 64/64/w4/s2)", "forward", {}, 4, 2),
    ("forward, segments", "prefill", dict(INIT=None, si=None, FINAL=None, sf=None), 4, 2),
    ("dq pass + SiLU derivative", "dq", {}, 4, 2),
    ("forward 8 warps", "forward", {}, 8, 2),
    ("forward BV=32", "forward", dict(BV=32), 4, 2),
    ("forward BV=128, 8 warps", "forward", dict(BV=128), 8, 2),
    ("forward chunk 32", "forward", dict(CH=32), 4, 2),
    ("LRPE shape K=256 BV=32", "lrpe", dict(SCALE_C=True), 4, 1),
    ("LRPE shape K=256 BV=32, key-scaled (launched)", "lrpe", {}, 4, 1),
    ("dk/dv (default 64/w8/s2)", "dkdv", dict(GRAD_ACT=0, E=None, se=None), 8, 2),
    ("dk/dv + SiLU derivative", "dkdv", {}, 8, 2),
    ("dk/dv chunk 32", "dkdv", dict(GRAD_ACT=0, E=None, se=None, CH=32), 8, 2),
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
    launches = KL.lightning_launches(B, T, H, D)
    for label, kind, extra, nw, ns in CASES:
        k = KL.compile_variant(launches[kind], 90, nw, ns, **extra)
        pipelined = "async_copy" in k.asm["ttgir"]
        u = KL.kernel_usage(k)
        rows.append(dict(config=label, num_warps=nw, num_stages=ns, **{k_: v for k_, v in extra.items() if v is not None},
                         **u, pipelined_loads=pipelined))
        print(f"{label:34s} {u['registers']!s:>5s} {u['spill_stores']!s:>6s}/{u['spill_loads']!s:<7s} {u['stack']!s:>8s} "
              f"{u['shared'] / 1024:8.1f} {'yes' if pipelined else 'no':>9s}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90", "shape": dict(B=B, T=T, H=H, D=D),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
