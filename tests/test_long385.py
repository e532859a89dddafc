"""The longer 385M comparison's tooling (issue 16) on fake runs: the ratio curve's alignment of eval points,
the results folder, the progress line and the data parts. The device chain itself (tools/long_385m.sh with
TINY=1) runs by hand: ``bash tools/long_385m_tiny.sh`` (~2.5 min on 2 cores)."""
import hashlib
import importlib.util
import json
import lzma
import math
import os
import random
import subprocess
import sys

import pytest

from tnlib.report import ppl_ratio_curve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EVALS = ("val", "eval-heldout", "eval-wikitext-valid")


def _fake_metrics(path, preset, steps, eval_every, per_step, ppl0, seed, final_eval_at=None):
    """A metrics.jsonl shaped like tnlib.train's: a start event, one line per step, evals every ``eval_every``."""
    rng = random.Random(seed)
    prov = {"command": f"python3 -m tnlib train --preset {preset}", "commit": "abc123", "gpu": "NVIDIA H200",
            "cpu": "x86_64", "torch": "2.11", "triton": "3.6", "cuda": "13.0", "python": "3.12", "date": "2026-12-03T00:00:00+00:00"}
    recs = [{"event": "start", "params": 384_000_000, "provenance": prov,
             "config": {"preset": preset, "max_steps": steps, "seq_len": 2048, "batch_size": 16, "grad_accum": 1}}]
    for s in range(1, steps + 1):
        r = {"step": s, "tokens": s * per_step, "loss": 5 - s / steps, "tokens_per_s": 150_000 + rng.random(),
             "step_s": 0.2, "elapsed_s": 0.2 * s, "mfu": 0.4, "mem_gb": 60.0}
        if s % eval_every == 0 or s == steps:
            for i, e in enumerate(EVALS):
                ppl = ppl0 * (1 + i) * (1 + 1 / s)
                r.update({f"{e}_loss": math.log(ppl), f"{e}_ppl": ppl, f"{e}_bpb": 1.5 + i})
        recs.append(r)
    if final_eval_at:
        recs.append({"event": "final_eval", "step": steps, "tokens": final_eval_at, "val_ppl": ppl0})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return recs


def test_ppl_ratio_curve_aligns_eval_points_by_tokens():
    # A evaluates every 100 tokens, B every 200 and once more at 600: only the shared tokens pair up
    a = [{"tokens": t, "val_ppl": 10.0 + t} for t in (100, 200, 300, 400)] + [{"tokens": 450, "loss": 1.0}]
    b = [{"tokens": t, "val_ppl": 2.0 * (10.0 + t)} for t in (200, 400, 600)] + [{"tokens": 100, "eval-heldout_ppl": 3}]
    assert ppl_ratio_curve(a, b, "val") == [(200, 0.5), (400, 0.5)]
    assert ppl_ratio_curve(a, b, "eval-heldout") == []
    # a later record at the same tokens (e.g. an end-of-run eval) wins
    assert ppl_ratio_curve(a + [{"tokens": 400, "val_ppl": 205.0}], b, "val")[-1] == (400, 205.0 / 820.0)


