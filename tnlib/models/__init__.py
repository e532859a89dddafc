"""Models: TransNormerLLM, the Transformer baseline, presets, save/load. See ``notebooks/07_model``."""
from __future__ import annotations

import os

import torch

from .common import document_cu_seqlens
from .config import CHOICES, PRESETS, Implementation, ModelConfig, get_config, glu_dim_for
from .transformer import Transformer
from .transnormer import TransNormerLLM

__all__ = ["ModelConfig", "Implementation", "PRESETS", "CHOICES", "get_config", "glu_dim_for", "create_model",
           "build_model", "save_model", "load_model", "TransNormerLLM", "Transformer", "document_cu_seqlens"]


def build_model(cfg: ModelConfig, impl: Implementation | None = None) -> torch.nn.Module:
    """Instantiate the architecture that ``cfg.arch`` names, computing as ``impl`` says (the defaults if None)."""
    return TransNormerLLM(cfg, impl) if cfg.arch == "tnl" else Transformer(cfg, impl)


def create_model(preset: str, impl: Implementation | None = None, **overrides) -> torch.nn.Module:
    """``create_model("tnl-385m", vocab_size=...)``: a model whose ``forward(input_ids)`` returns logits.
    ``overrides``: ``ModelConfig`` fields; ``impl``: how it computes (``Implementation``)."""
    return build_model(get_config(preset, **overrides), impl)


#: config fields every save_model config.json has held (later fields may be absent: their defaults apply)
_SHAPE_FIELDS = ("arch", "vocab_size", "d_model", "n_layers", "n_heads", "glu_dim")
#: what to do when a save_model directory is damaged
_REWRITE = "save the model again with save_model, or restore the directory from a copy"


def save_model(model: torch.nn.Module, path: str, tokenizer=None) -> None:
    """Write ``path/model.safetensors`` (weights, tied ones once), ``path/config.json`` and, given a
    ``tokenizer``, ``path/tokenizer.json``, so that ``load_model`` and ``python -m tnlib generate
    --checkpoint path`` need nothing else. ``tokenizer``: a ``tokenizers.Tokenizer``, or the path of a
    ``tokenizer.json`` (or of a directory holding one, such as a prepared data directory), which is
    checked and copied byte for byte. The files get the mode of any new file (the umask)."""
    import shutil

    from safetensors.torch import save_model as _save

    from ..files import set_default_mode

    if tokenizer is not None and not hasattr(tokenizer, "to_str"):  # a path: checked before anything is written
        from ..data import load_tokenizer

        tok_path = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else os.fspath(tokenizer)
        load_tokenizer(tok_path)
        tokenizer = tok_path
    os.makedirs(path, exist_ok=True)
    _save(model, os.path.join(path, "model.safetensors"))
    set_default_mode(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(model.config.to_json())
    if tokenizer is None:
        return
    if isinstance(tokenizer, str):
        if os.path.abspath(tokenizer) != os.path.abspath(os.path.join(path, "tokenizer.json")):
            shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.json"))
    else:
        tokenizer.save(os.path.join(path, "tokenizer.json"))


def load_model(path: str, device="cpu", impl: Implementation | None = None) -> torch.nn.Module:
    """Rebuild a model from ``save_model``'s directory, computing as ``impl`` says (the defaults if None;
    ``config.json`` holds the architecture only, and the implementation choices that earlier versions
    wrote there are ignored: ``ModelConfig.from_dict``). A missing file raises ``FileNotFoundError``; a
    damaged ``config.json`` or ``model.safetensors`` (truncated, empty, not JSON or safetensors, other
    keys or shapes than the config's model) raises ``tnlib.files.FileDamaged`` naming the file."""
    from ..files import FileDamaged, load_weights, read_json

    if os.path.isfile(path):
        raise FileNotFoundError(f"load_model: {path} is a file, not a directory written by save_model")
    cfg_path, w_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"load_model: {p} is missing (expected a directory written by save_model)")
    raw = read_json(cfg_path, _REWRITE)
    lacking = [k for k in _SHAPE_FIELDS if k not in raw]
    if lacking:  # the defaults would build another (385M) model
        raise FileDamaged(cfg_path, f"lacks {lacking}, which every save_model config records", _REWRITE)
    try:
        cfg = ModelConfig.from_dict(raw)
    except (ValueError, TypeError) as e:  # unknown fields or values out of their type (another tnlib version?)
        raise FileDamaged(cfg_path, f"is not a tnlib model config: {e}", _REWRITE) from None
    model = build_model(cfg, impl)
    load_weights(model, w_path, _REWRITE, device=device)
    return model.to(device)
