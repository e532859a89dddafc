"""Training loop: AdamW + warmup/cosine, bf16 autocast (fp16 with a loss scaler on GPUs without bf16),
accumulation, checkpoints, resume, DDP/FSDP/TP.

Taught in ``notebooks/09_train_385m.ipynb``; run as ``python -m tnlib train --preset tnl-tiny --data DIR``
(or under ``torchrun --nproc_per_node N`` for data parallelism; ``parallel=fsdp`` and ``tensor_parallel``
spread the model itself over ranks, see ``tnlib.parallel``). Everything a run needs to continue
exactly (weights, optimizer, RNG, step, the data position and the config) is checkpointed every
``ckpt_every`` steps and on SIGINT/SIGTERM; ``--resume`` picks it up and continues the same loss curve.
Sharded runs write their checkpoint with ``torch.distributed.checkpoint``, which any number of ranks
can resume (``python -m tnlib consolidate`` turns it into one file).

**Resuming** compares this run's settings with the checkpoint's and refuses any difference, naming each
setting with both values, except those in :data:`RESUME_MAY_CHANGE` (how long the run goes, when it
reports and saves, where its files are, and how the same steps are computed). Everything it reads is
checked first (``tnlib.files``): a damaged file raises ``FileDamaged`` before anything is written, and
``state.pt`` is unpickled with ``weights_only=True``, so a checkpoint cannot run code.
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
from .fields import check_fields, parse_field
from .files import FileDamaged, _one_line, load_weights, read_json, read_torch_file, set_default_mode
from .models import Implementation, build_model, document_cu_seqlens, get_config
from .models.config import FORMER_IMPLEMENTATION_FIELDS
from .parallel import (SHARDED_DIR, apply_fsdp, apply_tensor_parallel, build_mesh, canonical_state_dict,
                       check_parallel, check_sharded, clip_grad_norm, init_distributed, load_sharded, save_sharded)
from .ops import PackedSequences
from .ops.targets import device_target
from .provenance import provenance

__all__ = ["TrainConfig", "TRAIN_CHOICES", "RESUME_MAY_CHANGE", "train", "evaluate", "lr_at", "batch_at",
           "resume_differences", "precision_for"]

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
    checkpointing: bool = False  # activation checkpointing of every block: the model's Implementation.checkpointing
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
    # each training window's documents independent (they end with the EOT token in the token files): TNL's
    # attention restarts its state at every document (cu_seqlens), the Transformer's attends within its
    # document only (a block-diagonal causal mask); evaluation the same way. Off: windows are read across
    # document boundaries (the paper's setup)
    document_mask: bool = False
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


#: TrainConfig fields that ``--resume`` accepts with other values than the checkpoint's, and why. Every
#: other field must be equal; three are compared by what they mean (see :func:`resume_differences`):
#: ``batch_size`` as the global batch (per process x data-parallel ranks, so the number of processes may
#: change), ``dtype`` as the precision it resolves to (``auto``: bf16 on CUDA, fp32 on a CPU) and ``data``
#: by its tokens (tokenizer hash and split sizes), so the folder may move but not change.
RESUME_MAY_CHANGE = {
    "max_steps": "extends (or shortens) the run; it is also the cosine schedule's length, so the learning "
                 "rate from the resumed step on follows the new schedule",
    "max_tokens": "when to stop", "max_minutes": "when to stop",
    "eval_every": "when to evaluate (evaluation does not change the training)",
    "ckpt_every": "when to checkpoint", "progress": "the progress bar", "peak_tflops": "the MFU reference",
    "out": "the run folder (it may be copied or moved)", "device": "where it runs",
    # how the same steps are computed: the same results up to floating-point rounding
    "compile": "implementation", "compile_scope": "implementation", "checkpointing": "implementation",
    "fused_loss": "implementation", "ddp_bucket_mb": "implementation",
    # the checkpoint's layout still decides (single-file: parallel=ddp; sharded: the same tensor_parallel)
    "parallel": "how the model is spread", "fsdp_one_rank": "how the model is spread",
    "tensor_parallel": "how the model is spread",
}
#: model config fields not compared on resume: ``name`` is the preset, compared as such; the others are
#: implementation choices that earlier versions recorded in the model config (``Implementation`` now,
#: never saved), so checkpoints written then still resume
_MODEL_MAY_CHANGE = ("name", *FORMER_IMPLEMENTATION_FIELDS)
#: what to do when a file of a training checkpoint is damaged
_RESTORE = "restore the checkpoint from a copy, or start the run again without --resume"


def _resume_facts(cfg: "TrainConfig", meta: dict, data_ranks: int, autocast_dtype) -> dict:
    """What a checkpoint records beside the config so that a resume can compare meanings, not spellings:
    the data-parallel ranks (for the global batch), the precision ``dtype`` resolved to, and the data's
    identity (tokenizer hash, tokens of each split the run reads)."""
    return {"data_parallel_ranks": data_ranks, "precision": "bf16" if autocast_dtype is not None else "fp32",
            "data": {"tokenizer_sha256": meta["tokenizer_sha256"],
                     "tokens": {name: meta["splits"][name]["tokens"] for name in ("train", *cfg.eval_sets)}}}


def _as_flag(value) -> str:
    """A value as ``--set``/``--model`` take it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)


