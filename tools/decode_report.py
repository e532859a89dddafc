"""Read a decoding benchmark (``make bench-inference``'s ``decode-<gpu>.json``) the way issue 28 asks:
like for like, the context where the Transformer's cache reads overtake TNL's constant step, and the targets.

    python tools/decode_report.py results/bench/decode-h100-80gb-hbm3.json

* **Like for like**: at each batch size and context, the two models through the same decoder (eager vs
  eager, graph vs graph, compiled-graph vs compiled-graph), and each model's fastest decoder against the
  other's ("best"). ``ratio`` = the Transformer's ms per token / TNL's.
* **Crossover**: per decoder and batch, (1) the context at which the Transformer's ms per token reaches
  TNL's, on straight lines between measured contexts (both models' times against the context). Where the
  Transformer is already slower at the first measured context, the crossover lies below it: the line through
  the Transformer's first two contexts says where its time would equal TNL's (``below``; None when that line
  does not reach TNL's time at any positive context, i.e. its cost without any context already exceeds
  TNL's step); where it is faster at every measured context, there is none in the range (``above``).
  (2) The cache's share: a least-squares line ``ms = fixed + per_token * ctx`` through the Transformer's
  times; ``cache_ctx`` = TNL's mean ms per token / ``per_token``, the context at which reading the KV cache
  alone takes as long as TNL's whole step.
* **Targets** (issue 28, one GPU, one run): TNL's default decoder (``choose_auto``'s choice, which
  ``auto_decoder`` implements; the header's ``auto`` is what the library chose when the file was written) at batch 1 at or
  below ``BATCH1_MS`` (by GPU) at every context 1K-64K and flat within +-5% of its mean; batch 16 at 16K at
  least ``BATCH16_TOKENS_PER_S`` (H100); the default decoder's first call at most 10 s; the Transformer's
  graph-captured static-cache decoders measured at every context that fits.

**Choosing ``decoder="auto"``**: ``choose_auto`` applies ``AUTO_RULE`` (fixed before the run that decides
it) to a file; ``tnlib.generation.auto_decoder`` is then set to what it says.

Notebook 08 and the README print their decoding figures through these functions.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

MODELS = ("tnl-385m", "transformer-385m")
SHARED = ("eager", "graph", "compiled-graph")  # decoders both models have
BATCH1_MS = {"H100": 0.45, "H200": 0.35}        # ms per token, by GPU family
BATCH16_TOKENS_PER_S = {"H100": 30_000}
FIRST_CALL_S = 10.0
FLAT = 0.05


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def ok_rows(doc: dict) -> list[dict]:
    """The rows that ran (no ``error``)."""
    return [r for r in doc["rows"] if "error" not in r and r.get("ms_per_token")]


def _series(rows, model, decoder, batch, key="ms_per_token") -> dict:
    """``{ctx: row[key]}`` of one model, decoder and batch size."""
    return {r["ctx"]: r.get(key) for r in rows if (r["model"], r["decoder"], r["batch"]) == (model, decoder, batch)}


def like_for_like(rows: list[dict], batch: int) -> list[dict]:
    """Rows ``{"decoder", "ctx", "tnl_ms", "transformer_ms", "ratio"}`` for each shared decoder and context both
    models ran at ``batch``, then ``decoder="best"`` (each model's fastest decoder at that context, named in
    ``tnl_decoder`` / ``transformer_decoder``; only at contexts where both ran every decoder they have)."""
    out = []
    for dec in SHARED:
        a, b = _series(rows, MODELS[0], dec, batch), _series(rows, MODELS[1], dec, batch)
        for ctx in sorted(set(a) & set(b)):
            out.append(dict(decoder=dec, ctx=ctx, tnl_ms=a[ctx], transformer_ms=b[ctx], ratio=b[ctx] / a[ctx]))
    def complete(m):  # contexts where model m ran every decoder it ran at this batch
        decs = {r["decoder"] for r in rows if (r["model"], r["batch"]) == (m, batch)}
        return {c for c in {r["ctx"] for r in rows if (r["model"], r["batch"]) == (m, batch)}
                if decs <= {r["decoder"] for r in rows if (r["model"], r["batch"], r["ctx"]) == (m, batch, c)}}

    for ctx in sorted(complete(MODELS[0]) & complete(MODELS[1])):
        best = {m: min((r for r in rows if (r["model"], r["batch"], r["ctx"]) == (m, batch, ctx)),
                       key=lambda r: r["ms_per_token"]) for m in MODELS}
        a, b = best[MODELS[0]], best[MODELS[1]]
        out.append(dict(decoder="best", ctx=ctx, tnl_ms=a["ms_per_token"], transformer_ms=b["ms_per_token"],
                        ratio=b["ms_per_token"] / a["ms_per_token"], tnl_decoder=a["decoder"],
                        transformer_decoder=b["decoder"]))
    return out


def _interp(series: dict, ctx: float) -> float:
    xs = sorted(series)
    for x0, x1 in zip(xs, xs[1:]):
        if x0 <= ctx <= x1:
            return series[x0] + (series[x1] - series[x0]) * (ctx - x0) / (x1 - x0)
    raise ValueError(ctx)


def crossover(rows: list[dict], decoder: str, batch: int) -> dict | None:
    """``{"where": "between" | "below" | "above", "ctx": context or None, "fixed_ms", "per_token_ms",
    "cache_ctx"}`` for one shared decoder at ``batch`` (see the module docstring); None where the two models
    share fewer than two contexts."""
    a, b = _series(rows, MODELS[0], decoder, batch), _series(rows, MODELS[1], decoder, batch)
    ctxs = sorted(set(a) & set(b))
    if len(ctxs) < 2:
        return None
    xs, ys = zip(*sorted(b.items()))
    per_token = statistics.linear_regression(xs, ys).slope if len(xs) > 1 else 0.0
    fit = dict(fixed_ms=statistics.fmean(ys) - per_token * statistics.fmean(xs), per_token_ms=per_token,
               cache_ctx=statistics.fmean(a.values()) / per_token if per_token > 0 else None)
    diff = {c: b[c] - a[c] for c in ctxs}  # > 0: the Transformer slower
    if diff[ctxs[0]] >= 0:
        (c0, t0), (c1, t1) = sorted(b.items())[:2]
        slope = (t1 - t0) / (c1 - c0)
        at = c0 + (a[ctxs[0]] - t0) / slope if slope > 0 else None  # on the Transformer's line, TNL's first time
        return dict(where="below", ctx=at if at is not None and at > 0 else None, **fit)
    for c0, c1 in zip(ctxs, ctxs[1:]):
        if diff[c0] < 0 <= diff[c1]:
            lo, hi = c0, c1
            for _ in range(60):  # bisection on the two piecewise-linear curves
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _interp(b, mid) < _interp(a, mid) else (lo, mid)
            return dict(where="between", ctx=(lo + hi) / 2, **fit)
    return dict(where="above", ctx=None, **fit)


def gpu_family(doc: dict) -> str | None:
    gpu = doc["header"].get("gpu")
    gpu = gpu[0] if isinstance(gpu, list) else gpu
    return next((f for f in ("H100", "H200") if gpu and f in gpu), None)


def targets(doc: dict) -> dict:
    """Each of issue 28's targets: ``{"value", "target", "met"}`` (``met`` None where the file cannot say)."""
    rows, fam = ok_rows(doc), gpu_family(doc)
    auto = choose_auto(doc).get(MODELS[0], {})
    out = {}
    b1 = _series(rows, MODELS[0], auto.get("1"), 1)
    if b1:
        mean = statistics.fmean(b1.values())
        worst = max(b1.values())
        lim = BATCH1_MS.get(fam)
        out["tnl batch 1 ms/token (default decoder, worst context)"] = dict(
            value=worst, target=lim, met=None if lim is None else worst <= lim, decoder=auto.get("1"))
        spread = max(abs(v / mean - 1) for v in b1.values())
        out["tnl batch 1 flat (largest deviation from the mean)"] = dict(value=spread, target=FLAT, met=spread <= FLAT)
    b16 = _series(rows, MODELS[0], auto.get("16"), 16, "tokens_per_s")
    if 16384 in b16:
        lim = BATCH16_TOKENS_PER_S.get(fam)
        out["tnl batch 16 at 16K tokens/s (default decoder)"] = dict(
            value=b16[16384], target=lim, met=None if lim is None else b16[16384] >= lim, decoder=auto.get("16"))
    first = next((f for f in _series(rows, MODELS[0], auto.get("1"), 1, "first_call_s").values() if f is not None),
                 None)
    out["tnl first call s (default decoder, fresh process)"] = dict(
        value=first, target=FIRST_CALL_S, met=None if first is None else first <= FIRST_CALL_S)
    tf = [r for r in doc["rows"] if r["model"] == MODELS[1] and r["decoder"] in ("graph", "compiled-graph")]
    unmeasured = [(r["decoder"], r["batch"], r["ctx"]) for r in tf
                  if "error" in r and not str(r["error"]).startswith("skipped")]
    out["transformer graph decoders measured wherever they fit"] = dict(
        value=f"{len(tf) - len(unmeasured)} of {len(tf)} rows", target="every row that fits",
        met=bool(tf) and not unmeasured, failed=unmeasured)
    return out


