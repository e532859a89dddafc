"""Packed sequences (issue 29): ``lightning_attention(..., cu_seqlens=...)`` on B*T tokens split into documents of
mixed lengths, against the dense kernel on the same number of tokens, in the same run (``make bench-varlen``).

Rows (``--tokens`` 65,536 tokens, H = 16, D = 128, bf16 by default), every one timed forward and forward+backward
(``triton.testing.do_bench`` medians; ``grad_to_none`` between backward runs, as ``bench_kernels.py``) with its
peak extra memory:

  dense   ``lightning_attention`` on ``[B, T]`` for each T of ``--dense-lens`` (B = tokens / T): the same tokens
          without documents
  varlen  the same tokens as packed documents (``[1, tokens]`` and ``cu_seqlens``): ``mixed`` (lengths drawn
          log-uniformly from [``--min-len``, ``--max-len``], seed ``--seed``; the lengths are recorded), ``equal``
          (documents of ``--equal-len`` tokens: the dense work at that T, as packed sequences, so the cost of the
          varlen path itself) and ``one`` (a single document of every token: its segments). Each in two forms:
          impl ``tnlib`` passes a ``tnlib.ops.PackedSequences`` made once outside the timed calls (what a model
          step's layers get: boundaries checked once, the work table built once and shared; the row's
          ``build_ms`` is the time to make it and its table, paid once per step), impl ``tnlib-tensor`` the plain
          ``cu_seqlens`` tensor (its values read, a device sync, and its table built in every call). The
          difference between the two is the host work per call
  fla     flash-linear-attention's ``chunk_simple_gla`` with the same ``cu_seqlens`` (where importable)

Each varlen row is checked before it is timed: its output, the gradients of q, k, v, the final states and the
initial states' gradients against the same kernels run document by document (dense calls, one per document),
and the shortest document against a float64 reference; the ``PackedSequences`` call must also equal the plain
tensor's bitwise; a row that fails is recorded, not timed. The summary holds each varlen row's time over each
dense row's (issue 29's target: mixed documents within 10% of the dense kernel), and ``host_per_call`` the
plain tensor's time over the ``PackedSequences``'. Writes ``<out>/varlen-<gpu>.json`` (header: provenance, the
lengths) after every row and ``<out>/varlen-<gpu>.png`` (the rows as bars) at the end; ``--replot FILE.json``
redraws the PNG.

    PYTHONPATH=$PWD python3 benchmarks/bench_varlen.py --out $OUT
    PYTHONPATH=$PWD python3 benchmarks/bench_varlen.py --dry-run --out /tmp/x   # CPU: the kernels interpreted, tiny

``--dry-run`` runs the same code on the CPU at tiny sizes under Triton's interpreter (set before anything imports
Triton), with one wall-clock call per timing: it checks the script and the kernels' answers, and measures nothing.
"""
from __future__ import annotations

import math
import os
import sys
import time

from common import figure, median_ms, parser, peak_gb, record, replot, require_cuda, result_path, save_figure

DEV = "cuda"  # --dry-run: "cpu"


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def slopes(h):
    """ALiBi-style per-head rates, as benchmarks/bench_kernels.py uses."""
    import torch

    start = 2 ** (-(2 ** -(math.log2(h) - 3)))
    return torch.tensor([start * start**i for i in range(h)], dtype=torch.float32)


def mixed_lengths(tokens: int, lo: int, hi: int, seed: int) -> list[int]:
    """Document lengths drawn log-uniformly from [lo, hi] until they hold ``tokens``; the last one is cut to fit
    and, if that leaves it shorter than ``lo``, merged into the shortest earlier one that stays within ``hi``."""
    import random

    rng, lens = random.Random(seed), []
    while sum(lens) < tokens:
        lens.append(min(int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))), tokens - sum(lens)))
    if len(lens) > 1 and lens[-1] < lo:
        last = lens.pop()
        i = min(range(len(lens)), key=lambda j: lens[j])
        if lens[i] + last <= hi:
            lens[i] += last
        else:
            lens.append(last)
    return lens


def cu_of(lens):
    import torch

    return torch.tensor([0] + list(__import__("itertools").accumulate(lens)), dtype=torch.int32, device=DEV)


def inputs(B, T, H, D, dtype, seed):
    import torch

    g = torch.Generator(device=DEV).manual_seed(seed)
    q, k = (torch.randn(B, T, H, D, device=DEV, generator=g) / D**0.5 for _ in range(2))
    v, do = (torch.randn(B, T, H, D, device=DEV, generator=g) for _ in range(2))
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    return q, k, v, do.to(dtype)


def time_call(call, q, k, v, do):
    """Forward and forward+backward medians (ms) and peak extra GB of ``call(q, k, v) -> o``."""
    fwd = median_ms(lambda: call(q, k, v), DEV)
    fb = median_ms(lambda: call(q, k, v).backward(do), DEV, grad_to_none=[q, k, v])
    return dict(fwd_ms=round(fwd, 4), fwdbwd_ms=round(fb, 4), peak_gb=round(peak_gb(lambda: call(q, k, v).backward(do),
                                                                                    [q, k, v], DEV), 3))