def resume_differences(saved: dict, cfg: "TrainConfig", model: dict, facts: dict) -> list[tuple]:
    """The settings of this run (``cfg``, its model config as a dict ``model`` and its
    :func:`_resume_facts` ``facts``) that differ from a checkpoint's (``saved``, its ``config.json`` as
    :func:`_read_checkpoint_config` returns it), as ``(setting, checkpoint value, this run's value, how to
    set it)`` in field order; empty when the run may resume. Fields in :data:`RESUME_MAY_CHANGE` are not
    compared, nor the implementation choices that older checkpoints record in their model config
    (``FORMER_IMPLEMENTATION_FIELDS``); a model field the checkpoint does not record counts as a
    difference. Checkpoints written before the facts were recorded compare ``batch_size``, ``dtype`` and
    ``data`` as spelled."""
    out = []
    then_train, then_facts = saved["train"], saved.get("run")
    by_meaning = ("batch_size", "dtype", "data") if then_facts is not None else ()
    for f in dataclasses.fields(TrainConfig):
        name = f.name
        # the model is compared field by field below
        if name in RESUME_MAY_CHANGE or name == "model_overrides" or name in by_meaning:
            continue
        then, now = then_train[name], getattr(cfg, name)
        if then != now:
            out.append((name, then, now, f"--preset {then}" if name == "preset" else f"--set {name}={_as_flag(then)}"))
    if then_facts is not None:
        ranks, then_ranks = facts["data_parallel_ranks"], then_facts["data_parallel_ranks"]
        then_batch = then_train["batch_size"] * then_ranks
        if then_batch != cfg.batch_size * ranks:
            how = (f"--set batch_size={then_batch // ranks}" if then_batch % ranks == 0 else
                   f"a global batch of {then_batch} sequences")
            out.append(("global batch (batch_size x data-parallel ranks)", f"{then_train['batch_size']} x {then_ranks}",
                        f"{cfg.batch_size} x {ranks}", how))
        if then_facts["precision"] != facts["precision"]:
            out.append((f"precision (dtype={cfg.dtype})", then_facts["precision"], facts["precision"],
                        f"--set dtype={then_facts['precision']}"))
        then_data, now_data = then_facts["data"], facts["data"]
        same_data = f"--data with the data it was trained on ({then_train['data']})"
        if then_data.get("tokenizer_sha256") != now_data["tokenizer_sha256"]:
            out.append(("data tokenizer", then_data.get("tokenizer_sha256"), now_data["tokenizer_sha256"], same_data))
        then_tokens = then_data.get("tokens") if isinstance(then_data.get("tokens"), dict) else {}
        for split in [s for s in now_data["tokens"] if s in then_tokens]:  # which splits: eval_sets, above
            if then_tokens[split] != now_data["tokens"][split]:
                out.append((f"data {split} tokens", then_tokens[split], now_data["tokens"][split], same_data))
    for name in sorted(set(saved["model"]) | set(model)):
        if name in _MODEL_MAY_CHANGE:
            continue
        then, now = saved["model"].get(name, "(not recorded)"), model.get(name, "(not a field any more)")
        if then != now:
            out.append((f"model {name}", then, now, f"--model {name}={_as_flag(then)}"))
    return out


