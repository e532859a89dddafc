"""The LLaMA-style Transformer baseline: RMSNorm (with gain), RoPE, SwiGLU, causal SDPA, no biases.

Sized to match TransNormerLLM's parameter count (preset ``transformer-385m``); see ``notebooks/07_model``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.linear import Linear
from ..nn.norm import build_norm
from .common import CausalLM, check_documents, check_input_ids, document_mask, init_weights, left_pad_positions
from .config import Implementation, ModelConfig

__all__ = ["Transformer", "KVCache", "StaticKVCache", "rope"]


@dataclass
class KVCache:
    """Decoding state of the Transformer: keys and values of every past token (grows with context)."""

    keys: list  # per layer [B, H, L, D]
    values: list
    valid: torch.Tensor | None  # [B, L] bool: False at left padding (None: no padding)
    positions: torch.Tensor  # [B] position of the next token

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class StaticKVCache:
    """The Transformer's decoding state preallocated to ``capacity`` tokens: its shapes never change, so a
    decode step on it (``Transformer.static_step``) can be compiled and captured as a CUDA graph.

    Slot ``j`` of every layer holds the key and value of the batch's ``j``-th token (left padding
    included); ``valid`` says which slots a query may see (False at left padding and at unwritten slots);
    ``length`` (a one-element device tensor, not a Python int, so that a captured step reads it) is the
    slot of the next token, the same for every sequence; ``positions`` the next token's RoPE position
    per sequence. Unwritten slots hold zeros or an earlier sequence's (finite) values, masked out."""

    keys: list  # per layer [B, H, capacity, D]
    values: list
    valid: torch.Tensor  # [B, capacity] bool
    positions: torch.Tensor  # [B] long
    length: torch.Tensor  # [1] long

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, capacity: int, dtype, device) -> "StaticKVCache":
        """Zero keys and values for ``batch`` sequences of up to ``capacity`` tokens, nothing valid."""
        shape = (batch, cfg.n_heads, capacity, cfg.head_dim)
        kv = [[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)] for _ in range(2)]
        return cls(kv[0], kv[1], torch.zeros(batch, capacity, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device))

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def load(self, cache: KVCache) -> None:
        """Hold ``cache`` (a prefill's ``KVCache``, same batch size) instead of what was here."""
        T = cache.keys[0].shape[2]
        if T > self.capacity or cache.positions.shape[0] != self.valid.shape[0]:
            raise ValueError(f"StaticKVCache of {self.valid.shape[0]} x {self.capacity} tokens cannot hold a cache of "
                             f"{cache.positions.shape[0]} x {T}")
        for dst, src in zip(self.keys + self.values, cache.keys + cache.values):
            dst[:, :, :T].copy_(src)
        self.valid.zero_()
        self.valid[:, :T] = True if cache.valid is None else cache.valid
        self.positions.copy_(cache.positions)
        self.length.fill_(T)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def rope(x: torch.Tensor, theta: float = 10000.0, offset=0) -> torch.Tensor:
    """Rotary embedding of ``x: [B, T, H, D]`` (rotate-half convention), positions ``offset + t``."""
    B, T, H, D = x.shape
    inv = 1.0 / theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)  # [D/2]
    pos = torch.arange(T, device=x.device, dtype=torch.float32)
    if isinstance(offset, torch.Tensor):
        pos = offset.to(x.device, torch.float32)[:, None] + pos[None]
    else:
        pos = (pos + offset)[None]
    ang = pos[..., None] * inv  # [B|1, T, D/2]
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]  # [B|1, T, 1, D/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.theta = cfg.n_heads, cfg.head_dim, cfg.rope_theta
        self.qkv_proj = Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, offset=0, past=None, key_valid=None, want_kv=False, attn_mask=None):
        """Causal attention. ``past=(k, v)`` continues a sequence; ``key_valid`` ([B, L] bool) masks
        left padding; with ``want_kv`` it also returns the keys and values so far. ``attn_mask`` ([B, 1, T, T]
        bool, no ``past``): the whole mask instead of the causal one (documents: ``document_mask``)."""
        B, T, d = x.shape
        q, k, v = (p.reshape(B, T, self.n_heads, self.head_dim) for p in self.qkv_proj(x).chunk(3, dim=-1))
        q, k = rope(q, self.theta, offset), rope(k, self.theta, offset)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [B, H, T, D]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        L = k.shape[2]
        if attn_mask is not None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif key_valid is None and (past is None or T == 1):
            # no padding: plain causal attention (a single new token may see every cached key)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=past is None and T > 1)
        else:
            qpos = torch.arange(L - T, L, device=x.device)
            kpos = torch.arange(L, device=x.device)
            mask = kpos[None, :] <= qpos[:, None]  # causal [T, L]
            if key_valid is not None:
                mask = mask & key_valid[:, None, None, :]  # [B, 1, T, L]
                mask = mask | (kpos[None, :] == qpos[:, None])  # a padding query sees itself: no empty rows
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(o.transpose(1, 2).reshape(B, T, d))
        return (out, (k, v)) if want_kv else out

    def static_forward(self, x, positions, keys, values, slot, mask):
        """One token per sequence (``x: [B, 1, d]``) against a static cache: its key and value written at
        ``slot`` (a one-element tensor) of ``keys``/``values`` (``[B, H, capacity, D]``), then attention over
        the slots ``mask`` (``[B, 1, 1, capacity]`` bool) allows."""
        B, T, d = x.shape
        q, k, v = (p.reshape(B, T, self.n_heads, self.head_dim) for p in self.qkv_proj(x).chunk(3, dim=-1))
        q, k = rope(q, self.theta, positions), rope(k, self.theta, positions)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        keys.index_copy_(2, slot, k)
        values.index_copy_(2, slot, v)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, d))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, gemv: bool = True):
        super().__init__()
        self.w1 = Linear(d_model, hidden, bias=False, gemv=gemv)
        self.w3 = Linear(d_model, hidden, bias=False, gemv=gemv)
        self.w2 = Linear(hidden, d_model, bias=False, gemv=gemv)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.glu_dim)

    def forward(self, x, offset=0, past=None, key_valid=None, want_kv=False, attn_mask=None):
        h = self.attn(self.attn_norm(x), offset, past, key_valid, want_kv, attn_mask)
        if want_kv:
            h, kv = h
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return (x, kv) if want_kv else x

    def static_forward(self, x, positions, keys, values, slot, mask):
        """The block for one token per sequence on a static cache (``Attention.static_forward``)."""
        x = x + self.attn.static_forward(self.attn_norm(x), positions, keys, values, slot, mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(CausalLM):
    """LLaMA-style decoder with a tied LM head (like TransNormerLLM, for a like-for-like count).
    ``impl``: how it computes (``Implementation``; the defaults if None)."""

    def __init__(self, cfg: ModelConfig, impl: Implementation | None = None):
        super().__init__()
        if cfg.arch != "transformer":
            raise ValueError(f"Transformer needs arch='transformer', got {cfg.arch!r}")
        if cfg.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {cfg.head_dim}")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std)
        self.set_impl(impl or Implementation())

    @torch.no_grad()
    def step(self, input_ids, cache: KVCache | None = None, pad_mask=None, last_only=False):
        """Prefill (``cache=None``, optionally left-padded) or continue with a KV cache: ``(logits, cache)``.

        ``last_only`` returns logits for the last position only (what generation needs)."""
        check_input_ids(input_ids, self.config.vocab_size)
        B, T = input_ids.shape
        if pad_mask is not None and bool(pad_mask.all()):
            pad_mask = None
        if cache is None:
            start, pasts, valid = left_pad_positions(input_ids, pad_mask), [None] * len(self.layers), pad_mask
        else:
            if pad_mask is not None:
                raise ValueError("pad_mask is only for the prefill (left padding)")
            start, pasts = cache.positions, list(zip(cache.keys, cache.values))
            valid = None if cache.valid is None else torch.cat(
                [cache.valid, torch.ones(B, T, dtype=torch.bool, device=input_ids.device)], dim=1)
        x = self.residual_stream(self.embed(input_ids))
        keys, values = [], []
        for layer, past in zip(self.layers, pasts):
            x, (k, v) = layer(x, start, past, valid, want_kv=True)
            keys.append(k)
            values.append(v)
        if last_only:
            x = x[:, -1:]
        return self.logits(x), KVCache(keys, values, valid, start + T)

    def static_cache(self, cache: KVCache, capacity: int) -> StaticKVCache:
        """A ``StaticKVCache`` of ``capacity`` tokens per sequence holding ``cache`` (a prefill's ``KVCache``)."""
        static = StaticKVCache.empty(self.config, cache.positions.shape[0], capacity, cache.keys[0].dtype,
                                     cache.keys[0].device)
        static.load(cache)
        return static

    @torch.no_grad()
    def static_step(self, input_ids, cache: StaticKVCache):
        """One token per sequence (``input_ids: [B, 1]``) on a ``StaticKVCache``, updated in place (slot
        ``cache.length`` written and made valid, ``length`` and ``positions`` advanced); returns ``[B, 1,
        vocab]`` logits, those of ``step`` on the growing cache. No host synchronization, no shape that
        depends on the data (so it compiles and captures); ids unchecked, and the caller keeps ``length``
        below the capacity."""
        slot = cache.length
        cache.valid.index_fill_(1, slot, True)
        x = self.residual_stream(self.embed(input_ids))
        mask = cache.valid[:, None, None, :]
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
            x = layer.static_forward(x, cache.positions, keys, values, slot, mask)
        cache.positions.add_(1)
        cache.length.add_(1)
        return self.logits(x)

    def forward(self, input_ids, targets=None, *, cu_seqlens=None):
        """``input_ids: [B, T]`` -> logits ``[B, T, vocab]``, or with ``targets`` the mean cross-entropy.

        ``cu_seqlens``: documents, as ``TransNormerLLM.forward`` takes them (a tensor or a
        ``tnlib.ops.PackedSequences``): here a block-diagonal causal mask (``document_mask``, one per batch, shared
        by every layer) so that no attention score crosses a document boundary. RoPE positions stay the window's
        (a score depends on ``t - s`` only)."""
        check_input_ids(input_ids, self.config.vocab_size)
        kw = {}
        if cu_seqlens is not None:
            B, T = input_ids.shape
            check_documents(cu_seqlens, B, T)
            kw["attn_mask"] = document_mask(cu_seqlens, B, T)
        h = self.run_blocks(self.residual_stream(self.embed(input_ids)), **kw)
        return self.logits(h) if targets is None else self.lm_loss(h, targets)
