"""Benchmark causal attention kernels on one GPU, all contenders in one run (``make bench-kernels``).

Contenders, each in its native layout, inputs built outside the timed region:
  tnlib           tnlib.ops.lightning_attention            [B, T, H, D], slope [H]
  fla             fla.ops.simple_gla.chunk_simple_gla      [B, T, H, D], g_gamma=-slope, scale=1
  lightning-attn  lightning_attn.ops.lightning_attn_func   [B, H, T, D], s [H, 1, 1]
  sdpa            torch scaled_dot_product_attention (softmax, causal; a different function)
  naive           PyTorch quadratic decayed linear attention (skipped where its T x T scores don't fit)

Every contender's output is first checked against a float64 reference (tnlib's also its final
state and all gradients); failures are recorded and not timed. Forward and forward+backward
medians come from ``triton.testing.do_bench(return_mode="median")`` (gradients reset to None
between backward runs via ``grad_to_none``). Peak extra memory is ``max_memory_allocated`` during
one forward+backward minus what was allocated before it (inputs and the output gradient). The
memory floor is the bytes that must move at 4.3 TB/s (the copy rate measured on the H200):
forward reads q, k, v and writes o; forward+backward is about three times that.

Writes ``<out>/kernels-<gpu>.json`` and ``<out>/kernels-<gpu>.png``.

    PYTHONPATH=$PWD python3 benchmarks/bench_kernels.py   # = make bench-kernels (no .venv: python3)
    PYTHONPATH=$PWD python3 benchmarks/bench_kernels.py --impls tnlib,fla --shapes 16:128:128 --out $OUT
    python3 benchmarks/bench_kernels.py --replot results/bench/kernels-h200.json   # redraw the PNG, no GPU
"""
from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.nn.functional as F
from common import HBM_BYTES_PER_S as BW
from common import figure, median_ms, parser, peak_gb, replot, require_cuda, result_path, save_figure

DEV = "cuda"


def slopes(h):
    """ALiBi-style per-head rates (as in lightning-attn's utils), the decay used by TransNormerLLM."""
    start = 2 ** (-(2 ** -(math.log2(h) - 3)))
    return torch.tensor([start * start**i for i in range(h)], dtype=torch.float32)


def naive_bhtd(q, k, v, s):
    T = q.shape[2]
    idx = torch.arange(T, device=q.device)
    diff = (idx[:, None] - idx[None, :]).to(torch.float32)
    m = torch.exp(-s.view(-1, 1, 1) * diff.clamp(min=0)) * (diff >= 0)
    return ((q @ k.transpose(-1, -2)).float() * m).to(q.dtype) @ v


