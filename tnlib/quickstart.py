"""The quickstart: tnl-tiny vs transformer-tiny on the shipped sample, same tokens, on a CPU in minutes.

``make quickstart`` (or ``python -m tnlib quickstart``) writes ``results/quickstart/``: both
models' curves in one plot (``curves.png``), ``summary.json`` (with provenance) and ``summary.md``.
"""
from __future__ import annotations

import os

__all__ = ["quickstart", "SAMPLE_CORPUS", "SAMPLE_TOKENIZER", "SAMPLE_EVALS"]

SAMPLE_CORPUS = "data/sample/gutenberg-sample.txt.xz"
SAMPLE_TOKENIZER = "data/sample/tokenizer.json"
SAMPLE_EVALS = {"heldout": "data/sample/heldout-sample.txt.xz", "wikitext-valid": "data/sample/wikitext103-valid-sample.txt"}


def quickstart(out: str = "results/quickstart", steps: int = 300, work: str = "runs/quickstart") -> dict:
    from .data import prepare_data
    from .report import compare_runs
    from .train import TrainConfig, train

    for p in (SAMPLE_CORPUS, SAMPLE_TOKENIZER, *SAMPLE_EVALS.values()):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} is missing: run the quickstart from the repository root")
    data_dir = os.path.join(work, "data")
    print(f"[1/3] tokenizing the shipped sample into {data_dir}")
    prepare_data(SAMPLE_CORPUS, data_dir, tokenizer=SAMPLE_TOKENIZER, eval_sets=SAMPLE_EVALS, force=True)
    evals = ("val", *(f"eval-{k}" for k in SAMPLE_EVALS))
    runs = {}
    for i, preset in enumerate(("tnl-tiny", "transformer-tiny")):
        print(f"[{i + 2}/3] training {preset} for {steps} steps on the same tokens")
        cfg = TrainConfig(preset=preset, data=data_dir, out=os.path.join(work, preset), max_steps=steps,
                          seq_len=256, batch_size=8, lr=2e-3, warmup_steps=30, eval_every=max(1, steps // 6),
                          eval_tokens=32768, eval_sets=evals, ckpt_every=10**9, dtype="fp32")
        train(cfg)
        runs[preset] = os.path.join(cfg.out, "metrics.jsonl")
    doc = compare_runs(runs, out, "quickstart: tiny TNL vs tiny Transformer, same tokens (CPU)", evals,
                       {"steps": steps, "sample": SAMPLE_CORPUS})
    print(open(os.path.join(out, "summary.md")).read())
    return doc
