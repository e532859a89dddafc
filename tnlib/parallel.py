"""How the model is spread over ranks: DDP replicas, FSDP2 shards, Megatron-style tensor parallelism.

Three ways to put one model on several GPUs, all through ``torch.distributed`` (taught at the end of
``notebooks/09_train_385m.ipynb``, used by ``tnlib.train``):

* ``parallel="ddp"`` (default): every rank holds the whole model and its AdamW state; gradients are
  all-reduced. Fastest while the model, its gradients and Adam state fit on one GPU (16 bytes/param).
* ``parallel="fsdp"``: ``fully_shard`` per block and at the root. Each rank keeps ``1/world`` of every
  parameter, gradient and Adam moment; a block's weights are all-gathered just before it runs (and
  again for its backward) and its gradients reduce-scattered after. Mixed precision as in the paper:
  bf16 parameters for compute, fp32 master weights and fp32 reduction (the LRPE angles ``theta`` stay
  fp32: a bf16 angle at position 2000 is off by radians). One rank has nothing to shard: it trains the
  plain model and writes the same sharded checkpoints.
* ``tensor_parallel=N``: a 2-D mesh ``("dp", "tp")``; within a ``tp`` group each rank holds ``1/N`` of
  every block's heads and SGLU channels (the paper's Megatron-style plan, ``docs/sources.md``): GLA's fused ``qkvu`` and
  SGLU's ``l1``/``l2`` column-wise, the output projections row-wise, so a block costs one all-reduce
  forward and one backward per mixer. Each rank runs Lightning Attention on its own heads (their decay
  slopes and LRPE ``theta``). The ``dp`` dimension is sharded with FSDP.

**The fused projection.** ``qkvu_proj.weight`` stacks ``[q | k | v | u]`` rows; a plain column-wise
split would hand rank 0 all of ``q`` and ``k``. Before sharding, the rows are reordered so that each
rank's contiguous block is ``[q_r | k_r | v_r | u_r]`` for its head group (:func:`qkvu_rank_order`).
This grouped order is what a tensor-parallel run's checkpoint stores for that weight;
:func:`canonical_state_dict` and :func:`consolidate` undo it, and resuming needs the same
``tensor_parallel``.

**The norm over the full width.** GLA normalizes ``o`` (all heads) before the gate. With heads split,
rank ``r`` holds ``o_r`` only, so :class:`ShardedSRMSNorm` sums ``o_r^2`` locally, all-reduces that one
number per token over the ``tp`` group (autograd-aware: its backward all-reduces the gradient, since every
rank's shard depends on the total) and divides by ``sqrt(total / d + eps)``: the same value as SRMSNorm
on the gathered ``o``, for ``d/N`` fewer bytes on the wire than gathering it.
"""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["PARALLEL_MODES", "check_parallel", "init_distributed", "build_mesh", "apply_fsdp",
           "apply_tensor_parallel", "qkvu_rank_order", "ShardedSRMSNorm", "clip_grad_norm",
           "canonical_state_dict", "save_sharded", "check_sharded", "load_sharded", "consolidate"]

PARALLEL_MODES = ("ddp", "fsdp")
#: the folder of a checkpoint that holds the shards written by torch.distributed.checkpoint
SHARDED_DIR = "sharded"