#: how ``decoder="auto"`` is chosen from a benchmark file (written before the run that decides it)
AUTO_RULE = ("per model and batch size: among the decoders measured at every context of that batch, the lowest "
             "mean ms per token over those contexts, among those whose first call in a fresh process took at most "
             f"{FIRST_CALL_S:.0f} s (where first calls were measured at that batch; else among all); eager if no "
             "graph decoder ran. auto_decoder applies the batch-1 choice up to 8 sequences and the batch-16 choice "
             "from 9 (the fused products switch from broadcast to tensor-core tiles between 8 and 16)")


def choose_auto(doc: dict) -> dict:
    """``{model: {batch (str): decoder}}`` by ``AUTO_RULE``."""
    rows, out = ok_rows(doc), {}
    for m in MODELS:
        for batch in sorted({r["batch"] for r in rows if r["model"] == m}):
            mine = [r for r in rows if (r["model"], r["batch"]) == (m, batch)]
            ctxs = {r["ctx"] for r in mine}
            full = {d for d in {r["decoder"] for r in mine} if {r["ctx"] for r in mine if r["decoder"] == d} == ctxs}
            mean = {d: statistics.fmean(r["ms_per_token"] for r in mine if r["decoder"] == d) for d in full}
            first = {d: next((r["first_call_s"] for r in mine if r["decoder"] == d and r.get("first_call_s")), None)
                     for d in full}
            quick = {d for d in full if first[d] is not None and first[d] <= FIRST_CALL_S}
            pool = quick if any(v is not None for v in first.values()) and quick else full
            graphs = {d for d in pool if d != "eager"}
            out.setdefault(m, {})[str(batch)] = min(graphs, key=mean.get) if graphs else "eager"
    return out


