"""Text generation for TransNormerLLM (recurrent state) and the Transformer baseline (KV cache).

Taught in ``notebooks/08_recurrent_inference.ipynb``. One function serves both architectures through
their ``model.step(input_ids, cache, pad_mask)`` method, so the two compare like for like:

* prefill: the whole prompt batch in one parallel pass, keeping the cache: left-padded to the longest
  prompt (``prefill="padded"``, both models) or, for TransNormerLLM, packed back to back without padding,
  every layer's attention through ``cu_seqlens`` (``prefill="packed"``); the default, ``"auto"``
  (``auto_prefill``), packs TransNormerLLM's prompts and pads the Transformer's (``PREFILLS``);
* decode: one token per step; TransNormerLLM updates a constant-size state, the Transformer
  appends to its KV cache.

How the decode steps run is the ``decoder`` argument (``DECODERS``):

* ``"eager"``: ``model.step`` per token, the readable reference (the only choice on a CPU; the
  Transformer's cache grows by concatenation);
* ``"graph"``: the step on static buffers captured once as a CUDA graph and replayed per token.
  TransNormerLLM's state has a fixed size; the Transformer's keys and values go to a ``StaticKVCache``
  preallocated to the call's length (prompt + new tokens, rounded up to ``CAPACITY_STEP``);
* ``"compiled-graph"``: the same step compiled with ``torch.compile`` (fewer, fused kernels) and then
  captured, at the price of a one-time compilation: the Transformer's fastest;
* ``"fused-graph"`` (TransNormerLLM only): the step as tnlib's own fused kernels
  (``tnlib.models.fused_decode``: five launches per layer, no ``torch.compile``, nothing to autotune)
  captured as a CUDA graph; built in seconds, and TransNormerLLM's fastest per token;
* ``"auto"``: ``auto_decoder`` picks one (measured: ``results/bench/NOTES-decode.md``).

A graph decoder costs a compilation and a capture to build, so the built ones are kept in a
``DecoderCache``, once per (model, decoder, batch size), and reused by later calls: a new prompt only
copies its prefill state into the static buffers. ``generate(..., decoder_cache=cache)`` uses the
caller's cache; without one, the module's ``default_decoder_cache``. Nothing is stored on the model.
"""
from __future__ import annotations

import collections

from typing import Iterator, Sequence

import torch

from .models.fused_decode import FusedDecodeStep, fused_decode_support
from .models.transnormer import RecurrentCache
from .nn.linear import autotune_gemv

__all__ = ["generate", "stream_generate", "sample_next", "DECODERS", "auto_decoder", "GraphDecoder",
           "StaticDecodeStep", "DecoderCache", "default_decoder_cache", "CAPACITY_STEP", "capacity_for", "PREFILLS",
           "auto_prefill", "pack_prompts"]

DECODERS = ("auto", "eager", "graph", "compiled-graph", "fused-graph")

#: How ``generate`` / ``stream_generate`` prefill a batch of prompts (``prefill=``): ``"padded"`` left-pads them
#: to the longest one, ``model.step(ids, None, pad_mask)``; ``"packed"`` (TransNormerLLM only) puts them back to
#: back without padding, ``model.step(ids, cu_seqlens=...)`` (``pack_prompts``), so no work is spent on padding.
#: Both give the same cache (and tokens, up to rounding) for every decoder. ``"auto"``, the default, is
#: ``auto_prefill``'s choice: packed for TransNormerLLM, padded for the Transformer.
PREFILLS = ("auto", "padded", "packed")

#: A Transformer's static KV cache holds the call's tokens rounded up to a multiple of this (slots the
#: step reads whatever the context, so fewer spare ones cost less; a multiple of 16 keeps SDPA's mask aligned)
CAPACITY_STEP = 256


def _graph_capable(model, ids, capture: bool = True) -> bool:
    """Static-shape decoding needs TransNormerLLM without absolute position embeddings (whose table bounds
    the position) or the Transformer (through a ``StaticKVCache``), on a CUDA device unless nothing is
    captured (``DecoderCache(capture=False)``)."""
    cfg = model.config
    return (ids.is_cuda or not capture) and (cfg.arch == "transformer" or cfg.positional != "ape")