def check_varlen(lens, H, D, dtype, tol):
    """The packed call (with a ``PackedSequences``, as timed) against the kernels run document by document
    (outputs, final states, every gradient), against the same call with the plain tensor (bitwise), and its
    shortest document against float64; ``(ok, errors)``."""
    import torch

    from tnlib.ops import PackedSequences, lightning_attention, linear_attention_chunked
    from tnlib.testing import rel_err

    T, N = sum(lens), len(lens)
    q, k, v, do = inputs(1, T, H, D, dtype, seed=5)
    s = slopes(H).to(DEV)
    g = torch.Generator(device=DEV).manual_seed(6)
    S0 = torch.randn(N, H, D, D, device=DEV, generator=g)
    G = torch.randn(N, H, D, D, device=DEV, generator=g)
    cu = cu_of(lens)

    def packed(boundaries):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, S0)]
        o, S = lightning_attention(*xs[:3], s, xs[3], True, cu_seqlens=boundaries)
        ((o.float() * do.float()).sum() + (S * G).sum()).backward()
        return dict(o=o, S=S, dq=xs[0].grad, dk=xs[1].grad, dv=xs[2].grad, dS0=xs[3].grad)

    got, plain = packed(PackedSequences(cu, T)), packed(cu)
    want = {name: [] for name in got}
    bounds = cu.tolist()
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        xs = [x[:, a:b].detach().clone().requires_grad_() for x in (q, k, v)]
        s0n = S0[n:n + 1].clone().requires_grad_()
        on, Sn = lightning_attention(*xs, s, s0n, True)
        ((on.float() * do[:, a:b].float()).sum() + (Sn * G[n:n + 1]).sum()).backward()
        for name, t in zip(want, (on, Sn, *(x.grad for x in xs), s0n.grad)):
            want[name].append(t)
    errs = {name: rel_err(got[name], torch.cat(want[name], 0 if name in ("S", "dS0") else 1)) for name in got}
    n = min(range(N), key=lambda i: lens[i])  # the shortest document against float64
    a, b = bounds[n], bounds[n + 1]
    ref = linear_attention_chunked(*(x[:, a:b].detach().double() for x in (q, k, v)), s.double(), S0[n:n + 1].double())
    errs["o_vs_float64"] = rel_err(got["o"][:, a:b], ref)
    same = all(torch.equal(got[name], plain[name]) for name in got)
    ok = same and all(e <= tol for e in errs.values())
    return ok, {**{k_: float(f"{e:.3e}") for k_, e in errs.items()}, "same_as_tensor": same}


def fla_call(q, k, v, s, cu):
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(q, k, v, g_gamma=-s, scale=1.0, cu_seqlens=cu.long())[0]


def plot(rows, path, header=None):
    """Forward and forward+backward ms of every timed row, as bars (dense rows first)."""
    timed = [r for r in rows if r.get("fwdbwd_ms")]
    fig, axes = figure(1, 2)
    for ax, key, title in zip(axes[0], ("fwd_ms", "fwdbwd_ms"), ("forward", "forward + backward")):
        labels = [f"{r['impl']}\n{r['name']}" for r in timed]  # the dense rows' names are T=..., the others' not
        ax.bar(range(len(timed)), [r[key] for r in timed],
               color=["C7" if r["kind"] == "dense" else {"tnlib": "C3", "tnlib-tensor": "C1"}.get(r["impl"], "C0")
                      for r in timed])
        ax.set_xticks(range(len(timed)), labels, fontsize=7)
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{title}: {header.get('tokens') if header else ''} tokens, H={header.get('H') if header else ''}")
        ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path, header)


