"""Before/after acceptance numbers for ONE tnlib tree (the one importable from ``PYTHONPATH``).

Run it once per tree in the same GPU session and set the two JSON files side by side:

    git archive e6f71d5 tnlib | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    TNLIB_COMMIT=e6f71d5 PYTHONPATH=/tmp/before python3 tools/compare_commits.py --label before --out $OUT/before.json
    PYTHONPATH=$PWD python3 tools/compare_commits.py --label after --out $OUT/after.json

(``TNLIB_COMMIT`` names a tree that has no ``.git``; the header records where ``tnlib`` came from.)

What it measures (bf16 on a GPU), each part through that tree's own public API and defaults:

* ``kernels``: ``tnlib.ops.lightning_attention`` forward and forward+backward, median ms of
  ``triton.testing.do_bench``, H=16 D=128 and H=8 K=256 V=128, B*T = 65,536, T = 1K..32K; first a
  correctness gate against the float32 chunked reference (``tnlib.ops.linear_attention_chunked``);
* ``train``: training tokens/s of the preset through the library's default training step, as
  ``python -m tnlib train --preset P --set compile=true`` runs it: ``TrainConfig``'s defaults read
  from the tree (compile scope, fused loss, AdamW betas/weight decay with the tree's parameter
  groups, gradient clipping), bf16 autocast, 32,768 tokens per step, timed after a warm-up;
* ``decode``: batch-1 decode ms/token through the tree's ``stream_generate`` with random weights at
  each context: the median time between consecutive tokens (prefill and the decoder's one-time
  setup come before the first token and are reported apart). Old API (``tnlib.generate`` a module,
  ``fuse_step``/``cuda_graph``): its default and ``fuse_step=True``; new API (``decoder=``): its
  default and ``decoder="compiled-graph"``.

The JSON is rewritten after every row (a run cut short keeps what it measured). ``--device cpu`` with
tiny sizes checks the script itself without a GPU (timings then are wall-clock and meaningless).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import tnlib
from tnlib.provenance import write_results


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device, grad_to_none=None, reps=20):
    """Median ms: ``triton.testing.do_bench`` on a GPU; a wall-clock median on the CPU (script check only)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        if grad_to_none:
            for x in grad_to_none:
                x.grad = None
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def slopes(h):
    """ALiBi-style per-head decay rates (as in benchmarks/bench_kernels.py)."""
    start = 2 ** (-(2 ** -(math.log2(h) - 3)))
    return torch.tensor([start * start**i for i in range(h)], dtype=torch.float32)