def auto_decoder(model, ids, max_new_tokens: int, batch: int | None = None) -> str:
    """The decoder ``decoder="auto"`` uses: the one place to change this choice.

    Eager on a CPU and when nothing is decoded after the prefill token. Else, as ``AUTO_RULE`` in
    ``tools/decode_report.py`` picks from ``make bench-inference``'s file (per model and batch size, the graph
    decoder fastest per token among those whose first call in a fresh process takes at most 10 s;
    ``results/bench/NOTES-decode.md``): TransNormerLLM decodes through ``"fused-graph"`` wherever
    ``fused_decode_support`` accepts the model, else ``"compiled-graph"``; the Transformer eagerly up to 8
    sequences (its graph decoders' first calls took longer than 10 s) and through ``"compiled-graph"`` from 9.
    ``batch``: the number of sequences (default: ``ids``' rows; packed prompts are one row).
    """
    if max_new_tokens < 2 or not _graph_capable(model, ids):
        return "eager"
    if model.config.arch != "tnl":
        return "eager" if (ids.shape[0] if batch is None else batch) <= 8 else "compiled-graph"
    return "compiled-graph" if fused_decode_support(model) else "fused-graph"


def capacity_for(tokens: int) -> int:
    """A static KV cache's capacity for ``tokens`` tokens: rounded up to a multiple of ``CAPACITY_STEP``."""
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


class StaticDecodeStep:
    """One decode step on static buffers: ``tokens`` in, ``[B, 1, vocab]`` logits out, the cache updated in place.

    TransNormerLLM: ``model.step`` on ``cache``, a copy of the prefill's ``RecurrentCache`` (the state
    has a fixed size), the new state copied back into it. The Transformer: ``model.static_step`` on
    ``cache``, a ``StaticKVCache`` of ``capacity`` tokens holding the prefill's keys and values (required
    for it; the caller decodes at most ``capacity`` minus the prompt's tokens). With ``fuse=True`` the step
    is compiled with ``torch.compile`` (Inductor fuses each layer's elementwise work: norms, activations,
    positions, the recurrence), which cuts the kernel count per token; the Transformer's with its
    capacity as a dynamic size where the compiler allows it, so that one compilation serves every capacity.
    """

    def __init__(self, model, cache, fuse: bool = False, compile_mode: str | None = None,
                 capacity: int | None = None):
        B = cache.positions.shape[0]
        self.model = model
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=cache.positions.device)
        if model.config.arch == "transformer":
            if capacity is None:
                raise ValueError("StaticDecodeStep: the Transformer's static KV cache needs a capacity (tokens)")
            self.cache = model.static_cache(cache, capacity)
            body, dynamic = self._static_body, None
            if fuse:  # one compiled graph for every capacity (where the compiler need not specialize it)
                for t in (*self.cache.keys, *self.cache.values):
                    torch._dynamo.maybe_mark_dynamic(t, 2)
                torch._dynamo.maybe_mark_dynamic(self.cache.valid, 1)
        else:
            if model.config.positional == "ape":
                raise RuntimeError("static decoding does not support absolute position embeddings")
            self.cache = RecurrentCache([st.clone() for st in cache.states], cache.positions.clone())
            body, dynamic = self._body, False
        self._fn = torch.compile(body, dynamic=dynamic, mode=compile_mode) if fuse else body

    @torch.no_grad()
    def _body(self):
        logits, new = self.model.step(self.tokens, self.cache, validate=False)
        for st, nw in zip(self.cache.states, new.states):
            st.copy_(nw)
        self.cache.positions.copy_(new.positions)
        return logits

    @torch.no_grad()
    def _static_body(self):
        return self.model.static_step(self.tokens, self.cache)

    def load(self, cache) -> None:
        """Continue from ``cache`` (a prefill's ``RecurrentCache`` / ``KVCache`` of the same batch size) on
        the next call."""
        if isinstance(self.cache, RecurrentCache):
            for st, src in zip(self.cache.states, cache.states):
                st.copy_(src)
            self.cache.positions.copy_(cache.positions)
        else:
            self.cache.load(cache)

    def __call__(self, tokens=None):
        if tokens is not None:
            self.tokens.copy_(tokens.view_as(self.tokens))
        return self._fn()


