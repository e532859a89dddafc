"""Inference: prefill time vs length, per-token decode latency and memory (make bench-inference).

tnl-385m (recurrent state; decode replayed from a CUDA graph, and eager for reference) vs
transformer-385m (KV cache, eager), random bf16 weights, batch 1 and 16, contexts 1K..64K.
Checks first that the graph decode reproduces the eager decode. Writes
``<out>/inference-<gpu>.json`` with provenance.

    python3 benchmarks/bench_inference.py              # = make bench-inference (tnlib installed)
    PYTHONPATH=$PWD python3 benchmarks/bench_inference.py --contexts 1024 --batches 1 --out $OUT
"""
import json
import time

import torch
from common import cuda_median_ms, parser, require_cuda, result_path

import tnlib
from tnlib.generation import GraphDecoder
from tnlib.provenance import write_results
from tnlib.testing import rel_err


#: decode modes beyond the decoders (eager, graph, compiled-graph): the compiled step with another
#: Inductor mode, or with cuBLAS for the projections (ModelConfig.decode_gemv=False)
_COMPILE_MODES = {"compiled-graph-max": "max-autotune-no-cudagraphs"}
_CUBLAS_MODE = "compiled-graph-cublas"


def bench(model, name, B, ctx, vocab, decode_steps, mode, cublas_model=None):
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (B, ctx), device="cuda")
    model.step(ids, last_only=True)  # warm-up at the timed shape: kernel compilation stays out of the timing
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    logits, cache = model.step(ids, last_only=True)
    torch.cuda.synchronize()
    prefill_ms = (time.perf_counter() - t) * 1e3
    prefill_peak = (torch.cuda.max_memory_allocated() - weights) / 1e9
    tok = logits[:, -1].argmax(-1)[:, None]
    cache_gb = cache.nbytes() / 1e9
    torch.cuda.reset_peak_memory_stats()
    if mode != "eager":
        if mode != "graph":
            torch._dynamo.reset()  # a fresh compile per decoder: no silent fallback at the recompile limit
        dec = GraphDecoder(cublas_model if mode == _CUBLAS_MODE else model, cache, fuse=mode != "graph",
                           compile_mode=_COMPILE_MODES.get(mode))
        step = lambda: dec.decode(tok)  # noqa: E731
    else:
        state = {"cache": cache}

        def step():
            lg, state["cache"] = model.step(tok, state["cache"], validate=False) if name.startswith("tnl") else model.step(tok, state["cache"])
            return lg
    for _ in range(3):
        step()
    ms = cuda_median_ms(step, decode_steps)
    decode_peak = (torch.cuda.max_memory_allocated() - weights) / 1e9
    return dict(model=name, mode=mode, B=B, context=ctx, prefill_ms=prefill_ms, prefill_tokens_per_s=B * ctx / prefill_ms * 1e3,
                decode_ms_per_token=ms, decode_tokens_per_s=B / ms * 1e3, cache_gb=cache_gb,
                decode_peak_extra_gb=decode_peak, prefill_peak_extra_gb=prefill_peak)


def check_graph(model, vocab, fuse=False, compile_mode=None):
    """Graph decode == eager decode for a few steps (same prefill)."""
    ids = torch.randint(0, vocab, (2, 300), device="cuda")
    _, cache = model.step(ids, last_only=True)
    dec = GraphDecoder(model, cache, fuse=fuse, compile_mode=compile_mode)
    toks = torch.randint(0, vocab, (6, 2, 1), device="cuda")
    errs = []
    for t in toks:
        g = dec.decode(t).clone()
        e, cache = model.step(t, cache)
        errs.append(rel_err(g, e))
    return max(errs)


def main():
    ap = parser(__doc__)
    ap.add_argument("--contexts", default="1024,4096,16384,65536")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--decode-steps", type=int, default=50)
    ap.add_argument("--tnl-modes", default="compiled-graph,graph,eager",
                    help="the decoders eager, graph, compiled-graph; compiled-graph-max (max-autotune), "
                         "compiled-graph-cublas (projections through cuBLAS instead of the GEMV kernel)")
    ap.add_argument("--models", default="tnl-385m,transformer-385m")
    a = ap.parse_args()
    require_cuda("bench_inference.py")
    out = result_path(a, "inference")
    rows = []
    checks = {}
    for name in a.models.split(","):
        model = tnlib.create_model(name, vocab_size=a.vocab).to("cuda", torch.bfloat16).eval()
        modes = tuple(a.tnl_modes.split(",")) if name.startswith("tnl") else ("eager",)
        cublas_model = None
        if _CUBLAS_MODE in modes:
            cublas_model = tnlib.create_model(name, vocab_size=a.vocab, decode_gemv=False).to("cuda", torch.bfloat16).eval()
            cublas_model.load_state_dict(model.state_dict())
        if name.startswith("tnl"):
            checks["graph_vs_eager_rel_err"] = check_graph(model, a.vocab)
            if "compiled-graph" in modes:
                checks["compiled_graph_vs_eager_rel_err"] = check_graph(model, a.vocab, fuse=True)
            if "compiled-graph-max" in modes:
                checks["compiled_graph_max_vs_eager_rel_err"] = check_graph(
                    model, a.vocab, fuse=True, compile_mode=_COMPILE_MODES["compiled-graph-max"])
            print("graph vs eager decode rel err", checks, flush=True)
        for B in map(int, a.batches.split(",")):
            for ctx in map(int, a.contexts.split(",")):
                for mode in modes:
                    try:
                        r = bench(model, name, B, ctx, a.vocab, a.decode_steps, mode, cublas_model)
                    except torch.cuda.OutOfMemoryError as e:
                        r = dict(model=name, mode=mode, B=B, context=ctx, error="out of memory: " + str(e)[:120])
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                    torch.cuda.empty_cache()
                    write_results(out, rows, checks)
        del model, cublas_model
        torch.cuda.empty_cache()
    print(f"{'model':18s} {'mode':6s} {'B':>3s} {'ctx':>6s} {'prefill ms':>10s} {'ms/token':>9s} {'tok/s':>8s} {'cache GB':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:18s} {r['mode']:6s} {r['B']:3d} {r['context']:6d} {r['error'][:50]}")
        else:
            print(f"{r['model']:18s} {r['mode']:6s} {r['B']:3d} {r['context']:6d} {r['prefill_ms']:10.1f} "
                  f"{r['decode_ms_per_token']:9.3f} {r['decode_tokens_per_s']:8.0f} {r['cache_gb']:8.3f}")


if __name__ == "__main__":
    main()
