"""Lightning Attention-2 (arXiv 2401.04658): Triton forward and hand-derived backward.

``plan`` chooses the launches (tiles, segments), ``op`` holds the custom ops with their autograd
and the launchers (and ``PackedSequences``: packed-sequence boundaries checked once, their work tables shared
by the calls of a model step), ``kernels`` the Triton kernels. Notebook: ``04_lightning_attention``.
"""
from .op import (
    ACT_CODES,
    SUPPORTED_K,
    SUPPORTED_V,
    PackedSequences,
    feature_map_reference,
    lightning_attention,
    lightning_attention_packed,
)
from .plan import LaunchConfig, Tile, launch_config

__all__ = ["lightning_attention", "lightning_attention_packed", "PackedSequences", "SUPPORTED_K", "SUPPORTED_V",
           "ACT_CODES", "feature_map_reference", "LaunchConfig", "Tile", "launch_config"]