class GraphDecoder:
    """A decode step captured as a CUDA graph and replayed per token.

    The step (``StaticDecodeStep``, or with ``kernels=True`` TransNormerLLM's ``FusedDecodeStep``) keeps
    its cache in static buffers that the captured step updates in place; replaying the graph removes the
    hundreds of kernel launches per token that dominate eager batch-1 decoding. The captured projections
    of a ``StaticDecodeStep`` run ``tnlib.ops.gemv`` (``tnlib.nn.linear``), autotuned before the capture.
    ``fuse=True`` compiles the step first (``compile_mode``, e.g. ``"max-autotune-no-cudagraphs"``, goes to
    ``torch.compile``); ``capacity``: the Transformer's static KV cache in tokens; ``tiles``, ``pdl``,
    ``prefetch``: the fused kernels' launch configurations and launch options (``FusedDecodeStep``; default:
    the model's ``impl``). ``capture=False`` replays nothing and calls the
    step (how a CPU runs and tests it; a CUDA graph needs a GPU).

    ``load(cache)`` starts a new sequence batch of the same size from a prefill cache; ``decode(tokens)``
    returns ``[B, 1, vocab]`` logits (a static buffer: copy it if you keep it).
    """

    def __init__(self, model, cache, fuse: bool = False, compile_mode: str | None = None, *, kernels: bool = False,
                 capacity: int | None = None, tiles: dict | None = None, capture: bool = True,
                 pdl: bool | None = None, prefetch: bool | None = None):
        device = cache.positions.device
        if capture and (not torch.cuda.is_available() or device.type != "cuda"):
            raise RuntimeError("GraphDecoder needs the model and cache on a CUDA device "
                               "(capture=False runs the step uncaptured)")
        if kernels:
            if fuse:
                raise ValueError("GraphDecoder: kernels=True runs tnlib's fused kernels, which are not compiled "
                                 "(fuse=False)")
            self.step = FusedDecodeStep(model, cache, tiles, pdl=pdl, prefetch=prefetch)
        else:
            self.step = StaticDecodeStep(model, cache, fuse, compile_mode, capacity)
            if device.type == "cuda":  # autotuning syncs: not during capture
                autotune_gemv(model.gemv_weights(), cache.positions.shape[0])
        self.capacity = getattr(self.step.cache, "capacity", None)
        self.graph = None
        if not capture:
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(1 if kernels else 3):  # warm up: compilation, lazy initialisation outside the capture
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step()
        self.step.load(cache)  # undo the warm-up steps

    @property
    def cache(self):
        return self.step.cache

    def load(self, cache):
        """Continue from ``cache`` (a prefill's cache of the same batch size) on the next ``decode``."""
        self.step.load(cache)

    def decode(self, tokens):
        if self.graph is None:
            return self.step(tokens)
        self.step.tokens.copy_(tokens.view_as(self.step.tokens))
        self.graph.replay()
        return self.logits


def _signature(model) -> tuple:
    """What a built decoder depends on: each parameter's and buffer's storage, dtype and device (a
    ``model.to(...)`` or a replaced tensor changes it; in-place weight updates keep it, and the graph
    reads the new values)."""
    return tuple((t.data_ptr(), t.dtype, t.device, tuple(t.shape))
                 for t in (*model.parameters(), *model.buffers()))


def _fits(decoder, capacity: int | None) -> bool:
    """Whether a built decoder serves a call needing ``capacity`` slots (None: a fixed-size state): enough
    of them, and not more than twice as many (a step reads every slot)."""
    have = getattr(decoder, "capacity", None)
    return capacity is None or have is None or capacity <= have <= 2 * capacity


