"""Inference: prefill time vs length, per-token decode latency and memory (make bench-inference).

tnl-385m (recurrent state; decode replayed from a CUDA graph, and eager for reference) vs
transformer-385m (KV cache, eager), random bf16 weights, batch 1 and 16, contexts 1K..64K.
Checks first that the graph decode reproduces the eager decode. Writes
``<out>/inference-<gpu>.json`` with provenance.

    python3 benchmarks/bench_inference.py              # = make bench-inference (tnlib installed)
    PYTHONPATH=$PWD python3 benchmarks/bench_inference.py --contexts 1024 --batches 1 --out $OUT
"""
import time

import torch
from common import cuda_median_ms, figure, parser, print_table, record, replot, require_cuda, result_path, save_figure

import tnlib
from tnlib.generation import GraphDecoder
from tnlib.provenance import provenance
from tnlib.testing import rel_err


def plot(rows, path, header=None):
    """Decode ms/token, cache size and prefill time vs context, one line per (model, decoder, batch)."""
    fig, axes = figure(1, 3, size=(4.6, 3.6))
    ok = [r for r in rows if "error" not in r]
    for key, ax, label in (("decode_ms_per_token", axes[0][0], "decode ms / token"),
                           ("cache_gb", axes[0][1], "cache GB"), ("prefill_ms", axes[0][2], "prefill ms")):
        for series in dict.fromkeys((r["model"], r["mode"], r["B"]) for r in ok):
            pts = sorted((r["context"], r[key]) for r in ok if (r["model"], r["mode"], r["B"]) == series)
            ax.loglog(*zip(*pts), "o-" if series[0].startswith("tnl") else "s--", label="{} {} B={}".format(*series))
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    save_figure(fig, path, header)


#: decode modes beyond the decoders (eager, graph, compiled-graph): the compiled step with another
#: Inductor mode, or with cuBLAS for the projections (Implementation(decode_gemv=False))
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
    if replot(a, plot):
        return
    require_cuda("bench_inference.py")
    out = result_path(a, "inference")
    rows = []
    checks = {}
    for name in a.models.split(","):
        model = tnlib.create_model(name, vocab_size=a.vocab).to("cuda", torch.bfloat16).eval()
        modes = tuple(a.tnl_modes.split(",")) if name.startswith("tnl") else ("eager",)
        cublas_model = None
        if _CUBLAS_MODE in modes:
            cublas_model = tnlib.create_model(name, vocab_size=a.vocab, impl=tnlib.Implementation(decode_gemv=False))
            cublas_model = cublas_model.to("cuda", torch.bfloat16).eval()
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
                    torch.cuda.empty_cache()
                    record(out, rows, r, checks)
        del model, cublas_model
        torch.cuda.empty_cache()
    plot(rows, result_path(a, "inference", ".png"), provenance())
    print_table(rows, [("model", "model", "18s"), ("mode", "mode", "22s"), ("B", "B", "3d"), ("context", "ctx", "6d"),
                       ("prefill_ms", "prefill ms", "10.1f"), ("decode_ms_per_token", "ms/token", "9.3f"),
                       ("decode_tokens_per_s", "tok/s", "8.0f"), ("cache_gb", "cache GB", "8.3f")])


if __name__ == "__main__":
    main()
