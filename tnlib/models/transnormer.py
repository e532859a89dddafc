"""TransNormerLLM (arXiv 2307.14995, Figure 1): pre-norm blocks of GLA + SGLU. See ``notebooks/07_model``."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.linear import Linear
from ..nn.gla import SGLU, GatedLinearAttention
from ..nn.norm import build_norm
from .common import CausalLM, check_input_ids, init_weights, left_pad_positions, packed_documents
from .config import Implementation, ModelConfig

__all__ = ["TransNormerLLM", "TNLBlock", "RecurrentCache", "init_weights", "check_input_ids", "left_pad_positions"]


@dataclass
class RecurrentCache:
    """Decoding state of TransNormerLLM: one ``[B, H, K, V]`` fp32 matrix per layer and, per sequence,
    the LRPE position of the next token. Its size does not depend on the context length."""

    states: list
    positions: torch.Tensor  # [B] long

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states)


class TNLBlock(nn.Module):
    """``x + GLA(norm(x))`` then ``x + SGLU(norm(x))``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.token_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.token_mixer = GatedLinearAttention(cfg, layer_idx)
        self.channel_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.channel_mixer = SGLU(cfg.d_model, cfg.glu_dim, cfg.glu_act)

    def forward(self, x, state=None, offset=0, return_state=False, pad_mask=None, cu_seqlens=None):
        h = self.token_mixer(self.token_norm(x), state=state, offset=offset, return_state=return_state, pad_mask=pad_mask,
                             cu_seqlens=cu_seqlens)
        if return_state:
            h, state = h
        x = x + h
        x = x + self.channel_mixer(self.channel_norm(x))
        return (x, state) if return_state else x


