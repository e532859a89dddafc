"""Time the forward's work-queue launch (``tnlib.ops.lightning._QUEUE_STATE``) against the default plan
(segment-state kernel, then the output kernel) at long T, where sequences are cut into segments.

For each shape and length: the default plan's output and gradients are the reference; every queue
variant (``_TARGET_CTAS`` = number of segments, ``_QUEUE_LEAD``, ``_QUEUE_PROGRAMS`` per SM) is checked
against them, then timed (forward, forward+backward; ``do_bench`` medians). T=1024 (``--base-len``, no segments)
is timed once per shape as the flat-in-T baseline. Rows go to ``queue-<gpu>.json`` after every variant,
so a hang (a wait that never ends would be a bug) loses nothing; ``--best-out`` receives the ``--set``
string of the fastest correct variant at the longest T of the first shape, or nothing when no
variant beats the default there by more than 2%.

Usage: python3 scripts/bench_queue.py [--out DIR] [--best-out FILE]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_kernels import inputs, slopes, time_one  # noqa: E402

from tnlib.ops import lightning as L  # noqa: E402
from tnlib.provenance import gpu_slug, provenance  # noqa: E402
from tnlib.testing import rel_err  # noqa: E402

KNOBS = ("_QUEUE_STATE", "_TARGET_CTAS", "_QUEUE_LEAD", "_QUEUE_PROGRAMS")


def run_once(q, k, v, s, do):
    o = L.lightning_attention(q, k, v, s)
    o.backward(do)
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    return [o.detach()] + grads


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--best-out", default=None)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--lens", default="16384,32768")
    ap.add_argument("--base-len", type=int, default=1024, help="the flat-in-T baseline (timed with the default plan only)")
    ap.add_argument("--shapes", default="16:128:128,32:64:64,8:256:128", help="H:K:V,...; the first gets the full grid")
    ap.add_argument("--targets", default="512,1024")
    ap.add_argument("--leads", default="1,2,4")
    ap.add_argument("--programs", default="2,3")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_queue.py needs a CUDA GPU")
    saved = {n: getattr(L, n) for n in KNOBS}
    rows = []
    path = os.path.join(a.out, f"queue-{gpu_slug()}.json")
    os.makedirs(a.out, exist_ok=True)

    def dump():
        with open(path, "w") as fh:
            json.dump({"header": provenance({"tokens": a.tokens, "dtype": "bfloat16"}), "rows": rows}, fh, indent=1)

    lens = [int(x) for x in a.lens.split(",")]
    for i, shp in enumerate(a.shapes.split(",")):
        H, K, V = (int(x) for x in shp.split(":"))
        s = slopes(H).cuda()
        grid = list(itertools.product([int(x) for x in a.targets.split(",")], [int(x) for x in a.leads.split(",")],
                                      [int(x) for x in a.programs.split(",")]))
        if i > 0:  # the other shapes: the middle of the grid only
            grid = [(512, 2, p) for p in (2, 3)]
        for T in [a.base_len] + (lens if i == 0 else lens[-1:]):
            B = a.tokens // T
            q, k, v, do = inputs(B, T, H, K, V, "bthd", torch.bfloat16, seed=5)
            ref = run_once(q, k, v, s, do)
            f, fb, pk = time_one(lambda *x: L.lightning_attention(*x), q, k, v, s, do)
            rows.append(dict(H=H, K=K, V=V, T=T, B=B, variant="default", seg=L._plan_for(q, v), fwd_ms=round(f, 4),
                             fwdbwd_ms=round(fb, 4), peak_gb=round(pk, 3)))
            print(rows[-1], flush=True)
            dump()
            for tgt, lead, prog in (grid if T != a.base_len else []):
                L._QUEUE_STATE, L._TARGET_CTAS, L._QUEUE_LEAD, L._QUEUE_PROGRAMS = True, tgt, lead, prog
                row = dict(H=H, K=K, V=V, T=T, B=B, variant="queue", target_ctas=tgt, lead=lead, programs_per_sm=prog,
                           seg=L._plan_for(q, v))
                try:
                    got = run_once(q, k, v, s, do)
                    row["rel_err_vs_default"] = {n: rel_err(g, r) for n, g, r in zip(("o", "dq", "dk", "dv"), got, ref)}
                    if max(row["rel_err_vs_default"].values()) < 2e-2:
                        f, fb, pk = time_one(lambda *x: L.lightning_attention(*x), q, k, v, s, do)
                        row.update(fwd_ms=round(f, 4), fwdbwd_ms=round(fb, 4), peak_gb=round(pk, 3))
                    else:
                        row["error"] = "differs from the default plan"
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:300]
                finally:
                    for n, val in saved.items():
                        setattr(L, n, val)
                rows.append(row)
                print(row, flush=True)
                dump()
            del q, k, v, do, ref
            torch.cuda.empty_cache()
    if a.best_out:
        H, K, V = (int(x) for x in a.shapes.split(",")[0].split(":"))
        at = [r for r in rows if (r["H"], r["K"], r["V"], r["T"]) == (H, K, V, lens[-1]) and "fwd_ms" in r]
        default = next(r for r in at if r["variant"] == "default")
        best = min((r for r in at if r["variant"] == "queue"), key=lambda r: r["fwd_ms"], default=None)
        text = ""
        if best is not None and best["fwd_ms"] < 0.98 * default["fwd_ms"]:
            text = ",".join(f"tnlib.ops.lightning.{n}={v}" for n, v in (
                ("_QUEUE_STATE", "true"), ("_TARGET_CTAS", best["target_ctas"]), ("_QUEUE_LEAD", best["lead"]),
                ("_QUEUE_PROGRAMS", best["programs_per_sm"])))
        with open(a.best_out, "w") as fh:
            fh.write(text)
        print("best:", best, "default:", default, "->", text or "(default)", flush=True)


if __name__ == "__main__":
    main()
