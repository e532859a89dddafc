"""Time the segment-state kernel (tnlib.ops.lightning.op._local_states) per (chunk, BV, warps, stages).

At T >= 16K the forward and the backward each pay one pass that reads k and v (q and dO) once more to
make the segments' start states (its time and bandwidth: results/bench/NOTES-kernels.md). This sweeps the kernel's launch configuration at the benchmark's long shapes,
checks each against the default's states, and reports the effective bandwidth. Writes
segment-states-<gpu>.json under --out.

    PYTHONPATH=$PWD python3 tools/tune_segment_states.py --out $OUT
"""
import argparse
import dataclasses
import os

import torch

from tnlib.ops.lightning import Tile, launch_config, op
from tnlib.provenance import gpu_slug, write_results

CONFIGS = "default,64:128:8:3,64:128:8:4,32:128:4:3,32:128:8:3,128:128:8:2,64:64:4:3,64:64:8:3,32:64:4:4"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="16:128:128:32768,16:128:128:16384,32:64:64:32768", help="H:K:V:T,...")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--configs", default=CONFIGS, help="chunk:BV:warps:stages,...")
    ap.add_argument("--out", default="runs/tune-segment-states")
    a = ap.parse_args()
    from triton.testing import do_bench

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, checks only
    rows = []
    for shp in a.shapes.split(","):
        H, K, V, T = (int(x) for x in shp.split(":"))
        B = max(1, a.tokens // T)
        g = torch.Generator(device=dev).manual_seed(0)
        k = (torch.randn(B, T, H, K, device=dev, generator=g) / K**0.5).bfloat16()
        v = torch.randn(B, T, H, V, device=dev, generator=g).bfloat16()
        s = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device=dev)
        default = launch_config(B, T, H, K, V, k.dtype)
        seg_len, nseg = default.seg_len, default.n_seg(T)
        if nseg == 1:
            print(f"H={H} K={K} T={T}: one segment, no state pass")
            continue
        ref = op._local_states(k, v, s, default, reverse=False)
        nbytes = (k.numel() + v.numel()) * 2 * (nseg - 1) / nseg
        for c in a.configs.split(","):
            cfg = default if c == "default" else dataclasses.replace(
                default, state=Tile(*(int(x) for x in c.split(":")), scale_value=True))
            row = dict(H=H, K=K, V=V, T=T, B=B, seg=(seg_len, nseg), config=c, cfg=dataclasses.astuple(cfg.state))
            try:
                cfg.check(K, V)  # a value block that does not divide V would skip columns
                out = op._local_states(k, v, s, cfg, reverse=False)
                row["rel_err"] = ((out - ref).abs().max() / ref.abs().max()).item()
                if dev == "cuda":
                    ms = do_bench(lambda: op._local_states(k, v, s, cfg, reverse=False), warmup=25, rep=100,
                                  return_mode="median")
                    row.update(ms=round(ms, 4), tb_per_s=round(nbytes / ms / 1e9, 2))
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:200]
            rows.append(row)
            print(row, flush=True)
    os.makedirs(a.out, exist_ok=True)
    write_results(os.path.join(a.out, f"segment-states-{gpu_slug() if dev == 'cuda' else 'cpu'}.json"), rows,
                  {"tokens": a.tokens})


if __name__ == "__main__":
    main()
