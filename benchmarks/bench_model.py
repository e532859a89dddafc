"""Training throughput and peak memory of tnl-385m vs transformer-385m (make bench-model).

A training step as ``tnlib.train`` takes it by default (each block compiled on its own, bf16 autocast,
fused AdamW, gradient clipping at 1.0; ``common.train_step``), a fixed number of tokens per step (32,768 by default) at each
sequence length, eager and compiled, with the fused LM-head loss (training's default on a GPU) and
with ``F.cross_entropy`` on fp32 logits. Writes ``<out>/model-<gpu>.json`` with provenance.

    python3 benchmarks/bench_model.py                  # = make bench-model (tnlib installed)
    PYTHONPATH=$PWD python3 benchmarks/bench_model.py --models tnl-385m --lens 2048 --loss fused
"""
import time

import torch
from common import (build, figure, parse_settings, parser, print_table, record, replot, require_cuda, result_path,
                    save_figure, train_step)

import tnlib
from tnlib.provenance import provenance


def plot(rows, path, header=None):
    """Tokens/s and peak memory vs T per (model, mode, loss); where the file holds several runs (a ``run``
    field), each line is from the latest run that measured it."""
    ok = [r for r in rows if "error" not in r]
    latest = {}
    for r in ok:
        key = (r["model"], r["mode"], bool(r.get("fused_loss")))
        latest[key] = max(latest.get(key, r.get("run", 0)), r.get("run", 0))
    fig, axes = figure(1, 2)
    for key, run_id in latest.items():
        pts = sorted({r["T"]: r for r in ok if (r["model"], r["mode"], bool(r.get("fused_loss"))) == key
                      and r.get("run", 0) == run_id}.items())
        label = f"{key[0]} {key[1]}{' fused loss' if key[2] else ''}" + (f" (run {run_id})" if run_id else "")
        style = "o-" if key[0].startswith("tnl") else "s--"
        axes[0][0].semilogx([t for t, _ in pts], [r["tokens_per_s"] / 1e3 for _, r in pts], style, base=2, label=label)
        axes[0][1].semilogx([t for t, _ in pts], [r["peak_gb"] for _, r in pts], style, base=2, label=label)
    for ax, ylabel in ((axes[0][0], "training tokens/s (thousands)"), (axes[0][1], "peak memory (GB)")):
        ax.set_xlabel("sequence length T (tokens per step fixed)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    save_figure(fig, path, header)


def run(preset, T, tokens, mode, steps, warmup, vocab, fused_loss=False, compile_mode=None,
        compile_scope="blocks", overrides=None, impl=None):
    model, fwd, graphs = build(preset, vocab, mode == "compiled", compile_scope, compile_mode, overrides, impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    B = max(1, tokens // T)
    batches = [torch.randint(0, vocab, (B, T + 1), device="cuda") for _ in range(2)]

    def step(i):
        return train_step(model, fwd, opt, batches[i % 2], fused_loss, graphs)

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for i in range(warmup):
        loss = step(i)
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    if not graphs:  # CUDA graphs: their memory pool is allocated while recording (warm-up), so keep that peak
        torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        loss = step(i)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    row = dict(model=preset, T=T, B=B, mode=mode, fused_loss=fused_loss, tokens_per_step=B * T, step_ms=ms,
               compile_scope=compile_scope if mode == "compiled" else None, overrides=overrides or None,
               impl=impl or None,
               tokens_per_s=B * T / (ms / 1e3), peak_gb=torch.cuda.max_memory_allocated() / 1e9,
               reserved_gb=torch.cuda.max_memory_reserved() / 1e9, cuda_graphs=graphs,
               loss=float(loss), warmup_s=warm_s, params=model.num_parameters())
    del model, opt, batches
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def main():
    ap = parser(__doc__)
    ap.add_argument("--models", default="tnl-385m,transformer-385m")
    ap.add_argument("--lens", default="2048,8192,32768")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--loss", default="fused,logits",
                    help="comma list of: fused (model(ids, targets): the chunked LM head + cross-entropy, "
                         "training's default on a GPU), logits (F.cross_entropy on fp32 logits)")
    ap.add_argument("--override", default="", help="model config overrides for both models, e.g. "
                    "'residual_dtype=\"compute\"' (comma list, JSON values; recorded in the header)")
    ap.add_argument("--impl", default="", help="implementation choices for both models (tnlib.models.Implementation "
                    "fields), e.g. packed_attention=false (comma list, JSON values; recorded in the header)")
    ap.add_argument("--compile-scope", default="blocks", choices=("blocks", "model"),
                    help="compile each block (training's default) or the whole model as one graph")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs "
                    "(default: none, as training compiles)")
    ap.add_argument("--inductor", default="", help="torch._inductor.config settings for the whole run, "
                    "e.g. coordinate_descent_tuning=1 (recorded in the header)")
    a = ap.parse_args()
    if replot(a, plot):
        return
    import torch._inductor.config as ic

    inductor = parse_settings(a.inductor)
    for k, v in inductor.items():
        if not hasattr(ic, k):
            raise SystemExit(f"unknown torch._inductor.config setting {k!r}")
        setattr(ic, k, v)
    overrides, impl = parse_settings(a.override), parse_settings(a.impl)
    tnlib.models.get_config("tnl-tiny", **overrides)  # unknown names or values stop the run here
    tnlib.models.Implementation(**impl)
    require_cuda("bench_model.py")
    out = result_path(a, "model")
    rows = []
    for mode in a.modes.split(","):
        for preset in a.models.split(","):
            for T, loss_kind in ((T, k) for T in map(int, a.lens.split(",")) for k in a.loss.split(",")):
                try:
                    r = run(preset, T, a.tokens, mode, a.steps, a.warmup, a.vocab, fused_loss=loss_kind == "fused",
                            compile_mode=a.compile_mode, compile_scope=a.compile_scope, overrides=overrides,
                            impl=impl)
                except Exception as e:  # record failures instead of losing the whole run
                    r = dict(model=preset, T=T, mode=mode, fused_loss=loss_kind == "fused", error=repr(e)[:300])
                    torch.cuda.empty_cache()
                record(out, rows, r, {"tokens_per_step": a.tokens, "inductor": inductor, "compile_mode": a.compile_mode,
                                      "compile_scope": a.compile_scope, "overrides": overrides, "impl": impl})
    plot(rows, result_path(a, "model", ".png"), provenance())
    print_table(rows, [("model", "model", "18s"), ("mode", "mode", "9s"), ("fused_loss", "fused loss", "10d"),
                       ("T", "T", "6d"), ("tokens_per_s", "tok/s", "10.0f"), ("peak_gb", "peak GB", "8.1f")])


if __name__ == "__main__":
    main()
