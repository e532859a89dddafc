"""Read and write checkpoints in the layout of the official TransNormerLLM releases.

The released models (Hugging Face ``OpenNLPLab/TransNormerLLM-385M/1B/7B``, remote code
``TransnormerForCausalLM``) are directories with ``config.json`` and the weights as
``model.safetensors``, ``pytorch_model.bin``, or either one sharded with its ``*.index.json``.
Explained in ``notebooks/07_model.ipynb`` (last section).

* :func:`load_official` builds a :class:`~tnlib.models.TransNormerLLM` from such a directory. The model
  is built with its parameters on the meta device and each shard's tensors are assigned as the shard is
  read, so loading never holds two copies of the weights (the 7B release needs its 13.7 GB once).
* :func:`save_official` writes a tnlib TransNormerLLM in that layout (official field names, safetensors,
  an index when sharded), for the official code and ``transformers`` users.

Official key -> tnlib key (shapes for width d, H heads of D = d/H, vocabulary V)::

    model.embed_tokens.weight                     embed.weight                          [V, d]
    lm_head.weight                                (tied: equals embed.weight)           [V, d]
    model.layers.{i}.token_mixer.qkvu_proj.weight layers.{i}.token_mixer.qkvu_proj.weight [4d, d]  q|k|v|u
    model.layers.{i}.token_mixer.out_proj.weight  layers.{i}.token_mixer.out_proj.weight  [d, d]
    model.layers.{i}.token_mixer.lrpe.theta       layers.{i}.token_mixer.lrpe.theta     [H, 1, D] -> [H, D]
    model.layers.{i}.channel_mixer.l{1,2,3}.weight layers.{i}.channel_mixer.l{1,2,3}.weight
    (norm weights/biases, LayerNorm configs only)  same names without the ``model.`` prefix

The checkpoints hold no decay slopes: both codes recompute them from the head and layer counts.
Behaviours of the official code a user of these files should know (``docs/sources.md``):

* its SRMSNorm computes in fp32 and casts back; tnlib's does the same (fp64 inputs stay fp64 here);
* its eval-mode decoding keeps the LRPE offset on the module across prompts; tnlib restarts every
  prompt at position 0 (what a freshly loaded official model computes);
* its embedding has ``padding_idx = pad_token_id`` (row 0): the row is copied verbatim here (the forward
  looks it up like any other); only its training gradient from lookups differs (tnlib gives it one).
"""
from __future__ import annotations

import json
import os
import re

import torch

from .files import FileDamaged, _few, read_json, read_torch_file, safetensors_header, set_default_mode
from .models import Implementation, ModelConfig, TransNormerLLM
from .nn.gla import GatedLinearAttention

__all__ = ["load_official", "save_official", "is_official_dir", "official_to_config", "config_to_official",
           "find_weight_files"]

#: the official config fields read into ModelConfig (the rest of the fields below are metadata)
_MAPPED = ("vocab_size", "decoder_embed_dim", "decoder_layers", "decoder_attention_heads", "glu_dim", "hidden_dim",
           "no_scale_embedding", "linear_use_lrpe_list", "linear_use_lrpe", "norm_type", "linear_act_fun", "bias",
           "init_std", "tie_word_embeddings")
#: fields that do not change what the model computes (tokens, HF bookkeeping); read and ignored
_METADATA = ("architectures", "auto_map", "model_type", "torch_dtype", "transformers_version", "_name_or_path",
             "use_cache", "add_bos_token", "bos_token_id", "eos_token_id", "pad_token_id", "model_max_length",
             "tokenizer_class", "_from_model_config", "output_attentions", "output_hidden_states", "return_dict")
#: official ``linear_act_fun`` -> ModelConfig.qk_act ("swish" is the official alias of SiLU)
_ACT = {"silu": "silu", "swish": "silu", "1+elu": "1+elu", "none": "none"}
#: the official TransnormerConfig's defaults, for fields a config.json leaves out
_DEFAULTS = {"vocab_size": 64000, "decoder_embed_dim": 1024, "decoder_layers": 24, "decoder_attention_heads": 8,
             "glu_dim": 2816, "hidden_dim": 1024, "no_scale_embedding": False, "norm_type": "simplermsnorm",
             "linear_act_fun": "silu", "bias": False, "init_std": 0.02, "linear_use_lrpe_list": []}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_AUTO_MAP = {"AutoConfig": "configuration_transnormer.TransnormerConfig",
             "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM"}
