"""The launch plans per GPU family (issue 31), on one H100/H200: Hopper's defaults unchanged, and the smaller
GPUs' plans, forced on the Hopper GPU, correct and how much slower they are there.

Parts (``--parts``, all by default, run in this order; about 4 minutes on an H100 with a cold Triton cache):

  tests    tests/test_lightning.py's kernel tests against the float64 references (segments, two-pass
           backward, packed path, model-sized launches) with every launch planned as for sm_80, sm_86 and
           sm_75 (``TNLIB_TEST_TARGET``, tests/conftest.py): three pytest processes, started first, running
           while ``check`` works (they time nothing)
  check    at the model shapes, each forced plan's forward and backward against a float64 reference
           (one sequence; sm_75's plan in fp16, its training dtype: bf16 takes the PyTorch path there)
  hopper   before/after on this GPU's own (Hopper) plan: commit 94efa3b's tree (``git archive``, or
           ``--before DIR``) and this tree, each in its own process, forward and forward+backward medians
           (``triton.testing.do_bench``), and both trees' launch configurations compared
  forced   forward and forward+backward of each forced plan at the model shapes, beside the default's
  train    a few training steps of tnl-385m blocks (``--layers``, the LRPE layer first; fused loss, AdamW,
           clipping) with every op planned as for each target, fp16 autocast with a GradScaler for sm_75 (what
           ``train`` picks there): losses against the default plan's, tokens/s; then the default plan with
           each block compiled (``torch.compile``: the device lookup inside traced code)
  fp32     (only when named) fp32 inputs at B=16 T=2K: this GPU's fp32 plan (Hopper's, as tuned) beside the
           fp32 tiles of the other families (ptxas reports heavy spills for Hopper's: results/gpus/NOTES.md)

Model shapes: H=8 K=256 V=128 (the LRPE layer) and H=8 K=V=128, B*T = 32,768 (B=16, T=2K) and 65,536
(B=2, T=32K: sequences split into segments); bf16 unless said. Writes ``<out>/plans-<gpu>.json`` (rows
with provenance, rewritten after each) and ``.png``.

    PYTHONPATH=$PWD python3 benchmarks/bench_plans.py --out $OUT
    python3 benchmarks/bench_plans.py --replot results/bench/plans-h100.json
    PYTHONPATH=$PWD python3 benchmarks/bench_plans.py --dry-run --out /tmp/x   # the script itself, on a CPU

``--dry-run`` runs every part's code on the CPU at tiny sizes (PyTorch paths, wall-clock times,
pytest only collecting): it checks the script, and measures nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch
from common import figure, median_ms, parser, record, replot, require_cuda, result_path, save_figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "94efa3b"
FORCED = ("sm_80", "sm_86", "sm_75")
SHAPES = (("H=8 K=256 V=128", 8, 256, 128), ("H=8 K=128 V=128", 8, 128, 128))
BT = ((16, 2048), (2, 32768))
DEV = "cuda"  # --dry-run: "cpu", with the tiny sizes of dry_run()
TEST_SELECTION = ("float64_reference or segmented or two_pass or return_forms or no_decay or packed_matches "
                  "or model_sized")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def slopes(h):
    """ALiBi-style per-head rates, as benchmarks/bench_kernels.py uses."""
    start = 2 ** (-(2 ** -(math.log2(h) - 3)))
    return torch.tensor([start * start**i for i in range(h)], dtype=torch.float32)


def inputs(B, T, H, K, V, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = (torch.randn(B, T, H, K, device=DEV, generator=g) / K**0.5).to(dtype).requires_grad_()
    k = (torch.randn(B, T, H, K, device=DEV, generator=g) / K**0.5).to(dtype).requires_grad_()
    v = torch.randn(B, T, H, V, device=DEV, generator=g).to(dtype).requires_grad_()
    do = torch.randn(B, T, H, V, device=DEV, generator=g).to(dtype)
    return q, k, v, do, slopes(H).to(DEV)


def time_kernels(B, T, H, K, V, dtype, config=None):
    """Median ms of ``lightning_attention`` forward and forward+backward (``config``: forced launches)."""
    from tnlib.ops import lightning_attention

    q, k, v, do, s = inputs(B, T, H, K, V, dtype)
    kw = {} if config is None else {"config": config}
    fwd = median_ms(lambda: lightning_attention(q, k, v, s, **kw), DEV)
    fb = median_ms(lambda: lightning_attention(q, k, v, s, **kw).backward(do), DEV, grad_to_none=[q, k, v])
    return round(fwd, 4), round(fb, 4)


def _plan_94efa3b(B, T, H, DK, DV, dtype):
    """The launch plan of commit 94efa3b (one plan for every GPU), for a tree without git history."""
    from tnlib.ops.lightning.plan import LaunchConfig, Tile, segment_plan

    fp32 = dtype == torch.float32

    def generic(DK, DV):
        if fp32:
            t = Tile(32 if DK >= 128 else 64, min(DV, 32), 4, 1)
        elif DK >= 256:
            t = Tile(64, min(DV, 32), 4, 1)
        else:
            t = Tile(64, min(DV, 64), 4, 2)
        return dataclasses.replace(t, scale_value=DK <= 128 and not fp32)

    fwd = generic(DK, DV)
    # the state kernel of 94efa3b scaled the value tile whatever its tile said: scale_value=True is what ran
    state = dataclasses.replace(fwd, scale_value=True) if fp32 else Tile(64, min(DV, 128 if DK <= 128 else 64), 8, 2, True)
    dkdv = None
    if DK <= 128 and DV <= 128 and (not fp32 or DK * DV <= 64 * 64):
        dkdv = Tile(32 if fp32 else 64, DV, 8 if DK * DV >= 128 * 128 else 4, 1 if fp32 else 2)
    return LaunchConfig(seg_len=segment_plan(B, H, T, DV // fwd.block_v), forward=fwd, dq=generic(DV, DK), state=state,
                        dkdv=dkdv, dv=generic(DK, DV), dk=generic(DV, DK))


def worker(old_configs: bool):
    """``--worker``: time the default plan of the tnlib on ``PYTHONPATH`` (or, with ``--old-configs``, this
    tree forced to 94efa3b's plan) and print one ``ROW {json}`` per shape, with the configs it launched."""
    import inspect

    import tnlib
    from tnlib.ops.lightning import plan

    takes_target = "target" in inspect.signature(plan.launch_config).parameters
    for name, H, K, V in SHAPES:
        for B, T in BT:
            if old_configs:
                cfg = _plan_94efa3b(B, T, H, K, V, torch.bfloat16)
            elif takes_target:
                from tnlib.ops.targets import device_target

                cfg = plan.launch_config(B, T, H, K, V, torch.bfloat16, device_target(DEV))
            else:
                cfg = plan.launch_config(B, T, H, K, V, torch.bfloat16)
            fwd, fb = time_kernels(B, T, H, K, V, torch.bfloat16, cfg if old_configs else None)
            print("ROW " + json.dumps(dict(shape=name, B=B, T=T, fwd_ms=fwd, fwdbwd_ms=fb, config=cfg.to_ints(),
                                           tnlib=os.path.dirname(tnlib.__file__))), flush=True)


def before_tree(args, tmp):
    """``(PYTHONPATH for the before tree or None, how it was obtained)``."""
    if args.before:
        return args.before, f"--before {args.before}"
    dest = os.path.join(tmp, "before")
    os.makedirs(dest)
    r = subprocess.run(f"git -C {ROOT} archive {BEFORE} tnlib | tar -x -C {dest}", shell=True, capture_output=True,
                       text=True)
    if r.returncode == 0 and os.path.isfile(os.path.join(dest, "tnlib", "ops", "lightning", "plan.py")):
        return dest, f"git archive {BEFORE}"
    return None, f"no git history here ({r.stderr.strip()[:120]}): this tree forced to {BEFORE}'s plan"


def run_worker(pythonpath, old_configs=False):
    env = dict(os.environ, PYTHONPATH=pythonpath)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker"] + (["--old-configs"] if old_configs else []) + \
        (["--dry-run"] if DEV == "cpu" else [])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    rows = [json.loads(line[4:]) for line in r.stdout.splitlines() if line.startswith("ROW ")]
    if r.returncode or not rows:
        raise RuntimeError(f"worker failed ({r.returncode}): {(r.stderr or r.stdout)[-800:]}")
    return rows


@contextlib.contextmanager
def forced_target(name):
    """Every op plans as for ``name`` (None: this GPU's own plan): the device lookup answers that target."""
    from tnlib.ops import _triton, targets
    from tnlib.ops.lightning import op

    def clear():
        _triton._kernels_take.cache_clear()
        op._cached_config.cache_clear()
        targets._cuda_target.cache_clear()

    clear()
    if name is None:
        yield None
    else:
        t = targets.parse_target(name)
        with mock.patch.object(targets, "_cuda_target", lambda index: t):
            yield t
    clear()


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def dtype_of(target):
    return torch.float16 if target == "sm_75" else torch.bfloat16


def part_tests(args):
    """Start the forced-plan pytest runs (one process per target); returns a function that waits for them."""
    procs = {}
    for t in FORCED:
        env = dict(os.environ, TNLIB_TEST_TARGET=t, PYTHONPATH=ROOT)
        path = os.path.join(args.out, f"tests-{t}.log")
        f = open(path, "w")
        cmd = [sys.executable, "-m", "pytest", "tests/test_lightning.py", "-m", "triton", "-o", "addopts=", "-q", "-rf",
               "-p", "no:cacheprovider", "-k", TEST_SELECTION] + (["--collect-only"] if DEV == "cpu" else [])
        procs[t] = (subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT), f, path, time.time())

    def wait(path_json, rows):
        for t, (p, f, path, t0) in procs.items():
            p.wait()
            f.close()
            tail = open(path).read().strip().splitlines()[-1:] or [""]
            record(path_json, rows, dict(part="tests", target=t, returncode=p.returncode, summary=tail[0][-200:],
                                         seconds=round(time.time() - t0, 1)), HEADER)
    return wait


