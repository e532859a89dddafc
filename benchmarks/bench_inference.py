"""Decoding both 385M models through every decoder, side by side (make bench-inference; issue 28).

One row per (model, decoder, batch, context) in ``OUT/decode-<gpu>.json``::

    {"model", "decoder", "batch", "ctx", "ms_per_token", "tokens_per_s", "first_call_s", "peak_mem_gb"}

plus ``prefill_ms``, ``cache_gb`` (the recurrent state / the KV cache), ``capacity`` (a static KV cache's
slots), ``setup_s`` (building the decoder in this process), ``floor_ms`` (every weight and cache byte a
step reads, once, at the GPU's nominal bandwidth) and ``first_call_warm_s``; ``error`` where a
configuration did not run (out of memory, or skipped because its cache cannot fit the free memory).

* Decoders: ``tnl-385m`` eager, graph, compiled-graph, fused-graph; ``transformer-385m`` eager (the KV
  cache grows by concatenation), graph, compiled-graph (a ``StaticKVCache`` of ``ctx`` + the decoded
  tokens, rounded up to ``tnlib.generation.CAPACITY_STEP``). Like for like: eager vs eager, graph vs
  graph, compiled-graph vs compiled-graph; ``fused-graph`` is TNL's own kernels.
* ``ms_per_token``: median of CUDA-event-timed decode steps (a step = one token for every sequence of
  the batch); ``tokens_per_s = batch / ms * 1000``. bf16 weights, random (seeded) weights and tokens.
* ``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` over the prefill, the decoder's build and the
  timed steps, weights included.
* ``first_call_s``: the wall time of the first ``tnlib.generate(model, prompt, 32, decoder=...)`` (prompt of
  ``--first-call-ctx`` tokens) in a fresh Python process with empty Inductor and Triton caches, what a new
  user's first call costs (model built on the GPU before the clock starts); ``first_call_warm_s``: the
  same in another fresh process once those caches are filled. Measured per (model, decoder, batch) and
  written into every row of it.
* The header's ``auto``: the decoder ``decoder="auto"`` picks for each model and batch size on this
  machine (``tnlib.generation.auto_decoder``), so the default's rows can be found
  (``tools/decode_report.py``).
* Before each model's rows, ``checks``: each graph decoder's 16 greedy tokens and logits against the
  eager decoder's from the same prefill, at the first batch size (bf16: a near tie may pick another token;
  the header records how many agree).

Parts (``--parts``): ``tnl``, ``transformer`` (the timed rows, ``--batches`` x ``--contexts``),
``first-call`` (the fresh processes) and ``prefill`` (below, its own file). A call of a few minutes runs one
part at one batch size; the files of several calls are joined with ``--merge``. The device commands:
``results/bench/NOTES-decode.md``.

Part ``prefill`` (issue 29, item 4): ``tnl-385m``'s prefill of a batch of prompts of mixed lengths, left-padded
(``model.step(ids, None, pad_mask)``, what ``generate(..., prefill="padded")`` runs) against packed without padding
(``model.step(ids, cu_seqlens=cu)``, ``prefill="packed"``), both ``last_only`` as ``generate`` calls them, in
``OUT/prefill-<gpu>.json`` (+ ``.png``), one row per (lengths, prefill)::

    {"lengths", "prefill", "batch", "tokens", "padded_tokens", "ms", "tokens_per_s", "prepare_ms", "peak_gb", "check"}

``lengths``: ``mixed`` (``--prefill-batch`` prompts, log-uniform in ``--prefill-lens`` LO,HI, seed
``--prefill-seed``, the shortest LO and the longest HI; every length in the header), ``equal`` (all of the
mixed prompts' mean length: no padding, the cost of the packed path itself) and ``skewed`` (one of HI, the rest
LO: padding's worst case). ``ms``: median of ``--prefill-reps`` CUDA-event-timed calls after one untimed call;
``tokens_per_s`` counts real tokens; ``prepare_ms``: building the inputs on the device from the list of prompts
on the host (``_prepare_prompts`` / ``pack_prompts``, as ``generate``), median wall time; ``peak_gb``: extra
memory of one call.
``check`` (before timing, in the packed rows): the packed prefill's last-token logits and every layer's state
against the padded prefill's (relative errors), and how many prompts' greedy next tokens agree. The Transformer
has no packed prefill (its KV cache is kept padded): no rows for it.

``--dry-run``: the same code on the CPU with 2-layer tiny models of each architecture standing in for
the presets (rows keep the presets' names; fp32; contexts 32 and 64, batches 1 and 2, 3 timed steps,
first calls at batch 1 generating 4 tokens; the graph decoders uncaptured, ``DecoderCache(capture=False)``; ``fused-graph``
needs ``TRITON_INTERPRET=1`` there, else its rows say so; ``compiled-graph`` compiles for the CPU, minutes
under the interpreter). ``tests/test_bench_inference.py`` runs it.

    PYTHONPATH=$PWD python3 benchmarks/bench_inference.py --parts tnl --batches 1 --out $OUT
    PYTHONPATH=$PWD python3 benchmarks/bench_inference.py --merge A/decode-h100.json B/decode-h100.json --out results/bench
    PYTHONPATH=$PWD TRITON_INTERPRET=1 python3 benchmarks/bench_inference.py --dry-run --out /tmp/d
    PYTHONPATH=$PWD python3 benchmarks/bench_inference.py --parts prefill --out $OUT   # 16 prompts, 64..8,192 tokens

A dry run's ``prefill`` part: 4 prompts of 4..48 tokens (``equal``, ``skewed`` alike), 1 timed call.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from common import cuda_median_ms, figure, parser, print_table, replot, save_figure

import tnlib
from tnlib.generation import DecoderCache, auto_decoder, capacity_for
from tnlib.models import Implementation
from tnlib.provenance import gpu_slug, provenance, write_results

PARTS = ("tnl", "transformer", "first-call", "prefill")
DECODERS = {"tnl-385m": ("eager", "graph", "compiled-graph", "fused-graph"),
            "transformer-385m": ("eager", "graph", "compiled-graph")}
#: --dry-run: the architecture's tiny preset stands in for each model (the code paths are the same)
DRY = {"tnl-385m": "tnl-tiny", "transformer-385m": "transformer-tiny"}
DRY_OVERRIDES = dict(n_layers=2, vocab_size=512)
#: nominal memory bandwidth (bytes/s) by GPU name, for floor_ms
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
FIRST_CALL_TOKENS = 32
DRY_FIRST_CALL_TOKENS = 4  # --dry-run: the interpreted fused kernels take ~0.25 s a token on a CPU
ROW_KEY = ("model", "decoder", "batch", "ctx")


def parse_impl(text: str) -> dict:
    """``"decode_pdl=true,decode_prefetch=true"`` -> ``{"decode_pdl": "true", ...}`` for ``model.set_impl``
    (which checks the names and values); ``ValueError`` on an item without ``=``."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--impl: {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


