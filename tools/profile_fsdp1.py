"""Where ``parallel=fsdp`` on one rank spends its time against the default path (GPU; CPU for a dry run).

The step is ``tnlib.train``'s (bf16 autocast, the chunked loss, ``tnlib.parallel.clip_grad_norm``, fused
AdamW, one synchronize per step), on random tokens, for the plain model and for the same model under
``apply_fsdp(..., one_rank=True)`` on a 1-rank group (FSDP2 itself, not the plain model a 1-rank mesh
gets). Prints, per mode: wall ms per step, GPU busy ms per step and the longest idle gaps
(``tools/_profiling.gpu_gaps``), and the CUDA kernels whose time per step differs most between the modes.
Writes ``OUT/profile-fsdp1.txt``.

    PYTHONPATH=$PWD python3 tools/profile_fsdp1.py --out $OUT
    PYTHONPATH=$PWD python3 tools/profile_fsdp1.py --preset tnl-tiny --T 64 --tokens 256 --out /tmp/p   # CPU
"""
import argparse
import os
import time

import torch

from _profiling import cuda_kernels, gpu_gaps

from tnlib.models import build_model, get_config
from tnlib.parallel import apply_fsdp, clip_grad_norm


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tnl-385m")
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="runs/profile")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.profiler import ProfilerActivity, profile

    cfg = get_config(a.preset)
    B = max(1, a.tokens // a.T)
    ids = torch.randint(0, cfg.vocab_size, (B, a.T + 1), device=dev)
    dtype = torch.bfloat16 if cuda else None
    report, per_mode = [], {}
    for mode in ("default", "fsdp"):
        torch.manual_seed(0)
        model = build_model(cfg).to(dev)
        if mode == "fsdp":
            apply_fsdp(model, init_device_mesh(dev.type, (1,)), dtype, one_rank=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))

        def step():  # tnlib.train's step, grad_accum=1
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                loss = model(ids[:, :-1], ids[:, 1:])
            loss.backward()
            clip_grad_norm(list(model.parameters()), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            return loss

        for _ in range(3):
            step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            wall = (time.perf_counter() - t0) / a.steps
        rows, total_us = cuda_kernels(prof, a.steps)
        per_mode[mode] = {name: per_step for _, _, per_step, name in rows}
        report.append(f"== {mode}: {wall * 1e3:.1f} ms per step (profiled), CUDA kernels {total_us / 1e3:.1f} ms per step\n"
                      + gpu_gaps(prof, a.steps, top=12))
        report.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        del model, opt, prof
        if cuda:
            torch.cuda.empty_cache()
    names = set(per_mode["default"]) | set(per_mode["fsdp"])
    diff = sorted(((per_mode["fsdp"].get(n, 0) - per_mode["default"].get(n, 0), n) for n in names), reverse=True)
    report.append("== CUDA kernels, fsdp minus default, us per step (largest first)\n"
                  + "\n".join(f"{d:10.1f}  {n[:120]}" for d, n in diff[: a.top])
                  + "\n...\n" + "\n".join(f"{d:10.1f}  {n[:120]}" for d, n in diff[-8:]))
    text = "\n".join(report)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "profile-fsdp1.txt"), "w") as f:
        f.write(text)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
