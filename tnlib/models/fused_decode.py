"""TransNormerLLM's decode step through the fused kernels of ``tnlib.ops.decode``: 5 launches per layer.

``FusedDecodeStep`` has the contract of ``tnlib.generation.StaticDecodeStep`` (static buffers, tokens in,
logits out, the recurrent state updated in place) and is what ``decoder="fused-graph"`` captures in a
CUDA graph. It needs no ``torch.compile`` and no autotuning: building it compiles at most eight small
Triton kernels, which is what makes a cold first call short (issue 28). On a CPU it runs under the
Triton interpreter (``TRITON_INTERPRET=1``), which is how the tests check it.
"""
from __future__ import annotations

import torch

from ..ops import decode as _decode
from ..ops._triton import KERNEL_DTYPES
from ..ops.lightning.op import ACT_CODES
from .transnormer import RecurrentCache

__all__ = ["FusedDecodeStep", "fused_decode_support", "PDL_MAX_BATCH"]

#: the most sequences for which ``Implementation.decode_pdl`` turns PDL on (with the L2 prefetch): measured
#: faster at batch 1 and slower at batch 16 on an H100 (``results/bench/NOTES-decode.md``, section 5)
PDL_MAX_BATCH = 8


def fused_decode_support(model) -> str | None:
    """Why ``FusedDecodeStep`` cannot run ``model``, in a few words; None where it can (TransNormerLLM with
    SRMSNorm or RMSNorm, relative or no positions, a power-of-two head dim, fp16/bf16/fp32 weights, one
    process's full heads, an LM head without bias)."""
    cfg = model.config
    if cfg.arch != "tnl":
        return "the fused decode step is TransNormerLLM's (the Transformer decodes through its static KV cache)"
    if cfg.positional == "ape":
        return "absolute position embeddings are not supported"
    if cfg.norm not in ("srms", "rms"):
        return f"norm={cfg.norm!r} is not supported (SRMSNorm and RMSNorm are)"
    if cfg.head_dim & (cfg.head_dim - 1):
        return f"the head dim {cfg.head_dim} is not a power of two"
    if model.embed.weight.dtype not in KERNEL_DTYPES:
        return f"{model.embed.weight.dtype} weights (the kernels take fp16, bf16 and fp32)"
    if any(layer.token_mixer.tp_size != 1 for layer in model.layers):
        return "tensor-parallel layers are not supported"
    if model.lm_head is not None and model.lm_head.bias is not None:
        return "an LM head with a bias is not supported"
    return None


def _gain(norm):
    """The norm's per-channel gain (RMSNorm), or None (SRMSNorm has none)."""
    return getattr(norm, "weight", None)


