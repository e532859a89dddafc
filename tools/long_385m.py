"""The Python half of tools/long_385m.sh (issue 16: TNL-385M vs Transformer-385M on the same >= 80M tokens).

    final    on the device, after a model's training: every eval set (the test set too, evaluated only
             here) on the final weights, and greedy continuations of PROMPTS -> RUN/final.json
    progress on the device: step, tokens, latest eval and an ETA of every model, from the metrics files
    results  here, after the run (PYTHONPATH=$PWD): results/385m-<tokens>/ from the unpacked run files (summary.json with
             the test set, both metrics files, samples.md, curves.png, and ratio.png: the TNL/Transformer
             perplexity ratio against tokens per eval set, the 45M run beside it). The two models may come
             from different calls or sessions (--src A B), checked for the same data, recipe and tokens
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

from tnlib.report import compare_runs, plot_ratio_curves, ppl_ratio_curve, read_metrics

#: the same prompts for both models (the first is the 45M run's)
PROMPTS = (
    "It was a dark and stormy night; the rain fell in torrents, except",
    "The old man sat by the fire and told the children",
    "CHAPTER I.\n\n",
    "She opened the letter with trembling hands, and read:",
)
#: eval sets scored during training (every ~5M tokens, sampled) in the 80M run of issue 16
TRAIN_EVALS = ("val", "eval-heldout", "eval-wikitext-valid")
#: eval sets the final weights are scored on, each whole (the test sets only here)
FINAL_EVALS = ("val", "eval-heldout", "eval-wikitext-valid", "eval-wikitext-test", "eval-wikitext-detok-valid",
               "eval-wikitext-detok-test")


def final(run: str, data: str, tokenizer: str, eval_tokens: int | None, seq_len: int, batch_size: int,
          max_new_tokens: int = 80, evals=FINAL_EVALS, prompts=PROMPTS) -> dict:
    """Evaluate ``run/final`` on each of ``evals`` the data has (``eval_tokens=None``: every token of each set,
    ``tnlib.train.evaluate``) and, unless ``max_new_tokens`` is 0, continue each prompt greedily; writes
    ``run/final.json``."""
    import torch

    from tnlib.data import TokenFile, load_tokenizer
    from tnlib.generation import generate
    from tnlib.models import load_model
    from tnlib.provenance import provenance
    from tnlib.train import evaluate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(os.path.join(run, "final"), device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None  # as in training (dtype=auto)
    res = {"evals": {}, "samples": [], "eval_tokens": eval_tokens, "seq_len": seq_len}
    with open(os.path.join(data, "meta.json")) as f:
        meta = json.load(f)
    for name in evals:
        if name in meta["splits"]:
            res["evals"][name] = evaluate(model, TokenFile.open(data, name), seq_len, eval_tokens, batch_size, device,
                                          amp, meta["eot_id"])
            res["evals"][name]["set_tokens"] = meta["splits"][name]["tokens"]
    tok = load_tokenizer(tokenizer)
    eot = tok.token_to_id("<|endoftext|>")
    model.eval()
    for p in prompts if max_new_tokens else ():
        ids = torch.tensor([tok.encode(p).ids], device=device)
        with torch.no_grad():  # fp32 weights, as `python -m tnlib generate` runs them
            out = generate(model, ids, max_new_tokens, temperature=0.0, eos_token_id=eot)
        new = [int(t) for t in out[0, ids.shape[1]:].tolist()]
        new = new[: new.index(eot)] if eot in new else new
        res["samples"].append({"prompt": p, "continuation": tok.decode(new), "new_tokens": len(new)})
    res["provenance"] = provenance()
    with open(os.path.join(run, "final.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def progress(root: str, models, assume_tps: float = 157_000.0) -> str:
    """One line per model: step/max, tokens, tokens/s, the latest eval and an ETA (queued models at
    ``assume_tps``); then the total ETA of what is left, one model after another or side by side."""
    lines, etas = [], []
    for m in models:
        path = os.path.join(root, "runs", m, "metrics.jsonl")
        done = os.path.exists(os.path.join(root, "runs", m, "final.json"))
        recs = read_metrics(path) if os.path.exists(path) else []
        start = next((r for r in recs if r.get("event") == "start"), None)
        steps = [r for r in recs if "tokens_per_s" in r]
        if not start:
            lines.append(f"{m}: queued")
            etas.append(None)
            continue
        cfg = start["config"]
        max_steps, per_step = cfg["max_steps"], cfg["seq_len"] * cfg["batch_size"] * cfg.get("grad_accum", 1)
        if not steps:
            lines.append(f"{m}: started, compiling (0/{max_steps} steps)")
            etas.append(max_steps * per_step / assume_tps)
            continue
        last = steps[-1]
        window = steps[-min(len(steps), 200):]  # wall time per step over recent steps, evals included
        if len(window) > 1 and window[-1]["elapsed_s"] > window[0]["elapsed_s"]:
            s_per_step = (window[-1]["elapsed_s"] - window[0]["elapsed_s"]) / (window[-1]["step"] - window[0]["step"])
        else:
            s_per_step = last["step_s"]
        eta = 0.0 if done else (max_steps - last["step"]) * s_per_step
        etas.append(eta)
        tps = sorted(r["tokens_per_s"] for r in window)[len(window) // 2]
        ev = next((r for r in reversed(recs) if "val_ppl" in r), None)
        evtxt = ("; eval @%.1fM: " % (ev["tokens"] / 1e6) + ", ".join(
            f"{k[:-4]} ppl {ev[k]:.2f}" for k in ev if k.endswith("_ppl"))) if ev else ""
        state = "done" if done else ("trained, final evals" if last["step"] >= max_steps else f"ETA {eta / 60:.1f} min")
        lines.append(f"{m}: step {last['step']}/{max_steps}, {last['tokens'] / 1e6:.1f}M tokens, "
                     f"{tps:,.0f} tokens/s, loss {last['loss']:.3f}{evtxt}; {state}")
    known = [e for e in etas if e is not None]
    if known and len(known) == len(etas):
        lines.append(f"left: {sum(known) / 60:.1f} min one after another, {max(known) / 60:.1f} min side by side")
    return "\n".join(lines)


def budget_name(tokens: int) -> str:
    """The results folder's name for a token budget: ``385m-80m`` for 80,019,456 tokens."""
    return f"385m-{round(tokens / 1e6)}m"