def check_parallel(parallel: str, tensor_parallel: int, world: int, mcfg) -> None:
    """Clear errors for a bad combination, before any process group, data or model exists."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    tp = tensor_parallel
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel must be a positive int, got {tp!r}")
    if tp == 1:
        return
    if mcfg.arch != "tnl":
        raise ValueError(f"tensor_parallel is implemented for TransNormerLLM (arch='tnl'), not {mcfg.arch!r}")
    if mcfg.n_heads % tp:
        raise ValueError(f"tensor_parallel={tp} must divide the number of heads ({mcfg.n_heads}): "
                         f"each rank runs whole heads")
    if mcfg.glu_dim % tp:
        raise ValueError(f"tensor_parallel={tp} must divide glu_dim={mcfg.glu_dim}")
    if mcfg.norm not in ("srms", "rms"):
        raise ValueError(f"tensor_parallel supports norm='srms' or 'rms' (split across ranks), not {mcfg.norm!r}")
    if world % tp:
        raise ValueError(f"the world size ({world} processes) must be a multiple of tensor_parallel={tp}")
    if world // tp > 1 and parallel != "fsdp":
        raise ValueError(f"tensor_parallel={tp} on {world} processes has a data dimension of {world // tp}: "
                         f"set parallel=fsdp (the data dimension is sharded with fully_shard)")


def init_distributed(device_type: str) -> None:
    """Join the process group ``torchrun`` describes; a lone process (no ``torchrun``) gets a 1-rank group,
    so that ``parallel="fsdp"`` also runs (and can be timed) without a launcher."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def build_mesh(device_type: str, world: int, tensor_parallel: int):
    """The ``("dp", "tp")`` device mesh (``tp`` ranks adjacent: the fast links of one host)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // tensor_parallel, tensor_parallel), mesh_dim_names=("dp", "tp"))


def _mp_policy(dtype):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # inputs are not cast: the residual stream keeps the dtype ModelConfig.residual_dtype gives it
    if dtype is None:  # fp32 training (CPU tests): no casts at all
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def apply_fsdp(model: nn.Module, mesh, compute_dtype=None, one_rank: bool = False) -> nn.Module:
    """``fully_shard`` each block, then the root (embedding, final norm, head), over the 1-D ``mesh``.

    A mesh of one rank has nothing to shard, and FSDP2 would still copy every weight and gradient once
    more per step and add hooks around every block (what that costs: ``results/parallel/NOTES.md``):
    the model is returned as it is, unless ``one_rank`` asks for FSDP2 anyway (to measure it). Sharded
    checkpoints do not depend on it: ``torch.distributed.checkpoint`` writes and reshards plain and FSDP
    models alike.

    ``compute_dtype`` (bf16 on a GPU) is the parameters' dtype in forward and backward; master weights,
    Adam state and the gradient reduction stay fp32. LRPE's ``theta`` gets its own fp32 group. Blocks
    compiled before (``compile_blocks``) stay compiled; activation checkpointing (``run_blocks``) wraps
    the block call, FSDP's hooks included, which FSDP2 supports (the recompute in the backward runs on the
    weights the backward gathered).

    Over more than one rank each block's gathered weights are freed after its forward and gathered again
    for its backward (memory saved for one more all-gather); on one rank the "gathered" weights are just
    the bf16 copy, so they are kept.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if mesh.size() == 1 and not one_rank:
        return model
    reshard_after_forward = mesh.size() > 1
    for block in model.layers:
        lrpe = getattr(getattr(block, "token_mixer", None), "lrpe", None)
        if lrpe is not None and any(True for _ in lrpe.parameters()):
            fully_shard(lrpe, mesh=mesh, mp_policy=_mp_policy(None), reshard_after_forward=reshard_after_forward)
            register_fsdp_forward_method(lrpe, "pair")  # GLA calls lrpe.pair, not lrpe(...)
        fully_shard(block, mesh=mesh, mp_policy=_mp_policy(compute_dtype), reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=_mp_policy(compute_dtype), reshard_after_forward=reshard_after_forward)
    return model


def qkvu_rank_order(d_model: int, parts: int, tp: int) -> torch.Tensor:
    """Row order of the fused ``[q | k | v | u]`` weight (``parts`` blocks of ``d_model`` rows) that makes
    rank ``r``'s contiguous ``parts * d_model / tp`` rows ``[q_r | k_r | v_r | u_r]``, each the rows of
    its head group ``r``: ``grouped = canonical[order]``; ``canonical = grouped[argsort(order)]``."""
    w = d_model // tp
    return torch.tensor([p * d_model + r * w + j for r in range(tp) for p in range(parts) for j in range(w)])