def test_results_folder(tmp_path):
    lr = _tool("long_385m")
    src, base, out_root = tmp_path / "back", tmp_path / "base", tmp_path / "results"
    per_step = 32768
    for name, ppl0 in (("tnl-385m", 40.0), ("transformer-385m", 50.0)):
        _fake_metrics(str(src / "runs" / name / "metrics.jsonl"), name, 40, 5, per_step, ppl0, 1)
        fin = {"evals": {e: {"loss": 3.0, "ppl": ppl0 * (k + 1), "bpb": 1.4, "tokens": 1000}
                         for k, e in enumerate(lr.FINAL_EVALS)},
               "samples": [{"prompt": p, "continuation": f" said the {name}.", "new_tokens": 4} for p in lr.PROMPTS]}
        (src / "runs" / name / "final.json").write_text(json.dumps(fin))
        (src / "runs" / name / "train.log").write_text("log\n")
        # the 45M baseline: other eval points (every 3 steps of fewer tokens)
        _fake_metrics(str(base / f"{name}-metrics.jsonl"), name, 24, 3, per_step, ppl0 * 1.2, 2)
    (src / "data-meta.json").write_text("{}")
    out = lr.results(str(src), str(out_root), str(base), extra={"machine": "fake"})
    assert os.path.basename(out) == "385m-1m"  # 40 steps x 32,768 tokens
    s = json.load(open(os.path.join(out, "summary.json")))
    for m in ("tnl", "transformer"):
        assert s[m]["tokens"] == 40 * per_step and s[m]["tokens_per_s"] > 150_000
        assert {f"{e}_{k}" for e in lr.FINAL_EVALS for k in ("ppl", "bpb")} <= set(s[m])
    for key in ("command", "commit", "gpu", "date", "machine"):
        assert s[key], key
    assert s["ppl_ratios"]["eval-wikitext-test_ppl"] == pytest.approx(40 * 4 / (50 * 4))
    curves = s["ppl_ratio_curves"]
    assert set(curves) == {"1M-token run", "45M-token run (results/385m)"}
    run = curves["1M-token run"]["val"]
    assert [t for t, _ in run] == [k * 5 * per_step for k in range(1, 9)]  # both runs' shared eval points
    assert all(r == pytest.approx(0.8) for _, r in run)
    b = curves["45M-token run (results/385m)"]["val"]
    assert [t for t, _ in b] == [k * 3 * per_step for k in range(1, 9)]
    assert curves["1M-token run"]["eval-wikitext-test"] == []  # the test set: end of run only
    for f in ("ratio.png", "curves.png", "summary.md", "samples.md", "tnl-385m-metrics.jsonl",
              "transformer-385m-metrics.jsonl", "tnl-385m-final.json", "data-meta.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    samples = open(os.path.join(out, "samples.md")).read()
    assert samples.count("said the tnl-385m.") == len(lr.PROMPTS) == samples.count("said the transformer-385m.")


def _fake_source(src, name, ppl0, lr=6e-4, commit="abc123", train_tokens=86_000_000):
    """One unpacked long385.tar.gz holding one model's run (as `MODELS=<name> tools/long_385m.sh start` makes)."""
    recs = _fake_metrics(str(src / "runs" / name / "metrics.jsonl"), name, 40, 5, 32768, ppl0, 1)
    recs[0]["config"]["lr"] = lr
    recs[0]["provenance"]["commit"] = commit
    (src / "runs" / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (src / "data-meta.json").write_text(json.dumps({"tokenizer_sha256": "t", "sources": {f"/tmp/{name}/x.xz": "s1"},
                                                     "splits": {"train": {"tokens": train_tokens}}}))
    (src / "driver.log").write_text(f"driver: {name}\n")


def test_results_from_two_sessions(tmp_path):
    # each model trained on its own machine: combined when data, recipe and tokens agree (paths may differ)
    lr = _tool("long_385m")
    a, b = tmp_path / "a", tmp_path / "b"
    _fake_source(a, "tnl-385m", 40.0, commit="aaa111")
    _fake_source(b, "transformer-385m", 50.0, commit="bbb222")
    out = lr.results([str(a), str(b)], str(tmp_path / "r"), str(tmp_path / "no-baseline"))
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["runs"]["tnl"]["commit"] == "aaa111" and s["runs"]["transformer"]["commit"] == "bbb222"
    assert "aaa111" in s["commit"] and "bbb222" in s["commit"]
    assert s["ppl_ratios"]["val_ppl"] == pytest.approx(0.8)
    assert open(os.path.join(out, "driver-transformer-385m.log")).read() == "driver: transformer-385m\n"
    assert "aaa111" in open(os.path.join(out, "summary.md")).read()
    # a model found in no source, or in two
    with pytest.raises(FileNotFoundError, match="transformer"):
        lr.results([str(a)], str(tmp_path / "r2"))
    _fake_source(tmp_path / "c", "tnl-385m", 40.0)
    with pytest.raises(FileNotFoundError, match="tnl"):
        lr.results([str(a), str(b), str(tmp_path / "c")], str(tmp_path / "r3"))
    # another recipe (learning rate) or other data: refused before anything is written
    _fake_source(tmp_path / "d", "transformer-385m", 50.0, lr=3e-4)
    with pytest.raises(ValueError, match="lr=0.0003"):
        lr.results([str(a), str(tmp_path / "d")], str(tmp_path / "r4"))
    _fake_source(tmp_path / "e", "transformer-385m", 50.0, train_tokens=85_000_000)
    with pytest.raises(ValueError, match="same data"):
        lr.results([str(a), str(tmp_path / "e")], str(tmp_path / "r5"))
    assert not (tmp_path / "r4").exists() and not (tmp_path / "r5").exists()


def test_progress_line(tmp_path):
    lr = _tool("long_385m")
    _fake_metrics(str(tmp_path / "runs" / "tnl-385m" / "metrics.jsonl"), "tnl-385m", 40, 5, 32768, 40.0, 1)
    text = lr.progress(str(tmp_path), ["tnl-385m", "transformer-385m"])
    assert "tnl-385m: step 40/40" in text and "val ppl" in text and "transformer-385m: queued" in text
    recs = [json.loads(x) for x in open(tmp_path / "runs" / "tnl-385m" / "metrics.jsonl")]
    recs[0]["config"]["max_steps"] = 100  # 60 steps left at 0.2 s
    (tmp_path / "runs" / "tnl-385m" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert "ETA 0.2 min" in lr.progress(str(tmp_path), ["tnl-385m"])


def test_carry_parts_keep_every_document_in_order(tmp_path):
    rng = random.Random(0)
    words = [("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8)))) for _ in range(400)]
    texts, shards = [], []
    for k in range(3):  # three shards of 20 documents each
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(200, 600))) for _ in range(20)]
        text = "".join(d + "\n<|endoftext|>\n" for d in docs)
        texts.append(text)
        p = tmp_path / f"corpus-gutenberg-0{k}.txt.xz"
        p.write_bytes(lzma.compress(text.encode(), preset=6))
        shards.append(str(p))
    held = tmp_path / "gutenberg-heldout.txt.xz"
    held.write_bytes(lzma.compress(b"held out\n<|endoftext|>\n"))
    sizes = [os.path.getsize(s) for s in shards]
    max_bytes = int(sum(sizes) * 0.45)  # two parts, so one shard must be cut
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "long_385m_carry.py"), "--shards", *shards,
                          "--heldout", str(held), "--parts", "2", "--max-bytes", str(max_bytes),
                          "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rep = json.load(open(tmp_path / "c-parts.json"))
    got = ""
    files = sorted((f["file"], f["part"]) for f in rep["files"])  # name order = document order
    assert any(f["documents"] != "all" for f in rep["files"])
    for fname, part in files:
        with lzma.open(tmp_path / f"c-{part}" / fname, "rt") as f:
            got += f.read()
    whole = "".join(texts)
    assert whole.startswith(got) and len(got) > 0.85 * len(whole)  # a prefix of the documents, nothing reordered
    assert got.endswith("\n<|endoftext|>\n")
    for part in (1, 2):
        d = tmp_path / f"c-{part}"
        assert sum(os.path.getsize(d / f) for f in os.listdir(d)) <= max_bytes + 400  # + NPARTS, SHA256SUMS
        assert (d / "NPARTS").read_text().strip() == "2"
        for line in (d / "SHA256SUMS").read_text().splitlines():
            digest, name = line.split()
            assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest
    assert (tmp_path / "c-1" / "gutenberg-heldout.txt.xz").exists()