class DecoderCache:
    """The graph decoders that ``generate`` / ``stream_generate`` have built, for later calls to reuse.

    One ``GraphDecoder`` per (model, decoder, batch size): ``get`` returns the one built before, loaded
    with the new prompt's prefill state, or builds it (a compilation and a CUDA-graph capture) when there
    is none or when the model's tensors changed since (``model.to(...)``, a replaced parameter; weights
    updated in place keep it, and the graph reads their new values). A Transformer's decoder also has a
    capacity (its ``StaticKVCache``): it is rebuilt for a call that needs more slots, or fewer than half.
    The eager decoder needs no cache.

    The cache holds a reference to every model it has decoders for (the captured graphs read that
    model's tensors), so such a model and the decoders' GPU memory live as long as the cache holds them:
    ``clear(model)`` drops one model's decoders, ``clear()`` all. ``generate(..., decoder_cache=cache)``
    uses ``cache``; without one, the module's ``default_decoder_cache``. Inspect with ``len(cache)``,
    ``cache.models()`` and ``cache.decoders(model)``. ``max_models`` bounds how many models it keeps:
    building a decoder for one more drops the least recently used model's (the module's default cache
    keeps 2, so a notebook that builds model after model does not keep them all alive). ``capture=False``
    builds decoders that call their steps instead of replaying a CUDA graph (``GraphDecoder(capture=False)``),
    which lets ``generate`` run the graph decoders' steps on a CPU (tests, ``make bench-inference``'s dry run).
    """

    def __init__(self, max_models: int | None = None, capture: bool = True):
        if max_models is not None and max_models < 1:
            raise ValueError(f"DecoderCache(max_models={max_models!r}): expected None or an integer >= 1")
        self.max_models, self.capture = max_models, capture
        # id(model) -> (model, {(decoder, batch size): (GraphDecoder, _signature)}), least recently used first
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, model, cache, decoder: str, capacity: int | None = None) -> GraphDecoder:
        """The ``decoder`` (``"graph"``, ``"compiled-graph"`` or ``"fused-graph"``) for ``model`` at
        ``cache``'s batch size, loaded with ``cache`` (a prefill's cache); built if absent or stale.
        ``capacity``: the slots a Transformer's call needs (prompt + new tokens; rounded up here by
        ``capacity_for``)."""
        if decoder not in _GRAPH_DECODERS:
            raise ValueError(f"DecoderCache holds the graph decoders {_GRAPH_DECODERS}, not {decoder!r}")
        capacity = None if capacity is None else capacity_for(capacity)
        key, sig = (decoder, cache.positions.shape[0]), _signature(model)
        entry = self._entries.get(id(model))
        if entry is not None:
            self._entries.move_to_end(id(model))
        hit = None if entry is None else entry[1].get(key)
        if hit is not None and hit[1] == sig and _fits(hit[0], capacity):
            hit[0].load(cache)
            return hit[0]
        if entry is None and self.max_models is not None:
            while len(self._entries) >= self.max_models:
                self._entries.popitem(last=False)
        if entry is not None:
            entry[1].pop(key, None)  # a stale decoder's graph and buffers go before the new one is built
        dec = GraphDecoder(model, cache, fuse=decoder == "compiled-graph", kernels=decoder == "fused-graph",
                           capacity=capacity, capture=self.capture)
        self._entries.setdefault(id(model), (model, {}))[1][key] = (dec, sig)
        return dec

    def decoders(self, model) -> dict:
        """``{(decoder, batch size): GraphDecoder}`` built for ``model`` (a new dict; empty if none)."""
        entry = self._entries.get(id(model))
        return {} if entry is None else {k: v[0] for k, v in entry[1].items()}

    def models(self) -> list:
        """The models this cache holds decoders for."""
        return [m for m, _ in self._entries.values()]

    def clear(self, model=None) -> None:
        """Drop the decoders of ``model`` (and the cache's reference to it), or of every model."""
        if model is None:
            self._entries.clear()
        else:
            self._entries.pop(id(model), None)

    def __len__(self) -> int:
        return sum(len(per_model) for _, per_model in self._entries.values())

    def __repr__(self) -> str:
        return f"DecoderCache({len(self)} decoders for {len(self._entries)} models)"


_GRAPH_DECODERS = ("graph", "compiled-graph", "fused-graph")

