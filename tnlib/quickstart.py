"""The quickstart: tnl-tiny vs transformer-tiny on the shipped sample, same tokens, on a CPU in minutes.

``make quickstart`` (or ``python -m tnlib quickstart``) writes ``results/quickstart/``: both loss
curves in one plot, ``summary.json`` (with provenance) and ``summary.md``.
"""
from __future__ import annotations

import json
import os

__all__ = ["quickstart", "plot_runs"]

SAMPLE_CORPUS = "data/sample/gutenberg-sample.txt.xz"
SAMPLE_TOKENIZER = "data/sample/tokenizer.json"
SAMPLE_EVALS = {"heldout": "data/sample/heldout-sample.txt.xz", "wikitext-valid": "data/sample/wikitext103-valid-sample.txt"}


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(runs: dict, path: str, title: str = ""):
    """``runs = {label: metrics.jsonl path}`` -> one figure: train loss and val loss vs tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for label, mpath in runs.items():
        recs = [r for r in read_metrics(mpath) if "loss" in r and "event" not in r]
        ax[0].plot([r["tokens"] / 1e6 for r in recs], [r["loss"] for r in recs], label=label, alpha=0.8)
        ev = [r for r in read_metrics(mpath) if "val_loss" in r]
        ax[1].plot([r["tokens"] / 1e6 for r in ev], [r["val_loss"] for r in ev], "o-", label=label)
    for a, t in zip(ax, ("training loss", "validation loss")):
        a.set_xlabel("training tokens (M)")
        a.set_ylabel("cross-entropy (nats/token)")
        a.set_title(t)
        a.grid(alpha=0.3)
        a.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quickstart(out: str = "results/quickstart", steps: int = 300, work: str = "runs/quickstart") -> dict:
    from .data import prepare_data
    from .provenance import provenance
    from .train import TrainConfig, train

    for p in (SAMPLE_CORPUS, SAMPLE_TOKENIZER, *SAMPLE_EVALS.values()):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} is missing: run the quickstart from the repository root")
    data_dir = os.path.join(work, "data")
    print(f"[1/3] tokenizing the shipped sample into {data_dir}")
    prepare_data(SAMPLE_CORPUS, data_dir, tokenizer=SAMPLE_TOKENIZER, eval_sets=SAMPLE_EVALS, force=True)
    eval_sets = ("val", *(f"eval-{k}" for k in SAMPLE_EVALS))
    results, runs = {}, {}
    for i, preset in enumerate(("tnl-tiny", "transformer-tiny")):
        print(f"[{i + 2}/3] training {preset} for {steps} steps")
        cfg = TrainConfig(preset=preset, data=data_dir, out=os.path.join(work, preset), max_steps=steps,
                          seq_len=256, batch_size=8, lr=2e-3, warmup_steps=30, eval_every=max(1, steps // 6),
                          eval_tokens=32768, eval_sets=eval_sets, ckpt_every=10**9, dtype="fp32")
        res = train(cfg)
        runs[preset] = os.path.join(cfg.out, "metrics.jsonl")
        recs = [r for r in read_metrics(runs[preset]) if "tokens_per_s" in r]
        results[preset] = {"tokens": res["tokens"], "params": res["params"],
                           "tokens_per_s_median": sorted(r["tokens_per_s"] for r in recs)[len(recs) // 2],
                           **{k: res[k] for k in res if k.endswith(("_loss", "_ppl", "_bpb"))}}
    os.makedirs(out, exist_ok=True)
    plot_runs(runs, os.path.join(out, "loss.png"), "quickstart: tiny TNL vs tiny Transformer, same tokens (CPU)")
    summary = {"runs": results, **provenance({"steps": steps, "sample": SAMPLE_CORPUS})}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in ["params", "tokens", "tokens_per_s_median"] + sorted(k for k in results[names[0]] if k.endswith(("_ppl", "_bpb"))):
        vals = [results[n].get(key) for n in names]
        lines.append(f"| {key} | " + " | ".join(f"{v:,.3f}" if isinstance(v, float) else f"{v:,}" for v in vals) + " |")
    table = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Quickstart ({summary['date']}, commit {summary['commit'][:10]}, CPU)\n\n{table}\n\n"
                "Tiny models for minutes on a CPU: a smoke test of the pipeline, not the paper's comparison.\n")
    print(table)
    return summary