class _AllReduceSum(torch.autograd.Function):
    """Sum over ``group``; the gradient is summed too, because every rank's result feeds its own shard."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class ShardedSRMSNorm(nn.Module):
    """SRMSNorm (with the gain of RMSNorm when ``weight`` is given) over a width split across a ``tp``
    group: ``x_r / sqrt(allreduce(sum x_r^2) / full_dim + eps) [* weight_r]``, in fp32 like SRMSNorm."""

    def __init__(self, full_dim: int, eps: float, group, weight: nn.Parameter | None = None):
        super().__init__()
        self.full_dim, self.eps, self.group = full_dim, eps, group
        if weight is not None:
            self.weight = weight

    def forward(self, x):
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(cd)
        total = _AllReduceSum.apply(xf.pow(2).sum(-1, keepdim=True), self.group)
        y = (xf * torch.rsqrt(total / self.full_dim + self.eps)).to(x.dtype)
        if hasattr(self, "weight"):
            w = self.weight
            y = y * (w.to_local() if hasattr(w, "to_local") else w).to(x.dtype)
        return y

    def extra_repr(self):
        return f"{self.full_dim} over the tp group, eps={self.eps}"


def apply_tensor_parallel(model: nn.Module, tp_mesh, src_data_rank: int | None = 0) -> nn.Module:
    """Shard every block of a TransNormerLLM over ``tp_mesh`` (1-D) with ``parallelize_module`` (the plan
    of the module docstring). The embedding, final norm and head stay replicated. Works in place on a
    model whose weights are the canonical ones (e.g. freshly built or loaded); returns it. The shards are
    scattered from rank ``src_data_rank`` of the group (``None``: every rank cuts its own from identical
    weights, no communication)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp, r = tp_mesh.size(), tp_mesh.get_local_rank()
    group = tp_mesh.get_group()
    for block in model.layers:
        gla = block.token_mixer
        d = gla.out_proj.in_features
        parts = gla.qkvu_proj.out_features // d
        with torch.no_grad():  # heads grouped per rank (see the module docstring)
            gla.qkvu_proj.weight.copy_(gla.qkvu_proj.weight[qkvu_rank_order(d, parts, tp).to(gla.qkvu_proj.weight.device)])
        parallelize_module(block, tp_mesh, src_data_rank=src_data_rank, parallelize_plan={
            "token_mixer.qkvu_proj": ColwiseParallel(),
            "token_mixer.out_proj": RowwiseParallel(),
            "channel_mixer.l1": ColwiseParallel(),
            "channel_mixer.l2": ColwiseParallel(),
            "channel_mixer.l3": RowwiseParallel(),
        })
        gla.keep_heads(r, tp)  # this rank's heads: their decay slopes (and a fixed LRPE theta)
        if gla.lrpe is not None and isinstance(gla.lrpe.theta, nn.Parameter):  # used as its local shard by tnlib.nn.lrpe
            theta = gla.lrpe.theta
            gla.lrpe.theta = nn.Parameter(distribute_tensor(theta.data, tp_mesh, [Shard(0)], src_data_rank=src_data_rank),
                                          requires_grad=theta.requires_grad)
        norm = gla.norm
        weight = None
        if getattr(norm, "weight", None) is not None:  # RMSNorm's gain: split like o
            weight = nn.Parameter(distribute_tensor(norm.weight.data, tp_mesh, [Shard(0)], src_data_rank=src_data_rank))
        gla.norm = ShardedSRMSNorm(d, norm.eps, group, weight)
    return model


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for plain, FSDP-sharded and tensor-parallel (DTensor) gradients, also mixed;
    returns the total norm before clipping as a 0-d tensor (a replicated gradient counts once). Nothing
    here waits for the GPU: the training loop reads the norm once per step, after the optimizer step."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    meshes = {g.device_mesh for g in grads if hasattr(g, "device_mesh")}
    if not meshes:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    mesh = next(iter(meshes))
    if (len(meshes) == 1 and mesh.ndim == 1 and all(hasattr(g, "device_mesh") for g in grads)
            and all(pl.is_shard() for g in grads for pl in g.placements)):
        # FSDP: every gradient is split over one 1-D mesh, so the norm is the sum of the local shards'
        # squared norms over the ranks; working on the local tensors skips DTensor's per-op dispatch
        grads = [g.to_local() for g in grads]
        sq = torch.nn.utils.get_total_norm(grads).square()
        if mesh.size() > 1:
            torch.distributed.all_reduce(sq, group=mesh.get_group())
    else:  # plain (replicated) and sharded gradients mixed: one norm at a time
        sq = 0
        for g in grads:
            n = torch.linalg.vector_norm(g, dtype=torch.float32)
            n = n.full_tensor() if hasattr(n, "full_tensor") else n  # a DTensor's norm sums over its shards
            sq = sq + n.square()
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # scaled in place, shard by shard
    total = sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    return total


