"""Evaluate finished models with and without document masking (issue 29): each run of a sweep evaluates the way
it trained (``TrainConfig.document_mask``), so a masked row's perplexity and a plain row's differ in their
evaluation too. This scores every model both ways on the same tokens, so the training change and the
evaluation change can be told apart.

    python3 tools/document_mask_eval.py --work /tmp/abl-rows/work-document-mask --data /tmp/abl-rows/data \
        --out $OUT/document-mask-eval.json [--eval-tokens 262144] [--sets val eval-heldout]

Reads every ``<work>/<table>/<name>/seed<k>/final`` (``save_model``'s folder) and writes one row per model and
set: ``loss``/``ppl``/``bpb`` with ``document_mask`` False and True (``tnlib.train.evaluate``, the run's
``seq_len`` and batch size from its ``config.json`` beside ``final``), with provenance.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import torch

from tnlib.data import TokenFile
from tnlib.files import read_json
from tnlib.models import load_model
from tnlib.provenance import write_results
from tnlib.train import evaluate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="the sweep's work folder (<table>/<name>/seed<k>/final)")
    ap.add_argument("--data", required=True, help="the prepared data the runs trained on")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--sets", nargs="*", default=["val", "eval-heldout"])
    ap.add_argument("--eval-tokens", type=int, default=262144)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    eot = read_json(os.path.join(a.data, "meta.json"), "prepare the data again")["eot_id"]
    sets = {name: TokenFile.open(a.data, name) for name in a.sets}
    rows = []
    for final in sorted(glob.glob(os.path.join(a.work, "*", "*", "seed*", "final"))):
        key = os.path.relpath(os.path.dirname(final), a.work)
        metrics = os.path.join(os.path.dirname(final), "metrics.jsonl")
        with open(metrics) as f:
            start = json.loads(f.readline())
        cfg = start["config"]
        model = load_model(final, device=device)
        for name, tf in sets.items():
            row = dict(run=key, set=name, trained_with_document_mask=bool(cfg.get("document_mask")))
            for on in (False, True):
                r = evaluate(model, tf, cfg["seq_len"], a.eval_tokens, cfg["batch_size"], device, dtype, eot, on)
                tag = "masked" if on else "plain"
                row.update({f"{tag}_loss": r["loss"], f"{tag}_ppl": r["ppl"], f"{tag}_bpb": r["bpb"]})
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_results(a.out, rows, {"work": a.work, "data": a.data, "eval_tokens": a.eval_tokens})
        del model
    if not rows:
        raise SystemExit(f"no finished models under {a.work}/<table>/<name>/seed<k>/final")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