class Setup:
    """What every part shares: device, dtype, the model stand-ins of a dry run, the sizes."""

    def __init__(self, a):
        self.a, self.dry = a, a.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.dtype = torch.float32 if self.dry else torch.bfloat16
        self.vocab = 512 if self.dry else a.vocab
        self.first_call_tokens = DRY_FIRST_CALL_TOKENS if self.dry else FIRST_CALL_TOKENS
        self.impl = parse_impl(a.impl)
        Implementation().replace(**self.impl)  # unknown names or values fail here, before any model is built

    def model(self, name):
        """``name``'s model on the device, in the benchmark's dtype, seeded (built there: no host copy)."""
        torch.manual_seed(0)
        with torch.device(self.device):
            if self.dry:
                m = tnlib.create_model(DRY[name], **DRY_OVERRIDES)
            else:
                m = tnlib.create_model(name, vocab_size=self.vocab)
        if self.impl:
            m.set_impl(**self.impl)
        return m.to(self.dtype).eval()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def median_ms(self, fn, reps):
        if self.device.type == "cuda":
            return cuda_median_ms(fn, reps)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]

    def decoders(self):
        """A ``DecoderCache`` for this device (a CPU has no CUDA graphs: its decoders call their steps)."""
        return DecoderCache(capture=self.device.type == "cuda")

    def peak_gb(self):
        return torch.cuda.max_memory_allocated() / 1e9 if self.device.type == "cuda" else None


