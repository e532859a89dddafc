"""Two GPUs: DDP, FSDP2 and tensor parallelism (``tnlib.parallel``) checked and timed against each other.

Runs under ``torchrun --nproc_per_node 2`` (``make bench-parallel`` launches it) and refuses with fewer than
2 GPUs, unless ``--dry-run``: the same code on the CPU, 2 gloo processes, a 2-layer ``tnl-tiny`` for every
preset, tiny lengths, fp32 (tests/test_bench_parallel.py runs it). Random tokens (no data set needed); the
model is built, sharded and stepped with the library's pieces as ``tnlib.train`` does (bf16 autocast and
FSDP's bf16/fp32 mixed precision, the chunked loss on CUDA, ``tnlib.parallel.clip_grad_norm``, fused AdamW,
eager), without its checkpoints and final save (minutes for a 7B model). Parts (``--parts``):

* ``correctness``: TP=2 logits and every gradient of ``tnl-385m`` against one GPU's forward/backward of the
  same weights and batch (on rank 0), passing when the TP error is within twice what bf16 itself moves the
  value (bf16 vs fp32 of the one-GPU model; fp32 runs: 1e-5); the first 10 losses of FSDP vs DDP (same
  seed, same batches; within 1e-2 relative in bf16, 1e-5 in fp32).
* ``385m`` (DDP, FSDP, TP=2), ``1b`` (DDP, FSDP), ``7b`` (FSDP, TP=2 + FSDP, both with activation
  checkpointing): tokens/s (median of the timed steps, both GPUs together), peak GB per GPU and MFU
  against the bf16 matrix rate measured on this GPU, at every ``--lens``. A configuration that runs out
  of memory is recorded as such (``fits: false``) and the run goes on.
* ``scaling``: FSDP on 1 GPU (rank 0 alone, a 1-rank group) vs 2 GPUs, ``tnl-385m`` and ``tnl-1b`` at the
  first length, the same tokens per GPU per step (weak scaling, as DDP's 1.86x was measured).

Every configuration has ``--tokens-per-gpu`` tokens per GPU per step (2 GPUs: twice that per step in every
mode; a TP pair shares its batch, so it processes twice the sequences of one DDP rank). Writes
``OUT/parallel-<gpu>x2.json`` with provenance after every row, and a PNG at the end.

    PYTHONPATH=$PWD python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_parallel.py --out $OUT   # = make bench-parallel
    PYTHONPATH=$PWD python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_parallel.py --parts 7b --lens 2048
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python3 -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_parallel.py --dry-run --out /tmp/b
"""
import copy
import datetime
import gc
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import figure, parser, print_table, record, replot, result_path, save_figure

from tnlib.models import Implementation, build_model, get_config
from tnlib.parallel import (apply_fsdp, apply_tensor_parallel, build_mesh, check_parallel, clip_grad_norm,
                            qkvu_rank_order)
from tnlib.provenance import provenance

PARTS = ("correctness", "385m", "1b", "7b", "scaling")
#: part -> (preset, [(mode, activation checkpointing), ...])
THROUGHPUT = {
    "385m": ("tnl-385m", [("ddp", False), ("fsdp", False), ("tp", False)]),
    "1b": ("tnl-1b", [("ddp", False), ("fsdp", False)]),
    "7b": ("tnl-7b", [("fsdp", True), ("tp+fsdp", True)]),
}
SCALING = ("tnl-385m", "tnl-1b")
#: --dry-run: every preset becomes this tiny model (the code paths are the same)
DRY_MODEL = ("tnl-tiny", {"n_layers": 2, "d_model": 64, "n_heads": 4, "glu_dim": 128, "vocab_size": 512})