#: the cache ``generate`` and ``stream_generate`` use when no ``decoder_cache`` is given
default_decoder_cache = DecoderCache(max_models=2)


def _prompt_list(model, input_ids):
    """``[B, T]`` tensors or a list of 1-D prompts of different lengths, as a checked list of 1-D prompts."""
    vocab = model.config.vocab_size
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        prompts = list(input_ids)
    elif isinstance(input_ids, Sequence) and len(input_ids) > 0:
        prompts = [torch.as_tensor(p) for p in input_ids]
    else:
        raise TypeError("input_ids must be a [B, T] tensor or a non-empty list of 1-D token sequences")
    for i, p in enumerate(prompts):
        if p.dim() != 1:
            raise ValueError(f"prompt {i} must be 1-D, got shape {tuple(p.shape)}")
        if p.numel() == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
        if p.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"prompt {i} has dtype {p.dtype}; token ids must be integers (torch.long)")
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): min {lo}, max {hi}")
    return prompts


def _prepare_prompts(model, input_ids, pad_token_id):
    """Accept ``[B, T]`` tensors or a list of 1-D prompts of different lengths (left-padded here)."""
    prompts = _prompt_list(model, input_ids)
    device = next(model.parameters()).device
    T = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - p.numel():] = p.to(device=device, dtype=torch.long)
        mask[i, T - p.numel():] = True
    return prompts, ids, (None if bool(mask.all()) else mask)


def pack_prompts(prompts, device=None):
    """1-D prompts of any lengths back to back, for ``model.step(ids, cu_seqlens=cu)`` (a packed prefill):
    ``(ids [1, total] long, cu [N + 1] int32)`` on ``device`` (default: the first prompt's), ``cu`` the prompts'
    boundaries (0, then the running sum of their lengths). Nothing is checked here: ``step`` checks both."""
    device = prompts[0].device if device is None else device
    lengths = [int(p.numel()) for p in prompts]
    cu = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    ids = torch.cat([p.to(device=device, dtype=torch.long).flatten() for p in prompts])[None]
    return ids, cu


def auto_prefill(model) -> str:
    """``prefill="auto"``'s choice: ``"packed"`` for TransNormerLLM, ``"padded"`` for the Transformer.

    TransNormerLLM's packed prefill spends no work on padding: on a GPU it was measured faster than the padded
    one for prompts of mixed lengths and as fast for prompts of equal lengths (``make bench-inference`` part
    ``prefill``; ``results/bench/NOTES-prefill.md``). The Transformer prefills a left-padded batch only (its KV
    cache is kept padded)."""
    return "packed" if model.config.arch == "tnl" else "padded"


