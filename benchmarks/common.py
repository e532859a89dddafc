"""What the benchmarks share: argument conventions, result files with provenance, timing, the training step.

Conventions: every benchmark runs from the repository root with ``tnlib`` imported as installed
(``make setup`` installs it editable; on a machine with only a copy of the tree, ``PYTHONPATH=$PWD``),
takes ``--out FOLDER`` (default ``results/bench``) and ``--commit HASH`` (recorded where the tree has no
``.git``), rewrites ``FOLDER/<name>-<gpu>.json`` = ``{"header": provenance, "rows": [...]}`` after
every row, so a run cut short keeps what it measured, and draws ``FOLDER/<name>-<gpu>.png`` from the
rows at the end; ``--replot FILE.json`` only redraws the PNG beside a JSON (no GPU needed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

#: bytes/s, the device-to-device copy rate measured on the H200: the floor of memory-bound kernels
HBM_BYTES_PER_S = 4.3e12


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the shared ``--out`` and ``--commit`` options (``doc``: the script's docstring)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench", help="folder for <name>-<gpu>.json (default: results/bench)")
    ap.add_argument("--commit", default=None, help="commit to record where the tree has no .git")
    ap.add_argument("--replot", default=None, metavar="FILE.json",
                    help="only redraw FILE.png from the rows of FILE.json (no GPU needed)")
    return ap


def replot(args: argparse.Namespace, plot) -> bool:
    """With ``--replot FILE.json``: ``plot(rows, FILE.png, header)`` and True (the caller then stops); else False."""
    if not args.replot:
        return False
    if not args.replot.endswith(".json"):
        sys.exit(f"--replot expects a .json file, got {args.replot!r}")
    with open(args.replot) as f:
        doc = json.load(f)
    plot(doc["rows"], args.replot[: -len(".json")] + ".png", doc.get("header"))
    print(f"wrote {args.replot[: -len('.json')]}.png")
    return True


def figure(n_rows: int = 1, n_cols: int = 1, size=(5.5, 3.6)):
    """A matplotlib figure for a result PNG (no display needed): ``(fig, axes[n_rows][n_cols])``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(n_rows, n_cols, figsize=(size[0] * n_cols, size[1] * n_rows), squeeze=False)


def save_figure(fig, path: str, header: dict | None = None) -> None:
    """Write ``fig`` to ``path`` (PNG, folders created); the provenance's GPU, commit and date as a caption."""
    if header:  # a file merged from several runs holds lists: the caption names the latest
        last = {k: (v[-1] if isinstance(v, list) and v else v) for k, v in header.items()}
        runs = f" (latest of {len(header['date'])} runs)" if isinstance(header.get("date"), list) else ""
        fig.text(0.01, 0.005, f"{last.get('gpu')} · commit {str(last.get('commit'))[:10]} · {last.get('date')}{runs}",
                 fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def result_path(args: argparse.Namespace, name: str, suffix: str = ".json") -> str:
    """``<args.out>/<name>-<gpu><suffix>``; records ``args.commit`` (if given) in every header written later."""
    from tnlib.provenance import gpu_slug

    if getattr(args, "commit", None):
        os.environ["TNLIB_COMMIT"] = args.commit
    return os.path.join(args.out, f"{name}-{gpu_slug()}{suffix}")


def record(path: str, rows: list, row: dict, extra: dict | None = None) -> None:
    """Append ``row``, print it, and rewrite the result file ``path`` (header: provenance + ``extra``)."""
    from tnlib.provenance import write_results

    rows.append(row)
    print(json.dumps(row), flush=True)
    write_results(path, rows, extra)


def print_table(rows: list, columns: list) -> None:
    """A summary table; ``columns`` = ``[(key, title, spec), ...]`` with a format spec that starts with the
    width (``"18s"``, ``"10.0f"``). A row without a key shows its ``error`` from that column on."""
    widths = [int(re.match(r"\d+", spec).group()) for _, _, spec in columns]
    print(" ".join(f"{title:{'<' if spec.endswith('s') else '>'}{w}s}" for (_, title, spec), w in zip(columns, widths)))
    for r in rows:
        cells = []
        for key, _, spec in columns:
            if key not in r:
                cells.append(f"ERROR {str(r.get('error', ''))[:60]}")
                break
            cells.append(format(r[key], spec))
        print(" ".join(cells))


def require_cuda(script: str) -> None:
    """Stop with a clear message, before any work, where there is no CUDA GPU."""
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU")


def parse_settings(text: str) -> dict:
    """``'a=1,b="x"'`` -> ``{"a": 1, "b": "x"}`` (values in JSON; empty text: ``{}``)."""
    out = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            sys.exit(f"expected name=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            sys.exit(f"{k}: {v!r} is not a JSON value (strings need quotes: {k}='\"{v}\"')")
    return out


def cuda_median_ms(fn, reps: int) -> float:
    """Median over ``reps`` calls of ``fn``, each timed alone with CUDA events (ms)."""
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def build(preset, vocab, compiled, compile_scope="blocks", compile_mode=None, overrides=None, impl=None):
    """``(model, fwd, graphs)``: the preset on the GPU (seeded), with ``ModelConfig`` ``overrides`` and
    ``impl`` (a dict of ``tnlib.models.Implementation`` fields); ``fwd`` what a step calls: the model with
    its blocks compiled (``TrainConfig``'s default scope) or the whole model as one compiled graph
    (``compile_scope="model"``); ``graphs``: whether CUDA graphs record it (mode reduce-overhead)."""
    import tnlib

    torch.manual_seed(0)
    model = tnlib.create_model(preset, vocab_size=vocab, impl=tnlib.Implementation(**(impl or {})),
                               **(overrides or {})).cuda()
    fwd = model
    if compiled and compile_scope == "blocks":
        model.compile_blocks(mode=compile_mode)
    elif compiled:
        fwd = torch.compile(model, mode=compile_mode)
    return model, fwd, compiled and bool(compile_mode and "reduce-overhead" in compile_mode)


def train_step(model, fwd, opt, ids, fused_loss, graphs):
    """One training step as ``tnlib.train`` takes it: bf16 autocast forward (fused: the chunked LM head +
    cross-entropy, ``model(ids, targets)``), backward, gradient clipping at 1.0, AdamW; returns the loss."""
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: a new training step starts
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fwd(ids[:, :-1], ids[:, 1:]) if fused_loss else fwd(ids[:, :-1])
    loss = out if fused_loss else F.cross_entropy(out.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def median_ms(fn, device: str = "cuda", grad_to_none=None) -> float:
    """``triton.testing.do_bench`` median (ms) on the GPU; one wall-clock call on the CPU (scripts' --dry-run)."""
    if device == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def peak_gb(fn, leaves, device: str = "cuda") -> float:
    """Extra memory of one call of ``fn`` beyond what is allocated before it (GB; 0 on the CPU); the
    ``leaves``' gradients are cleared before and after."""
    import torch

    if device == "cpu":
        return 0.0
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    out = (torch.cuda.max_memory_allocated() - base) / 1e9
    for x in leaves:
        x.grad = None
    return out