def guarded(path, rows, row, fn):
    """Record ``row`` updated with ``fn()``'s dict, or with the error it raised (the run goes on)."""
    try:
        row.update(fn())
    except Exception as e:  # noqa: BLE001 - a failing configuration is a result, recorded
        row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
    record(path, rows, row, HEADER)
    empty_cache()


def part_check(path, rows):
    from tnlib.ops import lightning_attention, linear_attention_chunked
    from tnlib.ops.lightning.plan import launch_config
    from tnlib.ops.targets import parse_target
    from tnlib.testing import TOLERANCE, rel_err

    def check(cfg, B, T, H, K, V, dtype):
        q, k, v, do, s = inputs(B, T, H, K, V, dtype, seed=1)
        o = lightning_attention(q, k, v, s, config=cfg)
        o.backward(do)
        b = slice(0, 1)  # the reference on one sequence (float64, chunked form)
        xr = [x[b].detach().double().requires_grad_() for x in (q, k, v)]
        orf = linear_attention_chunked(*xr, s.double(), block_size=256)
        orf.backward(do[b].double())
        errs = dict(o=rel_err(o[b], orf), dq=rel_err(q.grad[b], xr[0].grad), dk=rel_err(k.grad[b], xr[1].grad),
                    dv=rel_err(v.grad[b], xr[2].grad))
        tol = TOLERANCE[dtype]  # a model-sized sum: test_model_sized_launch_on_gpu's budget
        return dict(tol=tol, errs={k_: float(f"{e:.3e}") for k_, e in errs.items()},
                    ok=all(e <= tol for e in errs.values()))

    for t in FORCED:
        dtype = dtype_of(t)
        for name, H, K, V in SHAPES:
            for B, T in BT:
                cfg = launch_config(B, T, H, K, V, dtype, parse_target(t))
                guarded(path, rows, dict(part="check", target=t, dtype=str(dtype)[6:], shape=name, B=B, T=T,
                                         n_seg=cfg.n_seg(T), dkdv_fused=cfg.dkdv is not None),
                        lambda: check(cfg, B, T, H, K, V, dtype))


