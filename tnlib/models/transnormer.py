"""TransNormerLLM (spec sections 2, 3, 8, 9): pre-norm blocks of GLA + SGLU. See ``notebooks/07_model``."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn.gla import SGLU, GatedLinearAttention
from ..nn.norm import build_norm
from .config import ModelConfig

__all__ = ["TransNormerLLM", "TNLBlock", "RecurrentCache", "init_weights", "check_input_ids", "left_pad_positions"]


@dataclass
class RecurrentCache:
    """Decoding state of TransNormerLLM: one ``[B, H, K, V]`` fp32 matrix per layer and, per sequence,
    the LRPE position of the next token. Its size does not depend on the context length."""

    states: list
    positions: torch.Tensor  # [B] long

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)


def left_pad_positions(input_ids, pad_mask):
    """Per-sequence position of token 0 for a left-padded batch: ``-(number of pads)`` (``[B]`` long)."""
    B, T = input_ids.shape
    if pad_mask is None:
        return torch.zeros(B, dtype=torch.long, device=input_ids.device)
    if pad_mask.shape != input_ids.shape or pad_mask.dtype != torch.bool:
        raise ValueError(f"pad_mask must be a bool tensor of shape {tuple(input_ids.shape)}")
    return pad_mask.sum(1) - T


def init_weights(model: nn.Module, std: float) -> None:
    """Every Linear and Embedding weight ~ N(0, std^2); biases (if any) zero; other params untouched."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def check_input_ids(input_ids, vocab_size: int) -> None:
    """Clear errors for the token-id tensor every model takes: ``[B, T]`` integers in ``[0, vocab)``."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"input_ids must be an integer tensor (torch.long), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: sequences need at least one token")
    if not torch.compiler.is_compiling():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}); got min {lo}, max {hi}")


class TNLBlock(nn.Module):
    """``x + GLA(norm(x))`` then ``x + SGLU(norm(x))``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.token_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.token_mixer = GatedLinearAttention(cfg, layer_idx)
        self.channel_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.channel_mixer = SGLU(cfg.d_model, cfg.glu_dim, cfg.glu_act)

    def forward(self, x, state=None, offset=0, return_state=False, pad_mask=None):
        h = self.token_mixer(self.token_norm(x), state=state, offset=offset, return_state=return_state, pad_mask=pad_mask)
        if return_state:
            h, state = h
        x = x + h
        x = x + self.channel_mixer(self.channel_norm(x))
        return (x, state) if return_state else x


class TransNormerLLM(nn.Module):
    """Embedding (x sqrt(d) if configured), blocks, final norm, LM head tied to the embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "tnl":
            raise ValueError(f"TransNormerLLM needs arch='tnl', got {cfg.arch!r}")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positional == "ape" else None
        self.layers = nn.ModuleList(TNLBlock(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        init_weights(self, cfg.init_std)

    def num_parameters(self, exclude_lrpe_theta: bool = False) -> int:
        """All parameters (tied weights once). ``exclude_lrpe_theta`` gives the paper's size convention."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_lrpe_theta:
            n -= sum(p.numel() for name, p in self.named_parameters() if name.endswith("lrpe.theta"))
        return n

    def embed_tokens(self, input_ids, start=None, validate=True):
        """Scaled token embeddings (+ absolute positions when configured); ``start``: ``[B]`` positions."""
        if validate:
            check_input_ids(input_ids, self.config.vocab_size)
        x = self.embed(input_ids) * self.embed_scale
        if self.pos_embed is not None:
            B, T = input_ids.shape
            pos = torch.arange(T, device=input_ids.device)[None]
            if start is not None:
                pos = (start[:, None] + pos).clamp(min=0)
            if int(pos.max()) >= self.config.max_seq_len:
                raise ValueError(f"absolute position embeddings cover {self.config.max_seq_len} positions, got {int(pos.max()) + 1}")
            x = x + self.pos_embed(pos)
        return x

    def logits(self, h):
        h = self.final_norm(h)
        return F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)

    @torch.no_grad()
    def step(self, input_ids, cache: RecurrentCache | None = None, pad_mask=None, last_only=False,
             validate=True):
        """Prefill (``cache=None``) or continue a batch of sequences; returns ``(logits, cache)``.

        Prefill runs the parallel (Lightning Attention) form and keeps each layer's final state; a
        one-token step runs the robust recurrence. ``pad_mask`` marks real tokens of a *left-padded*
        prefill; positions restart at 0 for every new prompt (spec section 7.4). ``last_only`` returns
        logits for the last position only; ``validate=False`` skips the host-side id check (CUDA graphs).
        """
        if cache is None:
            start = left_pad_positions(input_ids, pad_mask)
            states = [None] * len(self.layers)
        else:
            if pad_mask is not None:
                raise ValueError("pad_mask is only for the prefill (left padding)")
            start, states = cache.positions, cache.states
            if start.shape[0] != input_ids.shape[0]:
                raise ValueError(f"cache holds {start.shape[0]} sequences, got a batch of {input_ids.shape[0]}")
        x = self.embed_tokens(input_ids, start, validate)
        new_states = []
        for layer, st in zip(self.layers, states):
            x, st = layer(x, state=st, offset=start, return_state=True, pad_mask=pad_mask)
            new_states.append(st)
        if last_only:
            x = x[:, -1:]
        return self.logits(x), RecurrentCache(new_states, start + input_ids.shape[1])

    def forward(self, input_ids):
        """``input_ids: [B, T]`` -> logits ``[B, T, vocab]``."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            if self.config.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.logits(x)