#: config fields that do not change what a model learns (paths, checkpoint cadence, the progress bar)
RECIPE_FREE = ("preset", "out", "data", "ckpt_every", "progress")


def _same_data(metas: dict) -> None:
    """``metas = {src: data-meta.json dict}``: the same training and eval tokens (split sizes, tokenizer and the
    sha256 of every source file), else ValueError. Paths may differ (each machine stages its own copy)."""
    def key(m):
        splits = {n: {k: v for k, v in sp.items() if k != "source"} for n, sp in m.get("splits", {}).items()}
        return (m.get("tokenizer_sha256"), json.dumps(splits, sort_keys=True), sorted(m.get("sources", {}).values()))
    keys = {src: key(m) for src, m in metas.items()}
    if len(set(map(str, keys.values()))) > 1:
        raise ValueError("the sources did not train on the same data (data-meta.json differs): " + ", ".join(keys))


def _same_recipe(starts: dict) -> None:
    """``starts = {label: start event}``: the same training config apart from ``RECIPE_FREE``, else ValueError.
    Only the fields both configs have are compared (a field added to TrainConfig later had no other value before)."""
    cfgs = {lbl: {k: v for k, v in s.get("config", {}).items() if k not in RECIPE_FREE} for lbl, s in starts.items()}
    first_lbl, first = next(iter(cfgs.items()))
    for lbl, cfg in cfgs.items():
        diff = sorted(k for k in set(cfg) & set(first) if cfg[k] != first[k])
        if diff:
            raise ValueError(f"{lbl} and {first_lbl} did not train with the same recipe: "
                             + ", ".join(f"{k}={cfg.get(k)!r} vs {first.get(k)!r}" for k in diff))