class TransNormerLLM(CausalLM):
    """Embedding (x sqrt(d) if configured), blocks, final norm, LM head tied to the embedding.
    ``impl``: how it computes (``Implementation``; the defaults if None)."""

    def __init__(self, cfg: ModelConfig, impl: Implementation | None = None):
        super().__init__()
        if cfg.arch != "tnl":
            raise ValueError(f"TransNormerLLM needs arch='tnl', got {cfg.arch!r}")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positional == "ape" else None
        self.layers = nn.ModuleList(TNLBlock(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        init_weights(self, cfg.init_std)
        self.set_impl(impl or Implementation())

    def embed_tokens(self, input_ids, start=None, validate=True):
        """Scaled token embeddings (+ absolute positions when configured); ``start``: ``[B]`` positions of
        token 0, or ``[B, T]`` every token's position (packed prompts)."""
        if validate:
            check_input_ids(input_ids, self.config.vocab_size)
        x = self.embed(input_ids) * self.embed_scale
        if self.pos_embed is not None:
            B, T = input_ids.shape
            pos = torch.arange(T, device=input_ids.device)[None]
            if start is not None:
                pos = (start if start.dim() == 2 else start[:, None] + pos).clamp(min=0)
            if int(pos.max()) >= self.config.max_seq_len:
                raise ValueError(f"absolute position embeddings cover {self.config.max_seq_len} positions, got {int(pos.max()) + 1}")
            x = x + self.pos_embed(pos)
        return self.residual_stream(x)

    def _step_layers(self, x, states, offset, **kw):
        """Every layer of a ``step`` from ``states`` (None: a prefill): ``(x, the new states)``."""
        new_states = []
        for layer, st in zip(self.layers, states):
            x, st = layer(x, state=st, offset=offset, return_state=True, **kw)
            new_states.append(st)
        return x, new_states

    def _step_packed(self, input_ids, cache, pad_mask, last_only, validate, cu_seqlens):
        """``step`` with ``cu_seqlens``: prompts packed along time (see ``step``)."""
        from ..ops import PackedSequences, check_cu_seqlens

        if pad_mask is not None:
            raise ValueError("step: pad_mask and cu_seqlens exclude each other (packed prompts need no padding)")
        if validate:
            check_input_ids(input_ids, self.config.vocab_size)
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"step: with cu_seqlens, input_ids must be [1, total] (the prompts back to back), got "
                             f"{tuple(input_ids.shape)}")
        total, device = input_ids.shape[1], input_ids.device
        check_cu_seqlens(cu_seqlens, total, name="step", device=device, values=False)  # shapes, dtype, device
        packed = PackedSequences(cu_seqlens, total)  # values read once; one work table for every layer
        n, cu = packed.n_seqs, cu_seqlens.to(torch.int64)
        if cache is None:
            start, states = torch.zeros(n, dtype=torch.long, device=device), [None] * len(self.layers)
        else:
            start, states = cache.positions, cache.states
            if start.shape[0] != n:
                raise ValueError(f"cache holds {start.shape[0]} sequences, cu_seqlens {n}")
        seq = torch.searchsorted(cu[1:], torch.arange(total, device=device), right=True)  # each token's sequence
        pos = (torch.arange(total, device=device) - cu[seq] + start[seq])[None]  # [1, total]: its own position
        x, new_states = self._step_layers(self.embed_tokens(input_ids, pos, validate=False), states, pos,
                                          cu_seqlens=packed)
        if last_only:
            x = x[0, cu[1:] - 1][:, None]  # [N, 1, d]: each prompt's last token
        return self.logits(x), RecurrentCache(new_states, start + (cu[1:] - cu[:-1]))

    @torch.no_grad()
    def step(self, input_ids, cache: RecurrentCache | None = None, pad_mask=None, last_only=False,
             validate=True, *, cu_seqlens=None):
        """Prefill (``cache=None``) or continue a batch of sequences; returns ``(logits, cache)``.

        Prefill runs the parallel (Lightning Attention) form and keeps each layer's final state; a
        one-token step runs the robust recurrence. ``pad_mask`` marks real tokens of a *left-padded*
        prefill; positions restart at 0 for every new prompt (the official code does not reset them:
        ``docs/sources.md``). ``last_only`` returns logits for the last position only; ``validate=False``
        skips the host-side id check (CUDA graphs).

        ``cu_seqlens`` (int32 or int64 ``[N + 1]``, ``tnlib.ops.lightning_attention``'s convention): a *packed*
        prefill, no padding: ``input_ids`` is ``[1, total]``, ``N`` prompts back to back
        (``tnlib.generation.pack_prompts``), every layer's attention runs through ``cu_seqlens`` and each
        prompt is computed as if alone, its positions (LRPE, absolute) restarting at 0, or at its sequence's
        position in ``cache`` (which then holds ``N`` sequences, each continued by its prompt). The cache
        returned holds ``N`` sequences as a padded prefill's of ``N`` prompts does (states ``[N, H, K, V]``,
        positions the prompts' lengths, plus the given cache's), and every decoder takes it; ``last_only`` gives
        each prompt's last-token logits, ``[N, 1, vocab]`` (else ``[1, total, vocab]``). The inputs are checked
        before any work (``pad_mask`` is refused: packed prompts need none). ``tests/test_prefill.py``.
        """
        if cu_seqlens is not None:
            return self._step_packed(input_ids, cache, pad_mask, last_only, validate, cu_seqlens)
        if cache is None:
            start = left_pad_positions(input_ids, pad_mask)
            states = [None] * len(self.layers)
        else:
            if pad_mask is not None:
                raise ValueError("pad_mask is only for the prefill (left padding)")
            start, states = cache.positions, cache.states
            if start.shape[0] != input_ids.shape[0]:
                raise ValueError(f"cache holds {start.shape[0]} sequences, got a batch of {input_ids.shape[0]}")
        x, new_states = self._step_layers(self.embed_tokens(input_ids, start, validate), states, start,
                                          pad_mask=pad_mask)
        if last_only:
            x = x[:, -1:]
        return self.logits(x), RecurrentCache(new_states, start + input_ids.shape[1])

    def forward(self, input_ids, targets=None, *, cu_seqlens=None):
        """``input_ids: [B, T]`` -> logits ``[B, T, vocab]``; with ``targets`` (``[B, T]``) the mean
        cross-entropy instead, computed without the logits (``CausalLM.lm_loss``).

        ``cu_seqlens``: documents (``document_cu_seqlens``; boundaries over the ``B * T`` tokens, every window
        start among them; a tensor or a ``tnlib.ops.PackedSequences``): each document is computed as if it were
        alone. The windows run as one packed sequence through every block, their attention through
        ``cu_seqlens`` (no state crosses a boundary); LRPE and absolute positions stay the window's (LRPE's
        scores depend on ``t - s`` only). A tensor is made into one ``PackedSequences`` here, so its values are
        read once and the kernels' work tables built once per step, not per layer (``packed_documents``)."""
        x = self.embed_tokens(input_ids)
        if cu_seqlens is None:
            h = self.run_blocks(x)
        else:
            B, T = input_ids.shape
            docs = packed_documents(cu_seqlens, B, T)
            h = self.run_blocks(x.reshape(1, B * T, -1), cu_seqlens=docs).reshape(B, T, -1)
        return self.logits(h) if targets is None else self.lm_loss(h, targets)