def canonical_state_dict(model: nn.Module) -> dict:
    """The whole model's state dict as plain CPU tensors in the single-GPU layout, whatever sharding
    ``model`` has. Collective: every rank calls it; rank 0 gets the dict, the others an empty one (a
    gathered 7B model is 28 GB of host memory: once is enough)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if dist_on:
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if torch.distributed.get_rank() != 0:
            return {}
    else:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        tp = getattr(m, "tp_size", 1)
        if tp > 1 and sd:
            _ungroup_qkvu(sd, name.replace("_fsdp_wrapped_module.", "") + ".qkvu_proj.weight", m.out_proj.in_features, tp)
    return sd


def _ungroup_qkvu(sd: dict, key: str, d_model: int, tp: int) -> None:
    w = sd[key]
    sd[key] = w[torch.argsort(qkvu_rank_order(d_model, w.shape[0] // d_model, tp))]


def save_sharded(path: str, model: nn.Module, opt) -> None:
    """Every rank writes its shards of the weights and AdamW state under ``path/sharded`` with
    ``torch.distributed.checkpoint`` (collective). Loadable on any number of ranks (:func:`load_sharded`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(path, SHARDED_DIR))


#: the globals a ``torch.distributed.checkpoint`` metadata file may name (besides the classes of
#: ``torch.distributed.checkpoint.metadata`` and torch's dtypes): each builds a plain value when called
_DCP_GLOBALS = {("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                ("pathlib", "PureWindowsPath"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}
_DCP_REMEDY = "restore the checkpoint from a copy"


def _dcp_metadata(path: str, remedy: str):
    """The ``Metadata`` pickled in ``path`` (a ``.metadata`` file), unpickled with only the globals such a
    file holds (:data:`_DCP_GLOBALS`): any other raises ``FileDamaged``, so the file cannot run code.
    (``torch.distributed.checkpoint`` itself reads it with a plain ``pickle.load``.)"""
    import pickle

    from torch.distributed.checkpoint import metadata as dcp_metadata

    from .files import FileDamaged, _one_line

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            obj = None
            if (module, name) in _DCP_GLOBALS:
                obj = super().find_class(module, name)
            elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                obj = getattr(torch, name)
            elif module == dcp_metadata.__name__:
                found = getattr(dcp_metadata, name, None)
                obj = found if isinstance(found, type) and found.__module__ == module else None
            if obj is None:
                raise FileDamaged(path, f"names {module}.{name}, which a checkpoint's metadata never holds; refused, "
                                        f"since loading it could run code", remedy)
            return obj

    if os.path.getsize(path) == 0:
        raise FileDamaged(path, "is empty (0 bytes)", remedy)
    try:
        with open(path, "rb") as f:
            md = Unpickler(f).load()
    except FileDamaged:
        raise
    except Exception as e:  # truncated or foreign bytes: any unpickling error
        raise FileDamaged(path, f"cannot be read as checkpoint metadata ({_one_line(e) or type(e).__name__})",
                          remedy) from None
    if not isinstance(md, dcp_metadata.Metadata) or not isinstance(md.storage_data, dict):
        raise FileDamaged(path, f"holds a {type(md).__name__}, not a checkpoint's Metadata", remedy)
    return md


def check_sharded(path: str, remedy: str = _DCP_REMEDY) -> None:
    """Check the sharded checkpoint under ``path/sharded`` before ``torch.distributed.checkpoint`` reads
    it: its metadata holds only what such metadata holds (:func:`_dcp_metadata`), every shard file it
    names exists and is long enough, and every non-tensor value (pickled by ``torch.save``, which the
    reader unpickles with ``weights_only=False``) is tensors and plain values only. So the checkpoint
    cannot run code when it is loaded, and a truncated one raises ``FileDamaged`` naming the file."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from .files import FileDamaged, read_torch_file

    d = os.path.join(path, SHARDED_DIR)
    names = [n for n in sorted(os.listdir(d)) if n.endswith(".metadata")] if os.path.isdir(d) else []
    if ".metadata" not in names:
        raise FileDamaged(d, "has no .metadata file", remedy)
    for name in names:
        md = _dcp_metadata(os.path.join(d, name), remedy)
        for index, info in md.storage_data.items():
            file = os.path.join(d, str(getattr(info, "relative_path", "")))
            offset, length = getattr(info, "offset", None), getattr(info, "length", None)
            if os.path.basename(file) != getattr(info, "relative_path", None) or not isinstance(offset, int) \
                    or not isinstance(length, int):
                raise FileDamaged(os.path.join(d, name), f"has a malformed entry for {index.fqn!r}", remedy)
            if not os.path.isfile(file):
                raise FileDamaged(file, "is missing (the checkpoint's metadata names it)", remedy)
            if os.path.getsize(file) < offset + length:
                raise FileDamaged(file, f"holds {os.path.getsize(file):,} bytes, but {index.fqn!r} is stored up to byte "
                                        f"{offset + length:,}: truncated", remedy)
            if isinstance(md.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
                if getattr(info, "transform_descriptors", None):
                    raise FileDamaged(file, f"stores {index.fqn!r} through a transform tnlib does not check", remedy)
                read_torch_file(file, remedy, part=(offset, length))


def load_sharded(path: str, model: nn.Module, opt, remedy: str = _DCP_REMEDY) -> None:
    """Load ``save_sharded``'s files into ``model`` and ``opt`` however they are spread now (another world
    size, FSDP or a plain model: ``torch.distributed.checkpoint`` reshards while it reads). The files are
    checked first (:func:`check_sharded`); a shard that cannot be read raises ``FileDamaged``."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    check_sharded(path, remedy)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    _dcp_load(state, path, remedy)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _dcp_load(state: dict, path: str, remedy: str, no_dist: bool | None = None) -> None:
    """``dcp.load`` of ``path/sharded`` into ``state``; ``no_dist`` (default: when no process group is
    initialized) reads in this one process. Any failure to read raises ``FileDamaged`` naming the folder."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from .files import FileDamaged, _one_line

    no_dist = not torch.distributed.is_initialized() if no_dist is None else no_dist
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(state, checkpoint_id=os.path.join(path, SHARDED_DIR), no_dist=no_dist)
    except Exception as e:
        raise FileDamaged(os.path.join(path, SHARDED_DIR), f"cannot be read ({_one_line(e)})", remedy) from None


def consolidate(checkpoint: str, out: str) -> str:
    """A training checkpoint directory (sharded by FSDP/TP, or single-file) -> ``out`` written by
    ``tnlib.save_model`` (one ``model.safetensors`` + ``config.json``, and the run's data's
    ``tokenizer.json`` when it is still there), loadable with ``tnlib.load_model``. Runs in one process,
    no GPU; returns ``out``. Every file is checked before ``out`` is written (``FileDamaged``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from .files import FileDamaged, load_weights, read_json
    from .models import ModelConfig, build_model, save_model

    cfg_path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"consolidate: {cfg_path} is missing (expected a training checkpoint directory)")
    saved = read_json(cfg_path, _DCP_REMEDY)
    if not isinstance(saved.get("model"), dict) or not isinstance(saved.get("train"), dict):
        raise FileDamaged(cfg_path, "lacks the 'train' and 'model' configs of a training checkpoint", _DCP_REMEDY)
    try:
        model = build_model(ModelConfig.from_dict(saved["model"]))
    except (ValueError, TypeError) as e:
        raise FileDamaged(cfg_path, f"its model config is not a tnlib one: {e}", _DCP_REMEDY) from None
    if not os.path.isdir(os.path.join(checkpoint, SHARDED_DIR)):  # already one file
        load_weights(model, os.path.join(checkpoint, "model.safetensors"), _DCP_REMEDY)
    else:
        check_sharded(checkpoint)
        sd = {k: v for k, v in model.state_dict().items()}
        _dcp_load({"model": sd}, checkpoint, _DCP_REMEDY, no_dist=True)  # one process
        tp = int(saved["train"].get("tensor_parallel", 1))
        if tp > 1:
            for name, m in model.named_modules():
                if hasattr(m, "qkvu_proj"):
                    _ungroup_qkvu(sd, f"{name}.qkvu_proj.weight", m.out_proj.in_features, tp)
        set_model_state_dict(model, sd, options=StateDictOptions(strict=True))
    tokenizer = os.path.join(str(saved["train"].get("data")), "tokenizer.json")
    save_model(model, out, tokenizer=tokenizer if os.path.isfile(tokenizer) else None)
    return out