_SRMS_EPS, _LAYERNORM_EPS = 1e-6, 1e-5  # the official SimpleRMSNorm's eps; nn.LayerNorm's default
#: what to do when a file of an official checkpoint is damaged
_FETCH_AGAIN = "download or copy the checkpoint again"
_WRONG_CONFIG = "use the config.json that came with these weights, or download the checkpoint again"


def _refuse(field, value, why):
    raise ValueError(f"official config field {field}={value!r}: {why}")


def official_to_config(cfg: dict, name: str = "official") -> ModelConfig:
    """The :class:`ModelConfig` of an official ``config.json`` (a dict; absent fields take the official
    defaults); a value tnlib cannot express raises ``ValueError`` naming the field and the value."""
    for key, value in cfg.items():
        if key not in _MAPPED and key not in _METADATA:
            _refuse(key, value, "unknown to tnlib's converter (not a field of the official TransnormerConfig)")
    cfg = {**_DEFAULTS, **cfg}
    for key in ("vocab_size", "decoder_embed_dim", "decoder_layers", "decoder_attention_heads"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            _refuse(key, cfg[key], "must be a positive integer")
    d, L, H = cfg["decoder_embed_dim"], cfg["decoder_layers"], cfg["decoder_attention_heads"]
    if d % H:
        _refuse("decoder_attention_heads", H, f"does not divide decoder_embed_dim={d}")
    if L < 2:
        _refuse("decoder_layers", L, "the official decay factor 1 - i/(L-1) needs at least 2 layers")
    if cfg["hidden_dim"] != d:
        _refuse("hidden_dim", cfg["hidden_dim"], f"tnlib's token mixer has width decoder_embed_dim={d}")
    glu = cfg["glu_dim"]
    glu = d if glu == -1 else glu  # official: -1 means the model width
    if not isinstance(glu, int) or glu < 1:
        _refuse("glu_dim", cfg["glu_dim"], "must be a positive integer or -1")
    if cfg["bias"]:
        _refuse("bias", cfg["bias"], "tnlib's projections have no biases")
    act = cfg["linear_act_fun"]
    if act not in _ACT:
        _refuse("linear_act_fun", act, f"tnlib supports {sorted(_ACT)}")
    norm_type = cfg["norm_type"]
    # the official code builds SimpleRMSNorm for "simplermsnorm" and nn.LayerNorm (eps 1e-5) for any other value
    norm, eps = ("srms", _SRMS_EPS) if norm_type == "simplermsnorm" else ("layer", _LAYERNORM_EPS)
    flags = cfg["linear_use_lrpe_list"] or []
    if not flags:  # an empty list: the official code uses the scalar flag on every layer
        if "linear_use_lrpe" not in cfg:
            raise ValueError("official config: linear_use_lrpe_list is empty and linear_use_lrpe is missing")
        flags = [cfg["linear_use_lrpe"]] * L
    if len(flags) < L:
        _refuse("linear_use_lrpe_list", flags, f"has fewer than decoder_layers={L} entries")
    flags = [bool(f) for f in flags[:L]]
    if flags == [i == 0 for i in range(L)]:
        positional = "mix"
    elif all(flags):
        positional = "lrpe-d"
    elif not any(flags):
        positional = "decay"
    else:
        _refuse("linear_use_lrpe_list", cfg["linear_use_lrpe_list"],
                "tnlib applies LRPE to layer 0 only, to every layer, or to none")
    return ModelConfig(
        arch="tnl", vocab_size=cfg["vocab_size"], d_model=d, n_layers=L, n_heads=H, glu_dim=glu,
        positional=positional, decay_formula="official", layer_temperature=True, lrpe_learnable=True, gate=True,
        qk_act=_ACT[act], glu_act="none", norm=norm, norm_eps=eps,
        scale_embedding=not cfg["no_scale_embedding"],
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), init_std=float(cfg["init_std"]),
        name=name,
    )


