"""Training loop: AdamW + warmup/cosine, bf16 autocast (fp16 with a loss scaler on GPUs without bf16),
accumulation, checkpoints, resume, DDP/FSDP/TP.

Taught in ``notebooks/09_train_385m.ipynb``; run as ``python -m tnlib train --preset tnl-tiny --data DIR``
(or under ``torchrun --nproc_per_node N`` for data parallelism; ``parallel=fsdp`` and ``tensor_parallel``
spread the model itself over ranks, see ``tnlib.parallel``). Everything a run needs to continue
exactly (weights, optimizer, RNG, step, the data position and the config) is checkpointed every
``ckpt_every`` steps and on SIGINT/SIGTERM; ``--resume`` picks it up and continues the same loss curve.
Sharded runs write their checkpoint with ``torch.distributed.checkpoint``, which any number of ranks
can resume (``python -m tnlib consolidate`` turns it into one file).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataError, TokenFile
from .fields import check_fields
from .models import build_model, get_config
from .parallel import (SHARDED_DIR, apply_fsdp, apply_tensor_parallel, build_mesh, canonical_state_dict,
                       check_parallel, clip_grad_norm, init_distributed, load_sharded, save_sharded)
from .ops.targets import device_target
from .provenance import provenance

__all__ = ["TrainConfig", "TRAIN_CHOICES", "train", "evaluate", "lr_at", "batch_at", "precision_for"]

#: allowed values of TrainConfig's string-valued switches
TRAIN_CHOICES = {
    "dtype": ("auto", "bf16", "fp16", "fp32"),
    "compile_scope": ("blocks", "model"),
    "parallel": ("ddp", "fsdp"),
}
#: TrainConfig fields that must be >= 1 (counts and sizes)
_AT_LEAST_ONE = ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_tokens", "ckpt_every",
                 "tensor_parallel")


@dataclass
class TrainConfig:
    """Everything one training run needs. Every field is parsed into its declared type when the
    config is built (strings from ``--set`` included; ``tnlib.fields``), string switches are checked
    against ``TRAIN_CHOICES``, and ``model_overrides`` against the preset's ``ModelConfig``: a wrong
    value fails here, before any data is read or a model is built."""

    preset: str = "tnl-tiny"
    model_overrides: dict = field(default_factory=dict)
    data: str = "data/sample/prepared"
    out: str = "runs/tnl-tiny"
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    max_steps: int = 200  # also the length of the cosine schedule
    max_tokens: int | None = None  # stop earlier at this many training tokens (all processes)
    max_minutes: float | None = None  # stop earlier after this wall-clock time
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_tokens: int = 65536  # per held-out set
    eval_sets: tuple = ("val",)
    ckpt_every: int = 100
    seed: int = 1234  # initialisation (and, unless data_seed is set, the data order)
    data_seed: int | None = None  # the data order alone: runs that differ only in `seed` then see the same batches
    # auto: bf16 autocast on a CUDA GPU with bf16 (sm_80+), fp16 autocast with a loss scaler on one without
    # (sm_75: T4, RTX 20xx), fp32 on a CPU (precision_for)
    dtype: str = "auto"
    compile: bool = False
    # what torch.compile sees: "blocks" (each block compiled on its own, the embedding/head/loss eager;
    # under DDP the blocks' backward graphs hand gradients to the all-reduce as they finish: the better
    # scaling, results/385m/scaling-*.json) or "model" (one graph per forward; dynamo splits it at DDP's
    # gradient buckets)
    compile_scope: str = "blocks"
    checkpointing: bool = False
    ddp_bucket_mb: float = 25.0  # DDP gradient bucket size (torch's default); larger = fewer, bigger all-reduces
    # how the model is spread over the processes (tnlib.parallel): "ddp" = a whole replica on each (fastest
    # while it fits); "fsdp" = fully_shard per block: parameters, gradients and AdamW state split over ranks
    parallel: str = "ddp"
    # parallel=fsdp on a data dimension of one rank: FSDP2 anyway (True; only to measure what it costs) or,
    # by default, the plain model with the same sharded checkpoints (nothing to shard, results/parallel)
    fsdp_one_rank: bool = False
    # heads and SGLU channels of every block split over this many adjacent ranks (Megatron-style);
    # the world size must be a multiple, the rest is the data dimension (sharded with FSDP)
    tensor_parallel: int = 1
    # LM head + cross-entropy in row chunks, no [tokens, vocab] logits (tnlib.ops.loss; one Triton kernel
    # per chunk on a GPU: faster and far less memory, results/bench/NOTES-model.md). None: on for CUDA, off on a CPU
    fused_loss: bool | None = None
    peak_tflops: float | None = None  # for MFU; None: measured once on CUDA, not reported on CPU
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        check_fields(self, TRAIN_CHOICES)
        for key in _AT_LEAST_ONE:
            if getattr(self, key) < 1:
                raise ValueError(f"TrainConfig.{key}={getattr(self, key)!r}: expected an integer >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps!r}: expected an integer >= 0")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r}: expected a number > 0")
        # the model overrides, parsed as the model config will see them (preset and field names too)
        mcfg = get_config(self.preset, **self.model_overrides)
        self.model_overrides = {k: getattr(mcfg, k) for k in self.model_overrides}

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * (_world()[1] // self.tensor_parallel)


def _world():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def precision_for(dtype: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, loss scaler on)`` for ``TrainConfig.dtype`` on ``device``.

    ``"auto"``: bf16 on a GPU with bf16 tensor cores, fp16 with a loss scaler (``torch.amp.GradScaler``)
    on one without, none (fp32) on a CPU. Raises ``ValueError``, saying what to use instead, for bf16 on a
    GPU without bf16 and for fp16 on a CPU."""
    if device.type != "cuda":
        if dtype == "fp16":
            raise ValueError("TrainConfig.dtype='fp16' is for CUDA GPUs (fp16 autocast with a loss scaler); on a "
                             "CPU use dtype=fp32 (what auto picks) or bf16")
        return (torch.bfloat16 if dtype == "bf16" else None), False
    try:
        target = device_target(device)
        has_bf16, what = target.bf16, f"{target.gpus} ({target.name})"
    except ValueError:  # below sm_75: no kernels, and no bf16 either
        major, minor = torch.cuda.get_device_capability(device)
        has_bf16, what = False, f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    if dtype == "bf16" and not has_bf16:
        raise ValueError(f"TrainConfig.dtype='bf16': {what} has no bf16 tensor cores; use dtype=auto or fp16 (fp16 "
                         "autocast with a loss scaler, the default on this GPU) or dtype=fp32")
    if dtype == "fp16" or (dtype == "auto" and not has_bf16):
        return torch.float16, True
    return (torch.bfloat16 if dtype in ("auto", "bf16") else None), False


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def batch_at(tokens: np.ndarray, step: int, micro: int, cfg: TrainConfig, rank: int, world: int):
    """The training windows of data-parallel ``rank`` of ``world`` for (step, micro-batch): rows
    ``rank * batch_size ...`` of the step's global batch of ``world * batch_size`` windows, a pure function
    of the data seed (``cfg.data_seed``, else ``cfg.seed``). So resuming at a step replays exactly the data
    the interrupted run would have seen, also on another number of processes with the same global batch
    (e.g. 1 x 8 sequences after 2 x 4)."""
    seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    rng = np.random.default_rng([seed, step, micro, 0, 1])  # the key of single-process runs since the start
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, size=cfg.batch_size * world)
    starts = starts[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
    x = np.stack([tokens[s : s + cfg.seq_len + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x)


@torch.no_grad()
def evaluate(model, tf: TokenFile, seq_len: int, max_tokens: int, batch_size: int, device, autocast_dtype):
    """Loss (nats/token), perplexity and bits per byte over the first ``max_tokens`` of a held-out set,
    in non-overlapping windows."""
    model.eval()
    n = min(len(tf.tokens) - 1, max_tokens)
    n_win = max(1, n // seq_len)
    total, count = 0.0, 0
    for i in range(0, n_win, batch_size):
        rows = [tf.tokens[j * seq_len : j * seq_len + seq_len + 1] for j in range(i, min(n_win, i + batch_size))]
        rows = [r for r in rows if len(r) == seq_len + 1] or [tf.tokens[: min(len(tf.tokens), seq_len + 1)]]
        x = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    loss = total / count
    # bits per byte: the set's bytes scaled to the evaluated share of its tokens
    bytes_eval = tf.bytes * count / max(1, len(tf.tokens))
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bpb": total / math.log(2) / bytes_eval, "tokens": count}


def _param_groups(model, weight_decay):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_checkpoint(path, model, opt, step, tokens_seen, cfg, metrics_pos, sharded=False, rank=0, scaler=None):
    """Write ``path`` atomically (a ``.tmp`` folder renamed at the end). Single-file (rank 0 only):
    ``model.safetensors`` + the optimizer (and the fp16 loss scaler, if any) in ``state.pt``. ``sharded``
    (every rank calls it): each rank's shards of weights and optimizer under ``sharded/``
    (``tnlib.parallel.save_sharded``)."""
    import shutil

    tmp = path + ".tmp"
    if sharded:
        if rank == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)
        torch.distributed.barrier()
        save_sharded(tmp, model, opt)
        torch.distributed.barrier()
    if rank != 0:
        return
    os.makedirs(tmp, exist_ok=True)
    state = {"step": step, "tokens_seen": tokens_seen, "torch_rng": torch.get_rng_state(), "metrics_pos": metrics_pos,
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if not sharded:
        from safetensors.torch import save_model

        save_model(model, os.path.join(tmp, "model.safetensors"))
        state["optimizer"] = opt.state_dict()
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"train": dataclasses.asdict(cfg), "model": model.config.to_dict()}, f, indent=2)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def _measure_peak_tflops(device, dtype=torch.bfloat16) -> float:
    """``dtype`` (the autocast dtype) matmul rate measured on this GPU (no hard-coded hardware peaks)."""
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t) / 1e12


def _check_replicas_in_sync(model) -> None:
    """DDP sanity check (once, at the end): every process must hold the same weights."""
    with torch.no_grad():
        mine = torch.stack([p.detach().float().sum() for p in model.parameters()])
        everyone = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(everyone, mine)
    if not all(torch.equal(mine, other) for other in everyone):
        raise RuntimeError("DDP replicas diverged: the processes hold different weights")


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or resume) one model; returns the final metrics dict. Writes ``cfg.out``/metrics.jsonl,
    ``checkpoint/`` and ``final/`` (safetensors + config)."""
    rank, world = _world()
    tp = cfg.tensor_parallel
    check_parallel(cfg.parallel, tp, world, get_config(cfg.preset, **cfg.model_overrides))
    if cfg.compile and tp > 1:
        raise ValueError("compile=true with tensor_parallel > 1 is not supported (untested): use compile=false")
    sharded = cfg.parallel == "fsdp" or tp > 1  # checkpoints through torch.distributed.checkpoint
    if cfg.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    autocast_dtype, loss_scaling = precision_for(cfg.dtype, device)  # refuses what this device cannot run, first
    if loss_scaling and sharded:
        raise ValueError("fp16 training with a loss scaler runs with parallel=ddp and tensor_parallel=1 only; on this "
                         "GPU use those, or dtype=fp32")
    own_group = False
    if (world > 1 or sharded) and not torch.distributed.is_initialized():
        init_distributed(device.type)  # a lone process gets a 1-rank group (FSDP needs one)
        own_group = True
    mesh = build_mesh(device.type, world, tp) if sharded else None
    # the data dimension: tensor-parallel ranks of one group read the same batch
    dp_rank, dp_world = (mesh["dp"].get_local_rank(), world // tp) if mesh is not None else (rank, world)
    if cfg.fused_loss is None:  # resolved here, so the run's recorded config says what ran
        cfg = dataclasses.replace(cfg, fused_loss=device.type == "cuda")

    train_tf = TokenFile.open(cfg.data, "train")
    with open(os.path.join(cfg.data, "meta.json")) as f:
        meta = json.load(f)
    eval_tfs = {name: TokenFile.open(cfg.data, name) for name in cfg.eval_sets}
    if len(train_tf.tokens) <= cfg.seq_len + 1:
        raise DataError(f"training split has {len(train_tf.tokens)} tokens, fewer than seq_len={cfg.seq_len}")

    mcfg = get_config(cfg.preset, **{"vocab_size": meta["vocab_size"], **cfg.model_overrides,
                                     "checkpointing": cfg.checkpointing})
    if mcfg.vocab_size < meta["vocab_size"]:
        raise DataError(f"model vocab {mcfg.vocab_size} < tokenizer vocab {meta['vocab_size']}")
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)

    os.makedirs(cfg.out, exist_ok=True)
    ckpt_dir = os.path.join(cfg.out, "checkpoint")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    step, tokens_seen = 0, 0
    ckpt_sharded = False
    if resume:
        if not os.path.isdir(ckpt_dir):
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
        with open(os.path.join(ckpt_dir, "config.json")) as f:
            saved = json.load(f)
        if saved["model"] != mcfg.to_dict():
            raise ValueError("--resume: the checkpoint's model config differs from this run's")
        ckpt_sharded = os.path.isdir(os.path.join(ckpt_dir, SHARDED_DIR))
        saved_tp = saved["train"].get("tensor_parallel", 1)
        if ckpt_sharded and saved_tp != tp:
            raise ValueError(f"--resume: the checkpoint was written with tensor_parallel={saved_tp}; resume with the "
                             f"same (any number of data-parallel ranks), or consolidate it first")
        if not ckpt_sharded and sharded:
            raise ValueError("--resume: this checkpoint is single-file (written by parallel=ddp): resume it with "
                             "parallel=ddp")
        if not ckpt_sharded:  # whole weights, before any wrapping
            from safetensors.torch import load_model

            load_model(model, os.path.join(ckpt_dir, "model.safetensors"), device=str(device))

    raw_model = model
    if cfg.compile and cfg.compile_scope == "blocks":
        raw_model.compile_blocks()
    if tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if cfg.parallel == "fsdp":  # on one rank apply_fsdp returns the plain model unless fsdp_one_rank
        apply_fsdp(model, mesh["dp"], autocast_dtype, one_rank=cfg.fsdp_one_rank)
    from torch.distributed.fsdp import FSDPModule

    fsdp = isinstance(model, FSDPModule)
    # fused AdamW on CUDA; the per-tensor loop where plain and tensor-parallel (DTensor) weights mix
    opt_kw = {"fused": True} if device.type == "cuda" else ({"foreach": False} if tp > 1 else {})
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **opt_kw)
    scaler = torch.amp.GradScaler(device.type) if loss_scaling else None  # fp16: gradients scaled against underflow
    if resume:
        state = torch.load(os.path.join(ckpt_dir, "state.pt"), map_location=device, weights_only=False)
        if ckpt_sharded:  # resharded to however this run is spread
            load_sharded(ckpt_dir, model, opt)
        else:
            opt.load_state_dict(state["optimizer"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if os.path.exists(metrics_path):  # drop log lines written after the checkpoint
            with open(metrics_path, "rb+") as f:
                f.truncate(state["metrics_pos"])
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)

    ddp = world > 1 and not sharded
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=cfg.ddp_bucket_mb,
            gradient_as_bucket_view=True)
    fwd = torch.compile(model) if cfg.compile and cfg.compile_scope == "model" else model
    n_params = raw_model.num_parameters()
    peak = cfg.peak_tflops or (_measure_peak_tflops(device, autocast_dtype or torch.float32)
                               if device.type == "cuda" else None)

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log = open(metrics_path, "a") if rank == 0 else None

    def write(rec):
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    if rank == 0 and step == 0:
        write({"event": "start", "config": dataclasses.asdict(cfg), "model": mcfg.to_dict(), "params": n_params,
               "precision": {"autocast": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else None,
                             "loss_scaler": loss_scaling},
               "provenance": provenance(), "data_meta": {k: meta[k] for k in ("vocab_size", "tokenizer_sha256", "splits")}})

    def run_eval():
        res = {}
        for name, tf in eval_tfs.items():
            r = evaluate(raw_model, tf, cfg.seq_len, cfg.eval_tokens, cfg.batch_size, device, autocast_dtype)
            res.update({f"{name}_loss": r["loss"], f"{name}_ppl": r["ppl"], f"{name}_bpb": r["bpb"]})
        return res

    from .progress import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {cfg.preset}", disable=not (cfg.progress and rank == 0),
               dynamic_ncols=True)
    t_start = time.time()
    model.train()
    last = {}
    try:
        while step < cfg.max_steps:
            if cfg.max_tokens is not None and tokens_seen >= cfg.max_tokens:
                break
            if cfg.max_minutes is not None and (time.time() - t_start) / 60 >= cfg.max_minutes:
                break
            t0 = time.time()  # the previous step ended with a synchronize
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=device)  # read once, after the step: no wait per micro-batch
            for micro in range(cfg.grad_accum):
                x = batch_at(train_tf.tokens, step, micro, cfg, dp_rank, dp_world).to(device, non_blocking=True)
                # DDP/FSDP: reduce the gradients once per step, on the last micro-batch only
                last_micro = micro == cfg.grad_accum - 1
                if fsdp:
                    model.set_requires_gradient_sync(last_micro)
                with (model.no_sync() if ddp and not last_micro else contextlib.nullcontext()):
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        # fused: the model returns the loss itself (LM head + cross-entropy in row chunks)
                        out = fwd(x[:, :-1], x[:, 1:]) if cfg.fused_loss else fwd(x[:, :-1])
                    loss = out if cfg.fused_loss else F.cross_entropy(out.float().flatten(0, 1), x[:, 1:].flatten())
                    (loss / cfg.grad_accum if scaler is None else scaler.scale(loss / cfg.grad_accum)).backward()
                loss_sum += loss.detach().float() / cfg.grad_accum
            # launched while the GPU still runs the backward: the clip and the optimizer step queue up behind it
            if scaler is not None:
                scaler.unscale_(opt)  # clip the true gradients
            gnorm = clip_grad_norm(list(model.parameters()), cfg.grad_clip)
            if scaler is not None:
                scaler.step(opt)  # skipped when a gradient overflowed; the scale then shrinks
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            gnorm = float(gnorm)
            step += 1
            tokens_seen += cfg.tokens_per_step
            if world > 1:  # the mean loss, and whether any rank was signalled (all ranks stop together)
                t = torch.stack([loss_sum, torch.tensor(float(stop["signal"] is not None), device=device)])
                torch.distributed.all_reduce(t)
                loss_sum = t[0].item() / world
                if t[1].item() > 0 and stop["signal"] is None:
                    stop["signal"] = "SIGTERM"
            else:
                loss_sum = loss_sum.item()
            tps = cfg.tokens_per_step / dt
            rec = {"step": step, "tokens": tokens_seen, "loss": loss_sum, "lr": lr, "grad_norm": gnorm,
                   "tokens_per_s": tps, "step_s": dt, "elapsed_s": time.time() - t_start}
            if peak:
                rec["mfu"] = 6 * n_params * tps / (peak * 1e12 * world)  # per GPU: tps counts every rank
            if device.type == "cuda":
                rec["mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            if scaler is not None:
                rec["loss_scale"] = scaler.get_scale()
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                rec.update(run_eval())
            write(rec)
            last = rec
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:,.0f}")
            if (rank == 0 or sharded) and (step % cfg.ckpt_every == 0 or stop["signal"]):
                _save_checkpoint(ckpt_dir, raw_model, opt, step, tokens_seen, cfg,
                                 log.tell() if log else 0, sharded, rank, scaler)
            if stop["signal"]:
                write({"event": "interrupted", "signal": stop["signal"], "step": step})
                break
        if ddp:
            _check_replicas_in_sync(raw_model)
        if not stop["signal"]:
            if "val_loss" not in last and eval_tfs:
                last = {**last, "step": step, "tokens": tokens_seen, **run_eval()}
                write({**last, "event": "final_eval"})
            from .models import save_model

            if rank == 0 or sharded:
                _save_checkpoint(ckpt_dir, raw_model, opt, step, tokens_seen, cfg, log.tell() if log else 0,
                                 sharded, rank, scaler)
            if sharded:  # gather the whole model (collective), written by rank 0 as one file
                full = canonical_state_dict(raw_model)
                if rank == 0:
                    with torch.device("meta"):  # no second initialisation: the gathered tensors are assigned
                        plain = build_model(mcfg)
                    plain.load_state_dict(full, assign=True)
                    save_model(plain, os.path.join(cfg.out, "final"))
            elif rank == 0:
                save_model(raw_model, os.path.join(cfg.out, "final"))
    finally:
        bar.close()
        for s, h in old.items():
            signal.signal(s, h)
        if log:
            log.close()
        if (world > 1 or sharded) and torch.distributed.is_initialized():
            torch.distributed.barrier()
            if own_group:  # a group made here is ended here
                torch.distributed.destroy_process_group()
    return {**last, "interrupted": stop["signal"], "params": n_params}
