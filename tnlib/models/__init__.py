"""Models: TransNormerLLM, the Transformer baseline, presets, save/load. See ``notebooks/07_model``."""
from __future__ import annotations

import json
import os

import torch

from .config import CHOICES, PRESETS, ModelConfig, get_config, glu_dim_for
from .transformer import Transformer
from .transnormer import TransNormerLLM

__all__ = ["ModelConfig", "PRESETS", "CHOICES", "get_config", "glu_dim_for", "create_model",
           "build_model", "save_model", "load_model", "TransNormerLLM", "Transformer"]


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """Instantiate the architecture that ``cfg.arch`` names."""
    return TransNormerLLM(cfg) if cfg.arch == "tnl" else Transformer(cfg)


def create_model(preset: str, **overrides) -> torch.nn.Module:
    """``create_model("tnl-385m", vocab_size=...)``: a model whose ``forward(input_ids)`` returns logits."""
    return build_model(get_config(preset, **overrides))


def save_model(model: torch.nn.Module, path: str) -> None:
    """Write ``path/model.safetensors`` (weights, tied ones once) and ``path/config.json``."""
    from safetensors.torch import save_model as _save

    os.makedirs(path, exist_ok=True)
    _save(model, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(model.config.to_json())


def load_model(path: str, device="cpu") -> torch.nn.Module:
    """Rebuild a model from ``save_model``'s directory; missing or mismatched files raise clearly."""
    from safetensors.torch import load_model as _load

    cfg_path, w_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"load_model: {p} is missing (expected a directory written by save_model)")
    with open(cfg_path) as f:
        cfg = ModelConfig.from_dict(json.load(f))
    model = build_model(cfg)
    missing, unexpected = _load(model, w_path, strict=True, device=str(device))
    return model.to(device)