def config_to_official(cfg: ModelConfig, dtype: torch.dtype = torch.float32, bos_token_id: int = 1,
                       eos_token_id: int = 2, pad_token_id: int = 0) -> dict:
    """The official ``config.json`` (a dict, official field names) of a tnlib config; raises
    ``ValueError`` for settings the official code cannot compute."""
    def refuse(field, why):
        raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)!r} has no official equivalent: {why}")

    if cfg.arch != "tnl":
        refuse("arch", "the official code is TransNormerLLM only")
    if cfg.positional not in ("mix", "lrpe-d", "decay"):
        refuse("positional", "the official code always decays and has no absolute positions")
    if cfg.decay_formula != "official":
        refuse("decay_formula", "the official code uses the ALiBi slopes")
    if not cfg.layer_temperature:
        refuse("layer_temperature", "the official code always applies the layer factor")
    if not cfg.lrpe_learnable:
        refuse("lrpe_learnable", "the official theta is always a learnable parameter")
    if not cfg.gate:
        refuse("gate", "the official token mixer always has the output gate u")
    if cfg.glu_act != "none":
        refuse("glu_act", "the official SGLU has no activation")
    if cfg.qk_act not in ("silu", "1+elu", "none"):
        refuse("qk_act", "not an official linear_act_fun")
    if cfg.n_layers < 2:
        refuse("n_layers", "the official decay factor 1 - i/(L-1) needs at least 2 layers")
    if cfg.norm == "srms" and cfg.norm_eps == _SRMS_EPS:
        norm_type = "simplermsnorm"
    elif cfg.norm == "layer" and cfg.norm_eps == _LAYERNORM_EPS:
        norm_type = "layernorm"
    else:
        refuse("norm", f"the official norms are SRMSNorm (eps {_SRMS_EPS}) or LayerNorm (eps {_LAYERNORM_EPS}); "
                       f"this config has eps {cfg.norm_eps}")
    flags = [int(cfg.lrpe_on(i)) for i in range(cfg.n_layers)]
    dtype_name = {v: k for k, v in _DTYPES.items()}.get(dtype)
    if dtype_name is None:
        raise ValueError(f"save_official: unsupported parameter dtype {dtype}")
    out = {
        "add_bos_token": False,
        "architectures": ["TransnormerForCausalLM"],
        "auto_map": dict(_AUTO_MAP),
        "bias": False,
        "bos_token_id": bos_token_id,
        "decoder_attention_heads": cfg.n_heads,
        "decoder_embed_dim": cfg.d_model,
        "decoder_layers": cfg.n_layers,
        "eos_token_id": eos_token_id,
        "glu_dim": cfg.glu_dim,
        "hidden_dim": cfg.d_model,
        "init_std": cfg.init_std,
        "linear_act_fun": cfg.qk_act,
        "linear_use_lrpe": flags[-1],  # what the official model writes back (its last layer's flag)
        "linear_use_lrpe_list": flags,
        "model_type": "transnormer",
        "no_scale_embedding": not cfg.scale_embedding,
        "norm_type": norm_type,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype_name,
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }
    if not cfg.tie_embeddings:
        out["tie_word_embeddings"] = False
    return out


# ----------------------------------------------------------------------------------------------- keys
_KEY_RULES = [
    (re.compile(r"model\.embed_tokens\.weight"), "embed.weight"),
    (re.compile(r"lm_head\.weight"), "lm_head.weight"),
    (re.compile(r"model\.final_norm\.(weight|bias)"), r"final_norm.\1"),
    (re.compile(r"model\.layers\.(\d+)\.(.+)"), r"layers.\1.\2"),
]


def _tnlib_key(key: str) -> str | None:
    for pattern, repl in _KEY_RULES:
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    return None


def _official_key(name: str) -> str:
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "lm_head.weight":
        return name
    if name.startswith(("layers.", "final_norm.")):
        return "model." + name
    raise ValueError(f"save_official: the parameter {name!r} has no place in the official layout")


def _is_theta(name: str) -> bool:
    return name.endswith("lrpe.theta")