def main():
    ap = parser(__doc__)
    ap.add_argument("--tokens", type=int, default=65536, help="B*T: the tokens of every row")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128, help="head dim (K = V)")
    ap.add_argument("--dense-lens", default="2048,8192", help="T of the dense rows")
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--equal-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0, help="the mixed lengths' draw")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes, Triton's interpreter (checks the script)")
    a = ap.parse_args()
    if replot(a, plot):
        return
    global DEV
    if a.dry_run:  # before anything imports Triton: its interpreter runs the kernels on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"
        DEV = "cpu"
        a.tokens, a.heads, a.dim, a.dense_lens = 256, 2, 16, "128,256"
        a.min_len, a.max_len, a.equal_len = 4, 128, 128
        if a.out == "results/bench":  # never mix dry-run rows into the results
            sys.exit("--dry-run: give --out (a scratch folder)")
    else:
        require_cuda("bench_varlen.py")
    import torch

    from tnlib.ops import PackedSequences, lightning_attention
    from tnlib.ops.lightning import plan

    dtype, H, D, N_tok = (torch.float32 if a.dry_run else torch.bfloat16), a.heads, a.dim, a.tokens
    tol = 2e-6 if dtype == torch.float32 else 1e-2  # tnlib.testing.KERNEL_TOLERANCE of the dtype
    os.makedirs(a.out, exist_ok=True)
    path = result_path(a, "varlen")
    mixed = mixed_lengths(N_tok, a.min_len, a.max_len, a.seed)
    docs = {"mixed": mixed, "equal": [a.equal_len] * (N_tok // a.equal_len), "one": [N_tok]}
    header = dict(what="issue 29: packed documents (cu_seqlens) vs the dense kernel, same tokens", tokens=N_tok,
                  H=H, D=D, dtype=str(dtype).removeprefix("torch."), dry_run=a.dry_run, mixed_lengths=mixed,
                  mixed_seed=a.seed, mixed_range=[a.min_len, a.max_len],
                  varlen_seg_len=plan.launch_config(1, N_tok, H, D, D, dtype, varlen=True).seg_len,
                  method="do_bench median (warmup 25 ms, rep 100 ms), grad_to_none; peak = max_memory_allocated "
                         "during one fwd+bwd minus allocated before")
    rows: list = []
    s = slopes(H).to(DEV)
    log(f"{len(mixed)} mixed documents, {min(mixed)}..{max(mixed)} tokens; varlen segments of {header['varlen_seg_len']}")
    for T in (int(x) for x in a.dense_lens.split(",")):
        q, k, v, do = inputs(N_tok // T, T, H, D, dtype, seed=T)
        row = dict(impl="tnlib", kind="dense", name=f"T={T}", B=N_tok // T, T=T)
        row.update(time_call(lambda q_, k_, v_: lightning_attention(q_, k_, v_, s), q, k, v, do))
        record(path, rows, row, header)
        del q, k, v, do
    def attend(q_, k_, v_, cu):  # cu: the plain tensor ("tnlib-tensor") or a PackedSequences ("tnlib")
        return lightning_attention(q_, k_, v_, s, cu_seqlens=cu)

    impls = [("tnlib", attend), ("tnlib-tensor", attend)]
    if not a.no_fla and not a.dry_run:
        try:
            import fla  # noqa: F401

            impls.append(("fla", lambda q_, k_, v_, cu: fla_call(q_, k_, v_, s, cu)))
        except ImportError as e:
            header["fla"] = f"not importable: {e!r}"[:200]
    for name, lens in docs.items():
        ok, errs = check_varlen(lens, H, D, dtype, tol)
        log(f"check {name}: {'ok' if ok else 'FAILED'} {errs}")
        cu = cu_of(lens)
        for impl, fn in impls:
            row = dict(impl=impl, kind="varlen", name=name, docs=len(lens), max_len=max(lens),
                       check=errs if impl == "tnlib" else None)
            if impl.startswith("tnlib") and not ok:
                row.update(fwd_ms=None, fwdbwd_ms=None, note="skipped: failed the check")
            else:
                try:
                    boundaries = cu
                    if impl == "tnlib":  # what a model step hands its layers: made once, before the timed calls
                        cu_cpu, seg = cu.cpu(), header["varlen_seg_len"]

                        def build():  # from the CPU boundaries, as the trainer does (no device sync)
                            return PackedSequences(cu_cpu, N_tok, device=DEV).work_items(seg)

                        row["build_ms"] = round(median_ms(build, DEV), 4)
                        boundaries = PackedSequences(cu_cpu, N_tok, device=DEV)
                    q, k, v, do = inputs(1, N_tok, H, D, dtype, seed=1)
                    row.update(time_call(lambda q_, k_, v_: fn(q_, k_, v_, boundaries), q, k, v, do))
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    row.update(fwd_ms=None, fwdbwd_ms=None, error=repr(e)[:300])
            record(path, rows, row, header)
    dense = [r for r in rows if r["kind"] == "dense" and r.get("fwdbwd_ms")]
    header["summary"] = [dict(varlen=f"{r['impl']} {r['name']}", dense=d["name"],
                              **{f"{key}_ratio": round(r[key] / d[key], 3) for key in ("fwd_ms", "fwdbwd_ms")},
                              within_10pct=r["fwdbwd_ms"] <= 1.1 * d["fwdbwd_ms"])
                         for r in rows if r["kind"] == "varlen" and r.get("fwdbwd_ms") for d in dense]
    # the host work of a plain-tensor call (value read, table build) as the time it adds to the object's call
    timed = {(r["impl"], r["name"]): r for r in rows if r["kind"] == "varlen" and r.get("fwdbwd_ms")}
    header["host_per_call"] = [
        dict(name=name, **{f"{key}_tensor_over_object": round(t[key] / o[key], 3) for key in ("fwd_ms", "fwdbwd_ms")})
        for name in docs if (o := timed.get(("tnlib", name))) and (t := timed.get(("tnlib-tensor", name)))]
    from tnlib.provenance import provenance, write_results

    write_results(path, rows, header)
    plot(rows, path[: -len(".json")] + ".png", provenance(header))
    for line in header["summary"] + header["host_per_call"]:
        log(line)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