def part_hopper(args, path, rows, tmp):
    from tnlib.ops.lightning.plan import LaunchConfig

    tree, how = before_tree(args, tmp)
    runs = [("before", tree, False) if tree else ("before", ROOT, True), ("after", ROOT, False)]
    results = {}
    for label, pp, old in runs * args.rounds:
        log(f"hopper: {label} ({how if label == 'before' else 'this tree'})")
        source = how if label == "before" else "this tree"
        try:
            for r in run_worker(pp, old):
                record(path, rows, dict(part="hopper", tree=label, source=source, **r), HEADER)
                results.setdefault(label, {})[(r["shape"], r["B"], r["T"])] = r
        except RuntimeError as e:
            record(path, rows, dict(part="hopper", tree=label, source=source, error=str(e)[-1500:]), HEADER)
    if len(results) < 2:
        return results
    same = all(results["before"][key]["config"] == results["after"][key]["config"] for key in results["after"])
    record(path, rows, dict(part="hopper-configs", equal=same, configs={
        f"{s} B={b} T={t}": str(LaunchConfig.from_ints(r["config"])) for (s, b, t), r in results["after"].items()}),
        HEADER)
    return results


def part_forced(path, rows):
    from tnlib.ops.lightning.plan import launch_config
    from tnlib.ops.targets import parse_target

    base = {}
    for name, H, K, V in SHAPES:
        for B, T in BT:
            for dtype in (torch.bfloat16, torch.float16):
                base[(name, B, T, dtype)] = time_kernels(B, T, H, K, V, dtype)

    def timed(cfg, B, T, H, K, V, dtype, d_fwd, d_fb):
        fwd, fb = time_kernels(B, T, H, K, V, dtype, cfg)
        return dict(fwd_ms=fwd, fwdbwd_ms=fb, slowdown_fwd=round(fwd / d_fwd, 3), slowdown_fwdbwd=round(fb / d_fb, 3))

    for t in FORCED:
        dtype = dtype_of(t)
        for name, H, K, V in SHAPES:
            for B, T in BT:
                cfg = launch_config(B, T, H, K, V, dtype, parse_target(t))
                d_fwd, d_fb = base[(name, B, T, dtype)]
                guarded(path, rows, dict(part="forced", target=t, dtype=str(dtype)[6:], shape=name, B=B, T=T,
                                         default_fwd_ms=d_fwd, default_fwdbwd_ms=d_fb, config=str(cfg)),
                        lambda: timed(cfg, B, T, H, K, V, dtype, d_fwd, d_fb))