# ------------------------------------------------------------------------------------------- files
def is_official_dir(path: str) -> bool:
    """Whether ``path`` is a directory whose ``config.json`` is an official TransNormerLLM config."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return False
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):  # unreadable: not recognised here; the loader that reads it says what is wrong
        return False
    return isinstance(cfg, dict) and (cfg.get("model_type") == "transnormer" or "decoder_embed_dim" in cfg)


def find_weight_files(path: str):
    """``(files, weight_map)`` of an official directory: the weight files in order and, for a sharded
    checkpoint, the index's key -> file map (``None`` for a single file). Missing files raise."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_path = os.path.join(path, index_name)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path, _FETCH_AGAIN).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise FileDamaged(index_path, "has no weight_map (the key -> shard file map)", _FETCH_AGAIN)
            bad = [v for v in weight_map.values() if not isinstance(v, str) or not v or os.path.basename(v) != v]
            if bad:  # shards are files next to the index: a path elsewhere is never read
                raise FileDamaged(index_path, f"names {bad[0]!r} as a shard, not a file name in its directory",
                                  _FETCH_AGAIN)
            files = sorted(set(weight_map.values()))
            missing = [s for s in files if not os.path.isfile(os.path.join(path, s))]
            if missing:
                raise FileNotFoundError(f"{index_path} names shard(s) that are missing from {path}: {missing}")
            return [os.path.join(path, s) for s in files], weight_map
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)], None
    raise FileNotFoundError(
        f"{path}: no official weights (model.safetensors, pytorch_model.bin, or a sharded *.index.json)")


class _Shard:
    """One weight file, read lazily: ``shapes()`` without the data, then ``tensors()`` one at a time."""

    def __init__(self, path: str):
        self.path = path
        self.safetensors = path.endswith(".safetensors")
        self._bin = None

    def _load_bin(self):
        if self._bin is None:
            # memory-mapped: tensors are read when used, so the shard is never held whole (legacy files whole)
            self._bin = read_torch_file(self.path, _FETCH_AGAIN, mmap=True)
            if not isinstance(self._bin, dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in self._bin.items()):
                raise FileDamaged(self.path, f"holds a {type(self._bin).__name__}, not a state dict of named tensors",
                                  _FETCH_AGAIN)
        return self._bin

    def shapes(self) -> dict:
        if self.safetensors:  # the header, checked against the file's size
            return {k: shape for k, (shape, _) in safetensors_header(self.path, _FETCH_AGAIN).items()}
        shapes = {k: tuple(v.shape) for k, v in self._load_bin().items()}
        self._bin = None  # read again by tensors(): a legacy (unmapped) shard is never held during planning
        return shapes

    def tensors(self, keys):
        """Yield ``(key, tensor)`` for ``keys`` (CPU tensors, one at a time); releases the shard after."""
        if self.safetensors:
            from safetensors import safe_open

            with safe_open(self.path, framework="pt") as f:
                for k in keys:
                    yield k, f.get_tensor(k)
        else:
            sd = self._load_bin()
            for k in keys:
                yield k, sd[k]
            self._bin = None


def _empty_model(cfg: ModelConfig, impl: Implementation | None = None) -> TransNormerLLM:
    """``TransNormerLLM(cfg, impl)`` built on the meta device (no weight memory, no init work), its fixed
    buffers (the decay slopes, computed from the config, never stored) then made real on the CPU."""
    with torch.device("meta"):
        model = TransNormerLLM(cfg, impl)
    for i, layer in enumerate(model.layers):
        layer.token_mixer.slope = GatedLinearAttention.decay_slope(cfg, i)
    return model


def _resolve_dtype(dtype, cfg: dict):
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if dtype is None and cfg.get("torch_dtype") is not None:
        if cfg["torch_dtype"] not in _DTYPES:
            _refuse("torch_dtype", cfg["torch_dtype"], f"choose one of {sorted(_DTYPES)}")
        return _DTYPES[cfg["torch_dtype"]]
    return dtype


