"""Time the chunked loss's cross-entropy kernel (tnlib.ops.loss.xent_grad_) per (BLOCK, num_warps).

The kernel reads each row of logits twice (log-sum-exp, then the gradient written in place). With
many programs in flight the second read misses L2; wider programs (more warps, so fewer rows resident)
may keep it there. One chunk of the 385M training step: 8,192 rows x 50,272 bf16. Each config is checked
against PyTorch before timing. Writes xent-<gpu>.json under --out.

    PYTHONPATH=$PWD python3 tools/tune_xent.py --out $OUT
"""
import argparse
import os

import torch

from tnlib.ops import loss as L
from tnlib.provenance import gpu_slug, write_results


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--configs", default="default,4096:16,8192:16,8192:32,16384:32,2048:4",
                    help="BLOCK:num_warps,...")
    ap.add_argument("--out", default="runs/tune-xent")
    a = ap.parse_args()
    from triton.testing import do_bench

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, checks only (no timing)
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(a.rows, a.vocab, device=dev, generator=g) * 3).bfloat16()
    tgt = torch.randint(0, a.vocab, (a.rows,), device=dev, generator=g)
    ref_nll = torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="none")
    ref_grad = (torch.softmax(logits.float(), -1) - torch.nn.functional.one_hot(tgt, a.vocab)) / a.rows
    rows = []
    for c in a.configs.split(","):
        cfg = L.xent_config(a.vocab) if c == "default" else L.XentConfig(*(int(x) for x in c.split(":")))
        buf = logits.clone()
        try:
            nll = L.xent_grad_(buf, tgt, 1.0 / a.rows, config=cfg)
            err_nll = ((nll - ref_nll).abs().max() / ref_nll.abs().max()).item()
            err_g = ((buf.float() - ref_grad).abs().max() / ref_grad.abs().max()).item()
            work = logits.clone()
            if dev == "cpu":
                rows.append(dict(config=c, cfg=(cfg.block, cfg.num_warps), err_nll=err_nll, err_grad=err_g))
                print(rows[-1], flush=True)
                continue
            ms = do_bench(lambda: (work.copy_(logits), L.xent_grad_(work, tgt, 1.0 / a.rows, config=cfg)), warmup=25, rep=200,
                          return_mode="median")
            copy_ms = do_bench(lambda: work.copy_(logits), warmup=25, rep=200, return_mode="median")
            row = dict(config=c, cfg=(cfg.block, cfg.num_warps), err_nll=err_nll, err_grad=err_g,
                       kernel_ms=round(ms - copy_ms, 4), with_copy_ms=round(ms, 4), copy_ms=round(copy_ms, 4),
                       ok=err_nll < 1e-3 and err_g < 2e-2)
        except Exception as e:  # noqa: BLE001
            row = dict(config=c, error=repr(e)[:200])
        rows.append(row)
        print(row, flush=True)
    gb = a.rows * a.vocab * 2 / 1e9
    print(f"one pass over the chunk's logits: {gb:.2f} GB; read twice + written once = {3 * gb:.2f} GB")
    os.makedirs(a.out, exist_ok=True)
    write_results(os.path.join(a.out, f"xent-{gpu_slug() if dev == 'cuda' else 'cpu'}.json"), rows, {"rows": a.rows, "vocab": a.vocab})


if __name__ == "__main__":
    main()