def part_fp32(path, rows):
    from tnlib.ops.lightning.plan import launch_config
    from tnlib.ops.targets import parse_target

    B, T = BT[0]

    def both(cfg, H, K, V):
        d_fwd, d_fb = time_kernels(B, T, H, K, V, torch.float32)
        fwd, fb = time_kernels(B, T, H, K, V, torch.float32, cfg)
        return dict(default_fwd_ms=d_fwd, default_fwdbwd_ms=d_fb, other_fwd_ms=fwd, other_fwdbwd_ms=fb)

    for name, H, K, V in SHAPES:
        cfg = launch_config(B, T, H, K, V, torch.float32, parse_target("sm_86"))
        guarded(path, rows, dict(part="fp32", shape=name, B=B, T=T, other_config=str(cfg)), lambda: both(cfg, H, K, V))


def train_run(target, layers, steps, B, T, compiled=False, vocab=None):
    """Losses and tokens/s of ``steps`` training steps with every op planned as for ``target``."""
    import tnlib
    from tnlib.train import precision_for

    with forced_target(target):
        autocast, scaled = precision_for("auto", torch.device(DEV))
        torch.manual_seed(0)
        vocab = vocab or (4096 if DEV == "cpu" else 50272)
        model = tnlib.create_model("tnl-385m", n_layers=layers, vocab_size=vocab).to(DEV)
        if compiled:
            model.compile_blocks()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=DEV == "cuda")
        scaler = torch.amp.GradScaler(DEV) if scaled else None
        g = torch.Generator(device=DEV).manual_seed(0)
        batches = [torch.randint(0, vocab, (B, T + 1), device=DEV, generator=g) for _ in range(4)]
        losses, times = [], []
        for i in range(steps):
            x = batches[i % len(batches)]
            sync()
            t0 = time.perf_counter()
            with torch.autocast(DEV, dtype=autocast, enabled=autocast is not None):
                loss = model(x[:, :-1], x[:, 1:])
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(round(loss.item(), 5))
        timed = sorted(times[2:]) or times
        return dict(autocast=str(autocast).removeprefix("torch."), loss_scaler=scaled, losses=losses,
                    tokens_per_s=round(B * T / timed[len(timed) // 2]), first_step_s=round(times[0], 1))


def part_train(args, path, rows):
    runs = [(None, False)] + [(t, False) for t in FORCED] + ([(None, True)] if DEV == "cuda" else [])
    ref = []

    def run(t, compiled):
        r = train_run(t, args.layers, args.steps, args.batch, args.seq, compiled)
        ref[:] = ref or r["losses"]
        return dict(max_rel_loss_diff_vs_default=round(max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref)), 5),
                    **r)

    for t, compiled in runs:
        log(f"train: plan {t or 'default'}{' compiled' if compiled else ''}")
        guarded(path, rows, dict(part="train", plan=t or "default", compiled=compiled, layers=args.layers,
                                 B=args.batch, T=args.seq, steps=args.steps), lambda: run(t, compiled))


def plot(rows, path, header=None):
    """Forward+backward ms per plan at each model shape: the default before/after and each forced plan."""
    import numpy as np

    keys = [(s, b, t) for s, *_ in SHAPES for b, t in BT]
    series = {}
    for r in rows:
        if "error" in r:
            continue
        if r.get("part") == "hopper":
            series.setdefault(f"sm_90 default, {r['tree']}", {})[(r["shape"], r["B"], r["T"])] = r["fwdbwd_ms"]
        elif r.get("part") == "forced":
            series.setdefault(f"{r['target']} plan ({r['dtype']})", {})[(r["shape"], r["B"], r["T"])] = r["fwdbwd_ms"]
    fig, axes = figure(1, 1, size=(9, 3.8))
    ax = axes[0][0]
    w = 0.8 / max(1, len(series))
    for i, (label, vals) in enumerate(series.items()):
        ax.bar(np.arange(len(keys)) + i * w, [vals.get(k, 0) for k in keys], w, label=label)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - w / 2)
    ax.set_xticklabels([f"{s}\nB={b} T={t}" for s, b, t in keys], fontsize=7)
    ax.set_ylabel("forward+backward (ms)")
    ax.legend(fontsize=7)
    save_figure(fig, path, header)


