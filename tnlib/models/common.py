"""What both decoders share: weight init, input checks, left-padding positions, the implementation
choices (``Implementation``), the block loop (with optional activation checkpointing) and the tied LM head."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn.gla import GatedLinearAttention
from ..nn.linear import Linear, linear
from ..ops import PackedSequences
from .config import Implementation

__all__ = ["init_weights", "check_input_ids", "left_pad_positions", "document_cu_seqlens", "check_documents",
           "packed_documents", "document_mask", "CausalLM"]


def left_pad_positions(input_ids, pad_mask):
    """Per-sequence position of token 0 for a left-padded batch: ``-(number of pads)`` (``[B]`` long)."""
    B, T = input_ids.shape
    if pad_mask is None:
        return torch.zeros(B, dtype=torch.long, device=input_ids.device)
    if pad_mask.shape != input_ids.shape or pad_mask.dtype != torch.bool:
        raise ValueError(f"pad_mask must be a bool tensor of shape {tuple(input_ids.shape)}")
    return pad_mask.sum(1) - T


def document_cu_seqlens(input_ids, eot_id: int):
    """The documents of a batch of training windows ``input_ids: [B, T]`` as packed-sequence boundaries
    (``tnlib.ops.lightning_attention``'s ``cu_seqlens``: int32 ``[N + 1]`` over the ``B * T`` tokens taken row
    after row). A document starts at every window start and at every end-of-text token ``eot_id``: the EOT
    that ends one document in the token files opens the next one here, as a beginning-of-sequence token,
    so the first token of a document is predicted from the EOT alone (as ``tnlib.train.evaluate`` scores a
    set: ``[eot] + tokens``) and the EOT itself, as a target, from its own document. Reads the token values
    (a device sync for a GPU tensor: build it from the CPU batch)."""
    B, T = input_ids.shape
    start = input_ids == eot_id
    start[:, 0] = True
    starts = torch.nonzero(start.flatten()).flatten()
    return torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)


def _boundaries(cu_seqlens):
    """The boundary tensor of documents given as a tensor or a ``tnlib.ops.PackedSequences``."""
    return cu_seqlens.cu_seqlens if isinstance(cu_seqlens, PackedSequences) else cu_seqlens


def check_documents(cu_seqlens, B: int, T: int) -> None:
    """Where the values are free to read (a CPU tensor, outside ``torch.compile``): ``cu_seqlens`` (a tensor or
    a ``tnlib.ops.PackedSequences``, which must then cover ``B * T`` tokens) splits ``B * T`` tokens at every
    window start (``document_cu_seqlens`` does), so no document spans two windows. Its own form (monotone,
    the ends) is the attention op's, or the ``PackedSequences``', to check."""
    if isinstance(cu_seqlens, PackedSequences) and cu_seqlens.total != B * T:
        raise ValueError(f"the PackedSequences cover {cu_seqlens.total} tokens, but the batch holds B * T = {B * T}")
    cu_seqlens = _boundaries(cu_seqlens)
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        have = set(cu_seqlens.tolist())
        missing = [b * T for b in range(B + 1) if b * T not in have]
        if missing:
            raise ValueError(f"cu_seqlens must hold every window boundary (multiples of T = {T} up to B * T = "
                             f"{B * T}); missing {missing[:4]}: build it with document_cu_seqlens")


def packed_documents(cu_seqlens, B: int, T: int) -> PackedSequences:
    """The documents of ``B`` windows of ``T`` tokens as one ``tnlib.ops.PackedSequences`` for every layer of a
    step: ``cu_seqlens`` itself when it is one (the trainer makes it from the CPU boundaries: no device sync),
    else one made from the tensor (its values read once: a device sync for a GPU tensor). After
    :func:`check_documents`."""
    check_documents(cu_seqlens, B, T)
    return cu_seqlens if isinstance(cu_seqlens, PackedSequences) else PackedSequences(cu_seqlens, B * T)


def document_mask(cu_seqlens, B: int, T: int):
    """The causal attention mask ``[B, 1, T, T]`` (True: may attend) of windows holding the documents of
    ``cu_seqlens`` (``document_cu_seqlens``; a tensor or a ``tnlib.ops.PackedSequences``): block-diagonal, a
    query sees the earlier keys of its own document only. Built on the tensors' device without reading values
    (no sync)."""
    cu_seqlens = _boundaries(cu_seqlens)
    pos = torch.arange(B * T, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True).view(B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=cu_seqlens.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


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
    if not torch.compiler.is_compiling() and input_ids.numel():
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync, not two
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}); got min {lo}, max {hi}")


class CausalLM(nn.Module):
    """Base of TransNormerLLM and the Transformer: ``embed``, ``layers``, ``final_norm``, ``lm_head``;
    ``config`` (what the model is, saved with it) and ``impl`` (how it computes, ``Implementation``)."""

    impl: Implementation = Implementation()

    def set_impl(self, impl: Implementation | None = None, **changes) -> "CausalLM":
        """Choose how the model computes: ``impl`` as a whole, and/or ``changes`` to its fields
        (``model.set_impl(checkpointing=True)``). Sets ``self.impl`` and hands each choice to the modules
        that make it (every ``Linear``'s ``gemv``, every ``GatedLinearAttention``'s ``packed``); the
        parameters are untouched. Returns the model."""
        base = self.impl if impl is None else impl
        if not isinstance(base, Implementation):
            raise TypeError(f"impl must be a tnlib.models.Implementation, got {type(base).__name__}")
        impl = base.replace(**changes)
        for m in self.modules():
            if isinstance(m, Linear):
                m.gemv = impl.decode_gemv
            elif isinstance(m, GatedLinearAttention):
                m.packed = impl.packed_attention
        self.impl = impl
        return self

    def residual_stream(self, x):
        """The embeddings as the residual stream's first value: cast to the autocast dtype when the config
        says ``residual_dtype="compute"`` and autocast is on (else unchanged: the parameters' dtype)."""
        if self.config.residual_dtype == "compute" and torch.is_autocast_enabled(x.device.type):
            return x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def run_blocks(self, x, **block_kwargs):
        """The training/parallel pass through every block, checkpointing each one if ``impl.checkpointing``;
        ``block_kwargs`` go to every block (documents: TNL's ``cu_seqlens``, one ``PackedSequences`` for all blocks;
        the Transformer's ``attn_mask``)."""
        for layer in self.layers:
            if self.impl.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False, **block_kwargs)
            else:
                x = layer(x, **block_kwargs)
        return x

    def compile_blocks(self, **compile_kwargs):
        """``torch.compile`` each block in place (identical blocks share compiled code); returns self.
        ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``)."""
        for layer in self.layers:
            layer.compile(**compile_kwargs)
        return self

    def logits(self, h):
        """Final norm, then the LM head (tied to the embedding unless ``tie_embeddings=False``)."""
        h = self.final_norm(h)
        return linear(h, self.embed.weight, gemv=self.impl.decode_gemv) if self.lm_head is None else self.lm_head(h)

    def gemv_weights(self) -> list:
        """The weights that a decode step may send to ``tnlib.ops.gemv`` (for ``autotune_gemv``)."""
        ws = [m.weight for m in self.modules() if isinstance(m, Linear) and m.gemv and m.bias is None]
        if self.lm_head is None and self.impl.decode_gemv:
            ws.append(self.embed.weight)
        return ws

    def lm_loss(self, h, targets, chunk: int = 8192):
        """Mean next-token cross-entropy from the last hidden states ``h`` (``[B, T, d]``) against
        ``targets`` (``[B, T]``), through ``tnlib.ops.loss.linear_cross_entropy``: same value and
        gradients as ``F.cross_entropy(self.logits(h).float(), targets)`` without materializing the
        ``[B*T, vocab]`` logits."""
        from ..ops.loss import linear_cross_entropy

        if targets.shape != h.shape[:2]:
            raise ValueError(f"targets must have shape {tuple(h.shape[:2])} (like input_ids), got {tuple(targets.shape)}")
        h = self.final_norm(h)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if self.lm_head is not None and getattr(self.lm_head, "bias", None) is not None:
            raise NotImplementedError("lm_loss: an LM head with a bias is not supported")
        return linear_cross_entropy(h.flatten(0, 1), weight, targets.flatten().long(), chunk)

    def num_parameters(self, exclude_lrpe_theta: bool = False) -> int:
        """All parameters (tied weights once). ``exclude_lrpe_theta`` gives the paper's size convention."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_lrpe_theta:
            n -= sum(p.numel() for name, p in self.named_parameters() if name.endswith("lrpe.theta"))
        return n