def load_official(path: str, dtype=None, device=None, impl: Implementation | None = None) -> TransNormerLLM:
    """A :class:`~tnlib.models.TransNormerLLM` from an official checkpoint directory.

    ``path`` holds ``config.json`` and ``model.safetensors`` | ``pytorch_model.bin`` | either sharded
    with its ``*.index.json``. ``dtype`` (a torch dtype or its name): the parameters' dtype, by default
    the config's ``torch_dtype`` (else as stored), except LRPE's theta, which stays at least fp32 (tnlib
    forms the angles in fp64; a bf16 theta would move them); ``device``: where they live (default CPU);
    ``impl``: how the model computes (``tnlib.models.Implementation``, the defaults if None).

    Everything is checked before any weight is read: config values tnlib cannot express raise
    ``ValueError`` naming ``config.json`` and the field, missing shards ``FileNotFoundError``, and damaged
    files (truncated, empty or foreign bytes, an index without a usable weight map, unknown or missing
    keys, wrong shapes) ``tnlib.files.FileDamaged`` naming the file and the key. ``.bin`` shards are read
    with ``weights_only=True``. The model is built on the meta device and filled shard by shard, so the
    weights are held once. A tied ``lm_head.weight`` stored next to the embedding must equal it.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"load_official: {cfg_path} is missing (expected an official checkpoint directory)")
    raw = read_json(cfg_path, _FETCH_AGAIN)
    try:
        cfg = official_to_config(raw, name=f"official:{os.path.basename(os.path.normpath(path))}")
        dtype = _resolve_dtype(dtype, raw)
    except ValueError as e:  # a value tnlib cannot compute: name the file it came from
        raise ValueError(f"{cfg_path}: {e}") from None
    device = torch.device("cpu" if device is None else device)
    files, weight_map = find_weight_files(path)

    # plan: every stored key -> (shard, tnlib name), checked against the model's names and shapes
    model = _empty_model(cfg, impl)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shards = [_Shard(f) for f in files]
    plan, seen = {s.path: [] for s in shards}, {}
    for shard in shards:
        shapes = shard.shapes()
        keys = (shapes if weight_map is None else
                [k for k, v in weight_map.items() if os.path.join(path, v) == shard.path])
        for key in keys:
            if key not in shapes:
                raise FileDamaged(shard.path, f"does not hold {key!r}, which the index places in it", _FETCH_AGAIN)
            if key in seen:
                raise FileDamaged(shard.path, f"holds {key!r}, which {seen[key]} holds too", _FETCH_AGAIN)
            name = _tnlib_key(key)
            if name == "lm_head.weight" and cfg.tie_embeddings:
                name = "embed.weight"  # tied: the stored head must equal the embedding (checked below)
            want = expected.get(name)
            if want is not None and _is_theta(name):
                want = (want[0], 1, want[1])  # official theta is [H, 1, D]
            if name is None or want is None:
                raise FileDamaged(shard.path, f"unknown key {key!r} (not a parameter of the model config.json "
                                              f"describes)", _WRONG_CONFIG)
            if shapes[key] != want:
                raise FileDamaged(shard.path, f"{key!r} has shape {list(shapes[key])}, expected {list(want)} "
                                              f"from config.json", _WRONG_CONFIG)
            seen[key] = shard.path
            plan[shard.path].append((key, name))
    have = {name for entries in plan.values() for _, name in entries}
    missing = sorted(set(expected) - have)
    if missing:
        # the file that should list them: the one weight file, or the index of the shards
        where = files[0] if weight_map is None else next(
            p for p in (os.path.join(path, n) for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json"))
            if os.path.isfile(p))
        raise FileDamaged(where, f"lacks {len(missing)} of the model's tensors "
                                 f"({_few([_official_key(n) for n in missing])})", _FETCH_AGAIN)

    # load: one shard at a time; each tensor is converted and assigned before the next is read
    def check_tied(head):
        if not torch.equal(head.to(device=device, dtype=model.embed.weight.dtype), model.embed.weight.detach()):
            raise ValueError(f"{path}: lm_head.weight differs from model.embed_tokens.weight, but the config ties "
                             f"them (add \"tie_word_embeddings\": false to config.json to load them untied)")

    pending_head = None  # a tied head read before its embedding (held only until the embedding arrives)
    for shard in shards:
        # a tied head last in its shard, so that it is compared as soon as it is read when it can be
        entries = sorted(plan[shard.path], key=lambda e: e[0] == "lm_head.weight")
        names = dict(entries)
        for key, t in shard.tensors([k for k, _ in entries]):
            name = names[key]
            if key == "lm_head.weight" and name == "embed.weight" and "model.embed_tokens.weight" in seen:
                if model.embed.weight.is_meta:
                    pending_head = t
                else:
                    check_tied(t)
                continue
            want = dtype or t.dtype
            if _is_theta(name):  # LRPE's theta stays >= fp32: in bf16 the angle theta*t would be off by
                want = torch.promote_types(want, torch.float32)  # up to 0.4% of itself (radians at t ~ 100)
                t = t.reshape(t.shape[0], t.shape[2])
            t = t.to(device=device, dtype=want, copy=not shard.safetensors)
            model.load_state_dict({name: t}, strict=False, assign=True)
            del t
    if pending_head is not None:
        check_tied(pending_head)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # pragma: no cover - the plan covers every expected key
        raise RuntimeError(f"load_official: parameters left unloaded: {left}")
    return model.to(device)


def _parse_size(size) -> int:
    """``"2GB"`` / ``"500MB"`` / ``"1200KB"`` (powers of 10, as transformers reads them; ``GiB``... powers
    of 2) or a number of bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or a size such as '2GB', '500MB', '1GiB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