class FusedDecodeStep:
    """One TransNormerLLM decode step on static buffers through ``tnlib.ops.decode``: ``tokens`` in,
    ``[B, 1, vocab]`` logits out (a static buffer in the model's dtype), the state in ``cache`` (a
    ``RecurrentCache`` of its own) updated in place; 5 launches per layer, ``5 L + 3`` per token (the
    embedding, the final norm with the LM head, the positions' increment).

    ``cache``: a prefill's ``RecurrentCache``, copied (``load`` copies another of the same batch size).
    Weights are read from ``model`` at every call (a captured graph sees in-place updates). The residual
    stream and the intermediates are fp32 buffers. ``tiles``: launch configurations by product name
    (``"qkvu"``, ``"out"``, ``"glu"``, ``"down"``, ``"head"``: ``tnlib.ops.decode.GemvTile``; ``"bv"``:
    the recurrence's value block), else ``gemv_tile`` / ``recurrent_tile`` choose. ``pdl``: the kernels
    launched with programmatic dependent launch (default: the model's ``impl.decode_pdl`` for up to
    ``PDL_MAX_BATCH`` sequences; used only where ``tnlib.ops.decode.pdl_supported``); ``prefetch``: with it,
    the products' weights hinted into L2 before each kernel waits (default: ``impl.decode_prefetch``).
    Raises ``ValueError`` with the reason where ``fused_decode_support`` refuses the model.
    """

    def __init__(self, model, cache: RecurrentCache, tiles: dict | None = None, pdl: bool | None = None,
                 prefetch: bool | None = None):
        why = fused_decode_support(model)
        if why:
            raise ValueError(f"FusedDecodeStep: {why}")
        cfg = model.config
        self.model, self.tiles = model, dict(tiles or {})
        B, dev = cache.positions.shape[0], cache.positions.device
        d, f32 = cfg.d_model, torch.float32
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.cache = RecurrentCache([st.clone() for st in cache.states], cache.positions.clone())
        self.x = torch.zeros(B, d, dtype=f32, device=dev)  # the residual stream
        self.qkvu = torch.zeros(B, (4 if cfg.gate else 3) * d, dtype=f32, device=dev)
        self.o = torch.zeros(B, d, dtype=f32, device=dev)
        self.h = torch.zeros(B, cfg.glu_dim, dtype=f32, device=dev)
        self.logits = torch.zeros(B, 1, cfg.vocab_size, dtype=model.embed.weight.dtype, device=dev)
        self.eps = _decode.norm_eps_for(model.embed.weight.dtype, cfg.norm_eps)
        self.act, self.glu_act = ACT_CODES[cfg.qk_act], _decode.GLU_ACT_CODES[cfg.glu_act]
        want = (model.impl.decode_pdl and B <= PDL_MAX_BATCH) if pdl is None else pdl
        self.pdl = bool(want) and _decode.pdl_supported(dev)
        self.prefetch = self.pdl and bool(model.impl.decode_prefetch if prefetch is None else prefetch)

    def load(self, cache: RecurrentCache) -> None:
        """Continue from ``cache`` (a prefill's ``RecurrentCache`` of the same batch size) on the next call."""
        for st, src in zip(self.cache.states, cache.states):
            st.copy_(src)
        self.cache.positions.copy_(cache.positions)

    def snapshot(self):
        return [st.clone() for st in self.cache.states], self.cache.positions.clone()

    def restore(self, snap):
        """Copy ``(states, positions)`` (a ``snapshot``, or a prefill cache's) into the static buffers."""
        self.load(RecurrentCache(*snap))

    @torch.no_grad()
    def __call__(self, tokens=None):
        if tokens is not None:
            self.tokens.copy_(tokens.view_as(self.tokens))
        m, t, eps, pdl = self.model, self.tiles, self.eps, self.pdl
        g = dict(pdl=pdl, prefetch=self.prefetch)  # the products' launch options
        d = m.config.d_model
        x, positions = self.x, self.cache.positions
        _decode.embed(self.tokens.view(-1), m.embed.weight, m.embed_scale, out=x, pdl=pdl)
        for layer, state in zip(m.layers, self.cache.states):
            gla, glu = layer.token_mixer, layer.channel_mixer
            _decode.fused_gemv(x, gla.qkvu_proj.weight, norm_eps=eps, gain=_gain(layer.token_norm), out=self.qkvu,
                               tile=t.get("qkvu"), **g)
            theta = None if gla.lrpe is None else gla.lrpe.local_theta()
            _decode.recurrent_step(self.qkvu, state, gla.slope, out=self.o, act=self.act, positions=positions,
                                   theta=theta, bv=t.get("bv"), pdl=pdl)
            gate = self.qkvu[:, 3 * d:] if gla.gate else None
            _decode.fused_gemv(self.o, gla.out_proj.weight, norm_eps=eps, gain=_gain(gla.norm), gate=gate, residual=x,
                               out=x, tile=t.get("out"), **g)
            _decode.fused_gemv(x, glu.l1.weight, weight2=glu.l2.weight, glu_act=self.glu_act, norm_eps=eps,
                               gain=_gain(layer.channel_norm), out=self.h, tile=t.get("glu"), **g)
            _decode.fused_gemv(self.h, glu.l3.weight, residual=x, out=x, tile=t.get("down"), **g)
        head = m.embed.weight if m.lm_head is None else m.lm_head.weight
        _decode.fused_gemv(x, head, norm_eps=eps, gain=_gain(m.final_norm), out=self.logits.view(x.shape[0], -1),
                           tile=t.get("head"), **g)
        positions.add_(1)
        return self.logits