def _check_prefill(model, prefill: str) -> str:
    """The prefill a call uses (one of ``PREFILLS``, ``"auto"`` resolved by ``auto_prefill``): a clear error,
    before any work, for a name not in ``PREFILLS`` or a prefill the model does not have."""
    if prefill not in PREFILLS:
        raise ValueError(f"prefill must be one of {PREFILLS}, got {prefill!r}")
    if prefill == "auto":
        return auto_prefill(model)
    if prefill == "packed" and model.config.arch != "tnl":
        raise ValueError("prefill='packed' needs TransNormerLLM (its attention runs packed prompts through "
                         "cu_seqlens); the Transformer prefills a left-padded batch: use prefill='padded'")
    return prefill


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Pick next tokens from ``logits: [B, V]``: greedy when ``temperature == 0``, else sampled with
    optional top-k and nucleus (top-p) filtering."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def stream_generate(
    model,
    input_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    decoder: str = "auto",
    decoder_cache: DecoderCache | None = None,
    prefill: str = "auto",
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence (``[B]`` long) as it is produced.

    Sequences that have emitted an end token keep yielding ``pad_token_id``; the stream stops when
    all are done or after ``max_new_tokens`` steps. ``decoder`` (one of ``DECODERS``, see the module
    docstring) chooses how decode steps run; every choice yields the same tokens up to floating-point
    rounding. The graph decoders need a CUDA device (``"fused-graph"``: TransNormerLLM); the decoders
    they build are kept in ``decoder_cache`` (a ``DecoderCache``; ``default_decoder_cache`` if None).
    ``prefill`` (one of ``PREFILLS``, see the module docstring): the prompts left-padded (``"padded"``) or,
    for TransNormerLLM, packed without padding (``"packed"``); the same tokens up to rounding, every decoder.
    The default, ``"auto"`` (``auto_prefill``), packs TransNormerLLM's prompts and pads the Transformer's.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder_cache is not None and not isinstance(decoder_cache, DecoderCache):
        raise TypeError(f"decoder_cache must be a tnlib.generation.DecoderCache, got {type(decoder_cache).__name__}")
    prefill = _check_prefill(model, prefill)
    if prefill == "packed":
        prompts = _prompt_list(model, input_ids)
        ids, cu = pack_prompts(prompts, next(model.parameters()).device)
        B, mask = len(prompts), None
    else:
        _, ids, mask = _prepare_prompts(model, input_ids, pad_token_id)
        B, cu = ids.shape[0], None
    decoders = default_decoder_cache if decoder_cache is None else decoder_cache
    if decoder == "auto":
        decoder = auto_decoder(model, ids, max_new_tokens, B)
    elif decoder != "eager" and not _graph_capable(model, ids, decoders.capture):
        raise ValueError(f"decoder={decoder!r} needs a model on a CUDA device (TransNormerLLM without absolute "
                         "positions, or the Transformer); use decoder='eager' or 'auto'")
    if decoder == "fused-graph":
        why = fused_decode_support(model)
        if why:
            raise ValueError(f"decoder='fused-graph': {why}; use decoder='compiled-graph', 'graph' or 'eager'")
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, device=ids.device).flatten()
    was_training = model.training
    model.eval()
    try:
        if max_new_tokens == 0:
            return
        if cu is None:
            logits, cache = model.step(ids, None, mask, last_only=True)
        else:
            logits, cache = model.step(ids, cu_seqlens=cu, last_only=True)
        graph = None
        if decoder != "eager" and max_new_tokens > 1:
            slots = ids.shape[1] + max_new_tokens - 1 if model.config.arch == "transformer" else None
            graph = decoders.get(model, cache, decoder, slots)
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        for i in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            yield nxt
            done = done | torch.isin(nxt, eos)
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            if graph is not None:
                logits = graph.decode(nxt[:, None])
            else:
                logits, cache = model.step(nxt[:, None], cache)
    finally:
        model.train(was_training)


def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None,
             eos_token_id=None, pad_token_id: int = 0, generator=None, decoder: str = "auto",
             decoder_cache: DecoderCache | None = None, prefill: str = "auto"):
    """Prompt followed by up to ``max_new_tokens`` new tokens (greedy when ``temperature == 0``).

    ``input_ids``: a ``[B, T]`` tensor (returns ``[B, T + n]``, finished rows filled with
    ``pad_token_id``) or a list of 1-D prompts of any lengths (returns a list of 1-D tensors, each
    ending at its end token if one was produced). ``decoder``, ``decoder_cache``, ``prefill`` (default
    ``"auto"``: packed for TransNormerLLM, padded for the Transformer): see ``stream_generate``.
    """
    prefill = _check_prefill(model, prefill)
    prompts = _prompt_list(model, input_ids)
    steps = list(stream_generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                 pad_token_id, generator, decoder, decoder_cache, prefill))
    device = next(model.parameters()).device
    new = torch.stack(steps, dim=1) if steps else torch.zeros(len(prompts), 0, dtype=torch.long, device=device)
    if isinstance(input_ids, torch.Tensor):
        base = input_ids if input_ids.dim() == 2 else input_ids[None]
        return torch.cat([base.to(new.device, torch.long), new], dim=1)
    eos = set([] if eos_token_id is None else torch.as_tensor(eos_token_id).flatten().tolist())
    out = []
    for p, row in zip(prompts, new):
        toks = row.tolist()
        for j, t in enumerate(toks):
            if t in eos:
                toks = toks[: j + 1]
                break
        out.append(torch.cat([p.to(row.device, torch.long), torch.tensor(toks, dtype=torch.long, device=row.device)]))
    return out
