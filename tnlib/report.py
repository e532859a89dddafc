"""Summaries and plots of training runs (metrics.jsonl), for the quickstart and the 385M comparison."""
from __future__ import annotations

import json
import os

__all__ = ["read_metrics", "summarize_run", "plot_runs", "compare_runs", "ppl_ratio_curve", "plot_ratio_curves"]


def _pyplot():
    """pyplot on the file backend: these functions write PNGs, they never open windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style_axes(ax, title: str, ylabel: str) -> None:
    """The look every curve panel shares: training tokens on x, a grid, a small legend."""
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a panel with nothing drawn (e.g. no evals yet) gets no legend
        ax.legend(fontsize=7)


def _save_figure(fig, path: str, title: str = "") -> None:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize_run(path: str) -> dict:
    """Final held-out metrics, tokens seen and median throughput of one run's metrics.jsonl."""
    recs = read_metrics(path)
    start = next((r for r in recs if r.get("event") == "start"), {})
    steps = [r for r in recs if "tokens_per_s" in r]
    evals = [r for r in recs if "val_loss" in r]
    if not steps:
        raise ValueError(f"{path} holds no training steps")
    tps = sorted(r["tokens_per_s"] for r in steps[min(5, len(steps) - 1):])  # skip warm-up/compile steps
    out = {"tokens": steps[-1]["tokens"], "steps": steps[-1]["step"], "params": start.get("params"),
           "tokens_per_s": tps[len(tps) // 2], "train_loss": steps[-1]["loss"]}
    if "mfu" in steps[-1]:
        out["mfu"] = sorted(r["mfu"] for r in steps)[len(steps) // 2]
    if "mem_gb" in steps[-1]:
        out["peak_mem_gb"] = max(r.get("mem_gb", 0) for r in steps)
    if evals:
        out.update({k: v for k, v in evals[-1].items() if k.endswith(("_loss", "_ppl", "_bpb"))})
    if start:
        out["preset"] = start["config"]["preset"]
        out["provenance"] = start.get("provenance")
    return out


def plot_runs(runs: dict, path: str, title: str = "", evals=("val",)):
    """``runs = {label: metrics.jsonl}`` -> training loss, held-out perplexity and throughput vs tokens."""
    plt = _pyplot()

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    for i, (label, mpath) in enumerate(runs.items()):
        color = f"C{i}"  # one colour per run, one line style per held-out set
        recs = read_metrics(mpath)
        steps = [r for r in recs if "tokens_per_s" in r]
        ax[0].plot([r["tokens"] / 1e6 for r in steps], [r["loss"] for r in steps], color=color, label=label, alpha=0.8)
        for name, ls in zip(evals, ("o-", "s--", "^:", "d-.")):
            ev = [r for r in recs if f"{name}_ppl" in r]
            ax[1].plot([r["tokens"] / 1e6 for r in ev], [r[f"{name}_ppl"] for r in ev], ls, color=color,
                       label=f"{label} {name}")
        ax[2].plot([r["tokens"] / 1e6 for r in steps], [r["tokens_per_s"] for r in steps], color=color, label=label,
                   alpha=0.8)
    ax[1].set_yscale("log")
    for a, t, y in zip(ax, ("training loss", "held-out perplexity", "throughput"),
                       ("nats/token", "perplexity (our tokenizer)", "tokens/s")):
        _style_axes(a, t, y)
    _save_figure(fig, path, title)


def compare_runs(runs: dict, out: str, title: str = "", evals=("val",), extra: dict | None = None) -> dict:
    """Write ``out/summary.json`` (per-run summaries + provenance), ``out/summary.md`` and ``out/curves.png``."""
    from .provenance import provenance

    os.makedirs(out, exist_ok=True)
    summary = {name: summarize_run(p) for name, p in runs.items()}
    plot_runs(runs, os.path.join(out, "curves.png"), title, evals)
    here = provenance()
    doc = {**summary, **here}
    # the figures come from the training runs: report their machine, commit and date at the top level
    # (the runs may have been made elsewhere, e.g. on a GPU machine, and compared here); runs made on
    # different machines or commits list each run's value: "a: x; b: y"
    provs = {name: s.get("provenance") for name, s in summary.items()}
    if all(provs.values()):
        for key in ("commit", "gpu", "cpu", "torch", "triton", "cuda", "python", "date"):
            vals = {name: p[key] for name, p in provs.items() if key in p}
            if vals:
                same = len(set(map(str, vals.values()))) == 1
                doc[key] = next(iter(vals.values())) if same else "; ".join(f"{n}: {v}" for n, v in vals.items())
        doc["command"] = "; ".join(dict.fromkeys(p["command"] for p in provs.values()))
        doc["compare_command"] = here["command"]
        doc["compare_date"] = here["date"]
    names = list(summary)
    if len(names) == 2:  # e.g. tnl / transformer: perplexity ratios, the paper's way of comparing
        a, b = (summary[n] for n in names)
        doc["ppl_ratios"] = {k: a[k] / b[k] for k in a if k.endswith("_ppl") and b.get(k)}
        doc["ppl_ratios_note"] = f"{names[0]} / {names[1]} at equal tokens"
    doc.update(extra or {})
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(doc, f, indent=1)
    keys = ["params", "tokens", "tokens_per_s", "train_loss"] + sorted(
        k for k in summary[names[0]] if k.endswith(("_ppl", "_bpb")))
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in keys:
        vals = [summary[n].get(key) for n in names]
        lines.append(f"| {key} | " + " | ".join(
            "-" if v is None else f"{v:,.3f}" if isinstance(v, float) else f"{v:,}" for v in vals) + " |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        commits = "; ".join(dict.fromkeys(str(p.get("commit"))[:10] for p in provs.values() if p)) or doc["commit"][:10]
        f.write(f"# {title or 'comparison'}\n\n{doc['date']}, commit {commits}, "
                f"{doc['gpu'] or 'CPU'}\n\n" + "\n".join(lines) + "\n")
    return doc


def ppl_ratio_curve(metrics_a, metrics_b, eval_set: str = "val") -> list:
    """``[(tokens, ppl_a / ppl_b), ...]`` at the eval points the two runs share, aligned by training
    tokens (not by line or step: runs with other eval points, or a resumed run, still pair correctly).
    ``metrics_*``: a metrics.jsonl path or its records. A later record at the same tokens wins."""
    recs = [read_metrics(m) if isinstance(m, str) else m for m in (metrics_a, metrics_b)]
    key = f"{eval_set}_ppl"
    a, b = ({r["tokens"]: r[key] for r in rs if key in r and "tokens" in r} for rs in recs)
    return [(t, a[t] / b[t]) for t in sorted(set(a) & set(b))]


def plot_ratio_curves(curves: dict, path: str, evals, title: str = "", finals: dict | None = None):
    """One panel per eval set: the A/B perplexity ratio against training tokens for every labelled run
    pair. ``curves = {label: {eval_set: [(tokens, ratio), ...]}}``; ``finals = {label: {eval_set: ratio}}``
    adds end-of-run points (e.g. a test set evaluated only at the end) as markers at the run's last tokens."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, len(evals), figsize=(4.6 * len(evals), 3.8), squeeze=False)
    for ax, name in zip(axes[0], evals):
        for i, (label, by_set) in enumerate(curves.items()):
            pts = by_set.get(name, [])
            if pts:
                ax.plot([t / 1e6 for t, _ in pts], [r for _, r in pts], "o-" if i == 0 else "s--", color=f"C{i}",
                        label=label, ms=4)
            fin = (finals or {}).get(label, {}).get(name)
            if fin is not None:
                last = max((t for s in by_set.values() for t, _ in s), default=0)
                ax.plot([last / 1e6], [fin], "*", color=f"C{i}", ms=11, label=f"{label} (end of run)")
        ax.axhline(1.0, color="gray", lw=0.8)
        _style_axes(ax, name, "perplexity ratio")
    _save_figure(fig, path, title)
