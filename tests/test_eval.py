"""Evaluation (issue 26): whole-set scoring, bits per byte from the bytes scored, the WikiText detokenizer,
and the fair experiment's rules (tools/fair_385m.py)."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tnlib.data import (TokenFile, load_tokenizer, prepare_data, read_documents, token_byte_lengths,
                        wikitext_detokenize)
from tnlib.models import create_model
from tnlib.train import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data/sample/gutenberg-sample.txt.xz")
TOKENIZER = os.path.join(ROOT, "data/sample/tokenizer.json")
WIKI = os.path.join(ROOT, "data/sample/wikitext103-valid-sample.txt")


def _fair():
    spec = importlib.util.spec_from_file_location("fair_385m", os.path.join(ROOT, "tools", "fair_385m.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("raw, clean", [
    (" = Homarus gammarus = ", "= Homarus gammarus ="),
    (" = = Description = = ", "== Description =="),
    (" = = = Early life = = = ", "=== Early life ==="),
    (" ", ""),
    (" a length of 60 cm ( 24 in ) and a mass of 6 kilograms ( 13 lb ) , and bears . ",
     "a length of 60 cm (24 in) and a mass of 6 kilograms (13 lb), and bears."),
    (" weigh 0 @.@ 7 – 2 @.@ 2 kg , 1 @,@ 000 well @-@ known ", "weigh 0.7 – 2.2 kg, 1,000 well-known"),
    (' the lobsters are blue , only becoming " lobster red " on cooking ; ',
     'the lobsters are blue, only becoming "lobster red" on cooking;'),
    (" it 's what they 've said : I don 't know ! Really ? ", "it's what they've said: I don't know! Really?"),
    (" the players ' union [ 3 ] ", "the players' union [3]"),
    (" K 'awiil ", "K 'awiil"),  # a name's apostrophe is not a clitic: left alone
])
def test_wikitext_detokenize_examples(raw, clean):
    assert wikitext_detokenize(raw) == clean


def test_wikitext_detokenize_keeps_lines_and_shrinks_the_sample():
    raw = open(WIKI, encoding="utf-8").read()
    clean = wikitext_detokenize(raw)
    assert clean.count("\n") == raw.count("\n")  # paragraph structure kept
    assert " @" not in clean and " , " not in clean and " . " not in clean
    assert 0.90 < len(clean) / len(raw) < 0.99
    assert wikitext_detokenize(clean) == clean  # idempotent on its own output


def test_token_byte_lengths_count_the_utf8_bytes_of_the_text():
    tok = load_tokenizer(TOKENIZER)
    lengths = token_byte_lengths(tok)
    assert lengths[tok.token_to_id("<|endoftext|>")] == 0
    for text in ("It was a dark and stormy night — «naïve» café, 東京 🙂", open(WIKI, encoding="utf-8").read()):
        assert lengths[tok.encode(text).ids].sum() == len(text.encode("utf-8"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    meta = prepare_data(SAMPLE, str(out), tokenizer=TOKENIZER,
                        eval_sets={"wiki": WIKI, "wiki-detok": "wikitext-detok:" + WIKI})
    return str(out), meta


def test_prepare_applies_the_detok_transform(prepared):
    out, meta = prepared
    raw, detok = meta["splits"]["eval-wiki"], meta["splits"]["eval-wiki-detok"]
    assert detok["transform"] == "wikitext-detok" and "transform" not in raw
    assert detok["source"] == raw["source"] == WIKI
    (doc,) = read_documents(WIKI)  # a text file without separators is one document
    assert detok["bytes"] == len(wikitext_detokenize(doc).encode())
    assert detok["tokens"] < raw["tokens"]
    for split in ("train", "val", "eval-wiki", "eval-wiki-detok"):  # the byte table adds up to meta's bytes
        tf = TokenFile.open(out, split)
        assert tf.byte_lengths[np.asarray(tf.tokens)].sum() == meta["splits"][split]["bytes"]


def _reference_loss(model, tokens, seq_len, eot=0):
    """Sum of -log p over every token of the set, window by window, in float64 (no batching)."""
    stream = torch.tensor([eot] + [int(t) for t in tokens])
    total = 0.0
    for s in range(0, len(tokens), seq_len):
        x = stream[s : s + seq_len + 1][None]
        with torch.no_grad():
            logits = model(x[:, :-1]).double()
        total += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
    return total


def test_evaluate_scores_every_token_of_a_whole_set(prepared):
    out, meta = prepared
    tf = TokenFile.open(out, "eval-wiki")
    tf = TokenFile(tf.tokens[:1000], 0, tf.byte_lengths)  # 1,000 tokens: 3 windows of 300 and one of 100
    torch.manual_seed(0)
    model = create_model("tnl-tiny", vocab_size=4096).double()
    r = evaluate(model, tf, 300, None, 2, torch.device("cpu"), None)
    assert r["tokens"] == 1000
    assert r["bytes"] == tf.byte_lengths[np.asarray(tf.tokens)].sum()
    ref = _reference_loss(model, tf.tokens, 300)
    assert r["loss"] == pytest.approx(ref / 1000, rel=1e-6)  # evaluate takes the cross-entropy of fp32 logits
    assert r["bpb"] == pytest.approx(ref / math.log(2) / r["bytes"], rel=1e-6)  # evaluate takes the cross-entropy of fp32 logits
    # sampled: whole windows only, the first max_tokens targets
    s = evaluate(model, tf, 300, 700, 2, torch.device("cpu"), None)
    assert s["tokens"] == 600
    assert s["loss"] == pytest.approx(_reference_loss(model, tf.tokens[:600], 300) / 600, rel=1e-6)  # evaluate takes the cross-entropy of fp32 logits
    assert s["bytes"] == tf.byte_lengths[np.asarray(tf.tokens[:600])].sum()


# -- the fair experiment's rules ------------------------------------------------------------------------------

def _row(model, dtype="params", lr=6e-4, seed=1234, losses=None, diverged=False):
    losses = losses or {}
    final = {s: {"loss": losses.get(s, 3.0), "ppl": math.exp(losses.get(s, 3.0)), "bpb": 1.0}
             for s in ("val", "heldout", "wikitext-detok-valid")}
    return {"name": f"{model}-{dtype}-{lr}", "model": model, "residual_dtype": dtype, "lr": lr, "seed": seed,
            "final": final, "diverged": diverged, "tokens": 1}


def test_residual_rule_needs_both_models_within_the_margin():
    fair = _fair()
    base = [_row(m, d) for m in fair.MODELS for d in ("compute", "params")]
    assert fair.choose_residual(base)["choice"] == "compute"  # level: the faster stream
    worse = [_row("tnl-385m", "compute", losses={"heldout": 3.006})] + base[1:]
    got = fair.choose_residual(worse)
    assert got["choice"] == "params" and got["delta"]["tnl-385m"]["heldout"] == pytest.approx(0.006)
    within = [_row("transformer-385m", "compute", losses={"val": 3.004})] + [r for r in base if not (
        r["model"] == "transformer-385m" and r["residual_dtype"] == "compute")]
    assert fair.choose_residual(within)["choice"] == "compute"


def test_lr_rule_takes_the_lowest_val_loss_and_skips_diverged_runs():
    fair = _fair()
    rows = []
    for m in fair.MODELS:
        for lr, loss in zip(fair.LR_GRID, (3.2, 3.1, 3.05, 2.0)):
            rows.append(_row(m, lr=lr, losses={"val": loss}, diverged=lr == fair.LR_GRID[-1]))
    got = fair.choose_lr(rows)
    assert got["best"] == {m: 1.2e-3 for m in fair.MODELS} and not any(got["at_grid_edge"].values())


def test_seed_ratio_and_specs():
    fair = _fair()
    r = fair.seed_ratio([40.0, 42.0], [50.0, 48.0])
    assert r["min"] == pytest.approx(40 / 50) and r["max"] == pytest.approx(42 / 48)
    assert r["mean"] == pytest.approx(math.sqrt(40 * 42) / math.sqrt(50 * 48))
    spec = fair.specs("final", "params", {"tnl-385m": 1.2e-3, "transformer-385m": 2.4e-3})
    assert spec[0] == "tnl-s1=tnl-385m:m.residual_dtype=params:lr=0.0012:seed=1:tokens=80000000"
    assert len(fair.specs("lr")) == 8 and len(fair.specs("residual")) == 4
    extra = fair.specs("lr", grid=[1.5e-4])  # a rate beyond the grid's edge
    assert extra == ["tnl-lr1.5e-4=tnl-385m:m.residual_dtype=params:lr=0.00015:tokens=20000000",
                     "transformer-lr1.5e-4=transformer-385m:m.residual_dtype=params:lr=0.00015:tokens=20000000"]
    with pytest.raises(ValueError, match="learning rate of"):
        fair.specs("final")


def test_specs_only_refuses_a_name_the_stage_does_not_have(capsys):
    """A misspelt --only name is an error, not an empty MODELS (which tools/long_385m.sh would replace by its
    default pair of runs)."""
    fair = _fair()
    lr = ["--lr", "tnl-385m=6e-4", "transformer-385m=6e-4"]
    fair.main(["specs", "final", *lr, "--only", "tnl-s1", "transformer-s1"])
    assert capsys.readouterr().out.split() == [
        "tnl-s1=tnl-385m:m.residual_dtype=params:lr=0.0006:seed=1:tokens=80000000",
        "transformer-s1=transformer-385m:m.residual_dtype=params:lr=0.0006:seed=1:tokens=80000000"]
    for only in (["tnl-s3"], ["tnl-s1", "tnl_s2"], []):
        with pytest.raises(SystemExit):
            fair.main(["specs", "final", *lr, "--only", *only])
        assert "not a run of this stage" in capsys.readouterr().err


def test_residual_result_file_is_rebuilt_from_the_committed_runs(tmp_path):
    fair = _fair()
    doc = fair.results_residual([os.path.join(ROOT, "results/logs/fair-2026-12-05-h100")], str(tmp_path))
    committed = json.load(open(os.path.join(ROOT, "results/385m-fair/residual-2x2.json")))
    assert doc["choice"] == committed["choice"] == "params"
    assert [r["final"] for r in doc["rows"]] == [r["final"] for r in committed["rows"]]
    meta = json.load(open(os.path.join(ROOT, "results/logs/fair-2026-12-05-h100/data-meta.json")))
    for r in doc["rows"]:  # whole sets: every token of each split scored
        for name, split in fair.EVAL_NAMES.items():
            assert r["final"][split]["tokens"] == meta["splits"][name]["tokens"]


def _fake_run(root, name, model, seed, lr, ppl, tokens=3 * 32768):
    d = os.path.join(root, "runs", name)
    os.makedirs(d)
    start = {"event": "start", "config": {"preset": model, "lr": lr, "seed": seed, "max_steps": 3},
             "model": {"residual_dtype": "params"}, "provenance": {"commit": "abc", "gpu": "NVIDIA H200"}}
    steps = [{"step": i, "tokens": i * 32768, "loss": 5.0 - i / 10, "tokens_per_s": 2e5, "step_s": 0.16,
              **({"val_ppl": ppl * 1.2, "eval-heldout_ppl": ppl * 1.3} if i == 3 else {})} for i in (1, 2, 3)]
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in [start] + steps)
    evals = {s: {"loss": math.log(ppl * (1 + i)), "ppl": ppl * (1 + i), "bpb": 1.0 + i, "tokens": 1000 + i}
             for i, s in enumerate(("val", "eval-heldout", "eval-wikitext-detok-valid"))}
    with open(os.path.join(d, "final.json"), "w") as f:
        json.dump({"evals": evals}, f)


def test_final_summary_has_the_contract_keys(tmp_path):
    fair = _fair()
    src = str(tmp_path / "src")
    for m, short, lr, base in (("tnl-385m", "tnl", 6e-4, 40.0), ("transformer-385m", "transformer", 1.2e-3, 50.0)):
        for seed, bump in ((1, 0.0), (2, 2.0)):
            _fake_run(src, f"{short}-s{seed}", m, seed, lr, base + bump)
    doc = fair.results_final([src], str(tmp_path / "out"))
    saved = json.load(open(tmp_path / "out" / "summary.json"))
    assert saved["models"]["tnl-385m"]["seeds"] == [1, 2] and saved["models"]["tnl-385m"]["lr"] == 6e-4
    assert saved["models"]["transformer-385m"]["final"]["val"]["ppl"] == [50.0, 52.0]
    assert saved["models"]["transformer-385m"]["final"]["val"]["ppl_mean"] == pytest.approx(math.sqrt(50 * 52))
    assert saved["eval_tokens"] == {"val": 1000, "heldout": 1001, "wikitext-detok-valid": 1002}
    r = doc["ratio"]["val"]
    assert r["min"] == pytest.approx(40 / 52) and r["max"] == pytest.approx(42 / 50)
    assert r["mean"] == pytest.approx(math.sqrt(40 * 42 / (50 * 52)))
    # TNL 40/42 vs 50/52: every pairing lower, 1 - r = 0.18 beyond 2s = 2 * 3.45%
    assert doc["verdict"]["val"] == "TNL better" and saved["rule"] == fair.FINAL_RULE
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="not finished"):  # one seed has no final evals
        os.remove(os.path.join(src, "runs", "tnl-s2", "final.json"))
        fair.results_final([src], str(tmp_path / "out2"))


def test_final_comparison_rule():
    """FINAL_RULE: better / worse only when every seed pairing agrees and the gap exceeds twice the seed spread."""
    fair = _fair()
    assert fair.compare([40.0, 40.4], [50.0, 50.5])["verdict"] == "TNL better"
    assert fair.compare([50.0, 50.5], [40.0, 40.4])["verdict"] == "TNL worse"
    assert fair.compare([40.0, 52.0], [50.0, 51.0])["verdict"] == "level within the seed spread"  # a pairing disagrees
    # every pairing lower (r ~ 0.96), but the seeds spread 2.8% (2s = 5.6%): level
    close = fair.compare([48.0, 50.0], [51.0, 51.5])
    assert close["verdict"] == "level within the seed spread" and 1 - close["r"] < close["two_s"]
    assert fair.compare([50.0, 50.0], [50.0, 50.0])["verdict"] == "level within the seed spread"


def test_evaluate_command_scores_whole_sets_of_a_saved_model(prepared, tmp_path, capsys):
    import tnlib.__main__ as cli
    from tnlib.train import TrainConfig, train

    data, meta = prepared
    run = tmp_path / "run"
    train(TrainConfig(preset="tnl-tiny", data=data, out=str(run), seq_len=64, batch_size=2, max_steps=2,
                      eval_every=2, eval_tokens=128, progress=False))
    out = tmp_path / "evals.json"
    cli.main(["evaluate", "--checkpoint", str(run / "final"), "--data", data, "--seq-len", "256",
              "--batch-size", "4", "--out", str(out)])
    doc = json.load(open(out))
    assert set(doc["evals"]) == {"val", "eval-wiki", "eval-wiki-detok"}
    for name, r in doc["evals"].items():  # every token of every set, bytes from exactly those tokens
        assert r["tokens"] == r["set_tokens"] == meta["splits"][name]["tokens"]
        assert r["bytes"] == meta["splits"][name]["bytes"]
    assert "eval-wiki-detok" in capsys.readouterr().out
    cli.main(["evaluate", "--checkpoint", str(run / "final"), "--data", data, "--sets", "val", "--seq-len", "64",
              "--max-tokens", "100", "--out", str(out)])
    assert json.load(open(out))["evals"]["val"]["tokens"] == 64  # sampled: whole windows only
    with pytest.raises(SystemExit) as e:  # a split the data does not have: refused before the model loads
        cli.main(["evaluate", "--checkpoint", str(run / "final"), "--data", data, "--sets", "nope"])
    assert e.value.code == 2 and "no split 'nope'" in capsys.readouterr().err
