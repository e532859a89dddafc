"""The official reference checkpoints (tests/data/official-tnl/{A,B}) through tnlib on this machine's GPU.

For each checkpoint and dtype (float32: the golden values' own dtype; bfloat16: the releases' dtype) it
loads with ``tnlib.load_official`` on the GPU and measures, against the official code's golden outputs:
logits max_rel per sequence (max |x - golden| / max |golden|), loss differences, the teacher-forced decode
step logits, and the greedy tokens of ``tnlib.generate`` through the CUDA-graph decoder and the
eager one. It writes ``{"header": provenance, "rows": [...]}`` to ``--out`` after every row and prints a
line per row; float32 rows say whether they meet the CPU tests' tolerances (logits 1e-4, losses 1e-5,
tokens equal where the golden top-1 margin > 1e-4). Run from the repository root:

    PYTHONPATH=$PWD python3 tools/check_official.py --out $OUT/official-check-h200.json

On a CPU it runs the PyTorch fallbacks, or the Triton kernels in their interpreter with
``TRITON_INTERPRET=1`` (slow: use ``--dtypes float32``).
"""
import argparse
import json
import os

import torch

from tnlib import DecoderCache, generate
from tnlib.official import load_official
from tnlib.provenance import write_results

DATA = "tests/data/official-tnl"


def max_rel(x, ref):
    ref = torch.as_tensor(ref, dtype=torch.float64)
    return float((x.double().cpu() - ref).abs().max() / ref.abs().max())


def check(name, dtype, device):
    g = json.load(open(os.path.join(DATA, name, "golden.json")))
    model = load_official(os.path.join(DATA, name), dtype=dtype, device=device)
    row = {"checkpoint": name, "dtype": str(dtype).replace("torch.", ""), "sequences": {}}
    with torch.no_grad():
        for s in g["sequences"]:
            ids = torch.tensor([s["input_ids"]], device=device)
            r = {"logits_max_rel": max_rel(model(ids)[0, s["logits_first_row"]:], s["logits"])}
            if s["loss"] is not None:
                r["loss_abs"] = abs(float(model(ids[:, :-1], targets=ids[:, 1:])) - s["loss"])
            row["sequences"][s["name"]] = r
    gr = g["greedy"]
    prompt = torch.tensor([gr["prompt_ids"]], device=device)
    logits, cache = model.step(prompt, last_only=True)
    rows = [logits[0, -1]]
    for t in gr["tokens"][:-1]:
        logits, cache = model.step(torch.tensor([[t]], device=device), cache)
        rows.append(logits[0, -1])
    row["step_logits_max_rel"] = max_rel(torch.stack(rows), gr["step_logits"])
    sure = [m > 1e-4 for m in gr["step_top1_margin"]]
    decoders = DecoderCache()  # this model's graph decoder, dropped with it when check() returns
    for graph in ((True, False) if device == "cuda" else (False,)):
        new = generate(model, prompt, len(gr["tokens"]), decoder="compiled-graph" if graph else "eager",
                       decoder_cache=decoders)[0, prompt.shape[1]:].tolist()
        row[f"greedy_equal_{'graph' if graph else 'eager'}"] = sum(a == b for a, b in zip(new, gr["tokens"]))
        row[f"greedy_sure_equal_{'graph' if graph else 'eager'}"] = all(
            a == b for a, b, s in zip(new, gr["tokens"], sure) if s)
    if dtype == torch.float32:
        row["meets_cpu_tolerances"] = (
            all(r["logits_max_rel"] <= 1e-4 and r.get("loss_abs", 0) <= 1e-5 for r in row["sequences"].values())
            and row["step_logits_max_rel"] <= 1e-4
            and all(v for k, v in row.items() if k.startswith("greedy_sure_equal")))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "results"), "official-check.json"))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from tnlib.ops._triton import use_triton

    extra = {"device": device, "triton_kernels": use_triton(torch.zeros(1, device=device))}
    results = []
    for dtype in (getattr(torch, d) for d in a.dtypes):
        for name in ("A", "B"):
            results.append(check(name, dtype, device))
            print(json.dumps(results[-1]), flush=True)
            write_results(a.out, results, extra)


if __name__ == "__main__":
    main()