def _decoder(s, model, cache, decoder, capacity, built):
    """A decoder's ``decode(tokens)``: the eager step on the growing cache, or the ``GraphDecoder`` that
    ``built`` (a ``DecoderCache``, as ``generate`` keeps them) holds or builds, loaded with ``cache``."""
    if decoder == "eager":
        state = {"cache": cache}

        def step(tok):
            logits, state["cache"] = model.step(tok, state["cache"])
            return logits
        return step
    if decoder == "fused-graph" and s.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("skipped: the fused kernels need a GPU, or TRITON_INTERPRET=1 on a CPU")
    return built.get(model, cache, decoder, capacity).decode


def _cache_bytes(model, batch, tokens):
    """The decode state: TransNormerLLM's fixed fp32 states, the Transformer's keys and values for ``tokens``."""
    c = model.config
    if c.arch == "tnl":
        return sum(batch * c.n_heads * (2 if c.lrpe_on(i) else 1) * c.head_dim ** 2 * 4 for i in range(c.n_layers))
    return 2 * c.n_layers * batch * c.d_model * tokens * next(model.parameters()).element_size()


def _floor_ms(model, batch, ctx):
    """Every weight read once, the cache read (and TNL's state written back), at the nominal bandwidth."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    bw = next((v for k, v in BANDWIDTH.items() if k in name), None)
    if bw is None:
        return None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = _cache_bytes(model, batch, ctx) * (2 if model.config.arch == "tnl" else 1)
    return (weights + state) / bw * 1e3


def _fits(s, model, decoder, batch, ctx, steps):
    """Why a configuration is skipped (its caches cannot fit the free memory), or None: the eager
    Transformer holds ~4 copies of its growing cache during a step, a static one the prefill's and its own."""
    if s.device.type != "cuda" or model.config.arch == "tnl":
        return None
    need = _cache_bytes(model, batch, ctx + steps) * (4 if decoder == "eager" else 2.2)
    free = torch.cuda.mem_get_info()[0]
    if need > 0.9 * free:
        return f"skipped: needs ~{need / 1e9:.0f} GB for its caches, {free / 1e9:.0f} GB free"
    return None


def bench_row(s, model, name, decoder, batch, ctx, built):
    """One timed row (see the module docstring); ``built``: the graph decoders built so far (TNL's serve
    every context of a batch size; a Transformer's static cache is sized for the row's context)."""
    steps = s.a.decode_steps
    row = dict(model=name, decoder=decoder, batch=batch, ctx=ctx)
    why = _fits(s, model, decoder, batch, ctx, steps + 4)
    if why:
        return {**row, "error": why}
    torch.manual_seed(0)
    ids = torch.randint(0, s.vocab, (batch, ctx), device=s.device)
    model.step(ids, last_only=True)  # the prefill's kernels compiled at this shape before the clock
    s.sync()
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    logits, cache = model.step(ids, last_only=True)
    s.sync()
    prefill_ms = (time.perf_counter() - t) * 1e3
    tok = logits[:, -1].argmax(-1)[:, None]
    capacity = ctx + steps + 4 if model.config.arch == "transformer" and decoder != "eager" else None
    t = time.perf_counter()
    decode = _decoder(s, model, cache, decoder, capacity, built)
    s.sync()
    setup_s = time.perf_counter() - t
    del cache  # a graph decoder holds its own copy
    for _ in range(3):
        decode(tok)
    ms = s.median_ms(lambda: decode(tok), steps)
    return {**row, "ms_per_token": ms, "tokens_per_s": batch / ms * 1e3, "first_call_s": None,
            "peak_mem_gb": s.peak_gb(), "prefill_ms": prefill_ms, "cache_gb": _cache_bytes(model, batch, ctx) / 1e9,
            "capacity": None if capacity is None else capacity_for(capacity), "setup_s": setup_s,
            "floor_ms": _floor_ms(model, batch, ctx)}


