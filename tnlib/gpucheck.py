"""``python -m tnlib gpu-check``: will the kernels fit this GPU? Answered on any machine, no GPU needed.

For a target (``--target sm_86``; on a GPU machine without it, the local GPU) this collects every
kernel configuration the library launches for the model presets, exactly as it launches them: the
launchers themselves run on ``meta`` tensors with each Triton kernel replaced by a recorder
(:func:`collect_launches`), so the list follows the launch code and its plans (``tnlib.ops.targets``,
``tnlib.ops.lightning.plan.PLANS``). The distinct configurations are then compiled for the target with
Triton's own toolchain (``triton.compile`` + ptxas, ``tnlib.ops._compile``) and each is reported with
its shared memory against the target's limit, its registers and its register spills.

What "launches for the model presets" covers, per preset and dtype (the target's training dtype, bf16 or
fp16 where there is no bf16, and fp32): training steps at T = 2,048 (B = 16) and T = 32,768 (B = 1, so
sequences split into segments) through the packed attention path, the LRPE layer's unpacked path, the
norms and the chunked LM-head loss; the same step at T = 2,048 (B = 16) with documents
(``TrainConfig.document_mask``: the windows as packed sequences, ``cu_seqlens``, the kernels' ``VARLEN``
form); a prefill of 1,000 tokens (B = 1) with and without a start state, and of 8 packed prompts from
their states;
decode products through the GEMV kernel at 1, 2 and 4 rows (every configuration its autotuner tries);
the fused decode step (``tnlib.models.fused_decode``, ``decoder="fused-graph"``) at 1 to 32 sequences.
Integer arguments are specialized as Triton's JIT does (1 -> constant, multiples of 16 -> aligned).

A configuration fits when it compiles, its shared memory is within the target's opt-in limit (what
Triton checks before a launch: "out of resource: shared memory") and it spills at most ``max_spill``
bytes per thread (heavier spilling runs, but slowly). Compiled kernels and their ptxas reports are
cached in Triton's cache directory: a second run takes seconds.
"""
from __future__ import annotations

import importlib
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Optional
from unittest import mock

import torch

from .ops.targets import TARGETS, GpuTarget, device_target, parse_target

__all__ = ["Launch", "collect_launches", "record_launches", "compile_launch", "check_target", "run_gpu_check",
           "DEFAULT_MAX_SPILL"]

#: Spill stores (bytes per thread) above which a configuration counts as not fitting.
DEFAULT_MAX_SPILL = 1024

_TRITON_DEFAULTS = dict(num_warps=4, num_stages=3)  # what a launch without these options gets (CUDAOptions)
_COMPILE_OPTIONS = ("enable_fp_fusion",)  # other compile options a launch may request (recorded, compiled so)


