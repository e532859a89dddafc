"""Size the ablation sweep to the GPU time at hand (issue 15, item 3).

For each candidate shape (``DxL``: d_model x layers, 64-wide heads) it runs ``--parallel`` training
processes of the sweep's recipe side by side on this GPU for ``--seconds``, and reads their metrics:
per-process tokens/s in the steady state, and the per-run overhead (process start, model build, kernel
JIT, final evaluation and save). With the sweep's run count and evaluation cost it predicts the sweep's
wall time for a token budget, picks the largest shape whose sweep fits ``--budget-min`` at
``--min-tokens`` per run, then the largest token budget (up to the training split: no repeated data)
that still fits, and writes both the measurements and the choice to ``--out`` (JSON, with provenance).

    PYTHONPATH=$PWD python3 tools/ablation_size.py --data /tmp/abl-data --out $OUT/sizing.json --budget-min 11
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

from tnlib.provenance import provenance
from tnlib.sweep import load_spec, plan_runs, row_model_overrides


def measure(shape: dict, spec: dict, data: str, parallel: int, seconds: float, work: str) -> dict:
    """``parallel`` processes of the default row at ``shape`` for ``seconds`` each, at the same time."""
    rec = spec["recipe"]
    row = next(r for r in spec["rows"] if r["table"] == "default")
    model = row_model_overrides(row, shape)
    procs, t0 = [], time.time()
    for i in range(parallel):
        out = os.path.join(work, f"{shape['d_model']}x{shape['n_layers']}-{i}")
        cmd = [sys.executable, "-m", "tnlib", "train", "--preset", f"tnl-{rec['size']}", "--data", data, "--out", out,
               "--model"] + [f"{k}={json.dumps(v)}" for k, v in model.items()] + [
               "--set", f"seq_len={rec['seq_len']}", f"batch_size={rec['batch_size']}",
               f"grad_accum={rec['grad_accum']}", "max_steps=1000000", f"max_minutes={seconds / 60}",
               "eval_every=1000000", f"eval_tokens={rec['eval_tokens']}", f"eval_sets={','.join(rec['eval_sets'])}",
               "ckpt_every=1000000", f"compile={json.dumps(rec['compile'])}", f"seed={i + 1}", "progress=false"]
        shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resumed one
        os.makedirs(out)
        log = open(out + ".log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out, log))
    walls = []
    for p, out, log in procs:
        p.wait()
        walls.append(time.time() - t0)
        log.close()
    res = {"shape": shape, "parallel": parallel, "seconds": seconds, "procs": []}
    for (p, out, _), wall in zip(procs, walls):
        mpath = os.path.join(out, "metrics.jsonl")
        if p.returncode != 0 or not os.path.exists(mpath):
            tail = open(out + ".log").read()[-1500:]
            res["error"] = f"exit {p.returncode}: {tail}"
            print(f"  {shape}: process failed\n{tail}", flush=True)
            return res
        recs = [json.loads(line) for line in open(mpath) if line.strip()]
        steps = [r for r in recs if "tokens_per_s" in r]
        start = next(r for r in recs if r.get("event") == "start")
        steady = sorted(r["tokens_per_s"] for r in steps[min(5, len(steps) - 1):])
        res["procs"].append({"steps": len(steps), "tokens_per_s": steady[len(steady) // 2],
                             "wall_s": wall, "train_s": steps[-1]["elapsed_s"],
                             "first_step_s": steps[0]["elapsed_s"], "mem_gb": max(r.get("mem_gb", 0) for r in steps),
                             "params": start["params"]})
    ps = res["procs"]
    res["params"] = ps[0]["params"]
    res["tokens_per_s_per_proc"] = min(p["tokens_per_s"] for p in ps)  # the slowest process sets the pace
    res["tokens_per_s_total"] = sum(p["tokens_per_s"] for p in ps)
    # everything that is not steady-state training: start-up, first-step JIT, final eval + save
    res["overhead_s"] = max(p["wall_s"] - p["train_s"] + p["first_step_s"] for p in ps)
    res["mem_gb"] = max(p["mem_gb"] for p in ps)
    return res


def predict_minutes(m: dict, tokens: int, n_runs: int, parallel: int, rec: dict) -> float:
    """Sweep wall time: all runs' training at the measured total rate of ``parallel`` processes (an
    evaluated token costs about a third of a trained one: forward only), plus one per-run overhead per
    wave of ``parallel`` runs."""
    evals = rec["evals"] * rec["eval_tokens"] * len(rec["eval_sets"])
    train_s = n_runs * (tokens + evals / 3) / m["tokens_per_s_total"]
    return (train_s + math.ceil(n_runs / parallel) * m["overhead_s"]) / 60


def flops_per_token(shape: dict, spec: dict) -> float:
    """6 x parameters (the tied embedding counted once, as the LM head's matmul): for skipping shapes
    that cannot fit even if their throughput scaled perfectly with size."""
    import torch

    from tnlib.models import build_model, get_config

    row = next(r for r in spec["rows"] if r["table"] == "default")
    with torch.device("meta"):
        model = build_model(get_config(f"tnl-{spec['recipe']['size']}", vocab_size=50272,
                                       **row_model_overrides(row, shape)))
    return 6.0 * model.num_parameters()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="configs/ablations.toml")
    ap.add_argument("--data", required=True)
    ap.add_argument("--candidates", default="256x6,384x6,512x8,768x8", help="DxL shapes, smallest first (measured largest first)")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--budget-min", type=float, default=11.0, help="wall minutes the whole sweep may take")
    ap.add_argument("--min-tokens", type=int, default=20_000_000)
    ap.add_argument("--work", default="/tmp/abl-size")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides (CPU tests: seq_len=64 ...)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    spec = load_spec(a.spec, recipe={k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.set)})
    rec = spec["recipe"]
    n_runs = len(plan_runs(spec))
    per_step = rec["seq_len"] * rec["batch_size"] * rec["grad_accum"]
    meta = json.load(open(os.path.join(a.data, "meta.json")))
    max_tokens = meta["splits"]["train"]["tokens"] // per_step * per_step
    shapes = []
    for c in a.candidates.split(","):
        d, n = (int(x) for x in c.lower().split("x"))
        shapes.append({"d_model": d, "n_layers": n, "n_heads": max(1, d // 64)})
    # largest first; stop at the first that fits, and skip a shape that cannot fit even if its tokens/s
    # were the last measured one's scaled by the FLOP ratio (optimistic for smaller models)
    meas = []
    for shape in reversed(shapes):
        last = next((m for m in reversed(meas) if "error" not in m and "skipped" not in m), None)
        if last is not None:
            guess = dict(last, tokens_per_s_total=last["tokens_per_s_total"] * last["flops_per_token"] /
                         flops_per_token(shape, spec))
            if predict_minutes(guess, a.min_tokens, n_runs, a.parallel, rec) > a.budget_min and shape != shapes[0]:
                meas.append({"shape": shape, "skipped": "cannot fit even at the FLOP-scaled rate of the last shape",
                             "flops_per_token": flops_per_token(shape, spec)})
                print(f"{shape['d_model']}x{shape['n_layers']}: skipped (cannot fit)", flush=True)
                continue
        t = time.time()
        m = measure(shape, spec, a.data, a.parallel, a.seconds, a.work)
        m["measure_wall_s"] = time.time() - t
        m["flops_per_token"] = flops_per_token(shape, spec)
        meas.append(m)
        if "error" not in m:
            m["predicted_min_at_min_tokens"] = predict_minutes(m, a.min_tokens, n_runs, a.parallel, rec)
            print(f"{shape['d_model']}x{shape['n_layers']}: {m['params'] / 1e6:.1f}M params, "
                  f"{m['tokens_per_s_per_proc']:,.0f} tok/s per process, {m['tokens_per_s_total']:,.0f} tok/s with "
                  f"{a.parallel}, overhead {m['overhead_s']:.0f} s/run, {m['mem_gb']:.1f} GB/process; sweep at "
                  f"{a.min_tokens / 1e6:.0f}M tokens: {m['predicted_min_at_min_tokens']:.1f} min "
                  f"(measured in {m['measure_wall_s']:.0f} s)", flush=True)
            if m["predicted_min_at_min_tokens"] <= a.budget_min:
                break
    ok = [m for m in meas if "error" not in m and "skipped" not in m]
    if not ok:
        raise SystemExit("no candidate shape ran")
    fits = [m for m in ok if m["predicted_min_at_min_tokens"] <= a.budget_min]
    chosen = max(fits, key=lambda m: m["params"]) if fits else min(ok, key=lambda m: m["predicted_min_at_min_tokens"])
    tokens = math.ceil(a.min_tokens / per_step) * per_step
    while tokens + per_step * 64 <= max_tokens and \
            predict_minutes(chosen, tokens + per_step * 64, n_runs, a.parallel, rec) <= a.budget_min:
        tokens += per_step * 64
    choice = {"shape": chosen["shape"], "tokens": tokens, "parallel": a.parallel, "runs": n_runs,
              "predicted_min": predict_minutes(chosen, tokens, n_runs, a.parallel, rec),
              "budget_min": a.budget_min, "fits": bool(fits), "train_split_tokens": meta["splits"]["train"]["tokens"],
              "rule": "largest measured shape whose sweep fits the budget at min_tokens per run, then the largest "
                      "token budget (no repeated data) that still fits"}
    if not fits:
        print(f"WARNING: no shape fits {a.budget_min} min at {a.min_tokens:,} tokens; taking the fastest", flush=True)
    doc = {"choice": choice, "candidates": meas, "recipe": rec, "min_tokens": a.min_tokens,
           "provenance": provenance()}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    s = chosen["shape"]
    print(f"chosen: d_model={s['d_model']} n_layers={s['n_layers']} n_heads={s['n_heads']}, {tokens:,} tokens/run, "
          f"predicted sweep {choice['predicted_min']:.1f} min")
    # the last line is read by tools/ablation_device.sh
    print(f"SWEEP_ARGS --shape d_model={s['d_model']} n_layers={s['n_layers']} n_heads={s['n_heads']} "
          f"--set tokens={tokens}")


if __name__ == "__main__":
    main()
