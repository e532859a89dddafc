"""The numbers behind ``tnlib.generation.auto_decoder``: what each decoder costs once and per token.

For each decoder (``eager``, ``graph``, ``compiled-graph``) of a preset (tnl-385m, bf16, random
weights, batch 1) at each context:

* ``setup_s``: the one-time cost of building the decoder from a prefill cache (compilation, warm-up,
  CUDA-graph capture; 0 for eager), at the first context with cold caches (then the built decoder is
  reused: the step does not depend on the context, ``cached`` says so);
* ``ms_per_token``: the median of CUDA-event-timed decode steps afterwards;

then, at the first context, the wall time of ``tnlib.generate(model, prompt, 128)`` for each
``decoder`` (``auto`` too) on its first call (decoder built; compiled code reset, Inductor's on-disk
cache warm from the step above) and second call (decoder reused from the cache).

Writes ``<out>/decode-default-<gpu>.json`` with provenance. On a CPU only ``eager``/``auto`` run
(``--preset tnl-tiny`` checks the script). Caches: by default Inductor and Triton write to fresh
temporary folders, so the first compilation is what a new user pays; ``--warm-cache`` keeps yours.

    PYTHONPATH=$PWD python3 tools/bench_decode_default.py --out $OUT
    PYTHONPATH=$PWD python3 tools/bench_decode_default.py --device cpu --preset tnl-tiny --contexts 64 --out /tmp/d
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tnl-385m")
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--contexts", default="1024,65536")
    ap.add_argument("--decoders", default="eager,graph,compiled-graph")
    ap.add_argument("--steps", type=int, default=50, help="timed decode steps per decoder")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per generate call")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warm-cache", action="store_true", help="keep the Inductor/Triton caches (default: fresh)")
    ap.add_argument("--out", required=True, help="output folder")
    a = ap.parse_args()
    if not a.warm_cache:  # before torch/triton are imported: they read these once
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-")

    import torch

    import tnlib
    from tnlib import generation
    from tnlib.provenance import gpu_slug, write_results

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_decode_default: no CUDA device (use --device cpu --preset tnl-tiny to check the script)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    decoders = [d for d in a.decoders.split(",") if device.type == "cuda" or d == "eager"]
    out = os.path.join(a.out, f"decode-default-{gpu_slug() if device.type == 'cuda' else 'cpu'}.json")
    extra = dict(preset=a.preset, dtype=str(dtype).replace("torch.", ""), batch=1, cold_caches=not a.warm_cache,
                 auto_rule="tnlib.generation.auto_decoder")
    rows = []

    def emit(row):
        rows.append(row)
        write_results(out, rows, extra)
        print(row, flush=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    built = generation.DecoderCache()  # the graph decoders built here, which generate() below reuses

    def fresh():
        """No decoder built for the model and no compiled code: the next build pays in full."""
        built.clear()
        torch._dynamo.reset()

    def median_ms(fn):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(a.steps):
            if device.type == "cuda":
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]

    torch.manual_seed(0)
    model = tnlib.create_model(a.preset, vocab_size=a.vocab).to(device, dtype).eval()
    for i, ctx in enumerate(map(int, a.contexts.split(","))):
        ids = torch.randint(0, a.vocab, (1, ctx), device=device)
        with torch.no_grad():
            logits, cache = model.step(ids, last_only=True)  # also warms the prefill kernels
        tok = logits[:, -1].argmax(-1)[:, None]
        for name in decoders:
            if i == 0:
                fresh()
            sync()
            t0 = time.perf_counter()
            if name == "eager":
                state = {"cache": cache}

                def step():
                    lg, state["cache"] = model.step(tok, state["cache"], validate=False)
                    return lg
            else:
                dec = built.get(model, cache, name)
                step = lambda: dec.decode(tok)  # noqa: E731
            sync()
            setup_s = time.perf_counter() - t0
            for _ in range(3):
                step()
            emit(dict(part="decoder", decoder=name, context=ctx, setup_s=setup_s, cached=i > 0,
                      ms_per_token=median_ms(step)))
        for name in ["auto"] + decoders if i == 0 else []:
            fresh()
            for call in (1, 2):
                sync()
                t0 = time.perf_counter()
                tnlib.generate(model, ids, a.new_tokens, decoder=name, decoder_cache=built)
                sync()
                emit(dict(part="generate", decoder=name, resolved=generation.auto_decoder(model, ids, a.new_tokens)
                          if name == "auto" else name, context=ctx, call=call, new_tokens=a.new_tokens,
                          wall_s=time.perf_counter() - t0))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
