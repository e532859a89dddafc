"""Launch configurations of the fused decode kernels (``tnlib.ops.decode``), timed on a GPU (issue 28).

For each product of a ``tnl-385m`` decode step (``qkvu``, ``out``, ``glu``, ``down``, ``head``) and the
recurrence, at each batch size, every candidate tile is launched 20 times inside a CUDA graph and the
graph replayed (what ``decoder="fused-graph"`` runs: no launch overhead from Python; for the in-place residual
products ``out`` and ``down``, also the 5 fastest tiles with their reduction split in 2 and 4), then the whole
``FusedDecodeStep`` is timed in a graph with ``gemv_tile`` / ``recurrent_tile``'s choices and with the
fastest tile of each product, each also with programmatic dependent launch (``Implementation.decode_pdl``,
sm_90+: ``pdl_default_ms``, ``pdl_best_ms``) and with it the weights hinted into L2 before each wait
(``decode_prefetch``: ``pdl_prefetch_*``). Prints the table, writes ``OUT/tune-decode-<gpu>.json``; the
fastest tiles are what ``gemv_tile`` / ``recurrent_tile`` should return (they are read from there, not from
this file).

    PYTHONPATH=$PWD python3 tools/tune_decode.py --out $OUT                 # ~2-3 min on an H100
    PYTHONPATH=$PWD python3 tools/tune_decode.py --batches 1 --quick --out $OUT
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time

import torch


def products(cfg, B, dev, dtype):
    """``{name: (fused_gemv kwargs without tile, pair)}`` with the shapes of one tnl-385m layer and the head."""
    d, glu, V = cfg.d_model, cfg.glu_dim, cfg.vocab_size
    w = lambda n, k: torch.randn(n, k, device=dev, dtype=dtype) / k**0.5  # noqa: E731
    x, qkvu, o, h = (torch.randn(B, n, device=dev) for n in (d, 4 * d, d, glu))
    return {
        "qkvu": (dict(x=x, weight=w(4 * d, d), norm_eps=1e-6, out=torch.empty(B, 4 * d, device=dev)), False),
        "out": (dict(x=o, weight=w(d, d), norm_eps=1e-6, gate=qkvu[:, 3 * d:], residual=x, out=x), False),
        "glu": (dict(x=x, weight=w(glu, d), weight2=w(glu, d), norm_eps=1e-6, out=h), True),
        "down": (dict(x=h, weight=w(d, glu), residual=x, out=x), False),
        "head": (dict(x=x, weight=w(V, d), norm_eps=1e-6, out=torch.empty(B, V, device=dev, dtype=dtype)), False),
    }


def candidates(B, pair, quick):
    """Tiles worth timing: broadcast tiles within ~64 partial sums per thread up to 8 rows; from 16 rows, dot
    tiles and also broadcast tiles of 4 or 8 rows (more programs where a dot tile's 16 columns leave few:
    1,024 outputs are 64 programs; the rows' blocks then re-read the weights, mostly from L2)."""
    from tnlib.ops.decode import GemvTile

    bm = min(16, 1 << (B - 1).bit_length())
    grids = []
    if bm >= 16:
        grids.append((16, itertools.product((16, 32, 64), (32, 64, 128, 256), (4, 8), (2, 3))))
        grids += [(m, itertools.product((1, 2, 4, 8, 16), (128, 256, 512), (4,), (3,))) for m in (4, 8)]
    else:
        grids.append((bm, itertools.product((1, 2, 4, 8, 16, 32), (128, 256, 512), (2, 4, 8), (2, 3, 4))))
    out = []
    for m, grid in grids:
        for bn, bk, w, st in grid:
            if m < 16 and m * bn * bk * (2 if pair else 1) > 64 * 32 * w:
                continue
            if quick and st != 3:
                continue
            out.append(GemvTile(m, bn, bk, w, st))
    return out


def graph_ms(fn, launches=20, replays=10):
    """ms per call of ``fn`` captured ``launches`` times in one CUDA graph (median of ``replays``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(launches):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / launches)
    return sorted(times)[len(times) // 2]


def step_ms(model, B, tiles, pdl=False, prefetch=False):
    """One FusedDecodeStep per token in a CUDA graph, ms (median); ``pdl``/``prefetch`` forced (not the
    model's batch-dependent default), so that each variant is timed at every batch size."""
    from tnlib.generation import GraphDecoder

    ids = torch.randint(0, model.config.vocab_size, (B, 64), device="cuda")
    _, cache = model.step(ids, last_only=True)
    dec = GraphDecoder(model, cache, kernels=True, tiles=tiles, pdl=pdl, prefetch=prefetch)
    tok = ids[:, -1:]
    for _ in range(5):
        dec.decode(tok)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(50):
        s.record()
        dec.decode(tok)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tnl-385m")
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--quick", action="store_true", help="3 pipeline stages only")
    ap.add_argument("--out", default="results/tuning")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_decode.py needs a CUDA GPU")
    import tnlib
    from tnlib.ops import decode as D
    from tnlib.provenance import gpu_slug, write_results

    dtype, dev = torch.bfloat16, "cuda"
    torch.manual_seed(0)
    with torch.device(dev):
        model = tnlib.create_model(a.preset, vocab_size=a.vocab).to(dtype).eval()
    cfg = model.config
    rows, path = [], os.path.join(a.out, f"tune-decode-{gpu_slug()}.json")
    for B in map(int, a.batches.split(",")):
        best = {}
        for name, (kw, pair) in products(cfg, B, dev, dtype).items():
            in_place = kw.get("residual") is kw["out"]  # out, down: the residual stream updated in place
            default = D.gemv_tile(B, kw["weight"].shape[0], kw["weight"].shape[1], pair, in_place=in_place)
            timed = []

            def time_tiles(tiles):
                for tile in tiles:
                    try:
                        timed.append((graph_ms(lambda: D.fused_gemv(**kw, tile=tile)), tile))
                    except Exception as e:  # noqa: BLE001 - a tile that does not compile or launch is skipped
                        print(f"  {name} B={B} {tile}: {type(e).__name__}", file=sys.stderr)

            time_tiles(dict.fromkeys([default] + candidates(B, pair, a.quick)))
            if in_place:  # split-K of the 5 fastest tiles
                top = [t for _, t in sorted(timed, key=lambda p: p[0])[:5]]
                time_tiles([dataclasses.replace(t, split_k=k) for t in top for k in (2, 4)])
            ms_default = next(ms for ms, t in timed if t == default)
            ms_best, tile = min(timed, key=lambda p: p[0])
            best[name] = tile
            nbytes = sum(t.numel() * t.element_size() for k, t in kw.items() if k.startswith("weight"))
            rows.append(dict(batch=B, product=name, default=vars(default), default_us=ms_default * 1e3,
                             best=vars(tile), best_us=ms_best * 1e3, weight_gb_per_s=nbytes / ms_best / 1e6,
                             candidates=len(timed)))
            print(rows[-1], flush=True)
        qkv = torch.randn(B, 4 * cfg.d_model, device=dev)
        for lrpe in (False, True):
            Dh, H = cfg.head_dim, cfg.n_heads
            state = torch.zeros(B, H, (2 if lrpe else 1) * Dh, Dh, device=dev)
            slope, o = torch.rand(H, device=dev), torch.empty(B, H * Dh, device=dev)
            pos, theta = torch.zeros(B, dtype=torch.long, device=dev), torch.rand(H, Dh, device=dev) if lrpe else None
            timed = [(graph_ms(lambda: D.recurrent_step(qkv, state, slope, out=o, act=1, positions=pos, theta=theta,
                                                        bv=bv)), bv) for bv in (8, 16, 32, 64, 128) if bv <= Dh]
            ms_best, bv = min(timed)
            rows.append(dict(batch=B, product=f"recurrent{' (LRPE)' if lrpe else ''}", default_bv=D.recurrent_tile(B, H, Dh, lrpe)[0],
                             best_bv=bv, best_us=ms_best * 1e3, all_us={b: m * 1e3 for m, b in timed}))
            print(rows[-1], flush=True)
        t0 = time.time()
        row = dict(batch=B, product="whole step (ms/token)", default_ms=step_ms(model, B, None),
                   best_ms=step_ms(model, B, best))
        if D.pdl_supported(dev):  # the same steps with programmatic dependent launch, and with L2 prefetch too
            for key, prefetch in (("pdl", False), ("pdl_prefetch", True)):
                try:
                    row.update({f"{key}_default_ms": step_ms(model, B, None, True, prefetch),
                                f"{key}_best_ms": step_ms(model, B, best, True, prefetch)})
                except Exception as e:  # noqa: BLE001 - recorded: a variant that fails on this GPU is a finding
                    row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(dict(row, seconds=time.time() - t0))
        print(rows[-1], flush=True)
        write_results(path, rows, dict(preset=a.preset, dtype="bf16"))
    print("wrote", path)


if __name__ == "__main__":
    main()
