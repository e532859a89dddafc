"""Functional attention ops: the pure-PyTorch reference ladder (and, later, Triton kernels)."""
from .reference import (
    decay_mask,
    linear_attention_chunked,
    linear_attention_quadratic,
    linear_attention_recurrent,
    softmax_attention,
)
from .lightning import lightning_attention, lightning_attention_packed

__all__ = [
    "decay_mask",
    "linear_attention_chunked",
    "linear_attention_quadratic",
    "linear_attention_recurrent",
    "lightning_attention",
    "lightning_attention_packed",
    "softmax_attention",
]
