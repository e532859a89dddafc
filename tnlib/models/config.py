"""Typed model configs and named presets (the released shapes: ``docs/sources.md``). Taught in
``notebooks/07_model.ipynb``.

``ModelConfig`` is what a model *is*: every ablation of the paper is a field whose default is the paper's
choice, and it is what ``save_model`` writes to ``config.json``. ``Implementation`` is how a model
*computes* (same parameters, same results up to rounding): the model holds it at run time and it is
never saved.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from ..fields import check_fields, parse_field

__all__ = ["ModelConfig", "Implementation", "PRESETS", "get_config", "glu_dim_for", "CHOICES",
           "FORMER_IMPLEMENTATION_FIELDS"]

#: allowed values of the string-valued switches
CHOICES = {
    "arch": ("tnl", "transformer"),
    # mix: LRPE-d on layer 0, decay on every layer (the paper's choice); lrpe-d: LRPE + decay on every
    # layer; decay: decay only; lrpe: LRPE on every layer, no decay; ape: learned absolute positions
    "positional": ("mix", "lrpe-d", "decay", "lrpe", "ape"),
    "decay_formula": ("official", "paper"),
    "qk_act": ("silu", "1+elu", "none"),
    "glu_act": ("none", "silu"),
    "norm": ("srms", "rms", "layer"),
    # dtype of the residual stream between blocks under autocast (see ModelConfig.residual_dtype)
    "residual_dtype": ("params", "compute"),
}


def glu_dim_for(d_model: int, multiple: int = 256) -> int:
    """``ceil(8/3 d / 256) * 256``: 1024 -> 2816, 2048 -> 5632, 4096 -> 11008 (ours: fits every released config)."""
    return math.ceil(8 * d_model / 3 / multiple) * multiple


@dataclass
class ModelConfig:
    """One config for both architectures; ``arch`` picks TransNormerLLM or the Transformer baseline."""

    arch: str = "tnl"
    vocab_size: int = 50272
    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 8
    glu_dim: int = 2816
    # TransNormerLLM switches (defaults = the paper's choices)
    positional: str = "mix"
    decay_formula: str = "official"
    layer_temperature: bool = True
    lrpe_learnable: bool = True
    gate: bool = True
    qk_act: str = "silu"
    glu_act: str = "none"
    norm: str = "srms"
    scale_embedding: bool = True
    # Transformer baseline
    rope_theta: float = 10000.0
    # both
    max_seq_len: int = 2048  # only used by absolute position embeddings (positional="ape")
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # the residual stream between blocks under autocast: "params" = the parameters' dtype (fp32);
    # "compute" = the autocast dtype (bf16), ~4% faster steps at 385M but worse out of domain for TNL
    # (chosen by the rule of tools/fair_385m.py on results/385m-fair/residual-2x2.json)
    residual_dtype: str = "params"
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        # every field parsed into its declared type (strings from the command line included) and string
        # switches checked against CHOICES: tnlib.fields
        check_fields(self, CHOICES)
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "glu_dim", "max_seq_len"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig.{key} must be a positive int, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def lrpe_on(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` applies LRPE to q and k."""
        return self.positional in ("lrpe-d", "lrpe") or (self.positional == "mix" and layer_idx == 0)

    @property
    def uses_decay(self) -> bool:
        return self.positional in ("mix", "lrpe-d", "decay")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config of a dict such as ``to_dict`` writes. The implementation choices that earlier versions
        recorded here (``FORMER_IMPLEMENTATION_FIELDS``) are accepted and dropped, so their checkpoints load;
        any other unknown key raises ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in FORMER_IMPLEMENTATION_FIELDS}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)


#: ModelConfig fields of earlier versions that are ``Implementation`` fields now: ``ModelConfig.from_dict``
#: drops them from old ``config.json`` files, and a resumed training run does not compare them
FORMER_IMPLEMENTATION_FIELDS = ("checkpointing", "packed_attention", "decode_gemv")