def report(doc: dict, out=sys.stdout) -> None:
    rows = ok_rows(doc)
    h = doc["header"]
    print(f"GPU {h.get('gpu')}, commit {h.get('commit')}, auto: {h.get('auto')}", file=out)
    for batch in sorted({r["batch"] for r in rows}):
        print(f"\nbatch {batch}: ms per token, TNL vs Transformer (ratio = Transformer / TNL)", file=out)
        for r in like_for_like(rows, batch):
            extra = f"  ({r['tnl_decoder']} vs {r['transformer_decoder']})" if r["decoder"] == "best" else ""
            print(f"  {r['decoder']:15s} {r['ctx']:6d}  {r['tnl_ms']:8.3f} {r['transformer_ms']:8.3f}  {r['ratio']:6.2f}x"
                  f"{extra}", file=out)
        for dec in SHARED:
            c = crossover(rows, dec, batch)
            if c:
                at = "none at any context" if c["ctx"] is None and c["where"] == "below" else (
                    "beyond the measured contexts" if c["ctx"] is None else f"{c['ctx']:,.0f} tokens")
                cache = "never" if c["cache_ctx"] is None else f"{c['cache_ctx']:,.0f} tokens"
                print(f"  crossover, {dec}: {c['where']} the measured contexts: {at}; the Transformer's line: "
                      f"{c['fixed_ms']:.3f} ms + {c['per_token_ms'] * 1e3:.3f} us per context token, its cache "
                      f"reads alone equal TNL's step at {cache}", file=out)
    print(f"\ndecoder='auto' by the rule ({AUTO_RULE}): {choose_auto(doc)}; the file's: {h.get('auto')}", file=out)
    print("\ntargets:", file=out)
    for k, v in targets(doc).items():
        print(f"  {k}: {v}", file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="a decode-<gpu>.json of benchmarks/bench_inference.py")
    report(load(ap.parse_args(argv).path))


if __name__ == "__main__":
    main()