def attention_inputs(B, T, H, K, V, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = (torch.randn(B, T, H, K, generator=g) / K**0.5).to(device, dtype)
    k = (torch.randn(B, T, H, K, generator=g) / K**0.5).to(device, dtype)
    v = torch.randn(B, T, H, V, generator=g).to(device, dtype)
    do = torch.randn(B, T, H, V, generator=g).to(device, dtype)
    return q, k, v, do


def part_kernels(a, device, dtype, emit):
    from tnlib.ops import lightning_attention, linear_attention_chunked
    from tnlib.testing import rel_err

    for H, K, V in a.shapes:
        s = slopes(H).to(device)
        # correctness gate: one size, every output and gradient against the float32 chunked reference
        T0 = min(a.lens)
        q, k, v, do = attention_inputs(max(1, min(a.tokens, 4 * T0) // T0), T0, H, K, V, device, dtype, seed=1)
        got = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = [t.float().clone().requires_grad_() for t in (q, k, v)]
        o = lightning_attention(*got, s)
        o.backward(do)
        o_ref = linear_attention_chunked(*ref, s, block_size=64)
        o_ref.backward(do.float())
        errs = {"o": rel_err(o, o_ref)}
        errs.update({f"d{n}": rel_err(x.grad, r.grad) for n, x, r in zip("qkv", got, ref)})
        ok = all(e < a.gate for e in errs.values())
        emit(dict(part="kernels", check=True, H=H, K=K, V=V, T=T0, ok=ok, errs=errs))
        log(f"kernels H={H} K={K} V={V}: gate {'ok' if ok else 'FAILED'} {errs}")
        if not ok:
            continue
        for T in a.lens:
            B = max(1, a.tokens // T)
            q, k, v, do = attention_inputs(B, T, H, K, V, device, dtype)
            fwd_ms = bench_ms(lambda: lightning_attention(q, k, v, s), device)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            fb_ms = bench_ms(lambda: lightning_attention(q, k, v, s).backward(do), device, grad_to_none=[q, k, v])
            emit(dict(part="kernels", H=H, K=K, V=V, T=T, B=B, fwd_ms=fwd_ms, fwdbwd_ms=fb_ms))
            log(f"kernels H={H} K={K} V={V} T={T}: fwd {fwd_ms:.3f} ms, fwd+bwd {fb_ms:.3f} ms")
            del q, k, v, do
            if device.type == "cuda":
                torch.cuda.empty_cache()


def part_train(a, device, emit):
    """The default training step of the tree, replicated from ``tnlib.train.train``'s loop."""
    from tnlib import train as tr
    from tnlib.models import build_model, get_config

    fields = {f.name: f for f in dataclasses.fields(tr.TrainConfig)}
    cfg = tr.TrainConfig(preset=a.preset, compile=a.compile)  # every other field at the tree's default
    fused_loss = device.type == "cuda" if cfg.fused_loss is None else cfg.fused_loss
    scope = getattr(cfg, "compile_scope", "blocks")
    autocast = device.type == "cuda"
    for T in a.train_lens:
        B = max(1, a.train_tokens // T)
        torch.manual_seed(cfg.seed)
        # activation checkpointing: a ModelConfig field in older trees, an Implementation field in newer ones
        ckpt = {"checkpointing": cfg.checkpointing} if "checkpointing" in fields else {}
        model_fields = {f.name for f in dataclasses.fields(tnlib.models.ModelConfig)}
        mcfg = get_config(a.preset, vocab_size=a.vocab, **cfg.model_overrides,
                          **(ckpt if "checkpointing" in model_fields else {}))
        impl = getattr(tnlib.models, "Implementation", None)
        model = (build_model(mcfg) if impl is None or "checkpointing" in model_fields else
                 build_model(mcfg, impl(**ckpt))).to(device)
        groups = tr._param_groups(model, cfg.weight_decay) if hasattr(tr, "_param_groups") else model.parameters()
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                **({"fused": True} if device.type == "cuda" else {}))
        if cfg.compile and scope == "blocks":
            model.compile_blocks()
        fwd = torch.compile(model) if cfg.compile and scope == "model" else model
        g = torch.Generator(device="cpu").manual_seed(0)
        batches = [torch.randint(0, a.vocab, (B, T + 1), generator=g).to(device) for _ in range(2)]

        def step(i):
            x = batches[i % 2]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = fwd(x[:, :-1], x[:, 1:]) if fused_loss else fwd(x[:, :-1])
            loss = out if fused_loss else F.cross_entropy(out.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            loss_value = loss.item()  # as the training loop logs it
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss_value

        log(f"train {a.preset} T={T} B={B}: warm-up ({a.train_warmup} steps, compile={cfg.compile}, scope={scope})")
        t0 = time.time()
        for i in range(a.train_warmup):
            step(i)
        sync(device)
        warm_s = time.time() - t0
        t0 = time.perf_counter()
        for i in range(a.train_steps):
            loss = step(i)
        sync(device)
        dt = (time.perf_counter() - t0) / a.train_steps
        emit(dict(part="train", preset=a.preset, T=T, B=B, tokens_per_step=B * T, step_ms=dt * 1e3,
                  tokens_per_s=B * T / dt, compile=cfg.compile, compile_scope=scope, fused_loss=fused_loss,
                  warmup_s=warm_s, loss=loss))
        log(f"train T={T}: {B * T / dt:,.0f} tokens/s ({dt * 1e3:.1f} ms/step; warm-up {warm_s:.0f} s)")
        del model, opt, fwd, batches
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _stream_generate():
    """The tree's ``stream_generate`` and which API it has: ``"new"`` (``decoder=``) or ``"old"``."""
    fn = getattr(tnlib, "stream_generate", None)
    if fn is None:
        fn = importlib.import_module("tnlib.generate").stream_generate
    params = inspect.signature(fn).parameters
    return fn, ("new" if "decoder" in params else "old")


def _decoders(api, device):
    """(name, keyword arguments) of the decode paths to time for this API."""
    if api == "new":
        out = [("default", {})]
        if device.type == "cuda":
            out.append(("compiled-graph", {"decoder": "compiled-graph"}))
        return out
    out = [("default", {})]
    if device.type == "cuda":
        out.append(("fuse_step", {"cuda_graph": True, "fuse_step": True}))
    return out


def part_decode(a, device, dtype, emit):
    stream, api = _stream_generate()
    torch.manual_seed(0)
    model = tnlib.create_model(a.preset, vocab_size=a.vocab).to(device, dtype).eval()
    for ctx in a.contexts:
        ids = torch.randint(0, a.vocab, (1, ctx), device=device)
        for name, kw in _decoders(api, device):
            for call in ((1, 2) if api == "new" else (1,)):  # a second call reuses the new API's cached decoder
                sync(device)
                t0 = time.perf_counter()
                stamps = []
                for _ in stream(model, ids, a.decode_tokens, **kw):
                    stamps.append(time.perf_counter())  # each token is ready: the loop checked it on the host
                gaps = sorted(b - c for b, c in zip(stamps[1:], stamps[:-1]))
                ms = gaps[len(gaps) // 2] * 1e3
                row = dict(part="decode", api=api, decoder=name, kwargs=kw, B=1, context=ctx, call=call,
                           tokens=len(stamps), ms_per_token=ms, first_token_s=stamps[0] - t0,
                           total_s=stamps[-1] - t0)
                emit(row)
                log(f"decode {name} ctx={ctx} call {call}: {ms:.3f} ms/token, first token after "
                    f"{row['first_token_s']:.2f} s")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _tree_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(tnlib.__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return root, out.stdout.strip() or None
    except Exception:
        return root, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="name of this tree in the output, e.g. before / after")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--parts", default="kernels,train,decode")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="tnl-385m")
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--shapes", default="16:128:128,8:256:128", help="H:K:V list")
    ap.add_argument("--lens", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--tokens", type=int, default=65536, help="B*T of the kernel timings")
    ap.add_argument("--gate", type=float, default=2e-2, help="max relative error of the bf16 kernels vs fp32")
    ap.add_argument("--train-lens", default="2048,32768")
    ap.add_argument("--train-tokens", type=int, default=32768)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--train-warmup", type=int, default=5)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="train eager (CPU check)")
    ap.add_argument("--contexts", default="1024,65536")
    ap.add_argument("--decode-tokens", type=int, default=100)
    a = ap.parse_args()
    a.shapes = [tuple(map(int, s.split(":"))) for s in a.shapes.split(",")]
    a.lens = [int(x) for x in a.lens.split(",")]
    a.train_lens = [int(x) for x in a.train_lens.split(",")]
    a.contexts = [int(x) for x in a.contexts.split(",")]
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("compare_commits: no CUDA device (use --device cpu with tiny sizes to check the script)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    root, commit = _tree_commit()
    extra = dict(label=a.label, tnlib_root=root, tnlib_commit=commit or os.environ.get("TNLIB_COMMIT"),
                 generate_api=_stream_generate()[1], dtype=str(dtype).replace("torch.", ""))
    log(f"tnlib from {root} ({extra['tnlib_commit']}), API {extra['generate_api']}, {device}")
    rows = []

    def emit(row):
        rows.append(dict(label=a.label, **row))
        write_results(a.out, rows, extra)

    t0 = time.time()
    for part in a.parts.split(","):
        try:
            if part == "kernels":
                part_kernels(a, device, dtype, emit)
            elif part == "train":
                part_train(a, device, emit)
            elif part == "decode":
                part_decode(a, device, dtype, emit)
            else:
                sys.exit(f"unknown part {part!r}")
        except Exception as e:  # keep the other parts' numbers
            emit(dict(part=part, error=repr(e)[:400]))
            log(f"{part} FAILED: {e!r}")
        log(f"{part} done after {time.time() - t0:.0f} s")
    print(json.dumps([r for r in rows if not r.get("check")], indent=None)[:4000])


if __name__ == "__main__":
    main()