@dataclass(frozen=True)
class Implementation:
    """How a model computes, not what: the parameters, their names and the results (up to floating-point
    rounding) are the same whatever these are, so they are not part of ``ModelConfig`` and never saved.

    A model holds one (``model.impl``), given when it is built (``build_model(cfg, impl=...)``,
    ``create_model(preset, impl=...)``, ``load_model(path, impl=...)``, ``load_official(path, impl=...)``)
    or set later (``model.set_impl(checkpointing=True)``); training sets ``checkpointing`` from
    ``TrainConfig.checkpointing``. The defaults are the faster paths as measured
    (``results/bench/NOTES-model.md``); ``False`` gives the plain PyTorch form. Values are parsed like every
    config field (``"false"`` is ``False``, ``tnlib.fields``).
    """

    # on a GPU, the stateless (training) forward of GLA layers without LRPE runs through
    # tnlib.ops.lightning_attention_packed (GatedLinearAttention.packed)
    packed_attention: bool = True
    # products of at most a few rows inside compiled or CUDA-graph-captured code (decode steps) run the
    # tnlib.ops.gemv kernel (tnlib.nn.Linear.gemv and the tied LM head)
    decode_gemv: bool = True
    # activation checkpointing of every block while training (recomputed in the backward: less memory)
    checkpointing: bool = False
    # the fused decode step's kernels (decoder="fused-graph") launched with programmatic dependent launch on
    # sm_90+ (each kernel's launch overlaps the previous one's work) for up to fused_decode.PDL_MAX_BATCH
    # sequences: faster at batch 1, slower at 16 (results/bench/NOTES-decode.md); off elsewhere
    decode_pdl: bool = True
    # with decode_pdl: each product of that step hints its weights into L2 before waiting for the previous
    # kernel (weights are never written while decoding)
    decode_prefetch: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):  # frozen: parsed values are set through object.__setattr__
            object.__setattr__(self, f.name, parse_field(Implementation, f.name, getattr(self, f.name)))

    def replace(self, **changes) -> "Implementation":
        """A copy with ``changes`` (parsed like every field); ``ValueError`` naming the fields on an unknown name."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(Implementation)}
        if unknown:
            raise ValueError(f"unknown Implementation fields {sorted(unknown)}; fields are "
                             f"{[f.name for f in dataclasses.fields(Implementation)]}")
        return dataclasses.replace(self, **changes)


_TNL = dict(arch="tnl")
_TF = dict(arch="transformer", norm="rms", scale_embedding=False, positional="mix")

PRESETS: dict[str, dict] = {
    # a few million parameters: fast on a CPU (vocab small on purpose; override it to match a tokenizer)
    "tnl-tiny": dict(_TNL, vocab_size=4096, d_model=128, n_layers=4, n_heads=4, glu_dim=352),
    "transformer-tiny": dict(_TF, vocab_size=4096, d_model=128, n_layers=4, n_heads=4, glu_dim=400),
    # the paper's sizes (the released shapes, docs/sources.md; vocab 50272 = the ablation checkpoints' GPT-2 BPE)
    "tnl-385m": dict(_TNL, d_model=1024, n_layers=24, n_heads=8, glu_dim=2816),
    # LLaMA-style baseline of the same width/depth/heads; the SwiGLU width is raised to 3136 so that the
    # parameter count matches tnl-385m within 2% (it lacks the gate projection u)
    "transformer-385m": dict(_TF, d_model=1024, n_layers=24, n_heads=8, glu_dim=3136),
    "tnl-1b": dict(_TNL, d_model=2048, n_layers=16, n_heads=16, glu_dim=5632),
    "tnl-7b": dict(_TNL, d_model=4096, n_layers=30, n_heads=32, glu_dim=11008, scale_embedding=False),
}


def get_config(preset: str, **overrides) -> ModelConfig:
    """The named preset's config with ``overrides`` applied (unknown names raise)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    impl = sorted(set(overrides) & set(FORMER_IMPLEMENTATION_FIELDS))
    if impl:
        raise ValueError(f"unknown config overrides {impl}: implementation choices, not ModelConfig fields; pass "
                         f"impl=Implementation({impl[0]}=...) to create_model/build_model/load_model, or call "
                         f"model.set_impl({impl[0]}=...) (training: TrainConfig.checkpointing)")
    bad = set(overrides) - known
    if bad:
        raise ValueError(f"unknown config overrides {sorted(bad)}; fields are {sorted(known)}")
    return ModelConfig(**{**PRESETS[preset], "name": preset, **overrides})
