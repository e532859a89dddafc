"""Functional ops: the pure-PyTorch attention references and the Triton kernels.

``reference`` (the correctness ladder), ``lightning`` (Lightning Attention: plan, custom ops, kernels),
``srmsnorm``, ``loss`` (LM head + cross-entropy in chunks) and ``gemv`` (decode products); packed sequences
as ``cu_seqlens`` tensors or ``PackedSequences`` (checked once, shared by a model step's calls); every
Triton op runs where ``_triton.use_triton`` says a kernel can take its tensors.
"""
from .reference import (
    decay_mask,
    linear_attention_chunked,
    linear_attention_quadratic,
    linear_attention_recurrent,
    softmax_attention,
)
from ._checks import check_cu_seqlens, check_slope_values
from .lightning import PackedSequences, lightning_attention, lightning_attention_packed

__all__ = [
    "PackedSequences",
    "check_cu_seqlens",
    "check_slope_values",
    "decay_mask",
    "linear_attention_chunked",
    "linear_attention_quadratic",
    "linear_attention_recurrent",
    "lightning_attention",
    "lightning_attention_packed",
    "softmax_attention",
]