def check_decoders(s, model, decoders, batch, built, tokens=16):
    """Each graph decoder against the eager one from the same prefill of ``batch`` sequences: the greedy
    tokens of each step (the eager chain's tokens fed to both) equal, and the worst logits' relative error.
    ``built``: where the decoders go (the timed rows at this batch size reuse TNL's)."""
    from tnlib.testing import rel_err

    torch.manual_seed(1)
    ids = torch.randint(0, s.vocab, (batch, 300 if not s.dry else 20), device=s.device)
    logits, cache = model.step(ids, last_only=True)
    feed = [logits[:, -1].argmax(-1)[:, None]]
    ref, state = [], cache
    for _ in range(tokens):
        lg, state = model.step(feed[-1], state)
        ref.append(lg.clone())
        feed.append(lg[:, -1].argmax(-1)[:, None])
    out = {}
    for decoder in decoders:
        if decoder == "eager":
            continue
        try:
            decode = _decoder(s, model, cache, decoder, ids.shape[1] + tokens + 1, built)
        except RuntimeError as e:
            out[decoder] = dict(error=str(e))
            continue
        got = [decode(t).clone() for t in feed[:-1]]
        same = [torch.equal(g[:, -1].argmax(-1), r[:, -1].argmax(-1)) for g, r in zip(got, ref)]
        out[decoder] = dict(tokens_equal=sum(same), of=len(same), max_rel_err=max(rel_err(g, r) for g, r in zip(got, ref)))
    return out


def first_call(s, name, decoder, batch, warm_dir=None):
    """The child process of ``first-call``: wall seconds of the first and the second ``generate`` call."""
    model = s.model(name)
    torch.manual_seed(0)
    ids = torch.randint(0, s.vocab, (batch, s.a.first_call_ctx), device=s.device)
    times, built = [], s.decoders()
    for _ in range(2):
        s.sync()
        t = time.perf_counter()
        tnlib.generate(model, ids, s.first_call_tokens, decoder=decoder, decoder_cache=built)
        s.sync()
        times.append(time.perf_counter() - t)
    print("FIRST_CALL " + json.dumps(dict(first_s=times[0], second_s=times[1])), flush=True)


def run_first_calls(s, models, batches, log):
    """Per (model, decoder, batch): a fresh process with empty Inductor/Triton caches, then another with
    the caches it filled. Returns ``{(model, decoder, batch): {first_call_s, first_call_warm_s, ...}}``."""
    out = {}
    for name in models:
        for decoder in s.a.decoders_for(name):
            for batch in batches:
                rec = {}
                with tempfile.TemporaryDirectory(prefix="bench-first-call-") as tmp:
                    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "inductor"),
                           "TRITON_CACHE_DIR": os.path.join(tmp, "triton")}
                    for label in ("first_call_s", "first_call_warm_s")[: 2 if s.a.first_call_warm else 1]:
                        cmd = [sys.executable, os.path.abspath(__file__), "--first-call-child", name, decoder,
                               str(batch), "--first-call-ctx", str(s.a.first_call_ctx), "--vocab", str(s.a.vocab)]
                        cmd += ["--dry-run"] if s.dry else []
                        cmd += ["--impl", s.a.impl] if s.a.impl else []
                        t = time.perf_counter()
                        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=s.a.first_call_timeout)
                        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("FIRST_CALL ")]
                        if r.returncode or not lines:
                            rec[label] = None
                            rec["first_call_error"] = (r.stderr or r.stdout)[-300:]
                            break
                        got = json.loads(lines[-1][len("FIRST_CALL "):])
                        rec[label] = got["first_s"]
                        rec[label.replace("_s", "_second_call_s")] = got["second_s"]
                        rec[label.replace("_s", "_process_s")] = time.perf_counter() - t
                out[(name, decoder, batch)] = rec
                log(dict(model=name, decoder=decoder, batch=batch, **rec))
    return out