def _read_checkpoint_config(path: str) -> dict:
    """A checkpoint's ``config.json``, checked and with every TrainConfig value parsed into its field's
    type (a field the checkpoint does not record takes its default: fields were added with the default
    that keeps the earlier behaviour). Damage raises ``FileDamaged``."""
    saved = read_json(path, _RESTORE)
    if not isinstance(saved.get("train"), dict) or not isinstance(saved.get("model"), dict):
        raise FileDamaged(path, "lacks the 'train' and 'model' configs of a training checkpoint", _RESTORE)
    train_cfg = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_overrides":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        try:
            train_cfg[f.name] = parse_field(TrainConfig, f.name, saved["train"].get(f.name, default), TRAIN_CHOICES)
        except ValueError as e:
            raise FileDamaged(path, str(e), _RESTORE) from None
    run = saved.get("run")
    if run is not None and not (isinstance(run, dict) and isinstance(run.get("data_parallel_ranks"), int)
                                and run["data_parallel_ranks"] >= 1 and run.get("precision") in ("bf16", "fp32")
                                and isinstance(run.get("data"), dict)):
        raise FileDamaged(path, f"its 'run' record is {json.dumps(run)[:120]}", _RESTORE)
    return {**saved, "train": train_cfg}


def _refuse_resume(config_path: str, diffs: list) -> None:
    """One line: every differing setting with both values, then how to resume or start anew."""
    what = "; ".join(f"{name} {now!r} here, {then!r} in the checkpoint" for name, then, now, _ in diffs)
    flags: dict = {}  # "--set a=1 b=2", not "--set a=1 --set b=2" (a repeated --set replaces the first)
    for *_, h in diffs:
        flag, _, item = h.partition(" ")
        if flag in ("--set", "--model"):
            flags.setdefault(flag, []).append(item)
        else:
            flags.setdefault(h, [])
    how = " ".join(" ".join([f, *items]) for f, items in flags.items())
    raise ValueError(f"{config_path}: this run's settings differ from the checkpoint's: {what} (resume with the "
                     f"checkpoint's: {how}; or train into another --out without --resume; the settings that may "
                     f"change are {', '.join(RESUME_MAY_CHANGE)})")


def _read_train_state(path: str, single_file: bool) -> dict:
    """``state.pt`` of a checkpoint, unpickled with ``weights_only=True`` (tensors and plain values: it
    cannot run code) and checked: a dict with the step, the token and metrics positions, torch's RNG state
    and, single-file, the optimizer's state dict. Anything else raises ``FileDamaged``."""
    state = read_torch_file(path, _RESTORE)
    if not isinstance(state, dict):
        raise FileDamaged(path, f"holds a {type(state).__name__}, not a training state", _RESTORE)
    for key in ("step", "tokens_seen", "metrics_pos"):
        v = state.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise FileDamaged(path, f"{key} is {v!r}, not an integer >= 0", _RESTORE)
    rng, want = state.get("torch_rng"), torch.get_rng_state()
    if not isinstance(rng, torch.Tensor) or rng.dtype != want.dtype or rng.shape != want.shape:
        raise FileDamaged(path, "torch_rng is not torch's RNG state", _RESTORE)
    if single_file:
        opt = state.get("optimizer")
        if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(
                opt.get("param_groups"), list):
            raise FileDamaged(path, "holds no optimizer state dict", _RESTORE)
    return state


def _load_optimizer(opt, sd: dict, path: str) -> None:
    """``opt.load_state_dict(sd)``, refusing state that does not fit the model's parameters (AdamW does
    not check the moments' shapes itself: a mismatch would fail in the first step)."""
    try:
        opt.load_state_dict(sd)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise FileDamaged(path, f"its optimizer state does not fit this model ({_one_line(e)})", _RESTORE) from None
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                if hasattr(v, "shape") and v.dim() > 0 and v.shape != p.shape:
                    raise FileDamaged(path, f"its optimizer {key} has shape {list(v.shape)} for a parameter of shape "
                                            f"{list(p.shape)}", _RESTORE)


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


def _documents(x, eot_id: int, device, on: bool) -> dict:
    """The model's document keyword for the CPU windows ``x`` (``[B, T + 1]``): with ``on``
    (``TrainConfig.document_mask``) the documents of their inputs (``document_cu_seqlens``) as one
    ``PackedSequences`` on ``device``, checked on the CPU before the copy (no device sync), whose work tables
    the step's layers share; else nothing."""
    if not on:
        return {}
    ids = x[:, :-1]
    return {"cu_seqlens": PackedSequences(document_cu_seqlens(ids, eot_id), ids.numel(), device=device)}


