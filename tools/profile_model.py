"""Where a training step's time goes: torch.profiler over a few steps of a preset (GPU).

Prints the top CUDA kernels by total time and writes the table (and a Chrome trace) under --out.
The step is the model benchmark's (``benchmarks/common.py``), so the repository root must be importable.
Use it before optimizing (METHOD: predict, change, measure): e.g.
    PYTHONPATH=$PWD python3 tools/profile_model.py --preset tnl-385m --T 2048 --compile --fused-loss --out $OUT
"""
import argparse
import os

import torch

from _profiling import cuda_kernels, gpu_gaps


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tnl-385m")
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--fused-loss", action="store_true", help="LM head + cross-entropy in row chunks (model(ids, targets))")
    ap.add_argument("--compile-scope", default="blocks", choices=("blocks", "model"),
                    help="with --compile: each block (training's default) or the whole model as one graph "
                         "(a choice of TrainConfig.compile_scope)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (reduce-overhead: CUDA graphs; the "
                    "profiler then sees graph launches, not every kernel)")
    ap.add_argument("--override", default="", help="model config overrides as in benchmarks/bench_model.py, "
                    "e.g. 'residual_dtype=\"compute\"'")
    ap.add_argument("--impl", default="", help="implementation choices as in benchmarks/bench_model.py "
                    "(tnlib.models.Implementation fields), e.g. packed_attention=false")
    ap.add_argument("--out", default="runs/profile")
    a = ap.parse_args()
    from benchmarks.common import build, parse_settings, train_step

    overrides, impl = parse_settings(a.override), parse_settings(a.impl)
    model, fwd, graphs = build(a.preset, a.vocab, a.compile, a.compile_scope, a.compile_mode, overrides, impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    B = max(1, a.tokens // a.T)
    ids = torch.randint(0, a.vocab, (B, a.T + 1), device="cuda")

    def step():  # the step of benchmarks/bench_model.py
        train_step(model, fwd, opt, ids, a.fused_loss, graphs)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=70)
    rows, total_us = cuda_kernels(prof, a.steps)
    kern = [f"CUDA kernels only: summed kernel time per step {total_us / 1e3:.1f} ms",
            f"{'calls/step':>10s} {'mean us':>9s} {'ms/step':>8s}  name"]
    kern += [f"{calls:10.1f} {mean:9.1f} {per_step / 1e3:8.2f}  {name[:140]}"
             for calls, mean, per_step, name in rows[: 2 * a.top]]
    table = table + "\n" + "\n".join(kern) + "\n" + gpu_gaps(prof, a.steps)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    tag = f"{a.preset}-T{a.T}-{'compiled' if a.compile else 'eager'}{'-fusedloss' if a.fused_loss else ''}"
    if a.compile and a.compile_scope == "model":
        tag += "-wholemodel"
    if graphs:
        tag += "-cudagraphs"
    with open(os.path.join(a.out, f"profile-{tag}.txt"), "w") as f:
        f.write(table)
    prof.export_chrome_trace(os.path.join(a.out, f"trace-{tag}.json"))


if __name__ == "__main__":
    main()