def prefill_lengths(batch: int, lo: int, hi: int, seed: int) -> dict:
    """The ``prefill`` part's prompt lengths: ``{"mixed": [...], "equal": [...], "skewed": [...]}`` (see the
    module docstring)."""
    import math
    import random

    rng = random.Random(seed)
    mixed = [round(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for _ in range(batch)]
    if batch > 1:
        mixed[0], mixed[1] = lo, hi
    return dict(mixed=mixed, equal=[round(sum(mixed) / batch)] * batch, skewed=[hi] + [lo] * (batch - 1))


def _prefill_check(model, padded, packed) -> dict:
    """The packed prefill's ``(logits, cache)`` against the padded one's: relative errors, greedy tokens equal."""
    from tnlib.testing import rel_err

    (lp, cp), (lk, ck) = padded, packed
    same = lp[:, -1].argmax(-1) == lk[:, -1].argmax(-1)
    return dict(logits_rel_err=float(f"{rel_err(lk, lp):.3e}"),
                state_rel_err=float(f"{max(rel_err(a, b) for a, b in zip(ck.states, cp.states)):.3e}"),
                positions_equal=bool(torch.equal(ck.positions, cp.positions)), next_tokens_equal=int(same.sum()),
                of=len(same))


def time_prefill(s, call, prepare, reps) -> dict:
    """``ms``: median of ``reps`` timed ``call()``s; ``peak_gb``: memory one call adds beyond what is allocated
    before it (GPU); ``prepare_ms``: median wall time of ``prepare()`` (the host side of building the inputs)."""
    s.sync()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        s.sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    else:
        peak = None
    ms = s.median_ms(call, reps)
    prep = []
    for _ in range(max(3, reps)):
        t = time.perf_counter()
        prepare()
        s.sync()
        prep.append((time.perf_counter() - t) * 1e3)
    return dict(ms=ms, prepare_ms=sorted(prep)[len(prep) // 2], peak_gb=peak)


def run_prefill(s, a):
    """The ``prefill`` part (module docstring): rows to ``OUT/prefill-<gpu|cpu>.json``; returns the path."""
    from tnlib.generation import _prepare_prompts, _prompt_list, pack_prompts

    lo, hi = (int(x) for x in a.prefill_lens.split(","))
    sets = prefill_lengths(a.prefill_batch, lo, hi, a.prefill_seed)
    path = os.path.join(a.out, f"prefill-{gpu_slug() if s.device.type == 'cuda' else 'cpu'}.json")
    header = dict(part="prefill", model="tnl-385m", dtype=str(s.dtype).removeprefix("torch."), vocab=s.vocab,
                  dry_run=s.dry, batch=a.prefill_batch, lens=[lo, hi], seed=a.prefill_seed, lengths=sets,
                  reps=a.prefill_reps, what="issue 29 item 4: prefill of mixed-length prompts, left-padded vs packed "
                  "(cu_seqlens), last_only; ms = median CUDA-event time of model.step after one untimed call")
    model, rows = s.model("tnl-385m"), []
    g = torch.Generator().manual_seed(a.prefill_seed)
    for name, lens in sets.items():
        prompts = [torch.randint(0, s.vocab, (n,), generator=g) for n in lens]  # on the host, as a tokenizer gives them
        # what generate does from the list of prompts: check them, pad or pack them onto the device; the prefill call
        inputs = dict(padded=lambda: _prepare_prompts(model, prompts, 0)[1:],
                      packed=lambda: pack_prompts(_prompt_list(model, prompts), s.device))
        calls = dict(padded=lambda x: model.step(x[0], None, x[1], last_only=True),
                     packed=lambda x: model.step(x[0], cu_seqlens=x[1], last_only=True))
        first = {}
        for prefill in ("padded", "packed"):
            row = dict(lengths=name, prefill=prefill, batch=len(lens), tokens=sum(lens),
                       padded_tokens=len(lens) * max(lens))
            try:
                x = inputs[prefill]()
                first[prefill] = calls[prefill](x)  # untimed: the kernels compiled and tuned at this shape
                if prefill == "packed" and "padded" in first:
                    row["check"] = _prefill_check(model, first["padded"], first["packed"])
                first.pop("packed", None)
                row.update(time_prefill(s, lambda: calls[prefill](x), inputs[prefill], a.prefill_reps))
                row["tokens_per_s"] = row["tokens"] / row["ms"] * 1e3
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # recorded; the run goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_results(path, rows, header)
        del first
        gc.collect()
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    ok = [r for r in rows if "ms" in r]
    header["speedup"] = {n: round(p["ms"] / k["ms"], 3) for n in sets for p in ok for k in ok
                         if p["lengths"] == k["lengths"] == n and (p["prefill"], k["prefill"]) == ("padded", "packed")}
    write_results(path, rows, header)
    plot_prefill(rows, path[: -len(".json")] + ".png", provenance(header))
    print_table(rows, [("lengths", "lengths", "8s"), ("prefill", "prefill", "8s"), ("tokens", "tokens", "8d"),
                       ("padded_tokens", "padded", "8d"), ("ms", "ms", "9.2f"), ("tokens_per_s", "tok/s", "11.0f")])
    print("padded ms / packed ms:", header["speedup"])
    return path


def plot_prefill(rows, path, header=None):
    """The prefill part's ms per lengths set, padded and packed side by side."""
    fig, axes = figure(1, 1)
    ax = axes[0][0]
    ok = [r for r in rows if "ms" in r]
    names = list(dict.fromkeys(r["lengths"] for r in ok))
    for j, prefill in enumerate(("padded", "packed")):
        pts = [next((r["ms"] for r in ok if (r["lengths"], r["prefill"]) == (n, prefill)), 0) for n in names]
        ax.bar([i + 0.4 * j for i in range(len(names))], pts, width=0.4, label=prefill)
    ax.set_xticks([i + 0.2 for i in range(len(names))], names)
    ax.set_ylabel("ms (median)")
    ax.set_title(f"prefill of {header.get('batch') if header else ''} prompts, tnl-385m", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path, header)


def join(rows, first_calls):
    """Rows with their (model, decoder, batch)'s first-call measurements filled in."""
    for r in rows:
        rec = first_calls.get((r["model"], r["decoder"], r["batch"]))
        if rec and "error" not in r:
            r.update({k: v for k, v in rec.items() if k.startswith("first_call")})
    return rows


def merge(paths, out_dir):
    """Join result files of several calls (later rows replace earlier ones with the same key) into
    ``out_dir/decode-<gpu>.json`` and redraw its plot; returns the path."""
    rows, firsts, headers = {}, {}, []
    for p in paths:
        with open(p) as f:
            doc = json.load(f)
        headers.append(doc["header"])
        for r in doc["rows"]:
            rows[tuple(r[k] for k in ROW_KEY)] = r
        for rec in doc["header"].get("first_calls", []):
            firsts[(rec["model"], rec["decoder"], rec["batch"])] = rec
    gpus = {h.get("gpu") for h in headers}
    if len(gpus) != 1:
        sys.exit(f"--merge: the files come from different GPUs {sorted(map(str, gpus))}")
    path = os.path.join(out_dir, f"decode-{gpu_slug(gpus.pop() or 'cpu')}.json")
    header = {k: [h.get(k) for h in headers] for k in ("command", "commit", "gpu", "torch", "triton", "date", "parts")}
    auto = {}
    for h in headers:
        for m, by_batch in (h.get("auto") or {}).items():
            auto.setdefault(m, {}).update(by_batch)
    header.update(auto=auto, first_calls=list(firsts.values()), checks=[h.get("checks") for h in headers], merged=paths,
                  dry_run=any(h.get("dry_run") for h in headers))
    merged = join(sorted(rows.values(), key=_order), {k: v for k, v in firsts.items()})
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"header": header, "rows": merged}, f, indent=1)
    plot(merged, path[: -len(".json")] + ".png", header)
    return path


def _order(r):
    return (r["model"], r["decoder"], r["batch"], r["ctx"])


def plot(rows, path, header=None):
    """ms/token against context at batch 1 and tokens/s at batch 16, one line per (model, decoder)."""
    fig, axes = figure(1, 2, size=(5.2, 3.8))
    ok = [r for r in rows if "error" not in r and r.get("ms_per_token")]
    batches = sorted({r["batch"] for r in ok}) or [1]
    panels = [(min(batches), "ms_per_token", "ms / token"), (max(batches), "tokens_per_s", "tokens / s")]
    for ax, (batch, key, label) in zip(axes[0], panels):
        for model, decoder in dict.fromkeys((r["model"], r["decoder"]) for r in ok if r["batch"] == batch):
            pts = sorted((r["ctx"], r[key]) for r in ok if (r["model"], r["decoder"], r["batch"]) == (model, decoder, batch))
            ax.loglog(*zip(*pts), "o-" if model.startswith("tnl") else "s--", label=f"{model} {decoder}")
        ax.set_title(f"batch {batch}: {label}", fontsize=9)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    save_figure(fig, path, header)


def main():
    ap = parser(__doc__)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    ap.add_argument("--models", default=",".join(DECODERS))
    ap.add_argument("--decoders", default=None, help="only these decoders (default: every one of each model)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--contexts", default="1024,4096,16384,65536")
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--decode-steps", type=int, default=50, help="timed steps per row")
    ap.add_argument("--first-call-ctx", type=int, default=1024, help="prompt length of the first-call measurement")
    ap.add_argument("--first-call-warm", type=int, default=1, choices=(0, 1),
                    help="also time a fresh process with the caches the cold one filled (1, default)")
    ap.add_argument("--first-call-timeout", type=int, default=300, help="seconds per fresh process")
    ap.add_argument("--prefill-batch", type=int, default=16, help="prompts of the prefill part")
    ap.add_argument("--prefill-lens", default="64,8192", help="LO,HI: the prefill part's prompt lengths")
    ap.add_argument("--prefill-seed", type=int, default=0, help="the mixed lengths' and the tokens' draw")
    ap.add_argument("--prefill-reps", type=int, default=10, help="timed calls per prefill row")
    ap.add_argument("--dry-run", action="store_true", help="tiny models on the CPU (see above)")
    ap.add_argument("--impl", default="", metavar="KEY=VALUE,...",
                    help="Implementation fields for every model, e.g. decode_pdl=true,decode_prefetch=true "
                         "(default: the library's defaults); recorded in the header")
    ap.add_argument("--merge", nargs="+", metavar="FILE.json", help="join these result files into --out and redraw")
    ap.add_argument("--first-call-child", nargs=3, metavar=("MODEL", "DECODER", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if replot(a, lambda rows, png, header=None: (plot_prefill if (header or {}).get("part") == "prefill" else plot)(
            rows, png, header)):
        return
    if a.merge:
        print("wrote", merge(a.merge, a.out))
        return
    models = [m for m in a.models.split(",") if m]
    parts = [p for p in a.parts.split(",") if p]
    if set(models) - set(DECODERS) or not models:
        sys.exit(f"--models: expected some of {','.join(DECODERS)}, got {a.models!r}")
    if set(parts) - set(PARTS) or not parts:
        sys.exit(f"--parts: expected some of {','.join(PARTS)}, got {a.parts!r}")
    try:
        lo, hi = (int(x) for x in a.prefill_lens.split(","))
    except ValueError:
        lo = hi = 0
    if not 1 <= lo <= hi or a.prefill_batch < 1 or a.prefill_reps < 1:
        sys.exit(f"--prefill-lens: expected LO,HI with 1 <= LO <= HI, got {a.prefill_lens!r}; --prefill-batch and "
                 f"--prefill-reps: >= 1")
    only = None if a.decoders is None else set(a.decoders.split(","))
    a.decoders_for = lambda name: [d for d in DECODERS[name] if only is None or d in only]
    if a.dry_run:
        a.contexts, a.batches = ("32,64", "1,2") if a.contexts == "1024,4096,16384,65536" else (a.contexts, a.batches)
        a.decode_steps, a.first_call_ctx = min(a.decode_steps, 3), min(a.first_call_ctx, 32)
        a.prefill_batch = 4 if a.prefill_batch == 16 else a.prefill_batch  # the defaults' tiny stand-ins
        a.prefill_lens = "4,48" if a.prefill_lens == "64,8192" else a.prefill_lens
        a.prefill_reps = min(a.prefill_reps, 1)
        a.out = "runs/bench-inference-dry" if a.out == "results/bench" else a.out  # never mix dry rows into results
    elif not torch.cuda.is_available():
        sys.exit("bench_inference.py needs a CUDA GPU (--dry-run runs the same code on the CPU with tiny models)")
    try:
        s = Setup(a)
    except ValueError as e:  # --impl: a malformed item, an unknown field or value
        sys.exit(f"bench_inference.py: {e}")
    if a.first_call_child:
        name, decoder, batch = a.first_call_child
        return first_call(s, name, decoder, int(batch))
    run(s, a, models, parts)


def run(s, a, models, parts):
    """The parts, in order: timed rows per model, then the first calls; the file rewritten after each row."""
    from torch._dynamo.utils import counters

    # every row builds its own decoders: past Dynamo's default of 8 compilations per function it would run
    # the step uncompiled, silently (the header's compiled_graphs says how many were made)
    torch._dynamo.config.recompile_limit = 64
    if "prefill" in parts:
        run_prefill(s, a)
        if set(parts) == {"prefill"}:
            return
    path = os.path.join(a.out, f"decode-{gpu_slug() if s.device.type == 'cuda' else 'cpu'}.json")
    batches, contexts = [int(b) for b in a.batches.split(",")], [int(c) for c in a.contexts.split(",")]
    rows, checks, firsts = [], {}, {}
    header = dict(parts=parts, models=models, batches=batches, contexts=contexts, decode_steps=a.decode_steps,
                  dtype=str(s.dtype).removeprefix("torch."), vocab=s.vocab, dry_run=s.dry, checks=checks,
                  first_call_ctx=a.first_call_ctx, first_call_tokens=s.first_call_tokens, first_calls=[], impl=s.impl)

    def save():
        write_results(path, join(rows, firsts), header)

    def log(row):
        print(json.dumps(row), flush=True)

    for name in models:
        if name.split("-")[0] not in parts:
            continue
        model = s.model(name)
        built = s.decoders()
        # what decoder="auto" picks for this model here, per batch size (the rows to judge as the default)
        header.setdefault("auto", {})[name] = {
            str(b): auto_decoder(model, torch.zeros(b, 8, dtype=torch.long, device=s.device), 32) for b in batches}
        checks[name] = check_decoders(s, model, a.decoders_for(name), batches[0], built)
        log({"checks": {name: checks[name]}})
        if model.config.arch == "transformer":
            built.clear()
        for batch in batches:
            for ctx in contexts:
                for decoder in a.decoders_for(name):
                    try:
                        r = bench_row(s, model, name, decoder, batch, ctx, built)
                    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # recorded; the run goes on
                        msg = str(e)
                        r = dict(model=name, decoder=decoder, batch=batch, ctx=ctx,
                                 error=msg if msg.startswith("skipped") else f"{type(e).__name__}: {msg[:200]}")
                    if model.config.arch == "transformer":
                        built.clear()  # its static caches are sized for this context: free them
                    gc.collect()
                    if s.device.type == "cuda":
                        torch.cuda.empty_cache()
                    rows.append(r)
                    log(r)
                    save()
        header.setdefault("compiled_graphs", {})[name] = counters["stats"]["unique_graphs"]
        counters.clear()
        del model, built
    if "first-call" in parts:  # a dry run checks the fresh processes at its first batch size only
        firsts.update(run_first_calls(s, models, batches[:1] if s.dry else batches, log))
        header["first_calls"] = [dict(model=m, decoder=d, batch=b, **rec) for (m, d, b), rec in firsts.items()]
    save()
    plot(rows, path[: -len(".json")] + ".png", provenance(header))
    columns = [("model", "model", "18s"), ("decoder", "decoder", "15s"), ("batch", "B", "3d"), ("ctx", "ctx", "6d"),
               ("ms_per_token", "ms/token", "9.3f"), ("tokens_per_s", "tok/s", "9.0f")]
    print_table(rows, columns + ([("peak_mem_gb", "peak GB", "8.2f")] if s.device.type == "cuda" else []))
    print("wrote", path)


if __name__ == "__main__":
    main()