class Bench:
    """The run's settings and process-group state (one per process)."""

    def __init__(self, a):
        self.a, self.dry = a, a.dry_run
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.device = torch.device("cpu") if self.dry else torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # a hang in a collective (one rank out of memory, the other waiting) ends in an error, not in silence
        dist.init_process_group("gloo" if self.dry else "nccl", timeout=datetime.timedelta(minutes=3))
        self.dtype = None if self.dry else torch.bfloat16  # autocast / FSDP compute dtype (None: fp32)
        self.fused = self.device.type == "cuda"  # the chunked LM head + loss, as tnlib.train on CUDA
        self.meshes = {}
        self.solo = dist.new_group([0])  # rank 0 alone: the 1-GPU runs (collective: every rank creates it)

    def model_config(self, preset):
        if self.dry:
            return get_config(DRY_MODEL[0], **DRY_MODEL[1])
        return get_config(preset)

    def build(self, mcfg, checkpointing=False, seed=0):
        """The model built on the device itself (a 7B model initialised on the CPU takes minutes), seeded;
        ``checkpointing``: activation checkpointing of every block (``Implementation.checkpointing``)."""
        torch.manual_seed(seed)
        with torch.device(self.device):
            return build_model(mcfg, Implementation(checkpointing=checkpointing))

    def mesh(self, tp):
        if tp not in self.meshes:  # each init_device_mesh makes new process groups: one per shape
            self.meshes[tp] = build_mesh(self.device.type, self.world, tp)
        return self.meshes[tp]

    def solo_mesh(self):
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(self.solo, self.device.type, mesh_dim_names=("dp",))

    def batch(self, step, rows, seq_len, vocab, dp_rank, dp_world):
        """Step ``step``'s global batch of ``rows`` random sequences (the same on every rank); this rank's share."""
        x = torch.randint(0, vocab, (rows, seq_len + 1), generator=torch.Generator().manual_seed(1000 + step))
        per = rows // dp_world
        return x[dp_rank * per : (dp_rank + 1) * per].to(self.device)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def wrap(b: Bench, model, mode: str, gpus: int):
    """Spread ``model`` as ``tnlib.train`` does for ``mode`` on ``gpus`` ranks; returns
    ``(what to call, data-parallel rank, data-parallel world)``."""
    if mode == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[b.device.index] if b.device.type == "cuda" else None, gradient_as_bucket_view=True)
        return ddp, b.rank, b.world
    if mode == "fsdp" and gpus == 1:
        return apply_fsdp(model, b.solo_mesh(), b.dtype, one_rank=True), 0, 1  # FSDP2 itself on 1 GPU
    if mode == "fsdp":
        return apply_fsdp(model, b.mesh(1)["dp"], b.dtype), b.rank, b.world
    mesh = b.mesh(2)  # tp / tp+fsdp: the 2 GPUs are one tensor-parallel pair (data dimension 1)
    apply_tensor_parallel(model, mesh["tp"])
    if mode == "tp+fsdp":
        apply_fsdp(model, mesh["dp"], b.dtype)
    return model, mesh["dp"].get_local_rank(), mesh["dp"].size()


