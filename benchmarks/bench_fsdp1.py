"""One GPU: does ``parallel=fsdp`` (one rank) cost anything against the default path?

Runs ``tnlib.train.train`` itself, alternately with the default path (``default``) and with
``parallel=fsdp`` on a 1-rank process group (no launcher needed): as the library runs it (``fsdp-1rank``:
one rank has nothing to shard, so the plain model with sharded checkpoints) and, with ``--modes``
including ``fsdp2``, FSDP2 forced onto the one rank (``fsdp2-1rank``, ``fsdp_one_rank=true``). On
random tokens (so no data set is required; the vocabulary is the preset's); records the steady-state
tokens/s of each from the same process. Library defaults otherwise (bf16 autocast, fused loss on CUDA,
no compile; ``--compile``: each block compiled, as ``make train-385m`` trains). Writes
``OUT/fsdp1-<gpu>.json`` (``fsdp1-compiled-<gpu>.json``) with provenance after every run, so an
interrupted benchmark keeps what it measured (make bench-fsdp1).

    python3 benchmarks/bench_fsdp1.py                                    # = make bench-fsdp1: tnl-385m, T=2048, 32K tokens/step
    PYTHONPATH=$PWD python3 benchmarks/bench_fsdp1.py --preset tnl-tiny --seq-len 64 --tokens 256 --steps 4 --out /tmp/b
"""
import gc
import json
import os
import shutil
import statistics
import tempfile

import numpy as np
import torch
from common import figure, parser, replot, result_path, save_figure

from tnlib.models import get_config
from tnlib.provenance import provenance, write_results
from tnlib.train import TrainConfig, train


def random_data(path: str, vocab: int, n_tokens: int) -> None:
    """A data folder in ``tnlib prepare``'s layout holding uniform random tokens."""
    os.makedirs(path, exist_ok=True)
    np.random.default_rng(0).integers(0, vocab, n_tokens).astype(np.uint16).tofile(os.path.join(path, "train.bin"))
    splits = {"train": {"file": "train.bin", "tokens": n_tokens, "bytes": 4 * n_tokens}}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"vocab_size": vocab, "tokenizer_sha256": "random", "splits": splits}, f)


def plot(rows, path, header=None):
    """Tokens/s of each run, default path vs FSDP on one rank, in the order they ran."""
    fig, axes = figure()
    ax = axes[0][0]
    for i, r in enumerate(rows):
        ax.bar(i, r["tokens_per_s"] / 1e3, color={"default": "C0", "fsdp-1rank": "C1"}.get(r["mode"], "C2"))
    ax.set_xticks(range(len(rows)), [f"{r['mode']}\nround {r['round']}" for r in rows], fontsize=7)
    ax.set_ylabel("training tokens/s (thousands, median)")
    ax.set_title("one GPU: default path vs parallel=fsdp")
    save_figure(fig, path, header)


def main():
    ap = parser(__doc__)
    ap.add_argument("--preset", default="tnl-385m")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per optimizer step")
    ap.add_argument("--steps", type=int, default=20, help="steps per run (the first --warmup not timed)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the modes, alternated")
    ap.add_argument("--modes", default="default,fsdp", help="of default, fsdp, fsdp2 (comma-separated)")
    ap.add_argument("--compile", action="store_true", help="compile=true for both (each block compiled)")
    a = ap.parse_args()
    if replot(a, plot):
        return
    if a.tokens % a.seq_len:
        raise SystemExit(f"--tokens {a.tokens} is not a multiple of --seq-len {a.seq_len}")
    if a.steps <= a.warmup:
        raise SystemExit("--steps must exceed --warmup")
    labels = {"default": "default", "fsdp": "fsdp-1rank", "fsdp2": "fsdp2-1rank"}
    modes = a.modes.split(",")
    if not modes or set(modes) - set(labels):
        raise SystemExit(f"--modes {a.modes!r}: choose from {', '.join(labels)}")
    vocab = get_config(a.preset).vocab_size
    # the runs' checkpoints (GBs for a 385M model, deleted after each run) go to memory where a tmpfs has room
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 32e9 else None
    work = tempfile.mkdtemp(prefix="bench_fsdp1-", dir=shm)
    name = "fsdp1-compiled" if a.compile else "fsdp1"
    out_file = result_path(a, name)
    rows = []
    try:
        random_data(os.path.join(work, "data"), vocab, max(4 * a.tokens, 2 * a.seq_len + 2))
        for rnd in range(a.rounds):
            for mode in modes:
                run_dir = os.path.join(work, f"{mode}-{rnd}")
                cfg = TrainConfig(preset=a.preset, data=os.path.join(work, "data"), out=run_dir, seq_len=a.seq_len,
                                  batch_size=a.tokens // a.seq_len, max_steps=a.steps, warmup_steps=a.warmup,
                                  eval_sets=(), eval_every=10**9, ckpt_every=10**9, progress=False, compile=a.compile,
                                  parallel="ddp" if mode == "default" else "fsdp", fsdp_one_rank=mode == "fsdp2")
                gc.collect()
                if torch.cuda.is_available():  # each run's own peak memory
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                train(cfg)
                with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                    steps = [r for r in map(json.loads, f) if "tokens_per_s" in r]
                timed = [r["tokens_per_s"] for r in steps[a.warmup:]]
                rows.append({"mode": labels[mode], "round": rnd,
                             "tokens_per_s": statistics.median(timed), "tokens_per_s_all": timed,
                             "mem_gb": steps[-1].get("mem_gb"), "final_loss": steps[-1]["loss"]})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens_per_s_all"}), flush=True)
                shutil.rmtree(run_dir)
                summary = {}
                for m in labels.values():
                    vals = [r["tokens_per_s"] for r in rows if r["mode"] == m]
                    if vals:
                        summary[m] = statistics.median(vals)
                for m, key in (("fsdp-1rank", "fsdp_over_default"), ("fsdp2-1rank", "fsdp2_over_default")):
                    if m in summary and "default" in summary:
                        summary[key] = summary[m] / summary["default"]
                write_results(out_file, rows, {"preset": a.preset, "seq_len": a.seq_len, "tokens_per_step": a.tokens,
                                               "steps": a.steps, "warmup": a.warmup, "compile": a.compile,
                                               "summary": summary})
        print(json.dumps(summary), flush=True)
        plot(rows, result_path(a, name, ".png"), provenance())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