HEADER: dict = {}


def main():
    ap = parser(__doc__)
    ap.add_argument("--parts", default="tests,check,hopper,forced,train", help="comma-separated parts to run")
    ap.add_argument("--before", default=None, help=f"a tree holding {BEFORE}'s tnlib/ (default: git archive {BEFORE})")
    ap.add_argument("--rounds", type=int, default=1, help="before/after rounds (alternating)")
    ap.add_argument("--layers", type=int, default=2, help="tnl-385m blocks in the training steps")
    ap.add_argument("--steps", type=int, default=8, help="training steps per plan")
    ap.add_argument("--batch", type=int, default=8, help="training sequences per step")
    ap.add_argument("--seq", type=int, default=2048, help="training sequence length")
    ap.add_argument("--dry-run", action="store_true", help="run every part on the CPU at tiny sizes (checks the script)")
    ap.add_argument("--worker", action="store_true", help=argparse_hidden())
    ap.add_argument("--old-configs", action="store_true", help=argparse_hidden())
    args = ap.parse_args()
    if replot(args, plot):
        return
    if args.dry_run:
        dry_run(args)
    else:
        require_cuda("bench_plans.py")
    if args.worker:
        return worker(args.old_configs)
    from tnlib.ops.targets import device_target

    parts = args.parts.split(",")
    path = result_path(args, "plans")
    os.makedirs(args.out, exist_ok=True)
    HEADER.update(what="issue 31: launch plans per GPU family on a Hopper GPU",
                  device_target=getattr(device_target(DEV), "name", None), dry_run=args.dry_run,
                  before=BEFORE, forced=list(FORCED), parts=parts)
    rows: list = []
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        wait_tests = part_tests(args) if "tests" in parts else None
        if "check" in parts:
            log("check: forced plans against float64")
            part_check(path, rows)
        if wait_tests:
            log("tests: waiting for the forced-plan pytest runs")
            wait_tests(path, rows)
        if "hopper" in parts:
            part_hopper(args, path, rows, tmp)
        if "forced" in parts:
            log("forced: timings")
            part_forced(path, rows)
        if "train" in parts:
            part_train(args, path, rows)
        if "fp32" in parts:
            log("fp32: this GPU's fp32 plan vs the other families' fp32 tiles")
            part_fp32(path, rows)
    plot(rows, path[: -len(".json")] + ".png", HEADER)
    log(f"done in {time.time() - t_start:.0f} s: {path}")


def dry_run(args):
    """Tiny sizes on the CPU: the script's code paths, nothing measured."""
    global DEV, SHAPES, BT
    DEV, SHAPES, BT = "cpu", (("H=2 K=32 V=16", 2, 32, 16), ("H=2 K=16 V=16", 2, 16, 16)), ((2, 64), (1, 600))
    args.layers, args.steps, args.batch, args.seq = 1, 3, 1, 32


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