def results(src, out_root: str = "results", baseline: str = "results/385m",
            models=("tnl=tnl-385m", "transformer=transformer-385m"), extra: dict | None = None) -> str:
    """``src``: an unpacked ``long385.tar.gz`` (``runs/<model>/{metrics.jsonl,final.json,train.log}``,
    ``data-meta.json``, ``driver.log``), or a list of them when the models trained in different calls or sessions
    (``MODELS=... tools/long_385m.sh start``): each model is taken from the one source that holds it, and the
    sources must hold the same data and the models the same recipe and token count (ValueError otherwise).
    Writes ``out_root/385m-<tokens>/`` and returns its path."""
    srcs = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    pairs = [m.split("=", 1) for m in models]
    where = {}
    for label, m in pairs:
        found = [s for s in srcs if os.path.exists(os.path.join(s, "runs", m, "metrics.jsonl"))]
        if len(found) != 1:
            raise FileNotFoundError(f"{label}: runs/{m}/metrics.jsonl is in {len(found)} of the sources "
                                    f"{srcs} (unpack each long385.tar.gz into its own folder; one per model)")
        where[label] = found[0]
    runs = {label: os.path.join(where[label], "runs", m, "metrics.jsonl") for label, m in pairs}
    recs = {label: read_metrics(p) for label, p in runs.items()}
    used = list(dict.fromkeys(where.values()))
    metas = {s: json.load(open(os.path.join(s, "data-meta.json"))) for s in used
             if os.path.exists(os.path.join(s, "data-meta.json"))}
    _same_data(metas)
    _same_recipe({label: next((r for r in rs if r.get("event") == "start"), {}) for label, rs in recs.items()})
    finals = {}
    for label, m in pairs:
        fp = os.path.join(where[label], "runs", m, "final.json")
        finals[label] = json.load(open(fp)) if os.path.exists(fp) else None
    ends = {label: [r for r in rs if "tokens_per_s" in r][-1]["tokens"] for label, rs in recs.items()}
    if len(set(ends.values())) > 1:
        raise ValueError(f"the models did not train on the same number of tokens: {ends}")
    tokens = ends[pairs[0][0]]
    out = os.path.join(out_root, budget_name(tokens))
    os.makedirs(out, exist_ok=True)
    doc = compare_runs(runs, out, f"TNL-385M vs Transformer-385M: the same {tokens / 1e6:.0f}M tokens",
                       evals=TRAIN_EVALS, extra=extra)
    # each model's own machine, commit and date (they differ when the models trained in different sessions)
    doc["runs"] = {label: {k: (doc[label].get("provenance") or {}).get(k)
                           for k in ("commit", "gpu", "torch", "triton", "date", "command")} for label, _ in pairs}
    for label, fin in finals.items():  # the end-of-run evals (the test set only here)
        if fin:
            for name, r in fin["evals"].items():
                doc[label].update({f"{name}_{k}": r[k] for k in ("loss", "ppl", "bpb")})
    a, b = (lbl for lbl, _ in pairs[:2])
    doc["ppl_ratios"] = {k: doc[a][k] / doc[b][k] for k in doc[a] if k.endswith("_ppl") and doc[b].get(k)}
    doc["final_evals_note"] = ("eval-wikitext-test and the *_ppl/_bpb of every set at the end come from "
                               "final.json (the final weights, evaluated after training)")
    curves = {f"{tokens / 1e6:.0f}M-token run": {e: ppl_ratio_curve(recs[a], recs[b], e) for e in FINAL_EVALS}}
    base = {lbl: os.path.join(baseline, f"{m}-metrics.jsonl") for lbl, m in pairs}
    if all(os.path.exists(p) for p in base.values()):
        curves["45M-token run (results/385m)"] = {e: ppl_ratio_curve(base[a], base[b], e) for e in FINAL_EVALS}
    end_pts = {f"{tokens / 1e6:.0f}M-token run": {"eval-wikitext-test": doc["ppl_ratios"].get("eval-wikitext-test_ppl")}}
    doc["ppl_ratio_curves"] = {lbl: {e: [[t, r] for t, r in c] for e, c in by.items()} for lbl, by in curves.items()}
    plot_ratio_curves(curves, os.path.join(out, "ratio.png"), FINAL_EVALS,
                      f"TNL-385M / Transformer-385M perplexity at equal tokens", finals=end_pts)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(doc, f, indent=1)
    keys = ["params", "tokens", "tokens_per_s", "train_loss"] + [f"{e}_{k}" for e in FINAL_EVALS for k in ("ppl", "bpb")]
    rows = [f"| metric | {a} | {b} | {a}/{b} |", "|---|---|---|---|"]
    for key in keys:
        va, vb = doc[a].get(key), doc[b].get(key)
        fmt = lambda v: "-" if v is None else f"{v:,.3f}" if isinstance(v, float) else f"{v:,}"  # noqa: E731
        rows.append(f"| {key} | {fmt(va)} | {fmt(vb)} | " + (f"{va / vb:.3f}" if key.endswith("_ppl") and va and vb else "") + " |")
    made = "\n".join(f"- {lbl}: {r['date']}, commit {str(r['commit'])[:10]}, {r['gpu'] or 'CPU'}"
                     for lbl, r in doc["runs"].items())
    with open(os.path.join(out, "summary.md"), "w") as f:  # compare_runs' table plus the end-of-run evals
        f.write(f"# TNL-385M vs Transformer-385M, {tokens:,} tokens each\n\n{made}\n\n" + "\n".join(rows) + "\n")
    for label, m in pairs:
        shutil.copy(runs[label], os.path.join(out, f"{m}-metrics.jsonl"))
        for name, dst in (("train.log", f"{m}-train.log"), ("final.json", f"{m}-final.json")):
            p = os.path.join(where[label], "runs", m, name)
            if os.path.exists(p):
                shutil.copy(p, os.path.join(out, dst))
    if used[0] in metas:  # the same in every source (checked above)
        shutil.copy(os.path.join(used[0], "data-meta.json"), os.path.join(out, "data-meta.json"))
    for s in used:  # one driver log per source: named after the models it trained when there are several
        p = os.path.join(s, "driver.log")
        if os.path.exists(p):
            name = "driver.log" if len(used) == 1 else "driver-" + "-".join(
                m for lbl, m in pairs if where[lbl] == s) + ".log"
            shutil.copy(p, os.path.join(out, name))
    lines = [f"# Greedy samples after {tokens / 1e6:.0f}M tokens (same prompts, temperature 0)\n"]
    for i, p in enumerate(PROMPTS if not finals[a] else [s["prompt"] for s in finals[a]["samples"]]):
        lines.append(f"## Prompt {i + 1}\n\n```\n{p}\n```\n")
        for label, fin in finals.items():
            if fin:
                lines.append(f"**{label}**:\n\n```\n{p}{fin['samples'][i]['continuation']}\n```\n")
    with open(os.path.join(out, "samples.md"), "w") as f:
        f.write("\n".join(lines))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("final")
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--eval-tokens", type=int, default=None, help="per set (default: the whole set)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p = sub.add_parser("progress")
    p.add_argument("--root", required=True)
    p.add_argument("--models", nargs="+", required=True)
    p = sub.add_parser("results")
    p.add_argument("--src", nargs="+", required=True,
                   help="the unpacked long385.tar.gz; several when the models trained in different calls")
    p.add_argument("--out-root", default="results")
    p.add_argument("--baseline", default="results/385m")
    p.add_argument("--models", nargs="+", default=["tnl=tnl-385m", "transformer=transformer-385m"])
    p.add_argument("--extra", nargs="*", default=[], help="key=value added to summary.json")
    a = ap.parse_args(argv)
    if a.cmd == "final":
        r = final(a.run, a.data, a.tokenizer, a.eval_tokens, a.seq_len, a.batch_size, a.max_new_tokens)
        print(json.dumps({k: round(v["ppl"], 3) for k, v in r["evals"].items()}))
    elif a.cmd == "progress":
        print(progress(a.root, a.models))
    else:
        print(results(a.src, a.out_root, a.baseline, a.models, dict(e.split("=", 1) for e in a.extra)))


if __name__ == "__main__":
    main()