@torch.no_grad()
def evaluate(model, tf: TokenFile, seq_len: int, max_tokens: int | None, batch_size: int, device, autocast_dtype,
             eot_id: int = 0, document_mask: bool = False):
    """Loss (nats/token), perplexity and bits per byte of a held-out set, in non-overlapping windows.

    The set is scored as the stream ``[eot_id] + tokens`` (the end-of-text token is the context of the
    first token, as every document in training follows one), so each of its tokens is a target once.
    ``max_tokens=None``: the whole set, every token (the last window shorter); otherwise the first
    ``max_tokens`` targets, in whole windows (at least one). Bits per byte divide by the UTF-8 bytes of
    exactly the targets scored (``tf.byte_lengths``); a TokenFile without them pro-rates ``tf.bytes`` by
    the share of tokens scored. ``document_mask``: each window's documents scored on their own, as
    ``TrainConfig.document_mask`` trains them (``document_cu_seqlens``: the EOT opens a document). Returns
    ``loss``, ``ppl``, ``bpb``, ``tokens`` (targets scored) and ``bytes``."""
    model.eval()
    n_all = len(tf.tokens)
    if max_tokens is None:
        n = n_all
    else:
        n = max(min(n_all, seq_len), min(n_all, max_tokens) // seq_len * seq_len)
    stream = np.concatenate([np.asarray([eot_id], dtype=np.int64), np.asarray(tf.tokens[:n], dtype=np.int64)])
    full, rest = divmod(n, seq_len)
    # whole windows in batches, then the shorter last window (whole-set scoring) on its own
    spans = [[(j * seq_len, seq_len) for j in range(i, min(full, i + batch_size))] for i in range(0, full, batch_size)]
    if rest:
        spans.append([(full * seq_len, rest)])
    total, count, n_bytes = 0.0, 0, 0
    for batch in spans:
        x = torch.from_numpy(np.stack([stream[s : s + length + 1] for s, length in batch]))
        docs = _documents(x, eot_id, device, document_mask)
        x = x.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x[:, :-1], **docs)
        total += F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    if tf.byte_lengths is not None:
        n_bytes = int(tf.byte_lengths[stream[1 : count + 1]].sum())
    else:
        n_bytes = tf.bytes * count / max(1, n_all)
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bpb": total / math.log(2) / max(1, n_bytes),
            "tokens": count, "bytes": n_bytes}


def _param_groups(model, weight_decay):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_checkpoint(path, model, opt, step, tokens_seen, cfg, metrics_pos, facts, sharded=False, rank=0,
                     scaler=None):
    """Write ``path`` atomically (a ``.tmp`` folder renamed at the end). Single-file (rank 0 only):
    ``model.safetensors`` + the optimizer (and the fp16 loss scaler, if any) in ``state.pt``. ``sharded`` (every rank calls it): each rank's
    shards of weights and optimizer under ``sharded/`` (``tnlib.parallel.save_sharded``). ``state.pt``
    holds tensors and plain values only (read back with ``weights_only=True``); ``config.json`` the train
    and model configs and ``facts`` (:func:`_resume_facts`), which ``--resume`` compares."""
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
        set_default_mode(os.path.join(tmp, "model.safetensors"))
        state["optimizer"] = opt.state_dict()
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"train": dataclasses.asdict(cfg), "model": model.config.to_dict(), "run": facts}, f, indent=2)
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


