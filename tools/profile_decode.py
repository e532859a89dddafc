"""Where a decode step's time goes (GPU): one static decode step under torch.profiler.

Lists every CUDA kernel of one decode step (name, calls per step, mean µs) and the kernel count per
token, for the step a graph decoder captures: ``--decoder compiled-graph`` (default: the step compiled
with torch.compile, ``GraphDecoder(fuse=True)``), ``fused-graph`` (TNL's fused kernels,
``GraphDecoder(kernels=True)``: 5 per layer) or ``graph`` (the eager step; uncaptured, its projections
run cuBLAS, not the GEMV kernel they run when captured); ``--preset transformer-385m`` profiles the
Transformer's static KV cache step (``--context`` + 64 slots). Then the CUDA-graph replay's ms per token.
Use it before changing the decode path:
    PYTHONPATH=$PWD python3 tools/profile_decode.py --out $OUT [--compile-mode max-autotune-no-cudagraphs] [--cublas]
    PYTHONPATH=$PWD python3 tools/profile_decode.py --decoder fused-graph --batch 16 --out $OUT
"""
import argparse
import os

import torch
from _profiling import cuda_kernels

import tnlib
from tnlib.generation import GraphDecoder, StaticDecodeStep, capacity_for
from tnlib.models.fused_decode import FusedDecodeStep


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tnl-385m")
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cublas", action="store_true", help="projections through cuBLAS (Implementation(decode_gemv=False))")
    ap.add_argument("--compile-mode", default=None)
    ap.add_argument("--decoder", default="compiled-graph", choices=("graph", "compiled-graph", "fused-graph"))
    ap.add_argument("--out", default="runs/profile")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = tnlib.create_model(a.preset, vocab_size=a.vocab, impl=tnlib.Implementation(decode_gemv=not a.cublas))
    model = model.to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, a.vocab, (a.batch, a.context), device="cuda")
    _, cache = model.step(ids, last_only=True)
    fuse, kernels = a.decoder == "compiled-graph", a.decoder == "fused-graph"
    capacity = capacity_for(a.context + 64) if model.config.arch == "transformer" else None
    if kernels:
        step = FusedDecodeStep(model, cache)
    else:
        step = StaticDecodeStep(model, cache, fuse=fuse, compile_mode=a.compile_mode, capacity=capacity)
    tok = ids[:, -1:]
    for _ in range(5):
        step(tok)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step(tok)
        torch.cuda.synchronize()
    rows, total_us = cuda_kernels(prof, a.steps)
    n_kernels = sum(r[0] for r in rows)
    lines = [f"{a.preset} {a.decoder} batch {a.batch} context {a.context} {'cublas' if a.cublas else 'gemv'} "
             f"compile_mode={a.compile_mode}",
             f"kernels per token: {n_kernels:.0f}; summed kernel time per token: {total_us:.1f} us", "",
             f"{'calls/step':>10s} {'mean us':>8s} {'us/step':>8s}  name"]
    for calls, mean, per_step, name in rows:
        lines.append(f"{calls:10.1f} {mean:8.2f} {per_step:8.1f}  {name[:150]}")
    dec = GraphDecoder(model, cache, fuse=fuse, compile_mode=a.compile_mode, kernels=kernels, capacity=capacity)
    for _ in range(3):
        dec.decode(tok)
    s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(50):
        dec.decode(tok)
    t.record()
    torch.cuda.synchronize()
    lines.insert(2, f"CUDA-graph replay: {s.elapsed_time(t) / 50:.3f} ms per token")
    text = "\n".join(lines)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    name = f"profile-decode-{a.preset}-{a.decoder}-b{a.batch}-{'cublas' if a.cublas else 'gemv'}.txt"
    with open(os.path.join(a.out, name), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
