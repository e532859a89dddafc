"""tools/decode_report.py: like-for-like pairs, the crossover context and issue 28's targets, on made-up rows."""
import importlib.util
import io
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("decode_report", os.path.join(ROOT, "tools", "decode_report.py"))
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)
CTXS = (1024, 4096, 16384, 65536)


def _row(model, decoder, batch, ctx, ms, **kw):
    return dict(model=model, decoder=decoder, batch=batch, ctx=ctx, ms_per_token=ms, tokens_per_s=batch / ms * 1e3, **kw)


def _doc(tf_fixed=1.0, tf_per_token=1e-5, tnl=0.9, gpu="NVIDIA H100 80GB HBM3", first=5.0, fused_first=None):
    rows = []
    for ctx in CTXS:
        for dec, k in (("eager", 20.0), ("graph", 1.7), ("compiled-graph", 1.0)):
            rows.append(_row("tnl-385m", dec, 1, ctx, tnl * k, first_call_s=first if dec == "compiled-graph" else None))
            rows.append(_row("transformer-385m", dec, 1, ctx, (tf_fixed + tf_per_token * ctx) * k))
        rows.append(_row("tnl-385m", "fused-graph", 1, ctx, tnl * 0.8, first_call_s=fused_first))
        rows.append(_row("tnl-385m", "compiled-graph", 16, ctx, 0.5))
    rows.append(dict(model="transformer-385m", decoder="graph", batch=16, ctx=65536, error="skipped: does not fit"))
    header = dict(gpu=gpu, commit="abc", auto={"tnl-385m": {"1": "compiled-graph", "16": "compiled-graph"}})
    return dict(header=header, rows=rows)


def test_like_for_like_pairs_each_decoder_and_the_best():
    doc = _doc()
    pairs = R.like_for_like(R.ok_rows(doc), 1)
    graph = [p for p in pairs if p["decoder"] == "graph"]
    assert [p["ctx"] for p in graph] == list(CTXS)
    assert graph[0]["ratio"] == pytest.approx((1.0 + 1e-5 * 1024) / 0.9)
    best = [p for p in pairs if p["decoder"] == "best"]
    assert {(p["tnl_decoder"], p["transformer_decoder"]) for p in best} == {("fused-graph", "compiled-graph")}
    assert best[0]["tnl_ms"] == pytest.approx(0.72)


def test_crossover_between_below_and_above():
    # the Transformer faster at 1K (0.5 + 0.0102 ms), slower from ~40K: between the measured contexts
    c = R.crossover(R.ok_rows(_doc(tf_fixed=0.5, tf_per_token=1e-5)), "compiled-graph", 1)
    assert c["where"] == "between" and c["ctx"] == pytest.approx(40_000, rel=1e-6)
    assert c["per_token_ms"] == pytest.approx(1e-5) and c["fixed_ms"] == pytest.approx(0.5)
    assert c["cache_ctx"] == pytest.approx(0.9 / 1e-5)
    # slower already at 1K, and even without context (fixed 1.0 > 0.9): no crossover at any context
    c = R.crossover(R.ok_rows(_doc(tf_fixed=1.0)), "compiled-graph", 1)
    assert c["where"] == "below" and c["ctx"] is None
    # slower at 1K, but its line meets TNL's time at a positive context below it
    c = R.crossover(R.ok_rows(_doc(tf_fixed=0.89, tf_per_token=1e-4)), "compiled-graph", 1)
    assert c["where"] == "below" and c["ctx"] == pytest.approx(100)
    # faster everywhere
    assert R.crossover(R.ok_rows(_doc(tf_fixed=0.1, tf_per_token=1e-7)), "eager", 1) == dict(
        where="above", ctx=None, fixed_ms=pytest.approx(2.0), per_token_ms=pytest.approx(2e-6),
        cache_ctx=pytest.approx(18.0 / 2e-6))


def test_targets_read_the_default_decoders_rows():
    """The targets read the rows of the decoder ``choose_auto`` picks (not the header's ``auto``): here
    compiled-graph at batch 1, the only one with a first call within 10 s."""
    t = R.targets(_doc())
    b1 = t["tnl batch 1 ms/token (default decoder, worst context)"]
    assert b1["value"] == pytest.approx(0.9) and b1["target"] == 0.45 and b1["met"] is False
    assert t["tnl batch 1 flat (largest deviation from the mean)"]["met"] is True
    b16 = t["tnl batch 16 at 16K tokens/s (default decoder)"]
    assert b16["value"] == pytest.approx(32_000) and b16["met"] is True
    assert t["tnl first call s (default decoder, fresh process)"]["met"] is True
    assert t["transformer graph decoders measured wherever they fit"]["met"] is True  # the skipped row is no failure
    t = R.targets(_doc(tnl=0.3, gpu="NVIDIA H200", first=30.0, fused_first=40.0))  # none quick: the fastest, fused
    b1 = t["tnl batch 1 ms/token (default decoder, worst context)"]
    assert b1["decoder"] == "fused-graph" and b1["value"] == pytest.approx(0.24) and b1["met"] is True  # <= 0.35
    assert t["tnl batch 16 at 16K tokens/s (default decoder)"]["met"] is None  # no H200 target
    assert t["tnl first call s (default decoder, fresh process)"]["met"] is False


def test_report_prints_every_section():
    out = io.StringIO()
    R.report(_doc(), out)
    text = out.getvalue()
    assert "batch 1:" in text and "crossover, compiled-graph" in text and "targets:" in text


def test_choose_auto_by_the_rule():
    doc = _doc()  # fused-graph fastest at batch 1 but its first call unmeasured; compiled-graph's took 5 s
    assert R.choose_auto(doc)["tnl-385m"] == {"1": "compiled-graph", "16": "compiled-graph"}
    for r in doc["rows"]:  # once fused-graph's first call is measured and short, it wins batch 1
        if (r["model"], r["decoder"], r["batch"]) == ("tnl-385m", "fused-graph", 1):
            r["first_call_s"] = 3.0
    assert R.choose_auto(doc)["tnl-385m"]["1"] == "fused-graph"
    for r in doc["rows"]:  # ... but not if it took longer than FIRST_CALL_S
        if r.get("first_call_s") == 3.0:
            r["first_call_s"] = 12.0
    assert R.choose_auto(doc)["tnl-385m"]["1"] == "compiled-graph"
    # the Transformer: no first calls measured, so the fastest graph decoder at every context
    assert R.choose_auto(doc)["transformer-385m"] == {"1": "compiled-graph"}
    # a decoder missing a context is not a candidate
    doc["rows"] = [r for r in doc["rows"] if not (r["model"] == "transformer-385m" and r["decoder"] == "compiled-graph"
                                                  and r["ctx"] == 65536)]
    assert R.choose_auto(doc)["transformer-385m"] == {"1": "graph"}


def test_committed_benchmark_decides_what_auto_decoder_implements():
    """``tnlib.generation.auto_decoder`` is set to what ``AUTO_RULE`` picks from each committed
    ``results/bench/decode-<gpu>.json`` (``tests/test_generate.py`` checks the function's choices)."""
    import glob

    paths = glob.glob(os.path.join(ROOT, "results", "bench", "decode-*.json"))
    assert paths
    for path in paths:
        auto = R.choose_auto(R.load(path))
        assert auto["tnl-385m"] == {"1": "fused-graph", "16": "fused-graph"}, path
        assert auto["transformer-385m"] == {"1": "eager", "16": "compiled-graph"}, path