@dataclass
class Launch:
    """One distinct kernel configuration: the kernel (``module``, ``name``: importable), its constexpr
    arguments (None: an absent optional tensor), pointer types, warps and stages, the integers it was
    launched with (for the JIT's specialization) and the other compile options it requested
    (``options``, e.g. ``enable_fp_fusion``); ``uses``: which preset/purpose/dtype launch it."""

    module: str
    name: str
    constexprs: dict
    ptr_types: dict
    num_warps: int
    num_stages: int
    int_values: dict
    options: dict = field(default_factory=dict)
    uses: set = field(default_factory=set)

    def key(self):
        def cls(v):  # what the JIT's specialization sees of an integer (or of each in a tuple of them)
            return tuple(map(cls, v)) if isinstance(v, tuple) else 1 if v == 1 else 16 if v % 16 == 0 else 0

        spec = tuple(sorted((n, cls(v)) for n, v in self.int_values.items()))
        return (self.module, self.name, tuple(sorted(self.constexprs.items())), tuple(sorted(self.ptr_types.items())),
                self.num_warps, self.num_stages, spec, tuple(sorted(self.options.items())))

    @property
    def kernel(self) -> str:
        return self.name.strip("_").replace("_kernel", "")

    def describe(self) -> str:
        """The configuration in a few words: constexprs that matter (flags only when set), warps, stages."""
        skip = {"DOT_PREC", "UPCAST", "FAST"}
        parts = []
        for k, v in self.constexprs.items():
            if k in skip or v is False or v is None or (k in ("GRAD_ACT", "GLU_ACT") and v == 0) or (k == "INIT_DECAY" and v is True):
                continue
            parts.append(k if v is True else f"{k}={v}")
        return " ".join(parts) + f" w{self.num_warps} s{self.num_stages}"

    def dtype(self) -> str:
        types = [t for n, t in self.ptr_types.items() if t in ("*bf16", "*fp16")]
        return types[0][1:] if types else "fp32"


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](**kwargs)`` records the launch(es) instead of running.
    For an autotuned kernel it records one launch per configuration the autotuner would try."""

    def __init__(self, kernel, module: str, name: str, sink: "_Sink"):
        from .ops._compile import jit_function

        self.kernel, self.module, self.name, self.sink = kernel, module, name, sink
        self.jit = jit_function(kernel)

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, **kwargs):
        from .ops._compile import heuristic_constexprs

        configs = getattr(self.kernel, "configs", None)
        for extra in ([c.all_kwargs() for c in configs] if configs else [{}]):
            args = {**kwargs, **extra}
            self.sink.add(self, {**args, **heuristic_constexprs(self.kernel, args)})


class _Sink:
    """Collects distinct launches; ``use`` labels the launches recorded while it is set."""

    def __init__(self):
        self.launches: dict = {}
        self.use = ""

    def add(self, rec: _Recorder, kwargs: dict) -> None:
        from .ops._compile import ptr_type

        opts = {k: kwargs.pop(k, d) for k, d in _TRITON_DEFAULTS.items()}
        options = {k: kwargs.pop(k) for k in _COMPILE_OPTIONS if k in kwargs}
        kwargs.pop("num_ctas", None)
        constexprs, ptrs, ints = {}, {}, {}
        for p in rec.jit.params:
            v = kwargs.get(p.name)
            if p.is_constexpr or (v is None and p.name in kwargs):  # None: an absent tensor, a constexpr
                if p.name in kwargs:
                    constexprs[p.name] = v
            elif isinstance(v, torch.Tensor):
                ptrs[p.name] = ptr_type(v.dtype)
            elif isinstance(v, bool) or v is None:
                raise TypeError(f"{rec.name}: argument {p.name}={v!r} has no Triton type here")
            elif isinstance(v, int) or (isinstance(v, tuple) and all(isinstance(x, int) for x in v)):
                ints[p.name] = v  # an integer, or a tuple of them (a tensor's strides)
            elif isinstance(v, float):
                ptrs[p.name] = "fp32"
        launch = Launch(rec.module, rec.name, constexprs, ptrs, opts["num_warps"], opts["num_stages"], ints, options)
        launch = self.launches.setdefault(launch.key(), launch)
        launch.uses.add(self.use)


def _recorders(sink: _Sink) -> ExitStack:
    """Every Triton kernel of tnlib replaced by a recorder, for the ``with`` block."""
    from .ops import decode, gemv, loss, srmsnorm
    from .ops.lightning import kernels, op

    stack = ExitStack()
    lk = {n: _Recorder(getattr(kernels, n), kernels.__name__, n, sink)
          for n in ("_lightning_kernel", "_dkdv_kernel", "_segment_state_kernel", "_feature_map_kernel")}
    stack.enter_context(mock.patch.object(op, "_kernels", lambda: type("K", (), lk)))
    for mod, names in ((srmsnorm, ("_srms_fwd_kernel", "_srms_bwd_kernel")), (loss, ("_xent_grad_kernel",)),
                       (gemv, ("_gemv_kernel",)), (decode, ("_fused_gemv_kernel", "_recurrent_kernel", "_embed_kernel"))):
        for n in names:
            stack.enter_context(mock.patch.object(mod, n, _Recorder(getattr(mod, n), mod.__name__, n, sink)))
    return stack


def record_launches(fn) -> list[Launch]:
    """Run ``fn()`` with every Triton kernel of tnlib replaced by a recorder (run it on ``meta`` tensors:
    nothing is computed) and return the distinct launches it made, in order."""
    sink = _Sink()
    with _recorders(sink):
        fn()
    return list(sink.launches.values())


def _attention_launches(sink, target, dtype, H, K, D, lrpe: bool, act: int, B, T, train: bool, init: bool,
                        docs: int = 0):
    """The Lightning launches of one layer: the packed path (no LRPE, training) or the unpacked one. ``docs``:
    that many packed sequences (``cu_seqlens``) in the ``B * T`` tokens, run as one ``[1, B * T]`` batch."""
    from .ops.lightning import op
    from .ops.lightning.plan import launch_config

    meta = dict(device="meta", dtype=dtype)
    slope = torch.empty(H, device="meta", dtype=torch.float32)
    cu, n_states = None, B
    if docs:
        B, T, n_states = 1, B * T, docs
        cu = torch.empty(docs + 1, device="meta", dtype=torch.int32)
    cfg = launch_config(B, T, H, K, D, dtype, target, varlen=cu is not None).to_ints()
    if train and not lrpe:  # GatedLinearAttention._forward_packed: q | k | v from one projection
        qkv = torch.empty(B, T, 3 * H * D, **meta)
        o, qk, local = op._packed_forward(qkv, slope, H, act, cfg, cu)
        op._packed_backward_impl(torch.empty_like(o), qkv, qk, slope, H, act, local, cfg, cu)
        return
    # unpacked: q, k after LRPE (dense, K wide), v a view of the fused projection's output
    q, k = torch.empty(B, T, H, K, **meta), torch.empty(B, T, H, K, **meta)
    v = torch.empty(B, T, 4 * H * D, **meta)[..., 2 * H * D: 3 * H * D].unflatten(-1, (H, D))
    s0 = torch.empty(n_states, H, K, D, device="meta", dtype=torch.float32) if init else None
    cfg = op._config(cfg, q, v)
    o, final, local = op._forward_impl(q, k, v, slope, cfg, initial_state=s0, output_final_state=not train,
                                       cu_seqlens=cu)
    if train:
        op._backward_impl(torch.empty_like(o), q, k, v, slope, cfg, loc_kv=local, cu_seqlens=cu)


def _fused_decode_launches(cfg, rows: int, dtype) -> None:
    """The launches of one ``FusedDecodeStep`` call (``decoder="fused-graph"``) for ``rows`` sequences: the
    step itself runs, on a model and a state on the ``meta`` device."""
    from .models import build_model
    from .models.fused_decode import FusedDecodeStep
    from .models.transnormer import RecurrentCache

    with torch.device("meta"):
        model = build_model(cfg).to(dtype)
    D = cfg.head_dim
    states = [torch.empty(rows, cfg.n_heads, (2 if cfg.lrpe_on(i) else 1) * D, D, device="meta", dtype=torch.float32)
              for i in range(cfg.n_layers)]
    FusedDecodeStep(model, RecurrentCache(states, torch.zeros(rows, dtype=torch.long, device="meta")))()


def collect_launches(target: GpuTarget, presets=None, dtypes=None) -> list[Launch]:
    """Every distinct kernel configuration tnlib launches for ``presets`` (default: all) in ``dtypes``
    (default: the target's training dtype and fp32) on ``target``, recorded from the launchers (the
    module docstring says which shapes and paths)."""
    from .models import PRESETS, get_config
    from .ops import gemv, loss, srmsnorm
    from .ops._triton import KERNEL_DTYPES
    from .ops.lightning.op import ACT_CODES

    presets = list(presets or PRESETS)
    dtypes = list(dtypes or [torch.bfloat16 if target.bf16 else torch.float16])
    sink = _Sink()
    with _recorders(sink):
        for preset in presets:
            c = get_config(preset)
            for dtype in dtypes:
                if dtype not in KERNEL_DTYPES or (dtype == torch.bfloat16 and not target.bf16):
                    continue  # the PyTorch paths run (tnlib.ops._triton.use_triton)
                dn = str(dtype).removeprefix("torch.")
                meta = dict(device="meta", dtype=dtype)
                d = c.d_model
                if c.arch == "tnl":
                    H, D = c.n_heads, c.head_dim
                    act = ACT_CODES[c.qk_act]
                    layers = [(True, 2 * D)] if any(c.lrpe_on(i) for i in range(c.n_layers)) else []
                    layers += [(False, D)] if not all(c.lrpe_on(i) for i in range(c.n_layers)) else []
                    for lrpe, K in layers:
                        layer = "LRPE layer" if lrpe else "layers"
                        for B, T in ((16, 2048), (1, 32768)):
                            sink.use = f"{preset} train {dn} T={T} ({layer})"
                            _attention_launches(sink, target, dtype, H, K, D, lrpe, act, B, T, True, False)
                        sink.use = f"{preset} train {dn} T=2048 documents ({layer})"
                        _attention_launches(sink, target, dtype, H, K, D, lrpe, act, 16, 2048, True, False, docs=64)
                        for init in (False, True):
                            sink.use = f"{preset} prefill {dn}{' from a state' if init else ''} ({layer})"
                            _attention_launches(sink, target, dtype, H, K, D, lrpe, act, 1, 1000, False, init)
                        sink.use = f"{preset} prefill {dn} 8 packed prompts from their states ({layer})"
                        _attention_launches(sink, target, dtype, H, K, D, lrpe, act, 8, 125, False, True, docs=8)
                sink.use = f"{preset} norms {dn}"
                x = torch.empty(16 * 2048, d, **meta, requires_grad=True)
                srmsnorm.srms_norm_triton(x).backward(torch.empty_like(x))
                sink.use = f"{preset} loss {dn}"
                loss._xent_launch(torch.empty(8192, c.vocab_size, **meta),
                                  torch.empty(8192, device="meta", dtype=torch.long), 1.0)
                sink.use = f"{preset} decode {dn}"
                glu, qkv_rows = c.glu_dim, (4 if getattr(c, "gate", False) else 3) * d
                for rows in (1, 2, 4):
                    for n, k in ((qkv_rows, d), (d, d), (glu, d), (d, glu), (c.vocab_size, d)):
                        gemv._gemv_launch(torch.empty(rows, k, **meta), torch.empty(n, k, **meta))
                if c.arch == "tnl":
                    for rows in (1, 2, 4, 8, 16, 32):
                        sink.use = f"{preset} fused decode {dn} B={rows}"
                        _fused_decode_launches(c, rows, dtype)
    return list(sink.launches.values())


def compile_launch(launch: Launch, capability: int) -> dict:
    """Compile one configuration for ``sm_<capability>``; its ``kernel_usage`` (or ``error``)."""
    from .ops._compile import compile_kernel, kernel_usage

    fn = getattr(importlib.import_module(launch.module), launch.name)
    try:
        k = compile_kernel(fn, launch.constexprs, launch.ptr_types, capability, launch.num_warps, launch.num_stages,
                           launch.int_values, launch.options.get("enable_fp_fusion"))
        return kernel_usage(k)
    except Exception as e:  # noqa: BLE001 - a configuration that does not compile is a finding, reported
        return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")


def _fits(u: dict, target: GpuTarget, max_spill: int) -> bool:
    return "error" not in u and u["shared"] <= target.smem and (u["spill_stores"] or 0) <= max_spill


def check_target(target: GpuTarget, presets=None, dtypes=None, max_spill: int = DEFAULT_MAX_SPILL,
                 progress: bool = True, out=sys.stdout) -> dict:
    """Compile every configuration of ``collect_launches`` for ``target`` and print one row per
    configuration; returns ``{"target", "rows", "fits", ...}`` (a summary for tables)."""
    from .progress import tqdm

    launches = sorted(collect_launches(target, presets, dtypes), key=lambda l: (l.module, l.name, l.dtype(),
                                                                                    l.describe()))
    rows = []
    t0 = time.time()
    bar = tqdm(launches, desc=f"gpu-check {target.name}: compiling", unit="config", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for launch in bar:
        bar.set_postfix_str(f"{launch.kernel} {launch.describe()}"[:50])
        u = compile_launch(launch, target.capability)
        rows.append(dict(kernel=launch.kernel, config=launch.describe(), dtype=launch.dtype(), uses=sorted(launch.uses),
                         fits=_fits(u, target, max_spill), **u))
    bar.close()
    ok = [r for r in rows if "error" not in r]
    summary = dict(target=target.name, gpus=target.gpus, smem_limit=target.smem, configs=len(rows),
                   fits=all(r["fits"] for r in rows), not_fitting=sum(not r["fits"] for r in rows),
                   max_shared=max((r["shared"] for r in ok), default=0),
                   max_spill=max(((r["spill_stores"] or 0) for r in ok), default=0),
                   spilling=sum(bool(r["spill_stores"]) for r in ok),
                   max_registers=max(((r["registers"] or 0) for r in ok), default=0),
                   seconds=round(time.time() - t0, 1), rows=rows, max_spill_allowed=max_spill)
    _print_target(summary, target, out)
    return summary


def _print_target(s: dict, target: GpuTarget, out) -> None:
    w = max([len(r["kernel"]) for r in s["rows"]] + [6])
    wc = max([len(r["config"]) for r in s["rows"]] + [6])
    print(f"\n{target.name} ({target.gpus}): shared memory limit {target.smem:,} B per block, "
          f"bf16 {'yes' if target.bf16 else 'no (bf16 tensors take the PyTorch paths)'}, plan row '{target.family}'",
          file=out)
    print(f"{'kernel':{w}s}  {'configuration':{wc}s}  {'dtype':5s} {'shared B':>9s} {'regs':>4s} {'spills B':>8s}  fits  used by",
          file=out)
    for r in s["rows"]:
        uses = ", ".join(r["uses"][:2]) + (f" (+{len(r['uses']) - 2})" if len(r["uses"]) > 2 else "")
        if "error" in r:
            print(f"{r['kernel']:{w}s}  {r['config']:{wc}s}  {r['dtype']:5s} {'error: ' + r['error']}", file=out)
            continue
        print(f"{r['kernel']:{w}s}  {r['config']:{wc}s}  {r['dtype']:5s} {r['shared']:9,d} {r['registers'] or 0:4d} "
              f"{r['spill_stores'] or 0:8d}  {'yes ' if r['fits'] else 'NO  '}  {uses}", file=out)
    verdict = "all fit" if s["fits"] else f"{s['not_fitting']} do NOT fit"
    print(f"{target.name}: {s['configs']} configurations, {verdict} (shared memory at most {s['max_shared']:,} of "
          f"{target.smem:,} B; {s['spilling']} spill, at most {s['max_spill']} B/thread, limit {s['max_spill_allowed']}; "
          f"{s['seconds']} s)", file=out)


def markdown_summary(summaries: list[dict]) -> str:
    """The README's "Supported GPUs" table rows from ``check_target`` summaries."""
    lines = ["| target | GPUs | shared memory limit | kernel configurations | largest shared memory | spilling configurations (max B/thread) | all fit |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['target']} | {s['gpus']} | {s['smem_limit']:,} B | {s['configs']} | {s['max_shared']:,} B | "
                     f"{s['spilling']} ({s['max_spill']}) | {'yes' if s['fits'] else 'no'} |")
    return "\n".join(lines)


