"""Shared memory, registers and spills of candidate Lightning tiles for one GPU target, on any machine.

How the rows of ``tnlib.ops.lightning.plan.PLANS`` for GPUs we have no access to were chosen
(``results/gpus/NOTES.md``): each candidate (value block, chunk, warps, stages) of one kernel role is
compiled for the target with Triton's toolchain (``tnlib.ops._compile``) at tnl-385m's strides
(T=2K, packed path: its launches as recorded by ``tools/kernel_launches.py``) and reported; a candidate that fits the target's shared memory with the fewest
spills and registers is a row candidate, to be confirmed by ``python -m tnlib gpu-check``.

Roles: ``forward`` (the generic kernel; also the dq pass with ``--grad-act 1``, and the two-pass
dv/dk with ``--reverse``), ``dkdv`` (the fused reverse sweep; ``--dk`` is its K and V), ``state``
(the segment-state kernel).

Usage: PYTHONPATH=$PWD python3 tools/tile_sweep.py --target sm_86 --role forward --dk 128 [--dv 128]
           [--dtype bf16] [--bv 16,32,64] [--chunk 16,32,64] [--warps 4,8] [--stages 1,2] [--out FILE.jsonl]
"""
import argparse
import importlib.util
import itertools
import json
import os

from tnlib.ops.targets import parse_target

_spec = importlib.util.spec_from_file_location("kernel_launches", os.path.join(os.path.dirname(__file__),
                                                                                "kernel_launches.py"))
KL = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(KL)


def ints(arg):
    return [int(x) for x in arg.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="sm_75, sm_80, sm_86, sm_89, sm_90, sm_100 or sm_120")
    ap.add_argument("--role", choices=["forward", "dkdv", "state"], default="forward")
    ap.add_argument("--dk", type=int, default=128, help="key width of the kernel (K of the state)")
    ap.add_argument("--dv", type=int, default=128, help="value width (the fused dk/dv kernel: its V)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--bv", type=ints, default=[16, 32, 64], help="value blocks (not for dkdv)")
    ap.add_argument("--chunk", type=ints, default=[16, 32, 64])
    ap.add_argument("--warps", type=ints, default=[4, 8])
    ap.add_argument("--stages", type=ints, default=[1, 2])
    ap.add_argument("--grad-act", type=int, default=0, help="1: the SiLU-derivative epilogue (dq pass, fused dk)")
    ap.add_argument("--reverse", action="store_true", help="time reversed (the two-pass dv/dk)")
    ap.add_argument("--scale-value", action="store_true", help="the value-scaled state update (forward role)")
    ap.add_argument("--out", default=None, help="append one JSON line per candidate")
    a = ap.parse_args()
    t = parse_target(a.target)
    p, prec = "*" + a.dtype, "ieee" if a.dtype == "fp32" else "tf32"
    launches = KL.lightning_launches()
    print(f"{t.name} ({t.gpus}), shared memory limit {t.smem:,} B; {a.role} DK={a.dk} DV={a.dv} {a.dtype}")
    print(f"{'BV':>4s} {'chunk':>5s} {'warps':>5s} {'stages':>6s} {'shared B':>9s} {'regs':>4s} {'spills B':>8s}")
    bvs = [0] if a.role == "dkdv" else [b for b in a.bv if a.dv % b == 0]
    for bv, ch, nw, ns in itertools.product(bvs, a.chunk, a.warps, a.stages):
        launch = launches["dq" if a.grad_act else "forward"] if a.role == "forward" else launches[a.role]
        ptrs = {n: p for n, v in launch.ptr_types.items() if v != "*fp32"}  # the inputs' dtype; states stay fp32
        grad = dict(GRAD_ACT=a.grad_act) if a.grad_act else dict(GRAD_ACT=0, E=None, se=None)
        if a.role == "forward":
            c = dict(DK=a.dk, BV=bv, CH=ch, INIT_DECAY=not a.reverse, REVERSE=a.reverse, DOT_PREC=prec, **grad,
                     SCALE_C=a.scale_value)
        elif a.role == "dkdv":
            c = dict(DK=a.dk, DV=a.dv, CH=ch, DOT_PREC=prec, **grad)
        else:
            c = dict(DK=a.dk, BV=bv, CH=ch, REVERSE=a.reverse, DOT_PREC=prec)
        k = KL.compile_variant(launch, t.capability, nw, ns, ptr_types=ptrs, **c)
        u = KL.kernel_usage(k)
        fits = "" if u["shared"] <= t.smem else "  (does not fit)"
        print(f"{bv:4d} {ch:5d} {nw:5d} {ns:6d} {u['shared']:9,d} {u['registers'] or 0:4d} {u['spill_stores'] or 0:8d}"
              f"{fits}", flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(dict(target=t.name, role=a.role, DK=a.dk, DV=a.dv, dtype=a.dtype, BV=bv, chunk=ch,
                                        warps=nw, stages=ns, grad_act=a.grad_act, reverse=a.reverse, **u)) + "\n")


if __name__ == "__main__":
    main()
