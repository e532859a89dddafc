"""The README's result tables say what the committed result files say (the ablation table of
results/ablation/summary.json, the residual-precision table of results/385m-fair/residual-2x2.json, the fair
comparison's table of results/385m-fair/summary.json)."""
import json
import math
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_section(title: str) -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(title)
    nxt = re.search(r"\n#{2,3} ", text[start + len(title):])
    return text[start: start + len(title) + (nxt.start() if nxt else len(text))]


def _table_rows(section: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return rows[1:]  # without the header


def _num(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("K"))


def test_ablation_table_matches_the_summary():
    summary = json.load(open(os.path.join(ROOT, "results/ablation/summary.json")))
    rows = _table_rows(_readme_section("## Ablations"))
    assert len(rows) == len(summary["rows"])
    for cells, r in zip(rows, summary["rows"]):
        label, params, paper, ours, verdict, books = cells
        assert label.startswith(r["table"] if r["table"] not in ("default", "ours") else r["table"][:3]), (label, r)
        assert params == f"{r['params'] / 1e6:.2f}M"
        s = r["val_ppl_stats"]
        if s["mean"] is None:
            assert ours == "not run yet" and verdict == "—"
            continue
        m = re.match(r"([\d.]+) ± ([\d.]+)(?: \(([-+][\d.]+)%\))?", ours)
        assert m, ours
        assert float(m.group(1)) == round(s["mean"], 2) and float(m.group(2)) == round(s["std"], 2)
        if r["table"] != "default":
            assert float(m.group(3)) == round(r["delta_pct"], 2)
            assert verdict == r["verdict"] and books == r["verdict_heldout"]
        if r.get("paper_ppl") is not None:
            assert paper.startswith(f"{r['paper_ppl']:.3f}")


def test_residual_table_matches_the_2x2_file():
    doc = json.load(open(os.path.join(ROOT, "results/385m-fair/residual-2x2.json")))
    rows = _table_rows(_readme_section("### How the fair comparison was set up"))
    names = {"TNL-385M": "tnl-385m", "Transformer-385M": "transformer-385m"}
    dtype = {"bf16": "compute", "fp32": "params"}
    assert len(rows) == 4
    for label, val, held, wiki, tps in rows:
        model, stream = label.split(", ")
        r = next(x for x in doc["rows"] if x["model"] == names[model] and x["residual_dtype"] == dtype[stream])
        assert _num(val) == round(r["final"]["val"]["ppl"], 2)
        assert _num(held) == round(r["final"]["heldout"]["ppl"], 2)
        assert _num(wiki) == round(r["final"]["wikitext-detok-valid"]["ppl"], 1)
        assert math.isclose(_num(tps), round(r["tokens_per_s"] / 1e3, 1))
    assert doc["choice"] == "params"


def test_fair_comparison_table_matches_the_summary():
    doc = json.load(open(os.path.join(ROOT, "results/385m-fair/summary.json")))
    rows = _table_rows(_readme_section("### The fair comparison"))
    assert [r[0] for r in rows] == ["val", "heldout", "wikitext-detok-valid", "wikitext-detok-test", "wikitext-valid",
                                    "wikitext-test"]
    assert {r[0] for r in rows} == set(doc["ratio"])
    for name, tokens, tnl, transformer, ratio, verdict in rows:
        assert _num(tokens) == doc["eval_tokens"][name]
        for cell, model in ((tnl, "tnl-385m"), (transformer, "transformer-385m")):
            f = doc["models"][model]["final"][name]
            m = re.fullmatch(r"([\d.,]+) / ([\d.,]+) \(([\d.,]+)\)", cell)
            assert m and [_num(x) for x in m.groups()] == [round(x, 2) for x in f["ppl"] + [f["ppl_mean"]]], cell
        m = re.fullmatch(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", ratio)
        q = doc["ratio"][name]
        assert m and [float(g) for g in m.groups()] == [round(q[k], 3) for k in ("mean", "min", "max")], ratio
        assert verdict == doc["verdict"][name]


def _decode_ab():
    """The PDL A/B (``results/logs/decode-pdl-2026-12-06-h100``): per variant, round 1 and 2's fused-graph
    ms/token at batch 1 and 16 from the logs, and (``<variant>_row``) round 2's batch-1 row from its JSON as printed."""
    out = {}
    for v in ("plain", "pdl"):
        d = os.path.join(ROOT, "results/logs/decode-pdl-2026-12-06-h100", v)
        for r in (1, 2):
            rows = [ln.split() for ln in open(os.path.join(d, f"log{r}.txt")) if ln.startswith("tnl-385m ")]
            out.setdefault(v, {})[r] = [float(x[4]) for x in rows if x[2] == "1"]
            out.setdefault(v + "16", {})[r] = [float(x[4]) for x in rows if x[2] == "16"]
        doc = json.load(open(os.path.join(d, "decode-h100-80gb-hbm3.json")))
        assert doc["header"]["gpu"] == "NVIDIA H100 80GB HBM3" and doc["header"]["commit"].startswith("08aea14")
        assert doc["header"]["impl"] == ({} if v == "plain" else dict(decode_pdl="true", decode_prefetch="true"))
        b1 = sorted((r["ctx"], r["ms_per_token"]) for r in doc["rows"] if r.get("batch") == 1 and "ms_per_token" in r)
        assert [round(m, 3) for _, m in b1] == out[v][2]  # the JSON is round 2
        out[v + "_row"] = " / ".join(f"{m:.3f}" for _, m in b1)
    return out


def test_decode_rows_match_the_one_run_file():
    """The README's decode rows say what ``results/bench/decode-h100-80gb-hbm3.json`` (one H100 run of both
    models) says, for the decoders ``decoder="auto"`` picks there and like for like."""
    doc = json.load(open(os.path.join(ROOT, "results/bench/decode-h100-80gb-hbm3.json")))
    assert set(doc["header"]["gpu"]) == {"NVIDIA H100 80GB HBM3"} and {c[:7] for c in doc["header"]["commit"]} == {"1a39a23"}
    rows = {(r["model"], r["decoder"], r["batch"], r["ctx"]): r for r in doc["rows"] if "error" not in r and "ctx" in r}
    first = {(r["model"], r["decoder"]): r["first_call_s"] for r in doc["rows"] if r.get("first_call_s")}
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    ms = lambda m, d: " / ".join(f"{rows[m, d, 1, c]['ms_per_token']:.3f}" for c in (1024, 4096, 16384, 65536))  # noqa: E731
    line = next(x for x in lines if x.startswith("| batch-1 decode through `tnlib.generate`, 385M bf16"))
    assert f"TNL {ms('tnl-385m', 'fused-graph')} ms/token" in line
    assert f"Transformer {ms('transformer-385m', 'compiled-graph')} ms/token" in line
    line = next(x for x in lines if x.startswith("| same, like for like: both models' step compiled"))
    assert f"TNL {ms('tnl-385m', 'compiled-graph')} |" in line
    pdl = _decode_ab()
    line = next(x for x in lines if x.startswith("| TNL's default decoder at batch 1 (`decoder=\"auto\"`"))
    assert f"| {pdl['pdl_row']} ms/token | plain: {pdl['plain_row']} |" in line
    gain = [1 - p / q for r in (1, 2) for p, q in zip(pdl["pdl"][r], pdl["plain"][r])]
    slow = [p / q for r in (1, 2) for p, q in zip(pdl["pdl16"][r], pdl["plain16"][r])]
    flat = " ".join(" ".join(lines).split())  # the prose, line breaks as spaces
    assert 0.015 < min(gain) and max(gain) < 0.055 and "2-5% faster at batch 1 at every context in both rounds" in flat
    assert 1.65 < min(slow) and max(slow) < 1.85 and "1.7-1.8x slower at batch 16" in flat
    line = next(x for x in lines if x.startswith("| batch-16 decode at 16K context"))
    assert f"TNL {rows['tnl-385m', 'fused-graph', 16, 16384]['tokens_per_s']:,.0f} tokens/s" in line
    assert f"Transformer {rows['transformer-385m', 'compiled-graph', 16, 16384]['tokens_per_s']:,.0f} tokens/s" in line
    line = next(x for x in lines if x.startswith("| first call of TNL's default decoder in a fresh process"))
    assert f"TNL {first['tnl-385m', 'fused-graph']:.1f} s" in line
    assert f"`\"compiled-graph\"` {first['transformer-385m', 'compiled-graph']:.1f} s" in line
    text = flat
    tnl = [rows["tnl-385m", "fused-graph", 1, c]["ms_per_token"] for c in (1024, 4096, 16384, 65536)]
    tf = [rows["transformer-385m", "compiled-graph", 1, c]["ms_per_token"] for c in (1024, 4096, 16384, 65536)]
    mean = sum(tnl) / len(tnl)
    assert max(abs(t / mean - 1) for t in tnl) < 0.02 and "within 2% of its mean from 1K to 64K" in text
    assert f"{tf[0] / tnl[0]:.1f}x faster at 1K, {tf[-1] / tnl[-1]:.1f}x at 64K" in text
    assert f"({max(pdl['pdl'][2]):.3f} at worst with PDL)" in text
    assert f"and 16K ({rows['tnl-385m', 'fused-graph', 16, 16384]['tokens_per_s']:,.0f}) are missed" in text