def _targets(text: Optional[str]) -> list[GpuTarget]:
    if text is None:
        if not torch.cuda.is_available():
            raise ValueError(f"no GPU on this machine: name one with --target ({', '.join(TARGETS)}, or all)")
        return [device_target("cuda")]
    if text.strip().lower() == "all":
        return list(TARGETS.values())
    return [parse_target(t) for t in text.split(",") if t.strip()]


def run_gpu_check(target: Optional[str] = None, presets=None, dtypes=None, max_spill: int = DEFAULT_MAX_SPILL,
                  markdown: bool = False, progress: bool = True) -> int:
    """The command: check each target, print the tables (and the Markdown summary); exit status 0 if
    every configuration of every target fits, 1 otherwise. ``ValueError`` for a bad target or dtype."""
    targets = _targets(target)
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtypes:
        bad = [d for d in dtypes if d not in names]
        if bad:
            raise ValueError(f"unknown dtype {bad[0]!r}; choose from {', '.join(names)}")
        dtypes = [names[d] for d in dtypes]
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        raise ValueError(f"gpu-check needs Triton with its CUDA backend: {e}") from None
    summaries = [check_target(t, presets, dtypes, max_spill, progress) for t in targets]
    if markdown:
        print("\n" + markdown_summary(summaries))
    return 0 if all(s["fits"] for s in summaries) else 1