@dataclass
class _Run:
    """What one training run holds between its steps (built by ``_setup``/``_build``, used by the rest)."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    loss_scaling: bool  # fp16 autocast: gradients scaled against underflow (a GradScaler)
    sharded: bool  # checkpoints through torch.distributed.checkpoint (FSDP or tensor parallelism)
    dp_world: int  # the data dimension (tensor-parallel ranks share a batch)
    train_tf: TokenFile
    eval_tfs: dict
    meta: dict
    tokenizer: str | None  # the data's tokenizer.json, saved with the final model
    mcfg: object
    facts: dict
    ckpt_dir: str
    metrics_path: str
    resume_state: dict | None = None  # the checkpoint's state.pt when resuming
    ckpt_sharded: bool = False
    step: int = 0
    tokens_seen: int = 0
    dp_rank: int = 0
    own_group: bool = False
    model: torch.nn.Module | None = None  # as trained (wrapped by DDP/FSDP where they apply)
    raw_model: torch.nn.Module | None = None  # the plain model
    fwd: object = None  # what the step calls (the model, or its compiled graph)
    opt: torch.optim.Optimizer | None = None
    fsdp: bool = False
    ddp: bool = False
    n_params: int = 0
    peak: float | None = None
    log: object = None
    scaler: object = None  # torch.amp.GradScaler when loss_scaling


def _setup(cfg: TrainConfig):
    """The run's place (rank, device, precision) and its data, every file read and checked; returns
    ``(cfg, run fields)`` with ``fused_loss`` resolved, so the recorded config says what ran."""
    rank, world = _world()
    tp = cfg.tensor_parallel
    check_parallel(cfg.parallel, tp, world, get_config(cfg.preset, **cfg.model_overrides))
    if cfg.compile and tp > 1:
        raise ValueError("compile=true with tensor_parallel > 1 is not supported (untested): use compile=false")
    sharded = cfg.parallel == "fsdp" or tp > 1
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
    if cfg.fused_loss is None:
        cfg = dataclasses.replace(cfg, fused_loss=device.type == "cuda")
    train_tf, meta, eval_tfs, tokenizer = _read_data(cfg)
    mcfg = get_config(cfg.preset, **{"vocab_size": meta["vocab_size"], **cfg.model_overrides})
    if mcfg.vocab_size < meta["vocab_size"]:
        raise DataError(f"model vocab {mcfg.vocab_size} < tokenizer vocab {meta['vocab_size']}")
    if cfg.document_mask and not isinstance(meta.get("eot_id"), int):
        raise DataError(f"document_mask needs the end-of-text token's id, and {cfg.data}/meta.json has no eot_id "
                        "(written by `python -m tnlib prepare`): prepare the data again, or train without document_mask")
    dp_world = world // tp if sharded else world
    return _Run(cfg=cfg, rank=rank, world=world, device=device, autocast_dtype=autocast_dtype,
                loss_scaling=loss_scaling, sharded=sharded,
                dp_world=dp_world, train_tf=train_tf, eval_tfs=eval_tfs, meta=meta, tokenizer=tokenizer, mcfg=mcfg,
                facts=_resume_facts(cfg, meta, dp_world, autocast_dtype),
                ckpt_dir=os.path.join(cfg.out, "checkpoint"), metrics_path=os.path.join(cfg.out, "metrics.jsonl"))


def _read_data(cfg: TrainConfig):
    """The training and eval token files, ``meta.json`` and the tokenizer path (None when the data has
    none), each checked: token ids inside the vocabulary, the tokenizer the one meta.json names."""
    train_tf = TokenFile.open(cfg.data, "train")
    meta = read_json(os.path.join(cfg.data, "meta.json"), "prepare the data again")  # checked by TokenFile.open
    eval_tfs = {name: TokenFile.open(cfg.data, name) for name in cfg.eval_sets}
    if len(train_tf.tokens) <= cfg.seq_len + 1:
        raise DataError(f"training split has {len(train_tf.tokens)} tokens, fewer than seq_len={cfg.seq_len}")
    for name, tf in (("train", train_tf), *eval_tfs.items()):  # one pass over each file (~0.1 s per 100M tokens)
        if len(tf.tokens) and int(tf.tokens.max()) >= meta["vocab_size"]:
            raise FileDamaged(os.path.join(cfg.data, meta["splits"][name]["file"]),
                              f"holds token id {int(tf.tokens.max())}, outside the vocabulary of {meta['vocab_size']} "
                              f"(meta.json): overwritten?", f"prepare the data again: python -m tnlib prepare --out "
                                                            f"{cfg.data} --force ...")
    tokenizer = os.path.join(cfg.data, "tokenizer.json")  # saved with the final model; checked now, not then
    if not os.path.isfile(tokenizer):
        return train_tf, meta, eval_tfs, None  # data prepared by other means: the final model has no tokenizer
    from .data import load_tokenizer, tokenizer_hash

    if tokenizer_hash(load_tokenizer(tokenizer)) != meta["tokenizer_sha256"]:
        raise FileDamaged(tokenizer, f"is not the tokenizer meta.json names ({meta['tokenizer_sha256']})",
                          f"prepare the data again: python -m tnlib prepare --out {cfg.data} --force ...")
    return train_tf, meta, eval_tfs, tokenizer


def _read_checkpoint(run: _Run) -> None:
    """``--resume``: every file of the checkpoint read and checked (settings against this run's,
    ``RESUME_MAY_CHANGE``) before any process group, model or file exists; sets ``run.resume_state``."""
    cfg, ckpt_dir = run.cfg, run.ckpt_dir
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir}")
    for name in ("config.json", "state.pt"):
        if not os.path.isfile(os.path.join(ckpt_dir, name)):
            raise FileNotFoundError(f"--resume: {os.path.join(ckpt_dir, name)} is missing ({_RESTORE})")
    cfg_path = os.path.join(ckpt_dir, "config.json")
    saved = _read_checkpoint_config(cfg_path)
    diffs = resume_differences(saved, cfg, run.mcfg.to_dict(), run.facts)
    if diffs:
        _refuse_resume(cfg_path, diffs)
    run.ckpt_sharded = os.path.isdir(os.path.join(ckpt_dir, SHARDED_DIR))
    saved_tp = saved["train"]["tensor_parallel"]
    if run.ckpt_sharded and saved_tp != cfg.tensor_parallel:
        raise ValueError(f"--resume: the checkpoint was written with tensor_parallel={saved_tp}; resume with the "
                         f"same (any number of data-parallel ranks), or consolidate it first")
    if not run.ckpt_sharded and run.sharded:
        raise ValueError("--resume: this checkpoint is single-file (written by parallel=ddp): resume it with "
                         "parallel=ddp")
    state = _read_train_state(os.path.join(ckpt_dir, "state.pt"), single_file=not run.ckpt_sharded)
    if run.ckpt_sharded:
        check_sharded(ckpt_dir, _RESTORE)
    elif not os.path.isfile(os.path.join(ckpt_dir, "model.safetensors")):
        raise FileNotFoundError(f"--resume: {os.path.join(ckpt_dir, 'model.safetensors')} is missing ({_RESTORE})")
    mp = run.metrics_path
    if os.path.exists(mp) and os.path.getsize(mp) < state["metrics_pos"]:
        raise FileDamaged(mp, f"holds {os.path.getsize(mp):,} bytes, fewer than the {state['metrics_pos']:,} the "
                              f"checkpoint recorded: truncated",
                          "restore it from a copy, or delete it to resume without the earlier lines")
    run.resume_state = state


def _build(run: _Run) -> None:
    """The model (the checkpoint's weights when resuming), the process group, compilation, the parallel
    wrappers and AdamW (its state when resuming); the metrics file is cut back to the checkpoint."""
    cfg, device, tp = run.cfg, run.device, run.cfg.tensor_parallel
    torch.manual_seed(cfg.seed)
    model = build_model(run.mcfg, Implementation(checkpointing=cfg.checkpointing)).to(device)
    if run.resume_state is not None and not run.ckpt_sharded:  # whole weights, before any wrapping
        load_weights(model, os.path.join(run.ckpt_dir, "model.safetensors"), _RESTORE, device=device)
    if (run.world > 1 or run.sharded) and not torch.distributed.is_initialized():
        init_distributed(device.type)  # a lone process gets a 1-rank group (FSDP needs one)
        run.own_group = True
    mesh = build_mesh(device.type, run.world, tp) if run.sharded else None
    run.dp_rank = mesh["dp"].get_local_rank() if mesh is not None else run.rank
    os.makedirs(cfg.out, exist_ok=True)
    run.raw_model = model
    if cfg.compile and cfg.compile_scope == "blocks":
        model.compile_blocks()
    if tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if cfg.parallel == "fsdp":  # on one rank apply_fsdp returns the plain model unless fsdp_one_rank
        apply_fsdp(model, mesh["dp"], run.autocast_dtype, one_rank=cfg.fsdp_one_rank)
    from torch.distributed.fsdp import FSDPModule

    run.fsdp = isinstance(model, FSDPModule)
    # fused AdamW on CUDA; the per-tensor loop where plain and tensor-parallel (DTensor) weights mix
    opt_kw = {"fused": True} if device.type == "cuda" else ({"foreach": False} if tp > 1 else {})
    run.opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                **opt_kw)
    run.scaler = torch.amp.GradScaler(device.type) if run.loss_scaling else None
    state = run.resume_state
    if state is not None:
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        if run.ckpt_sharded:  # resharded to however this run is spread
            load_sharded(run.ckpt_dir, model, run.opt, _RESTORE)
        else:
            _load_optimizer(run.opt, state["optimizer"], os.path.join(run.ckpt_dir, "state.pt"))
        run.step, run.tokens_seen = state["step"], state["tokens_seen"]
        torch.set_rng_state(state["torch_rng"])
        if os.path.exists(run.metrics_path):  # drop log lines written after the checkpoint
            with open(run.metrics_path, "rb+") as f:
                f.truncate(state["metrics_pos"])
    elif run.rank == 0 and os.path.exists(run.metrics_path):
        os.remove(run.metrics_path)
    run.ddp = run.world > 1 and not run.sharded
    if run.ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=cfg.ddp_bucket_mb,
            gradient_as_bucket_view=True)
    run.model = model
    run.fwd = torch.compile(model) if cfg.compile and cfg.compile_scope == "model" else model
    run.n_params = run.raw_model.num_parameters()
    run.peak = cfg.peak_tflops or (_measure_peak_tflops(device, run.autocast_dtype or torch.float32)
                                   if device.type == "cuda" else None)


def _write(run: _Run, rec: dict) -> None:
    if run.log:
        run.log.write(json.dumps(rec) + "\n")
        run.log.flush()


def _run_evals(run: _Run) -> dict:
    """Every eval set of the run (``eval_tokens`` each): ``{<set>_loss, <set>_ppl, <set>_bpb}``."""
    res = {}
    for name, tf in run.eval_tfs.items():
        r = evaluate(run.raw_model, tf, run.cfg.seq_len, run.cfg.eval_tokens, run.cfg.batch_size, run.device,
                     run.autocast_dtype, run.meta.get("eot_id", 0), run.cfg.document_mask)  # 0: evaluate's default
        res.update({f"{name}_loss": r["loss"], f"{name}_ppl": r["ppl"], f"{name}_bpb": r["bpb"]})
    return res


def _step(run: _Run, stop: dict) -> dict:
    """One optimizer step (its micro-batches, the clip, AdamW); returns the step's record. Under DDP/FSDP
    the gradients are reduced once, on the last micro-batch; ``stop`` learns of a signal on any rank."""
    cfg, device, model = run.cfg, run.device, run.model
    t0 = time.time()  # the previous step ended with a synchronize
    lr = lr_at(run.step, cfg)
    for g in run.opt.param_groups:
        g["lr"] = lr
    loss_sum = torch.zeros((), device=device)  # read once, after the step: no wait per micro-batch
    for micro in range(cfg.grad_accum):
        x = batch_at(run.train_tf.tokens, run.step, micro, cfg, run.dp_rank, run.dp_world)
        docs = _documents(x, run.meta.get("eot_id"), device, cfg.document_mask)  # checked at setup when on
        x = x.to(device, non_blocking=True)
        last_micro = micro == cfg.grad_accum - 1
        if run.fsdp:
            model.set_requires_gradient_sync(last_micro)
        with (model.no_sync() if run.ddp and not last_micro else contextlib.nullcontext()):
            with torch.autocast(device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
                # fused: the model returns the loss itself (LM head + cross-entropy in row chunks)
                out = run.fwd(x[:, :-1], x[:, 1:], **docs) if cfg.fused_loss else run.fwd(x[:, :-1], **docs)
            loss = out if cfg.fused_loss else F.cross_entropy(out.float().flatten(0, 1), x[:, 1:].flatten())
            (loss / cfg.grad_accum if run.scaler is None else run.scaler.scale(loss / cfg.grad_accum)).backward()
        loss_sum += loss.detach().float() / cfg.grad_accum
    # launched while the GPU still runs the backward: the clip and the optimizer step queue up behind it
    if run.scaler is not None:
        run.scaler.unscale_(run.opt)  # clip the true gradients
    gnorm = clip_grad_norm(list(model.parameters()), cfg.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.opt)  # skipped when a gradient overflowed; the scale then shrinks
        run.scaler.update()
    else:
        run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t0
    run.step += 1
    run.tokens_seen += cfg.tokens_per_step
    if run.world > 1:  # the mean loss, and whether any rank was signalled (all ranks stop together)
        t = torch.stack([loss_sum, torch.tensor(float(stop["signal"] is not None), device=device)])
        torch.distributed.all_reduce(t)
        loss = t[0].item() / run.world
        if t[1].item() > 0 and stop["signal"] is None:
            stop["signal"] = "SIGTERM"
    else:
        loss = loss_sum.item()
    tps = cfg.tokens_per_step / dt
    rec = {"step": run.step, "tokens": run.tokens_seen, "loss": loss, "lr": lr, "grad_norm": float(gnorm),
           "tokens_per_s": tps, "step_s": dt}
    if run.peak:
        rec["mfu"] = 6 * run.n_params * tps / (run.peak * 1e12 * run.world)  # per GPU: tps counts every rank
    if device.type == "cuda":
        rec["mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    if run.scaler is not None:
        rec["loss_scale"] = run.scaler.get_scale()
    return rec


def _checkpoint(run: _Run) -> None:
    if run.rank == 0 or run.sharded:
        _save_checkpoint(run.ckpt_dir, run.raw_model, run.opt, run.step, run.tokens_seen, run.cfg,
                         run.log.tell() if run.log else 0, run.facts, run.sharded, run.rank, run.scaler)


def _save_final(run: _Run) -> None:
    """The last checkpoint, then ``out/final`` (weights, config, tokenizer); sharded runs gather the whole
    model first (a collective), written by rank 0 as one file."""
    from .models import save_model

    _checkpoint(run)
    final = os.path.join(run.cfg.out, "final")
    if run.sharded:
        full = canonical_state_dict(run.raw_model)
        if run.rank == 0:
            with torch.device("meta"):  # no second initialisation: the gathered tensors are assigned
                plain = build_model(run.mcfg)
            plain.load_state_dict(full, assign=True)
            save_model(plain, final, tokenizer=run.tokenizer)
    elif run.rank == 0:
        save_model(run.raw_model, final, tokenizer=run.tokenizer)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or resume) one model; returns the final metrics dict. Writes ``cfg.out``/metrics.jsonl,
    ``checkpoint/`` and ``final/`` (safetensors + config + the data's ``tokenizer.json``, so that
    ``python -m tnlib generate --checkpoint OUT/final`` needs nothing else).

    Everything is read and checked before anything is written: the data (``meta.json``, token files,
    ``tokenizer.json``) and, with ``resume``, the checkpoint (its settings against this run's, see
    :data:`RESUME_MAY_CHANGE`; its files, see ``tnlib.files``). A damaged file raises ``FileDamaged``, a
    changed setting ``ValueError`` naming each setting and both values. The steps: ``_setup`` (place,
    data), ``_read_checkpoint``, ``_build`` (model, wrappers, optimizer), then ``_step`` until the end,
    evaluating (``_run_evals``) and checkpointing on their cadence, and ``_save_final``."""
    run = _setup(cfg)
    cfg = run.cfg
    if resume:
        _read_checkpoint(run)
    _build(run)
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    run.log = open(run.metrics_path, "a") if run.rank == 0 else None
    if run.rank == 0 and run.step == 0:
        _write(run, {"event": "start", "config": dataclasses.asdict(cfg), "model": run.mcfg.to_dict(),
                     "params": run.n_params,
                     "precision": {"autocast": str(run.autocast_dtype).removeprefix("torch.") if run.autocast_dtype
                                   else None, "loss_scaler": run.loss_scaling},
                     "provenance": provenance(),
                     "data_meta": {k: run.meta[k] for k in ("vocab_size", "tokenizer_sha256", "splits")}})
    from .progress import tqdm

    bar = tqdm(total=cfg.max_steps, initial=run.step, desc=f"train {cfg.preset}",
               disable=not (cfg.progress and run.rank == 0), dynamic_ncols=True)
    t_start = time.time()
    run.model.train()
    last = {}
    try:
        while run.step < cfg.max_steps:
            if cfg.max_tokens is not None and run.tokens_seen >= cfg.max_tokens:
                break
            if cfg.max_minutes is not None and (time.time() - t_start) / 60 >= cfg.max_minutes:
                break
            rec = _step(run, stop)
            rec["elapsed_s"] = time.time() - t_start
            if run.step % cfg.eval_every == 0 or run.step == cfg.max_steps:
                rec.update(_run_evals(run))
            _write(run, rec)
            last = rec
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}")
            if run.step % cfg.ckpt_every == 0 or stop["signal"]:
                _checkpoint(run)
            if stop["signal"]:
                _write(run, {"event": "interrupted", "signal": stop["signal"], "step": run.step})
                break
        if run.ddp:
            _check_replicas_in_sync(run.raw_model)
        if not stop["signal"]:
            if "val_loss" not in last and run.eval_tfs:
                last = {**last, "step": run.step, "tokens": run.tokens_seen, **_run_evals(run)}
                _write(run, {**last, "event": "final_eval"})
            _save_final(run)
    finally:
        bar.close()
        for s, h in old.items():
            signal.signal(s, h)
        if run.log:
            run.log.close()
        if (run.world > 1 or run.sharded) and torch.distributed.is_initialized():
            torch.distributed.barrier()
            if run.own_group:  # a group made here is ended here
                torch.distributed.destroy_process_group()
    return {**last, "interrupted": stop["signal"], "params": run.n_params}
