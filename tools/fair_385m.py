"""The fair TNL-385M vs Transformer-385M experiment (issue 26): its plan, its rules and its result files.

Three stages, each trained by ``tools/long_385m.sh`` on a lent GPU (the same data parts, prepare step and
driver as the 80M run; every run's final weights scored on the *whole* of every eval set):

    residual  both models with the residual stream in bf16 (``residual_dtype=compute``) and in fp32
              (``params``), 24M tokens each at the old learning rate 6e-4 -> results/385m-fair/residual-2x2.json
    lr        each model at 4 peak learning rates spanning 8x, 20M tokens, the chosen residual precision
              -> results/385m-fair/lr-sweep.json
    final     each model at its best learning rate, seeds 1 and 2 (initialisation and data order), 80M tokens
              -> results/385m-fair/summary.json (per model and eval set: each seed's perplexity, bits per
              byte and loss, and over the seeds ``ppl_mean`` (geometric) and ``bpb_mean``; per set the ratio
              and the verdict) and curves.png

Everything else is the recipe of the 80M run: T=2048, 16 sequences (32,768 tokens) per step, AdamW
(0.9, 0.95, weight decay 0.1), warmup steps/50+1, cosine to 10%, blocks compiled, bf16 autocast, chunked loss.

    python tools/fair_385m.py specs residual               # the MODELS value for tools/long_385m.sh
    python tools/fair_385m.py specs lr --residual params
    python tools/fair_385m.py specs final --residual params --lr tnl-385m=1.2e-3 transformer-385m=2.4e-3
    python tools/fair_385m.py results residual --src runs/fair/a runs/fair/b   # unpacked long385.tar.gz folders

The device calls and what each stage cost are in results/385m-fair/NOTES.md.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics

MODELS = ("tnl-385m", "transformer-385m")
SHORT = {"tnl-385m": "tnl", "transformer-385m": "transformer"}
#: residual_dtype values: "compute" keeps the stream in the autocast dtype (bf16), "params" in fp32
RESIDUAL = {"bf16": "compute", "fp32": "params"}
STAGE_TOKENS = {"residual": 24_000_000, "lr": 20_000_000, "final": 80_000_000}
LR_GRID = (3e-4, 6e-4, 1.2e-3, 2.4e-3)
SEEDS = (1, 2)
#: the result files' names for the prepared eval splits
EVAL_NAMES = {"val": "val", "eval-heldout": "heldout", "eval-wikitext-valid": "wikitext-valid",
              "eval-wikitext-test": "wikitext-test", "eval-wikitext-detok-valid": "wikitext-detok-valid",
              "eval-wikitext-detok-test": "wikitext-detok-test"}
OUT = "results/385m-fair"

#: the rule that chooses the residual precision (applied by ``choose_residual``)
RESIDUAL_RULE = (
    "bf16 (the faster stream) is chosen only if, for both models, its whole-set loss is at most 0.005 nats "
    "(0.5% perplexity) above the fp32 stream's on each of val, heldout and wikitext-detok-valid; otherwise fp32 "
    "for both (one precision for both models, so the comparison does not depend on it)")
RESIDUAL_MARGIN = 0.005
RESIDUAL_SETS = ("val", "heldout", "wikitext-detok-valid")
LR_RULE = ("each model's learning rate with the lowest whole-set val loss; a diverged run (non-finite loss) "
           "is a measured point that cannot be chosen")

#: the rule that states the comparison's verdict per eval set (applied by ``compare``); written down before the
#: stage-3 runs, in the spirit of the ablation sweep's rule (``tnlib.sweep.VERDICT_RULE``)
FINAL_RULE = (
    "per eval set, r = the TNL / Transformer perplexity ratio of the geometric-mean perplexities over the 2 "
    "seeds, s = the larger relative sample standard deviation (n-1) of either model's per-seed perplexities: "
    "'TNL better' if r < 1 and every pairing of a TNL seed with a Transformer seed has TNL lower and "
    "1 - r > 2s; 'TNL worse' the same way round (r > 1, every pairing, r - 1 > 2s); else 'level within the "
    "seed spread'. Equal training tokens; the GPU-seconds view (curves.png) is shown, not judged")


def compare(a: list, b: list) -> dict:
    """``FINAL_RULE`` for one eval set: ``a``, ``b`` the per-seed perplexities of TNL and the Transformer.
    Returns ``{"verdict", "r", "two_s"}``."""
    r = seed_ratio(a, b)
    two_s = 2 * max(statistics.stdev(x) / statistics.fmean(x) for x in (a, b))
    if r["max"] < 1 and 1 - r["mean"] > two_s:
        verdict = "TNL better"
    elif r["min"] > 1 and r["mean"] - 1 > two_s:
        verdict = "TNL worse"
    else:
        verdict = "level within the seed spread"
    return {"verdict": verdict, "r": r["mean"], "two_s": two_s}


def _fmt_lr(lr: float) -> str:
    return f"{lr:.1e}".replace("e-0", "e-")


def specs(stage: str, residual: str = "params", lrs: dict | None = None, models=MODELS, grid=LR_GRID) -> list[str]:
    """Run specs for ``tools/long_385m.sh`` (``NAME=PRESET:KEY=VALUE...``; ``m.`` marks a model field). ``grid``:
    the learning rates of the ``lr`` stage (rates beyond ``LR_GRID`` when a model's best lies at its edge)."""
    tokens = STAGE_TOKENS[stage]
    out = []
    for m in models:
        if stage == "residual":
            for label, value in RESIDUAL.items():
                out.append(f"{SHORT[m]}-{label}={m}:m.residual_dtype={value}:lr=6e-4:tokens={tokens}")
        elif stage == "lr":
            for lr in grid:
                out.append(f"{SHORT[m]}-lr{_fmt_lr(lr)}={m}:m.residual_dtype={residual}:lr={lr}:tokens={tokens}")
        elif stage == "final":
            if not lrs or m not in lrs:
                raise ValueError(f"final: the learning rate of {m} is needed (--lr {m}=VALUE)")
            for seed in SEEDS:
                out.append(f"{SHORT[m]}-s{seed}={m}:m.residual_dtype={residual}:lr={lrs[m]}:seed={seed}:tokens={tokens}")
        else:
            raise ValueError(f"unknown stage {stage!r}; choose from {sorted(STAGE_TOKENS)}")
    return out


# -- reading the runs -----------------------------------------------------------------------------------------

def load_runs(srcs) -> dict:
    """``{run name: {"start", "steps", "final", "src"}}`` from unpacked ``long385.tar.gz`` folders
    (``runs/<name>/metrics.jsonl`` and ``final.json``). A run found in two sources is refused."""
    from tnlib.report import read_metrics  # here, not at the top: `specs` runs where tnlib is not installed

    runs = {}
    for src in srcs:
        for path in sorted(glob.glob(os.path.join(src, "runs", "*", "metrics.jsonl"))):
            name = os.path.basename(os.path.dirname(path))
            if name in runs:
                raise ValueError(f"run {name} is in {runs[name]['src']} and in {src}")
            recs = read_metrics(path)
            fin = os.path.join(os.path.dirname(path), "final.json")
            runs[name] = {"start": next((r for r in recs if r.get("event") == "start"), {}),
                          "steps": [r for r in recs if "tokens_per_s" in r], "src": src,
                          "final": json.load(open(fin)) if os.path.exists(fin) else None}
    return runs


def _run_row(name: str, run: dict) -> dict:
    """The row of one finished run: model, settings, tokens, whole-set final evals, speed and provenance."""
    if run["final"] is None:
        raise ValueError(f"run {name} has no final.json (not finished)")
    cfg, steps = run["start"]["config"], run["steps"]
    final = {}
    for split, r in run["final"]["evals"].items():
        if split in EVAL_NAMES:
            final[EVAL_NAMES[split]] = {"ppl": _finite(r["ppl"]), "bpb": _finite(r["bpb"]),
                                        "loss": _finite(r["loss"]), "tokens": r["tokens"]}
    tps = sorted(s["tokens_per_s"] for s in steps[5:] or steps)
    return {"name": name, "model": cfg["preset"], "residual_dtype": run["start"]["model"]["residual_dtype"],
            "lr": cfg["lr"], "seed": cfg["seed"], "tokens": steps[-1]["tokens"], "steps": steps[-1]["step"],
            "final": final, "diverged": not all(math.isfinite(s["loss"]) for s in steps),
            "tokens_per_s": tps[len(tps) // 2], "train_s": sum(s["step_s"] for s in steps),
            "provenance": {k: run["start"].get("provenance", {}).get(k)
                           for k in ("commit", "gpu", "torch", "triton", "cuda", "date")}}


def _finite(x):
    return x if x is not None and math.isfinite(x) and x < 1e30 else None


def _provenance(rows, stage: str, srcs) -> dict:
    from tnlib.provenance import provenance

    prov = provenance({"stage": stage})
    prov["command"] = f"python tools/fair_385m.py results {stage} --src " + " ".join(
        os.path.relpath(s) if not os.path.isabs(s) else os.path.basename(s.rstrip("/")) for s in srcs)
    prov["train_command"] = ("bash tools/long_385m.sh start  # MODELS=$(python tools/fair_385m.py specs "
                             + stage + " ...), see results/385m-fair/NOTES.md")
    prov["runs"] = {r["name"]: r["provenance"] for r in rows}
    return prov


def _check_same(rows, fields=("tokens",)) -> None:
    for f in fields:
        vals = {r[f] for r in rows}
        if len(vals) > 1:
            raise ValueError(f"the runs differ in {f}: " + ", ".join(f"{r['name']}={r[f]}" for r in rows))


# -- the rules -------------------------------------------------------------------------------------------------

def choose_residual(rows) -> dict:
    """Apply ``RESIDUAL_RULE`` to the 2 x 2 rows: ``{"choice": "compute"|"params", "delta": {model: {set: nats}}}``
    (delta = bf16 loss - fp32 loss)."""
    by = {(r["model"], r["residual_dtype"]): r for r in rows}
    delta, ok = {}, True
    for m in MODELS:
        bf, fp = by[(m, "compute")], by[(m, "params")]
        delta[m] = {s: bf["final"][s]["loss"] - fp["final"][s]["loss"] for s in RESIDUAL_SETS}
        ok &= all(d <= RESIDUAL_MARGIN for d in delta[m].values())
    return {"choice": "compute" if ok else "params", "delta": delta}


def choose_lr(rows) -> dict:
    """Apply ``LR_RULE``: ``{model: lr}``; also whether each choice lies at an edge of the grid."""
    best, edge = {}, {}
    for m in MODELS:
        mine = [r for r in rows if r["model"] == m]
        ok = [r for r in mine if not r["diverged"] and r["final"]["val"]["loss"] is not None]
        if not ok:
            raise ValueError(f"{m}: every learning rate diverged")
        b = min(ok, key=lambda r: r["final"]["val"]["loss"])
        best[m] = b["lr"]
        lrs = sorted(r["lr"] for r in mine)
        edge[m] = b["lr"] in (lrs[0], lrs[-1])
    return {"best": best, "at_grid_edge": edge}


# -- the result files ------------------------------------------------------------------------------------------

def results_residual(srcs, out: str = OUT) -> dict:
    runs = load_runs(srcs)
    rows = [_run_row(n, r) for n, r in runs.items() if r["start"].get("config", {}).get("max_steps")
            and n.endswith(("-bf16", "-fp32"))]
    if sorted((r["model"], r["residual_dtype"]) for r in rows) != sorted(
            (m, v) for m in MODELS for v in RESIDUAL.values()):
        raise ValueError(f"residual: expected the 4 runs of {MODELS} x bf16/fp32, found {[r['name'] for r in rows]}")
    _check_same(rows, ("tokens", "lr", "seed"))
    doc = {"rows": rows, "rule": RESIDUAL_RULE, **choose_residual(rows), "provenance": _provenance(rows, "residual", srcs)}
    _write(out, "residual-2x2.json", doc)
    return doc


def results_lr(srcs, out: str = OUT) -> dict:
    runs = load_runs(srcs)
    rows = []
    for n, r in runs.items():
        if "-lr" in n:
            row = _run_row(n, r)
            rows.append({**row, "val_ppl": row["final"]["val"]["ppl"]})
    for m in MODELS:
        lrs = sorted(r["lr"] for r in rows if r["model"] == m)
        if len(lrs) < 4 or lrs[-1] / lrs[0] < 8 - 1e-9:
            raise ValueError(f"lr: {m} needs >= 4 learning rates spanning >= 8x, has {lrs}")
    _check_same(rows, ("tokens", "residual_dtype", "seed"))
    doc = {"rows": sorted(rows, key=lambda r: (r["model"], r["lr"])), "rule": LR_RULE, **choose_lr(rows),
           "provenance": _provenance(rows, "lr", srcs)}
    _write(out, "lr-sweep.json", doc)
    return doc


def mean_loss(ppl: list) -> float:
    """The mean over seeds of the log-perplexities (losses): ``exp`` of it is their geometric mean."""
    return statistics.fmean(math.log(x) for x in ppl)


def seed_ratio(a: list, b: list) -> dict:
    """Perplexity ratio of model A to model B over seeds: ``mean`` = ratio of the geometric-mean perplexities
    (exp of the mean loss difference), ``min``/``max`` over every pairing of an A seed with a B seed."""
    cross = [x / y for x in a for y in b]
    return {"mean": math.exp(mean_loss(a) - mean_loss(b)), "min": min(cross), "max": max(cross)}


def results_final(srcs, out: str = OUT) -> dict:
    runs = load_runs(srcs)
    rows = [_run_row(n, r) for n, r in runs.items() if n.rsplit("-", 1)[-1] in {f"s{s}" for s in SEEDS}]
    _check_same(rows, ("tokens", "residual_dtype"))
    models, eval_tokens = {}, {}
    for m in MODELS:
        mine = sorted((r for r in rows if r["model"] == m), key=lambda r: r["seed"])
        if [r["seed"] for r in mine] != list(SEEDS):
            raise ValueError(f"final: {m} needs seeds {SEEDS}, has {[r['seed'] for r in mine]}")
        _check_same(mine, ("lr",))
        sets = sorted(set.intersection(*(set(r["final"]) for r in mine)))
        models[m] = {"lr": mine[0]["lr"], "residual_dtype": mine[0]["residual_dtype"], "seeds": list(SEEDS),
                     "tokens": mine[0]["tokens"], "tokens_per_s": [r["tokens_per_s"] for r in mine],
                     "train_s": [r["train_s"] for r in mine],
                     "final": {s: {k: [r["final"][s][k] for r in mine] for k in ("ppl", "bpb", "loss")} for s in sets}}
        for f in models[m]["final"].values():  # over the seeds: perplexity's geometric mean (= exp of the mean loss)
            f["ppl_mean"] = math.exp(mean_loss(f["ppl"]))
            f["bpb_mean"] = statistics.fmean(f["bpb"])
        for s in sets:
            eval_tokens[s] = mine[0]["final"][s]["tokens"]
    a, b = (models[m] for m in MODELS)
    ratio = {s: seed_ratio(a["final"][s]["ppl"], b["final"][s]["ppl"]) for s in a["final"] if s in b["final"]}
    verdict = {s: compare(a["final"][s]["ppl"], b["final"][s]["ppl"])["verdict"] for s in ratio}
    doc = {"models": models, "eval_tokens": eval_tokens, "ratio": ratio, "verdict": verdict, "rule": FINAL_RULE,
           "rows": rows,
           "provenance": _provenance(rows, "final", srcs)}
    _write(out, "summary.json", doc)
    plot_final(runs, rows, out)
    return doc


def step_seconds(run: dict) -> dict:
    """``{step: GPU-seconds of training steps up to and including it}`` (the compute-matched axis)."""
    seconds, t = {}, 0.0
    for s in run["steps"]:
        t += s["step_s"]
        seconds[s["step"]] = t
    return seconds


def plot_final(runs: dict, rows: list, out: str, sets=("val", "eval-heldout", "eval-wikitext-detok-valid")) -> None:
    """``curves.png``: the sampled in-run perplexity of every run against training tokens, and against
    GPU-seconds of training (the compute-matched view: the same budget of time instead of tokens), one
    colour per model, one line style per seed; the whole-set final values as markers at the end."""
    from tnlib.report import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(2, len(sets), figsize=(5 * len(sets), 8), squeeze=False)
    names = {r["name"]: r for r in rows}
    for name, run in runs.items():
        if name not in names:
            continue
        r = names[name]
        color = "C0" if r["model"] == MODELS[0] else "C3"
        style = "-" if r["seed"] == SEEDS[0] else "--"
        seconds = step_seconds(run)
        for j, split in enumerate(sets):
            ev = [s for s in run["steps"] if f"{split}_ppl" in s]
            label = f"{SHORT[r['model']]} seed {r['seed']}"
            for i, xs in enumerate(([s["tokens"] / 1e6 for s in ev], [seconds[s["step"]] for s in ev])):
                axes[i][j].plot(xs, [s[f"{split}_ppl"] for s in ev], style, color=color, lw=1.2, label=label)
            fin = r["final"].get(EVAL_NAMES[split], {}).get("ppl")
            if fin:
                axes[0][j].plot([r["tokens"] / 1e6], [fin], "o", color=color, ms=5)
                axes[1][j].plot([r["train_s"]], [fin], "o", color=color, ms=5)
    for j, split in enumerate(sets):
        for i, xl in enumerate(("training tokens (M)", "GPU-seconds of training (compute-matched)")):
            ax = axes[i][j]
            ax.set(xlabel=xl, ylabel="perplexity (log)", yscale="log", title=EVAL_NAMES[split])
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle("lines: sampled in-run evaluations; dots: the whole set scored at the end")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)


def _write(out: str, name: str, doc: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        json.dump(doc, f, indent=1)
    print(os.path.join(out, name))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("specs", help="the MODELS value of a stage for tools/long_385m.sh")
    p.add_argument("stage", choices=sorted(STAGE_TOKENS))
    p.add_argument("--residual", default="params", choices=sorted(RESIDUAL.values()),
                   help="lr, final: the residual stream (default: the one stage 1 chose, fp32)")
    p.add_argument("--lr", nargs="*", default=[], help="final stage: MODEL=LR for each model")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--only", nargs="*", default=None,
                   help="only these run names (each must be one of the stage's; an empty MODELS would make "
                        "tools/long_385m.sh train its default pair)")
    p.add_argument("--grid", nargs="+", type=float, default=list(LR_GRID),
                   help="lr stage: the learning rates (default: %(default)s; add 1.5e-4 when a best is at 3e-4)")
    p = sub.add_parser("results", help="write a stage's result file from unpacked run folders")
    p.add_argument("stage", choices=sorted(STAGE_TOKENS))
    p.add_argument("--src", nargs="+", required=True)
    p.add_argument("--out", default=OUT)
    a = ap.parse_args(argv)
    if a.cmd == "specs":
        lrs = {k: float(v) for k, v in (x.split("=", 1) for x in a.lr)}
        out = specs(a.stage, a.residual, lrs, a.models, a.grid)
        if a.only is not None:
            names = [s.split("=", 1)[0] for s in out]
            unknown = sorted(set(a.only) - set(names))
            if unknown or not a.only:
                ap.error(f"--only {' '.join(unknown) or '(nothing)'}: not a run of this stage; its runs: {' '.join(names)}")
            out = [s for s in out if s.split("=", 1)[0] in a.only]
        print(" ".join(out))
    else:
        {"residual": results_residual, "lr": results_lr, "final": results_final}[a.stage](a.src, a.out)


if __name__ == "__main__":
    main()
