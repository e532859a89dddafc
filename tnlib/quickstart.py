"""The quickstart: tnl-tiny vs transformer-tiny on the shipped sample, same tokens, on a CPU in minutes.

``make quickstart`` (or ``python -m tnlib quickstart``) writes everything under ``runs/quickstart/``:
the prepared sample (``data/``), both training runs (``tnl-tiny/``, ``transformer-tiny/``: metrics,
``checkpoint/`` and the saved model in ``final/``), both models' curves in one plot (``curves.png``),
``summary.json`` (with provenance) and ``summary.md``. The committed example in
``results/quickstart/`` is only rewritten when asked (``--out results/quickstart``).
"""
from __future__ import annotations

import os
import sys

__all__ = ["quickstart", "SAMPLE_CORPUS", "SAMPLE_TOKENIZER", "SAMPLE_EVALS", "DEFAULT_STEPS", "DEFAULT_THREADS"]

SAMPLE_CORPUS = "data/sample/gutenberg-sample.txt.xz"
SAMPLE_TOKENIZER = "data/sample/tokenizer.json"
SAMPLE_EVALS = {"heldout": "data/sample/heldout-sample.txt.xz", "wikitext-valid": "data/sample/wikitext103-valid-sample.txt"}
DEFAULT_STEPS = 300
# A fixed, small thread count: the tiny models' matmuls (d_model = 128) gain little from more threads,
# a shared CPU is not oversubscribed (which makes every thread wait on the others), and tokens/s are
# comparable between machines. 2 is the smallest machine we support.
DEFAULT_THREADS = 2


def quickstart(out: str = "runs/quickstart", steps: int = DEFAULT_STEPS, work: str = "runs/quickstart",
               threads: int = DEFAULT_THREADS) -> dict:
    """Prepare the sample, train both tiny models for ``steps`` steps on ``threads`` CPU threads, write
    the comparison to ``out``; returns the summary (per model: final metrics, median tokens/s)."""
    import torch

    from .data import prepare_data
    from .report import compare_runs
    from .train import TrainConfig, train

    for p in (SAMPLE_CORPUS, SAMPLE_TOKENIZER, *SAMPLE_EVALS.values()):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} is missing: run the quickstart from the repository root")
    evals = ("val", *(f"eval-{k}" for k in SAMPLE_EVALS))
    data_dir = os.path.join(work, "data")
    presets = ("tnl-tiny", "transformer-tiny")
    # every config is built (and type-checked) before any work starts
    cfgs = [TrainConfig(preset=preset, data=data_dir, out=os.path.join(work, preset), max_steps=steps, seq_len=256,
                        batch_size=8, lr=2e-3, warmup_steps=min(30, steps // 10), eval_every=max(1, steps // 6),
                        eval_tokens=32768, eval_sets=evals, ckpt_every=10**9, dtype="fp32")
            for preset in presets]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        print(f"[1/3] tokenizing the shipped sample into {data_dir}")
        prepare_data(SAMPLE_CORPUS, data_dir, tokenizer=SAMPLE_TOKENIZER, eval_sets=SAMPLE_EVALS, force=True)
        runs = {}
        for i, cfg in enumerate(cfgs):
            print(f"[{i + 2}/3] training {cfg.preset} for {steps} steps on the same tokens "
                  f"({threads} CPU thread{'s' * (threads > 1)})")
            res = train(cfg)
            if res.get("interrupted"):  # Ctrl-C / SIGTERM: train() checkpointed and returned; stop here too
                print(f"error: quickstart interrupted ({res['interrupted']}) while training {cfg.preset}; "
                      f"its checkpoint is in {os.path.join(cfg.out, 'checkpoint')}", file=sys.stderr)
                raise SystemExit(2)
            runs[cfg.preset] = os.path.join(cfg.out, "metrics.jsonl")
    finally:
        torch.set_num_threads(threads_before)
    doc = compare_runs(runs, out, "quickstart: tiny TNL vs tiny Transformer, same tokens (CPU)", evals,
                       {"steps": steps, "sample": SAMPLE_CORPUS, "threads": threads})
    print(open(os.path.join(out, "summary.md")).read())
    for preset in presets:
        print(f"{preset}: median {doc[preset]['tokens_per_s']:,.0f} tokens/s (the first 5 steps are warm-up, left out)")
    print(f"\nplot:             {os.path.join(out, 'curves.png')}")
    print(f"summary:          {os.path.join(out, 'summary.md')} (and summary.json, with provenance)")
    for preset in presets:
        run = os.path.join(work, preset)
        print(f"{preset + ':':<18}{os.path.join(run, 'final')} (saved model), {os.path.join(run, 'checkpoint')} "
              f"(resumable), {os.path.join(run, 'metrics.jsonl')}")
    print(f"try:              make generate CKPT={os.path.join(work, presets[0], 'final')} PROMPT=\"It was\"")
    return doc