def train_steps(b: Bench, preset, mode, gpus, seq_len, steps, checkpointing, lr=3e-4, losses=False):
    """Build, spread and train ``steps`` steps on random tokens; returns ``{"times", "losses", "n_params", "mcfg"}``.
    ``losses``: the global mean loss of every step (one more all-reduce per step; for the correctness part)."""
    mcfg = b.model_config(preset)
    parallel, tp = ("fsdp", 2) if mode == "tp+fsdp" else ("ddp", 2) if mode == "tp" else (mode, 1)
    check_parallel(parallel, tp, gpus, mcfg)
    tokens = b.a.tokens_per_gpu * gpus
    if tokens % seq_len:
        raise SystemExit(f"{tokens} tokens per step is not a multiple of seq_len={seq_len}")
    model = b.build(mcfg, checkpointing)
    n_params = model.num_parameters()
    fwd, dp_rank, dp_world = wrap(b, model, mode, gpus)
    opt_kw = {"fused": True} if b.device.type == "cuda" else ({"foreach": False} if tp > 1 else {})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1,
                            betas=(0.9, 0.95), **opt_kw)
    group = b.solo if gpus == 1 else None
    times, out_losses = [], []
    for step in range(steps):
        x = b.batch(step, tokens // seq_len, seq_len, mcfg.vocab_size, dp_rank, dp_world)
        b.sync()
        t0 = time.perf_counter()
        with torch.autocast(b.device.type, dtype=b.dtype, enabled=b.dtype is not None):
            out = fwd(x[:, :-1], x[:, 1:]) if b.fused else fwd(x[:, :-1])
        loss = out if b.fused else F.cross_entropy(out.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        clip_grad_norm(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        b.sync()
        times.append(time.perf_counter() - t0)
        if losses:
            t = loss.detach().float().reshape(1)
            dist.all_reduce(t, group=group)
            out_losses.append(t.item() / gpus)
    return {"times": times, "losses": out_losses, "n_params": n_params, "mcfg": mcfg}


def run_config(b: Bench, preset, mode, gpus, seq_len, checkpointing, steps, warmup, peak):
    """One timed configuration on every rank (``gpus == 1``: rank 0 runs, rank 1 waits); returns the row
    (rank 0) after cleaning up, out of memory recorded as ``fits: false``."""
    gc.collect()
    if b.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    res, err = None, None
    if b.rank < gpus:
        try:
            res = train_steps(b, preset, mode, gpus, seq_len, warmup + steps, checkpointing)
        except torch.OutOfMemoryError as e:  # both ranks run the same shapes: they run out at the same place
            err = "out of memory: " + str(e).split("\n")[0][:160]
        except Exception as e:  # recorded, so that one failing mode does not cost the others' figures
            traceback.print_exc()
            err = f"{type(e).__name__}: {str(e)[:300]}"
    gc.collect()
    mem = torch.cuda.max_memory_allocated(b.device) / 1e9 if b.device.type == "cuda" else None
    if b.device.type == "cuda":
        torch.cuda.empty_cache()
    everyone = [None] * b.world
    dist.all_gather_object(everyone, {"err": err, "mem": mem, "ran": b.rank < gpus})
    row = {"part": None, "preset": preset, "mode": mode, "gpus": gpus, "seq_len": seq_len,
           "tokens_per_step": b.a.tokens_per_gpu * gpus, "checkpointing": checkpointing}
    if b.dry:
        row["model"] = f"{DRY_MODEL[0]} {DRY_MODEL[1]}"
    errs = [e["err"] for e in everyone if e["err"]]
    if errs:  # fits: false where it ran out of memory; null where it failed otherwise
        return {**row, "fits": False if errs[0].startswith("out of memory") else None, "error": errs[0]}
    timed = res["times"][warmup:] if res else []
    if b.rank != 0:
        return None
    tps = row["tokens_per_step"] / statistics.median(timed)
    mems = [e["mem"] for e in everyone if e["ran"]]
    row.update({"fits": True, "params": res["n_params"], "tokens_per_s": tps,
                "step_s": [round(t, 5) for t in timed], "peak_gb_per_gpu": max(mems) if mems[0] is not None else None,
                "peak_gb_ranks": mems})
    if peak:  # model FLOPs (6 N per token; the recompute of checkpointing not counted) per GPU
        row["mfu"] = 6 * res["n_params"] * tps / (gpus * peak * 1e12)
    return row


def rel_err(a, b):
    """``|a - b| / |b|`` in the Frobenius norm, in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def fwd_bwd(model, ids, dtype, device_type):
    """Logits of ``ids[:, :-1]`` and the gradients of their cross-entropy (the model's .grad)."""
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        logits = model(ids[:, :-1])
    F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
    return logits.detach().float()


def check_tp(b: Bench, seq_len, rows):
    """TP=2 logits and gradients of tnl-385m vs one GPU (rank 0): the TP error against bf16's own."""
    mcfg = b.model_config("tnl-385m")
    ref = b.build(mcfg)
    ids = b.batch(0, rows, seq_len, mcfg.vocab_size, 0, 1)
    grads, ref_logits, own = {}, None, {}
    if b.rank == 0:  # one GPU: bf16 autocast, and fp32 for the scale of bf16's own error
        fp32 = copy.deepcopy(ref)
        exact = fwd_bwd(fp32, ids, None, b.device.type)
        ref_logits = fwd_bwd(ref, ids, b.dtype, b.device.type)
        own["logits"] = rel_err(ref_logits, exact)
        for (name, p), q in zip(ref.named_parameters(), fp32.parameters()):
            own[name] = rel_err(p.grad, q.grad)
            grads[name] = p.grad.float().cpu()
        del fp32, exact
        gc.collect()
    model = copy.deepcopy(ref)
    for p in model.parameters():
        p.grad = None
    del ref
    apply_tensor_parallel(model, b.mesh(2)["tp"])
    logits = fwd_bwd(model, ids, b.dtype, b.device.type)
    d = mcfg.d_model
    errs = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # collective: every rank
        if name.endswith("qkvu_proj.weight"):  # TP stores these rows grouped per rank
            g = g[torch.argsort(qkvu_rank_order(d, g.shape[0] // d, 2)).to(g.device)]
        if b.rank == 0:
            errs[name] = rel_err(g.float().cpu(), grads[name])
    if b.rank != 0:
        return None
    floor = 1e-5  # fp32 runs: bf16's own error is 0
    tol = {k: max(2 * v, floor) for k, v in own.items()}
    logit_err = rel_err(logits, ref_logits)
    bad = sorted(k for k, v in errs.items() if v > tol[k])
    worst = max(errs, key=lambda k: errs[k] / tol[k])
    return {"part": "correctness", "check": "tp2 vs 1 gpu", "preset": "tnl-385m", "seq_len": seq_len, "rows": rows,
            "logits_rel_err": logit_err, "logits_bf16_own_err": own["logits"],
            "grad_worst": worst, "grad_worst_rel_err": errs[worst], "grad_worst_bf16_own_err": own[worst],
            "grads_over_tolerance": bad, "passed": logit_err <= tol["logits"] and not bad}


def check_fsdp_vs_ddp(b: Bench, seq_len):
    """The first 10 losses of FSDP and DDP on 2 GPUs (same seed, same batches)."""
    got = {}
    for mode in ("ddp", "fsdp"):
        gc.collect()
        got[mode] = train_steps(b, "tnl-385m", mode, b.world, seq_len, 10, False, losses=True)["losses"]
    if b.rank != 0:
        return None
    tol = 1e-5 if b.dtype is None else 1e-2
    worst = max(abs(f - d) / abs(d) for f, d in zip(got["fsdp"], got["ddp"]))
    return {"part": "correctness", "check": "fsdp vs ddp, 10 losses", "preset": "tnl-385m", "seq_len": seq_len,
            "ddp_losses": got["ddp"], "fsdp_losses": got["fsdp"], "max_rel_diff": worst, "tolerance": tol,
            "passed": worst <= tol}


def guarded(b: Bench, check, fn, *args):
    """``fn(*args)`` (a correctness check); an exception on any rank becomes a failed row (rank 0)."""
    row, err = None, None
    try:
        row = fn(*args)
    except Exception as e:
        traceback.print_exc()
        err = f"{type(e).__name__}: {str(e)[:300]}"
    gc.collect()
    everyone = [None] * b.world
    dist.all_gather_object(everyone, err)
    errs = [e for e in everyone if e]
    if errs and b.rank == 0:
        return {"part": "correctness", "check": check, "passed": False, "error": errs[0]}
    return row


def plot(rows, path, header=None):
    """Tokens/s of every timed configuration (a cross where it did not fit)."""
    rows = [r for r in rows if r.get("part") != "correctness"]
    fig, axes = figure(size=(max(5.5, 0.45 * len(rows)), 3.8))
    ax = axes[0][0]
    colors = {"ddp": "C0", "fsdp": "C1", "tp": "C2", "tp+fsdp": "C3"}
    for i, r in enumerate(rows):
        if r.get("fits"):
            ax.bar(i, r["tokens_per_s"] / 1e3, color=colors.get(r["mode"], "gray"), alpha=1.0 if r["gpus"] > 1 else 0.5)
        else:
            ax.plot(i, 0, "kx")
    labels = [f"{r['preset'].replace('tnl-', '')} {r['mode']}\n{r['seq_len'] // 1024 or r['seq_len']}"
              f"{'K' if r['seq_len'] >= 1024 else ''} {r['gpus']}gpu" for r in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
    ax.set_ylabel("training tokens/s (thousands, all GPUs)")
    ax.set_yscale("log")
    ax.set_title("DDP / FSDP / tensor parallelism (x: out of memory)")
    save_figure(fig, path, header)


def main():
    ap = parser(__doc__)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    ap.add_argument("--lens", default="2048,32768", help="sequence lengths of the throughput parts")
    ap.add_argument("--tokens-per-gpu", type=int, default=32768, help="tokens per GPU per step")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--steps-7b", type=int, default=4, help="timed steps of tnl-7b (seconds each)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, 2 gloo processes, a 2-layer tnl-tiny, fp32, tiny sizes: the same code paths")
    a = ap.parse_args()
    if replot(a, plot):
        return
    parts = [p for p in a.parts.split(",") if p]
    if not parts or set(parts) - set(PARTS):
        sys.exit(f"--parts: expected some of {','.join(PARTS)}, got {a.parts!r}")
    if a.dry_run:
        a.lens, a.tokens_per_gpu = "32,64", 128
        a.warmup, a.steps, a.steps_7b = 1, 2, 2
        if a.out == "results/bench":  # never mix dry-run rows into the results
            a.out = "runs/bench-parallel-dry"
    elif torch.cuda.device_count() < 2:
        sys.exit(f"bench_parallel.py needs 2 CUDA GPUs (this machine has {torch.cuda.device_count()}); "
                 f"--dry-run runs the same code on the CPU over gloo")
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) != 2:
        sys.exit("bench_parallel.py runs as 2 processes: torchrun --nproc_per_node 2 benchmarks/bench_parallel.py "
                 "(make bench-parallel)")
    lens = [int(t) for t in a.lens.split(",")]
    bad = [t for t in lens if a.tokens_per_gpu % t]
    if bad:
        sys.exit(f"--tokens-per-gpu {a.tokens_per_gpu} is not a multiple of --lens {bad}")

    b = Bench(a)
    out_file = result_path(a, "parallel", f"x{b.world}.json")
    peak = None
    if b.device.type == "cuda":
        from tnlib.train import _measure_peak_tflops

        peak = _measure_peak_tflops(b.device)
    extra = {"world": b.world, "parts": parts, "lens": lens, "tokens_per_gpu": a.tokens_per_gpu, "warmup": a.warmup,
             "steps": a.steps, "steps_7b": a.steps_7b, "peak_bf16_tflops": peak, "dry_run": a.dry_run}
    rows, t_start = [], time.time()

    def log(msg):
        if b.rank == 0:
            print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    def add(row):
        if b.rank == 0 and row is not None:
            record(out_file, rows, row, extra)

    # the configurations to time: (part, preset, mode, gpus, seq_len, checkpointing, steps)
    todo = []
    for part in ("385m", "1b", "7b"):
        if part in parts:
            preset, modes = THROUGHPUT[part]
            steps = a.steps_7b if part == "7b" else a.steps
            todo += [(part, preset, mode, b.world, t, ckpt, steps) for t in lens for mode, ckpt in modes]
    if "scaling" in parts:
        for preset in SCALING:
            if not any(c[1:5] == (preset, "fsdp", b.world, lens[0]) for c in todo):
                todo.append(("scaling", preset, "fsdp", b.world, lens[0], False, a.steps))
            todo.append(("scaling", preset, "fsdp", 1, lens[0], False, a.steps))
    log(f"{len(todo)} configurations to time; parts {parts}; bf16 matrix rate {peak and round(peak)} TFLOP/s")

    if "correctness" in parts:
        t = lens[0]
        log(f"correctness: TP=2 vs one GPU, tnl-385m, T={t}")
        add(guarded(b, "tp2 vs 1 gpu", check_tp, b, t, max(1, a.tokens_per_gpu // t // 4)))
        log("correctness: FSDP vs DDP, 10 losses")
        add(guarded(b, "fsdp vs ddp, 10 losses", check_fsdp_vs_ddp, b, t))
    for i, (part, preset, mode, gpus, t, ckpt, steps) in enumerate(todo):
        log(f"[{i + 1}/{len(todo)}] {preset} {mode} on {gpus} GPU(s), T={t}{', checkpointing' if ckpt else ''}")
        row = run_config(b, preset, mode, gpus, t, ckpt, steps, a.warmup, peak)
        if row is not None:
            row["part"] = part
        add(row)
        dist.barrier()

    if b.rank == 0:
        summary = {}
        for preset in SCALING:
            got = {r["gpus"]: r for r in rows if r.get("fits") and r["preset"] == preset and r["mode"] == "fsdp"
                   and r["seq_len"] == lens[0]}
            if 1 in got and b.world in got:
                summary[f"fsdp_scaling_{preset}"] = got[b.world]["tokens_per_s"] / got[1]["tokens_per_s"]
        for r in rows:
            if r.get("part") == "correctness":
                summary[f"passed: {r['check']}"] = r["passed"]
        extra["summary"] = summary
        if rows:
            from tnlib.provenance import write_results

            write_results(out_file, rows, extra)
            timed = [r for r in rows if r.get("part") != "correctness"]
            print_table(timed, [("preset", "preset", "9s"), ("mode", "mode", "8s"), ("gpus", "gpus", "5d"),
                                ("seq_len", "T", "6d"), ("tokens_per_s", "tokens/s", "12.0f")]
                        + ([("peak_gb_per_gpu", "GB/GPU", "8.1f"), ("mfu", "MFU", "6.3f")] if peak else []))
            print(summary, flush=True)
            plot(rows, out_file[: -len(".json")] + ".png", provenance())
        log(f"done: {out_file}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
