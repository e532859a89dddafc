"""SRMSNorm forward and forward+backward: Triton kernel vs eager PyTorch vs torch.compile (make bench-srmsnorm).

Each implementation is checked against a float64 reference first (bf16 inputs, ``rows`` x ``dim``),
then timed (``triton.testing.do_bench`` medians). Writes ``<out>/srmsnorm-<gpu>.json`` with provenance.

    python3 benchmarks/bench_srmsnorm.py               # = make bench-srmsnorm (tnlib installed)
    PYTHONPATH=$PWD python3 benchmarks/bench_srmsnorm.py --dims 1024,2048,4096 --out $OUT
"""
import json

import torch
from common import HBM_BYTES_PER_S, parser, require_cuda, result_path

from tnlib.ops.srmsnorm import srms_norm_reference, srms_norm_triton
from tnlib.provenance import write_results
from tnlib.testing import rel_err


def main():
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--dims", default="512,1024,2048,4096,8192")
    a = ap.parse_args()
    require_cuda("bench_srmsnorm.py")
    from triton.testing import do_bench

    out = result_path(a, "srmsnorm")
    compiled = torch.compile(srms_norm_reference)
    impls = {"triton": srms_norm_triton, "eager": srms_norm_reference, "compiled": compiled}
    rows = []
    for N in map(int, a.dims.split(",")):
        x = torch.randn(a.rows, N, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        dy = torch.randn_like(x)
        ref = srms_norm_reference(x.detach().double())
        for name, fn in impls.items():
            y = fn(x)
            (dx,) = torch.autograd.grad(y, x, dy)
            xr = x.detach().double().requires_grad_(True)
            (dxr,) = torch.autograd.grad(srms_norm_reference(xr), xr, dy.double())
            err, gerr = rel_err(y, ref), rel_err(dx, dxr)
            ok = err < 2e-2 and gerr < 4e-2
            fwd = do_bench(lambda: fn(x), warmup=25, rep=100, return_mode="median")
            fb = do_bench(lambda: torch.autograd.grad(fn(x), x, dy), warmup=25, rep=100, return_mode="median")
            bytes_fwd = 2 * x.numel() * 2  # read x, write y (bf16)
            rows.append(dict(impl=name, rows=a.rows, dim=N, fwd_ms=fwd, fwdbwd_ms=fb, rel_err=err, grad_rel_err=gerr,
                             correct=ok, fwd_floor_ms=bytes_fwd / HBM_BYTES_PER_S * 1e3,
                             fwdbwd_floor_ms=5 * x.numel() * 2 / HBM_BYTES_PER_S * 1e3))
            print(json.dumps(rows[-1]), flush=True)
            write_results(out, rows)
    for r in rows:
        print(f"{r['impl']:9s} dim {r['dim']:5d}  fwd {r['fwd_ms']:.3f} ms  fwd+bwd {r['fwdbwd_ms']:.3f} ms  ok={r['correct']}")


if __name__ == "__main__":
    main()