def make_impls():
    impls, versions, notes = {}, {}, {}
    from tnlib.ops import lightning_attention

    impls["tnlib"] = ("bthd", lambda q, k, v, s: lightning_attention(q, k, v, s))
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        impls["fla"] = ("bthd", lambda q, k, v, s: chunk_simple_gla(q, k, v, g_gamma=-s, scale=1.0)[0])
        versions["fla"] = _version("fla-core", "flash-linear-attention")
    except Exception as e:  # noqa: BLE001
        notes["fla"] = f"not importable: {e!r}"[:200]
    try:
        from lightning_attn.ops import lightning_attn_func

        impls["lightning-attn"] = ("bhtd", lambda q, k, v, s: lightning_attn_func(q, k, v, s.view(-1, 1, 1)))
        versions["lightning-attn"] = _version("lightning-attn")
    except Exception as e:  # noqa: BLE001
        notes["lightning-attn"] = f"not importable: {e!r}"[:200]
    impls["sdpa"] = ("bhtd", lambda q, k, v, s: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    impls["naive"] = ("bhtd", naive_bhtd)
    return impls, versions, notes


def _version(*names):
    from importlib.metadata import PackageNotFoundError, version

    for n in names:
        try:
            return version(n)
        except PackageNotFoundError:
            pass
    return None


def inputs(B, T, H, K, V, layout, dtype, seed, grad=True):
    g = torch.Generator(device=DEV).manual_seed(seed)
    shp = (lambda d: (B, T, H, d)) if layout == "bthd" else (lambda d: (B, H, T, d))
    q = torch.randn(shp(K), device=DEV, generator=g) / K**0.5
    k = torch.randn(shp(K), device=DEV, generator=g) / K**0.5
    v = torch.randn(shp(V), device=DEV, generator=g)
    do = torch.randn(shp(V), device=DEV, generator=g)
    q, k, v = (x.to(dtype).requires_grad_(grad) for x in (q, k, v))
    return q, k, v, do.to(dtype)


def reference(name, q, k, v, s, layout):
    """float64 reference output of contender `name` in its own layout."""
    from tnlib.ops import linear_attention_quadratic

    qd, kd, vd = (x.detach().double() for x in (q, k, v))
    if name == "sdpa":
        return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
    if layout == "bhtd":
        qd, kd, vd = (x.transpose(1, 2) for x in (qd, kd, vd))
    o = linear_attention_quadratic(qd, kd, vd, s.double())
    return o.transpose(1, 2) if layout == "bhtd" else o


def check_contender(name, layout, fn, H, K, V, s, dtype):
    """Relative error vs float64 on a small problem (B=2, T=1000): output, and gradients for tnlib."""
    from tnlib.testing import TOLERANCE, rel_err

    q, k, v, do = inputs(2, 1000, H, K, V, layout, dtype, seed=1)
    o = fn(q, k, v, s)
    ref = reference(name, q, k, v, s, layout)
    errs = {"o": rel_err(o, ref)}
    if name == "tnlib":
        o.backward(do)
        xr = [x.detach().double().requires_grad_() for x in (q, k, v)]
        from tnlib.ops import linear_attention_quadratic

        linear_attention_quadratic(*xr, s.double()).backward(do.double())
        for nm, a, b in zip(("dq", "dk", "dv"), (q, k, v), xr):
            errs[nm] = rel_err(a.grad, b.grad)
    ok = all(e <= TOLERANCE[dtype] for e in errs.values())
    return ok, {k_: float(f"{e:.3e}") for k_, e in errs.items()}


def long_check(H=4):
    """tnlib at T=131072, B=1: outputs, final state and all gradients vs a float64 chunked reference."""
    from tnlib.ops import lightning_attention, linear_attention_chunked
    from tnlib.testing import rel_err

    out = []
    for dtype, K, V in ((torch.bfloat16, 128, 128), (torch.float32, 64, 64)):
        B, T = 1, 131072
        g = torch.Generator(device=DEV).manual_seed(7)
        q, k = (torch.randn(B, T, H, K, device=DEV, generator=g) / K**0.5 for _ in range(2))
        v = torch.randn(B, T, H, V, device=DEV, generator=g)
        S0 = torch.randn(B, H, K, V, device=DEV, generator=g)
        do = torch.randn(B, T, H, V, device=DEV, generator=g)
        G = torch.randn(B, H, K, V, device=DEV, generator=g)
        s = torch.tensor([0.0005, 2.0, 0.01, 0.3][:H], device=DEV)
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        s0 = S0.clone().requires_grad_()
        try:
            o, S = lightning_attention(*xs, s, s0, output_final_state=True)
        except Exception as e:  # noqa: BLE001
            out.append(dict(T=T, H=H, K=K, V=V, dtype=str(dtype), error=repr(e)[:300]))
            print("long check failed", out[-1], flush=True)
            continue
        ((o.float() * do).sum() + (S * G).sum()).backward()
        xr = [x.detach().double().requires_grad_() for x in xs]
        s0r = S0.double().requires_grad_()
        orf, Sr = linear_attention_chunked(*xr, s.double(), s0r, True, block_size=512)
        ((orf * do.double()).sum() + (Sr * G.double()).sum()).backward()
        errs = dict(o=rel_err(o, orf), S=rel_err(S, Sr), dq=rel_err(xs[0].grad, xr[0].grad),
                    dk=rel_err(xs[1].grad, xr[1].grad), dv=rel_err(xs[2].grad, xr[2].grad),
                    dS0=rel_err(s0.grad, s0r.grad))
        out.append(dict(B=B, T=T, H=H, K=K, V=V, dtype=str(dtype).replace("torch.", ""), slope=s.tolist(),
                        errs={k_: float(f"{e:.3e}") for k_, e in errs.items()}))
        print("long check", out[-1], flush=True)
        del xs, xr, o, orf
        torch.cuda.empty_cache()
    return out


def time_one(fn, q, k, v, s, do):
    def fb():
        fn(q, k, v, s).backward(do)

    fwd = median_ms(lambda: fn(q, k, v, s))
    fwdbwd = median_ms(fb, grad_to_none=[q, k, v])
    return fwd, fwdbwd, peak_gb(fb, (q, k, v))


def run_shape(impls, checks, H, K, V, lens, tokens, dtype, rows):
    s = slopes(H).to(DEV)
    for name, (layout, fn) in impls.items():
        if name == "sdpa" and K != V:
            continue
        try:
            ok, errs = check_contender(name, layout, fn, H, K, V, s, dtype)
        except Exception as e:  # noqa: BLE001
            ok, errs = False, {"error": repr(e)[:200]}
        checks.append(dict(impl=name, H=H, K=K, V=V, ok=ok, errs=errs))
        print(f"check {name:14s} H={H} K={K} V={V}: {'ok' if ok else 'FAILED'} {errs}", flush=True)
    for T in lens:
        B = max(1, tokens // T)
        esz = torch.finfo(dtype).bits // 8
        floor_fwd = (2 * K + 2 * V) * B * T * H * esz / BW * 1e3
        for name, (layout, fn) in impls.items():
            if name == "sdpa" and K != V:
                continue
            row = dict(impl=name, T=T, B=B, H=H, D=K, K=K, V=V, dtype=str(dtype).replace("torch.", ""),
                       floor_fwd_ms=round(floor_fwd, 4), floor_fwdbwd_ms=round(3 * floor_fwd, 4))
            chk = [c for c in checks if c["impl"] == name and c["H"] == H and c["K"] == K and c["V"] == V]
            if not chk or not chk[-1]["ok"]:
                row.update(fwd_ms=None, fwdbwd_ms=None, peak_gb=None, note="skipped: failed the correctness check")
            elif name == "naive" and B * H * T * T * 4 * 3 > 60e9:
                row.update(fwd_ms=None, fwdbwd_ms=None, peak_gb=None, note="skipped: T x T scores do not fit")
            else:
                try:
                    q, k, v, do = inputs(B, T, H, K, V, layout, dtype, seed=T)
                    f, fb, pk = time_one(fn, q, k, v, s, do)
                    row.update(fwd_ms=round(f, 4), fwdbwd_ms=round(fb, 4), peak_gb=round(pk, 3))
                    del q, k, v, do
                except Exception as e:  # noqa: BLE001
                    row.update(fwd_ms=None, fwdbwd_ms=None, peak_gb=None, note=f"error: {e!r}"[:200])
                torch.cuda.empty_cache()
            rows.append(row)
            print(f"{name:14s} H={H:2d} K={K:3d} V={V:3d} T={T:6d} B={B:3d} fwd={row['fwd_ms']} "
                  f"fwdbwd={row['fwdbwd_ms']} peak={row['peak_gb']} {row.get('note', '')}", flush=True)


def variants(tokens, dtype, shapes=((16, 128, 128),), lens=(1024, 32768), targets=(256, 512, 1024)):
    """tnlib's segment-plan alternatives (``plan.segment_plan``'s ``target_ctas``) per shape and T, each
    checked against the default plan's output, plus a per-kernel breakdown of the default plan."""
    import dataclasses

    from triton.testing import do_bench

    from tnlib.ops.lightning import lightning_attention, op, plan

    out = []
    for H, K, V in shapes:
        s = slopes(H).to(DEV)
        for T in lens:
            B = tokens // T
            q, k, v, do = inputs(B, T, H, K, V, "bthd", dtype, seed=3)
            cfg = plan.launch_config(B, T, H, K, V, dtype)
            with torch.no_grad():
                ref = lightning_attention(q, k, v, s).float()
            for tgt in targets:
                seg = plan.segment_plan(B, H, T, V // cfg.forward.block_v, target_ctas=tgt)
                c = dataclasses.replace(cfg, seg_len=seg)
                fn = lambda q, k, v, s_, c=c: lightning_attention(q, k, v, s_, config=c)  # noqa: E731
                try:
                    with torch.no_grad():
                        err = ((fn(q, k, v, s).float() - ref).abs().max() / ref.abs().max()).item()
                    f, fb, pk = time_one(fn, q, k, v, s, do)
                    row = dict(H=H, K=K, V=V, T=T, B=B, target_ctas=tgt, seg=(seg, c.n_seg(T)),
                               rel_err_vs_default=err, fwd_ms=round(f, 4), fwdbwd_ms=round(fb, 4), peak_gb=round(pk, 3))
                except Exception as e:  # noqa: BLE001
                    row = dict(H=H, K=K, V=V, T=T, B=B, target_ctas=tgt, error=repr(e)[:200])
                out.append(row)
                print("variant", row, flush=True)
            # breakdown of the default plan: segment-state kernel, main forward kernel, backward
            qd, kd, vd, dod = (x.detach() for x in (q, k, v, do))
            loc = op._local_states(kd, vd, s, cfg, reverse=False)
            t_main = do_bench(lambda: op._attn(qd, kd, vd, s, cfg.forward, init_decay=True, local=loc,
                                               seg_len=cfg.seg_len, out_dtype=dtype),
                              warmup=25, rep=100, return_mode="median")
            t_loc = (do_bench(lambda: op._local_states(kd, vd, s, cfg, reverse=False), warmup=25, rep=100,
                              return_mode="median") if loc is not None else 0.0)
            t_bwd = do_bench(lambda: op._backward_impl(dod, qd, kd, vd, s, cfg, loc_kv=loc), warmup=25,
                             rep=100, return_mode="median")
            out.append(dict(H=H, K=K, V=V, T=T, breakdown=dict(
                main_fwd_kernel_ms=round(t_main, 4), segment_state_kernel_ms=round(t_loc, 4),
                backward_kernels_ms=round(t_bwd, 4), seg=(cfg.seg_len, cfg.n_seg(T)))))
            print("breakdown", out[-1], flush=True)
            del q, k, v, do, qd, kd, vd, dod, loc, ref
            torch.cuda.empty_cache()
    return out


def plot(rows, path, header=None):
    """Forward and forward+backward ms vs T, one row of panels per shape, with the memory floor."""
    shapes = sorted({(r["H"], r["K"], r["V"]) for r in rows}, key=lambda x: (-x[1], x[0]))
    fig, axes = figure(len(shapes), 2)
    colors = {"tnlib": "C3", "fla": "C0", "lightning-attn": "C2", "sdpa": "C1", "naive": "C7"}
    for i, (H, K, V) in enumerate(shapes):
        sub = [r for r in rows if (r["H"], r["K"], r["V"]) == (H, K, V)]
        for j, (key, floor_key, title) in enumerate(
            (("fwd_ms", "floor_fwd_ms", "forward"), ("fwdbwd_ms", "floor_fwdbwd_ms", "forward + backward"))
        ):
            ax = axes[i][j]
            for name in colors:
                pts = sorted((r["T"], r[key]) for r in sub if r["impl"] == name and r[key] is not None)
                if pts:
                    ax.plot(*zip(*pts), "o-", color=colors[name], label=name)
            fl = sorted({(r["T"], r[floor_key]) for r in sub})
            ax.plot(*zip(*fl), "k--", label="memory floor")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T (B*T fixed)")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{title}: H={H}, K={K}, V={V}, B*T={sub[0]['B'] * sub[0]['T']}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path, header)


def main():
    ap = parser(__doc__)
    ap.add_argument("--lens", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--tokens", type=int, default=65536, help="B*T held fixed")
    ap.add_argument("--shapes", default="16:128:128,32:64:64,8:256:128", help="H:K:V,...")
    ap.add_argument("--no-long-check", action="store_true")
    ap.add_argument("--long-first", action="store_true", help="run the T=131072 check before timing")
    ap.add_argument("--long-heads", type=int, default=4)
    ap.add_argument("--impls", default=None, help="comma list of contenders to run (default: all)")
    ap.add_argument("--variants", action="store_true", help="also time tnlib's segment-plan variants")
    ap.add_argument("--variants-only", action="store_true", help="only the variants (written to variants-<gpu>.json; "
                    "tuning results: --out results/tuning)")
    ap.add_argument("--targets", default="256,512,1024", help="segment-plan target CTAs for the variants")
    a = ap.parse_args()
    if replot(a, plot):
        return
    require_cuda("bench_kernels.py")
    from tnlib.provenance import provenance

    dtype = torch.bfloat16
    impls, versions, notes = make_impls()
    if a.impls:
        impls = {n: f for n, f in impls.items() if n in a.impls.split(",")}
    t0 = time.time()
    rows, checks, long, var = [], [], [], []
    lens = [int(x) for x in a.lens.split(",")]
    os.makedirs(a.out, exist_ok=True)
    path = result_path(a, "variants" if a.variants_only else "kernels")
    shapes = [tuple(int(x) for x in shp.split(":")) for shp in a.shapes.split(",")]
    if a.variants_only:
        a.variants, a.no_long_check, shapes = True, True, shapes

    def dump(partial):
        head = provenance({"fla": versions.get("fla"), "lightning-attn": versions.get("lightning-attn"),
                           "dtype": "bfloat16", "tokens": a.tokens, "bandwidth_Bps": BW,
                           "seconds": round(time.time() - t0, 1), "notes": notes, "partial": partial,
                           "method": "do_bench median (warmup 25 ms, rep 100 ms), grad_to_none; peak = "
                                     "max_memory_allocated during one fwd+bwd minus allocated before"})
        with open(path, "w") as fh:
            json.dump({"header": head, "checks": checks, "long_T_check": long, "variants": var, "rows": rows},
                      fh, indent=1)

    # the fused dk/dv backward kernel is checked against the two-pass one (dk/dv as generic passes)
    import dataclasses

    from tnlib.ops.lightning import op, plan
    from tnlib.testing import rel_err

    q, k, v, do = (x.detach() for x in inputs(2, 3000, 4, 128, 128, "bthd", dtype, seed=11))
    s4 = slopes(4).to(DEV)
    cfg = plan.launch_config(2, 3000, 4, 128, 128, dtype)
    got = op._backward_impl(do, q, k, v, s4, cfg)
    want = op._backward_impl(do, q, k, v, s4, dataclasses.replace(cfg, dkdv=None))
    notes["fused_dkdv_vs_two_pass_rel_err"] = max(rel_err(a_, b_) for a_, b_ in zip(got[:3], want[:3]))
    print("fused dkdv:", notes, flush=True)
    if a.long_first and not a.no_long_check:
        long.extend(long_check(a.long_heads))
        dump(True)
    for H, K, V in ([] if a.variants_only else shapes):
        run_shape(impls, checks, H, K, V, lens, a.tokens, dtype, rows)
        dump(True)
    if rows:
        plot(rows, result_path(a, "kernels", ".png"), provenance())
    if not a.no_long_check and not a.long_first:
        long.extend(long_check(a.long_heads))
        dump(True)
    if a.variants:
        try:
            var.extend(variants(a.tokens, dtype, shapes, lens, [int(x) for x in a.targets.split(",")]))
        except Exception as e:  # noqa: BLE001
            var.append({"error": repr(e)[:300]})
    dump(False)
    print(f"\nwrote {path}")
    print(f"{'impl':14s} {'H':>3s} {'K':>4s} {'V':>4s} {'T':>6s} {'fwd':>8s} {'f+b':>8s} {'GB':>6s}")
    for r in rows:
        f = lambda x: f"{x:8.3f}" if isinstance(x, float) else f"{str(x):>8s}"
        print(f"{r['impl']:14s} {r['H']:3d} {r['K']:4d} {r['V']:4d} {r['T']:6d} {f(r['fwd_ms'])} "
              f"{f(r['fwdbwd_ms'])} {f(r['peak_gb'])} {r.get('note', '')}")


if __name__ == "__main__":
    main()
