"""SRMSNorm forward and forward+backward: Triton kernel vs eager PyTorch vs torch.compile (make bench-srmsnorm).

Each implementation is checked against a float64 reference first (bf16 inputs, ``rows`` x ``dim``),
then timed (``triton.testing.do_bench`` medians). Writes ``<out>/srmsnorm-<gpu>.json`` with provenance.

    python3 benchmarks/bench_srmsnorm.py               # = make bench-srmsnorm (tnlib installed)
    PYTHONPATH=$PWD python3 benchmarks/bench_srmsnorm.py --dims 1024,2048,4096 --out $OUT
"""

import torch
from common import HBM_BYTES_PER_S, figure, parser, print_table, record, replot, require_cuda, result_path, save_figure

from tnlib.ops.srmsnorm import srms_norm_reference, srms_norm_triton
from tnlib.provenance import provenance
from tnlib.testing import rel_err


def plot(rows, path, header=None):
    """Forward and forward+backward ms vs dim per implementation, with the memory floor."""
    fig, axes = figure(1, 2)
    for ax, key, floor, title in ((axes[0][0], "fwd_ms", "fwd_floor_ms", "forward"),
                                  (axes[0][1], "fwdbwd_ms", "fwdbwd_floor_ms", "forward + backward")):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["dim"], r[key]) for r in rows if r["impl"] == impl)
            ax.loglog(*zip(*pts), "o-", label=impl)
        ax.loglog(*zip(*sorted({(r["dim"], r[floor]) for r in rows})), "k--", lw=1, label="memory floor")
        ax.set_xlabel("dim")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"SRMSNorm {title}, {rows[0]['rows']:,} rows, bf16")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, header)


def main():
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--dims", default="512,1024,2048,4096,8192")
    a = ap.parse_args()
    if replot(a, plot):
        return
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
            record(out, rows, dict(impl=name, rows=a.rows, dim=N, fwd_ms=fwd, fwdbwd_ms=fb, rel_err=err,
                                   grad_rel_err=gerr, correct=ok, fwd_floor_ms=bytes_fwd / HBM_BYTES_PER_S * 1e3,
                                   fwdbwd_floor_ms=5 * x.numel() * 2 / HBM_BYTES_PER_S * 1e3))
    plot(rows, result_path(a, "srmsnorm", ".png"), provenance())
    print_table(rows, [("impl", "impl", "9s"), ("dim", "dim", "5d"), ("fwd_ms", "fwd ms", "8.3f"),
                       ("fwdbwd_ms", "fwd+bwd ms", "10.3f"), ("correct", "ok", "3d")])


if __name__ == "__main__":
    main()
