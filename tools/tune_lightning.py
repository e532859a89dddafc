"""GPU correctness at real sizes plus a small block-size sweep for tnlib's Lightning Attention kernels.

Usage (on the GPU machine): PYTHONPATH=$PWD python3 tools/tune_lightning.py --out DIR
Prints the relative errors of outputs, final state and all gradients against a float64 reference
(including T=131072, B=1), then times the main kernel per state shape [DK, DV] for a grid of
(chunk, BV, num_warps, num_stages) and prints the winners (defaults: tnlib.ops.lightning.plan._generic_tile).
"""
import argparse
import dataclasses
import json
import math
import os
import time

import torch
from triton.testing import do_bench

from tnlib.ops import lightning as L
from tnlib.ops.lightning import op, plan
from tnlib.ops.reference import linear_attention_chunked
from tnlib.testing import rel_err


def slopes(h):
    start = 2 ** (-(2 ** -(math.log2(h) - 3)))
    return torch.tensor([start * start**i for i in range(h)], dtype=torch.float32)


DEV = "cuda"


def check(B, T, H, K, V, dtype, slope, init=True, seg=None):
    cfg = plan.launch_config(B, T, H, K, V, dtype)
    cfg = cfg if seg is None else dataclasses.replace(cfg, seg_len=seg)
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(T + K)
    q, k = (torch.randn(B, T, H, K, device=dev, generator=g) / K**0.5 for _ in range(2))
    v = torch.randn(B, T, H, V, device=dev, generator=g)
    S0 = torch.randn(B, H, K, V, device=dev, generator=g) if init else None
    do = torch.randn(B, T, H, V, device=dev, generator=g)
    G = torch.randn(B, H, K, V, device=dev, generator=g)
    xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    s0 = S0.clone().requires_grad_() if init else None
    o, S = L.lightning_attention(*xs, slope, s0, True, config=cfg)
    ((o.float() * do).sum() + (S * G).sum()).backward()
    xr = [x.detach().double().requires_grad_() for x in xs]
    s0r = S0.double().requires_grad_() if init else None
    orf, Sr = linear_attention_chunked(*xr, slope.double(), s0r, True, block_size=256)
    ((orf * do.double()).sum() + (Sr * G.double()).sum()).backward()
    errs = dict(o=rel_err(o, orf), S=rel_err(S, Sr), dq=rel_err(xs[0].grad, xr[0].grad),
                dk=rel_err(xs[1].grad, xr[1].grad), dv=rel_err(xs[2].grad, xr[2].grad))
    if init:
        errs["dS0"] = rel_err(s0.grad, s0r.grad)
    return errs


def sweep(DK, DV, H, T, dtype, configs):
    dev = "cuda"
    B = 65536 // T
    a = torch.randn(B, T, H, DK, device=dev, dtype=dtype)
    b = torch.randn(B, T, H, DK, device=dev, dtype=dtype) / DK
    c = torch.randn(B, T, H, DV, device=dev, dtype=dtype)
    s = slopes(H).to(dev)
    res = []
    for cfg in configs:
        ch, bv, nw, ns = cfg
        if bv > DV or DK * bv > 256 * 64 or (ch == 128 and DK * bv > 128 * 64):
            continue
        tile = dataclasses.replace(plan.launch_config(B, T, H, DK, DV, dtype).forward, chunk=ch, block_v=bv,
                                   num_warps=nw, num_stages=ns)
        try:
            t0 = time.time()
            fn = lambda: op._attn(a, b, c, s, tile, init_decay=True, seg_len=T, out_dtype=dtype)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
            res.append((ms, cfg))
            print(f"  DK={DK} DV={DV} cfg={cfg} {ms:.3f} ms (compile+first {time.time()-t0:.1f}s)", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of shared memory)
            print(f"  DK={DK} DV={DV} cfg={cfg} failed: {str(e)[:100]}", flush=True)
    res.sort()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--skip-sweep", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    report = {"checks": [], "sweep": {}}
    cases = [
        (1, 131072, 2, 128, 128, torch.bfloat16, [0.001, 1.0], True, None),
        (1, 131072, 2, 64, 64, torch.float32, [0.01, 0.3], True, None),
        (2, 8192, 16, 128, 128, torch.bfloat16, None, True, None),
        (2, 4100, 8, 256, 128, torch.float16, None, True, None),
        (3, 777, 3, 32, 128, torch.float32, None, True, 256),
        (4, 1000, 4, 128, 16, torch.bfloat16, None, False, None),
    ]
    for B, T, H, K, V, dt, sl, init, seg in cases:
        slope = torch.tensor(sl, dtype=torch.float32) if sl else slopes(H)
        t0 = time.time()
        e = check(B, T, H, K, V, dt, slope.cuda(), init, seg)
        row = dict(B=B, T=T, H=H, K=K, V=V, dtype=str(dt), errs=e, s=round(time.time() - t0, 1))
        report["checks"].append(row)
        print("check", row, flush=True)
    if not a.skip_sweep:
        configs = [(ch, bv, nw, ns) for ch in (64, 128) for bv in (32, 64, 128) for nw in (4, 8) for ns in (1, 2)]
        for DK, DV, H in ((128, 128, 16), (256, 128, 8), (128, 256, 8), (64, 64, 32)):
            res = sweep(DK, DV, H, 4096, torch.bfloat16, configs)
            report["sweep"][f"{DK}x{DV}"] = [(round(ms, 4), cfg) for ms, cfg in res]
            print(f"best DK={DK} DV={DV}:", res[:3], flush=True)
        # segment target sweep at T=32K (fwd + fwd/bwd of the whole op)
        B, T, H = 2, 32768, 16
        q, k, v = (torch.randn(B, T, H, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(v)
        s = slopes(H).cuda()
        cfg = plan.launch_config(B, T, H, 128, 128, torch.bfloat16)
        for tgt in (132, 264, 512, 1024, 2048):
            c = dataclasses.replace(cfg, seg_len=plan.segment_plan(B, H, T, 128 // cfg.forward.block_v, tgt))
            f = do_bench(lambda: L.lightning_attention(q, k, v, s, config=c), warmup=10, rep=40, return_mode="median")
            fb = do_bench(lambda: L.lightning_attention(q, k, v, s, config=c).backward(do), warmup=10, rep=40,
                          return_mode="median")
            print(f"target_ctas={tgt} seg={c.seg_len} fwd {f:.3f} fwdbwd {fb:.3f}", flush=True)
            report["sweep"][f"target{tgt}"] = (f, fb)
    try:  # a quick look at fla on the same shape, for orientation only (the benchmark is bench_kernels.py)
        from fla.ops.simple_gla import chunk_simple_gla
        for T in (4096, 32768):
            B, H = 65536 // T, 16
            q, k, v = (torch.randn(B, T, H, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
            do = torch.randn_like(v)
            s = slopes(H).cuda()
            ff = lambda: chunk_simple_gla(q, k, v, g_gamma=-s, scale=1.0)[0]
            tf = lambda: L.lightning_attention(q, k, v, s)
            for name, fn in (("fla", ff), ("tnlib", tf)):
                f = do_bench(fn, warmup=10, rep=40, return_mode="median")
                fb = do_bench(lambda: fn().backward(do), warmup=10, rep=40, return_mode="median")
                print(f"T={T} {name} fwd {f:.3f} fwdbwd {fb:.3f}", flush=True)
    except Exception as e:  # noqa: BLE001
        print("fla comparison skipped:", repr(e)[:200])
    with open(os.path.join(a.out, "tune-lightning.json"), "w") as fh:
        json.dump(report, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
