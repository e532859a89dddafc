"""What the benchmarks share: argument conventions, result files with provenance, timing, the training step.

Conventions: every benchmark runs from the repository root with ``tnlib`` imported as installed
(``make setup`` installs it editable; on a machine with only a copy of the tree, ``PYTHONPATH=$PWD``),
takes ``--out FOLDER`` (default ``results/bench``) and ``--commit HASH`` (recorded where the tree has no
``.git``), and rewrites ``FOLDER/<name>-<gpu>.json`` = ``{"header": provenance, "rows": [...]}`` after
every row, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

#: bytes/s, the device-to-device copy rate measured on the H200: the floor of memory-bound kernels
HBM_BYTES_PER_S = 4.3e12


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the shared ``--out`` and ``--commit`` options (``doc``: the script's docstring)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench", help="folder for <name>-<gpu>.json (default: results/bench)")
    ap.add_argument("--commit", default=None, help="commit to record where the tree has no .git")
    return ap


def result_path(args: argparse.Namespace, name: str, suffix: str = ".json") -> str:
    """``<args.out>/<name>-<gpu><suffix>``; records ``args.commit`` (if given) in every header written later."""
    from tnlib.provenance import gpu_slug

    if getattr(args, "commit", None):
        os.environ["TNLIB_COMMIT"] = args.commit
    return os.path.join(args.out, f"{name}-{gpu_slug()}{suffix}")


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


def build(preset, vocab, compiled, compile_scope="blocks", compile_mode=None, overrides=None):
    """``(model, fwd, graphs)``: the preset on the GPU (seeded); ``fwd`` what a step calls: the model with
    its blocks compiled (``TrainConfig``'s default scope) or the whole model as one compiled graph
    (``compile_scope="model"``); ``graphs``: whether CUDA graphs record it (mode reduce-overhead)."""
    import tnlib

    torch.manual_seed(0)
    model = tnlib.create_model(preset, vocab_size=vocab, **(overrides or {})).cuda()
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