def save_official(model: TransNormerLLM, path: str, max_shard_size="5GB", bos_token_id: int = 1,
                  eos_token_id: int = 2, pad_token_id: int = 0) -> str:
    """Write ``model`` in the official layout under ``path``; returns ``path``.

    Files: ``config.json`` (official field names, with ``architectures``/``auto_map``/``model_type`` as
    the releases have them), ``generation_config.json``, and the weights in safetensors: one
    ``model.safetensors`` when they fit in ``max_shard_size``, else ``model-0000i-of-0000n.safetensors``
    shards and ``model.safetensors.index.json``. A tied head is stored as ``lm_head.weight`` next to the
    embedding with equal values (as the official code's checkpoints do). Token ids go to the config.
    To load it with ``transformers`` (``trust_remote_code=True``), put the official ``*.py`` files of
    ``OpenNLPLab/TransNormerLLM-*`` next to it. Settings the official code cannot compute raise.
    """
    from safetensors.torch import save_file

    if not isinstance(model, TransNormerLLM):
        raise TypeError(f"save_official needs a tnlib TransNormerLLM, got {type(model).__name__}")
    limit = _parse_size(max_shard_size)
    dtype = model.embed.weight.dtype
    cfg = config_to_official(model.config, dtype, bos_token_id, eos_token_id, pad_token_id)
    # official order: embedding, layers, final norm, head
    tensors = []
    for name, t in model.state_dict().items():
        t = t.detach()
        if _is_theta(name):
            t = t.reshape(t.shape[0], 1, t.shape[1])
        tensors.append((_official_key(name), t))
        if name == "embed.weight" and model.config.tie_embeddings:
            head = t
    if model.config.tie_embeddings:
        tensors.append(("lm_head.weight", head))
    shards, size = [[]], 0
    for key, t in tensors:
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, t))
        size += n
    os.makedirs(path, exist_ok=True)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        # contiguous CPU copies, one shard at a time; a tied head gets its own storage (safetensors
        # refuses shared tensors)
        data = {k: t.to("cpu").contiguous().clone() if k == "lm_head.weight" and model.config.tie_embeddings
                else t.to("cpu").contiguous() for k, t in shard}
        save_file(data, os.path.join(path, fname), metadata={"format": "pt"})
        set_default_mode(os.path.join(path, fname))
        for k, t in data.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
        del data
    index_path = os.path.join(path, "model.safetensors.index.json")
    if len(shards) > 1:
        with open(index_path, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    elif os.path.exists(index_path):
        os.remove(index_path)  # a stale index from an earlier sharded save would shadow model.safetensors
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}, f,
                  indent=2)
        f.write("\n")
    return path
