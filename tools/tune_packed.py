"""Lightning kernels at the model's attention shape (tnl-385m at T=2K: B=16, H=8, D=128, bf16).

Usage (GPU): PYTHONPATH=$PWD python3 tools/tune_packed.py --out DIR [--B 16 --T 2048 --H 8 --D 128]
Checks ``lightning_attention_packed`` (feature map inside the kernels) against a float64 reference
at that shape, times it against the unfused form (SiLU, then ``lightning_attention``), then sweeps
the main kernel's (chunk, BV, warps, stages), the dk/dv kernel's (chunk, warps, stages) and the
segment length, timing the packed forward and forward+backward for each. Writes tune-packed-<gpu>.json.
"""
import argparse
import dataclasses
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from tnlib.ops import lightning as L
from tnlib.ops.lightning import Tile, launch_config
from tnlib.ops.reference import linear_attention_chunked
from tnlib.provenance import gpu_slug, write_results
from tnlib.testing import rel_err

MAIN_GRID = [(64, 64, 4, 2), (64, 64, 4, 1), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 2, 2),
             (64, 128, 8, 2), (64, 128, 8, 1), (128, 64, 8, 2), (128, 32, 4, 2), (32, 64, 4, 2), (32, 128, 8, 2)]
DKDV_GRID = [(64, 8, 2), (64, 8, 1), (64, 8, 3), (64, 4, 2), (32, 8, 2), (32, 4, 2), (32, 8, 3), (128, 8, 2)]
SEGS = [None, 1024, 512]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--out", default="results/bench")
    a = ap.parse_args()
    B, T, H, D = a.B, a.T, a.H, a.D
    dev, dt = os.environ.get("TUNE_DEVICE", "cuda"), torch.bfloat16  # TUNE_DEVICE=cpu: a dry run (interpreter)
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * D, device=dev, generator=g).to(dt)
    slope = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)], device=dev)
    do = torch.randn(B, T, H, D, device=dev, generator=g).to(dt)

    # correctness at this shape: packed (bf16) vs float64 (SiLU of the bf16 inputs, rounded as the model stores them)
    x = qkv.clone().requires_grad_()
    o = L.lightning_attention_packed(x, slope, H)
    (o.float() * do.float()).sum().backward()
    xr = qkv.double().requires_grad_()
    q, k, v = (t.reshape(B, T, H, D) for t in xr.chunk(3, -1))
    qa, ka = (F.silu(t.to(dt).double()).to(dt).double() for t in (q, k))
    orf = linear_attention_chunked(qa, ka, v, slope.double(), block_size=256)
    (orf * do.double()).sum().backward()
    d = H * D
    errs = dict(o=rel_err(o, orf), **{n: rel_err(x.grad[..., i * d:(i + 1) * d], xr.grad[..., i * d:(i + 1) * d])
                                      for i, n in enumerate(("dq", "dk", "dv"))})
    print("rel. errors vs float64:", {k_: f"{v_:.2e}" for k_, v_ in errs.items()}, flush=True)
    del xr, q, k, v, qa, ka, orf

    default = launch_config(B, T, H, D, D, dt)
    cfg = [default]  # the launch config the packed runs use

    def packed_fwd():
        return L.lightning_attention_packed(qkv, slope, H, config=cfg[0])

    xg = qkv.clone().requires_grad_()

    def packed_fwdbwd():
        xg.grad = None
        L.lightning_attention_packed(xg, slope, H, config=cfg[0]).backward(do)

    def unfused_fwdbwd():  # what the model did before: split, SiLU (materialized), attention, grads concatenated
        xg.grad = None
        q_, k_, v_ = (t.unflatten(-1, (H, D)) for t in xg.chunk(3, -1))
        L.lightning_attention(F.silu(q_), F.silu(k_), v_, slope).backward(do)

    def unfused_fwd():
        q_, k_, v_ = (t.unflatten(-1, (H, D)) for t in qkv.chunk(3, -1))
        return L.lightning_attention(F.silu(q_), F.silu(k_), v_, slope)

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        return do_bench(fn, warmup=10, rep=50, return_mode="median")

    rows = [dict(kind="check", B=B, T=T, H=H, D=D, **errs)]
    for name, fn in (("packed fwd", packed_fwd), ("packed fwd+bwd", packed_fwdbwd),
                     ("unfused fwd", unfused_fwd), ("unfused fwd+bwd", unfused_fwdbwd)):
        ms = bench(fn)
        rows.append(dict(kind="path", name=name, ms=ms))
        print(f"{name:18s} {ms:.3f} ms", flush=True)
    for c in MAIN_GRID:  # the forward and the dq pass
        tile = Tile(*c, scale_value=default.forward.scale_value)
        cfg[0] = dataclasses.replace(default, forward=tile, dq=tile)
        try:
            r = dict(kind="main", cfg=c, fwd_ms=bench(packed_fwd), fwdbwd_ms=bench(packed_fwdbwd))
        except Exception as e:  # noqa: BLE001 (e.g. out of shared memory): report and go on
            r = dict(kind="main", cfg=c, error=str(e)[:120])
        rows.append(r)
        print(r, flush=True)
    for ch, nw, ns in DKDV_GRID:
        cfg[0] = dataclasses.replace(default, dkdv=Tile(ch, D, nw, ns))
        try:
            r = dict(kind="dkdv", cfg=(ch, nw, ns), fwdbwd_ms=bench(packed_fwdbwd))
        except Exception as e:  # noqa: BLE001
            r = dict(kind="dkdv", cfg=(ch, nw, ns), error=str(e)[:120])
        rows.append(r)
        print(r, flush=True)
    for seg in SEGS:
        cfg[0] = default if seg is None else dataclasses.replace(default, seg_len=seg)
        r = dict(kind="seg", seg_len=seg, fwd_ms=bench(packed_fwd), fwdbwd_ms=bench(packed_fwdbwd))
        rows.append(r)
        print(r, flush=True)
    os.makedirs(a.out, exist_ok=True)
    write_results(os.path.join(a.out, f"tune-packed-{gpu_slug()}.json"), rows, {"shape": dict(B=B, T=T, H=H, D=D)})


if __name__ == "__main__":
    main()
