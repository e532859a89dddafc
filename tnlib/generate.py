"""Text generation for TransNormerLLM (recurrent state) and the Transformer baseline (KV cache).

Taught in ``notebooks/08_recurrent_inference.ipynb``. One function serves both architectures through
their ``model.step(input_ids, cache, pad_mask)`` method, so the two compare like for like:

* prefill: the whole (left-padded) prompt batch in one parallel pass, keeping the cache;
* decode: one token per step; TransNormerLLM updates a constant-size state, the Transformer
  appends to its KV cache.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .nn.linear import force_gemv

__all__ = ["generate", "stream_generate", "sample_next", "GraphDecoder", "StaticDecodeStep"]


class StaticDecodeStep:
    """One TransNormerLLM decode step on static buffers: ``tokens`` in, logits out, state updated in place.

    With ``fuse=True`` the step is compiled with ``torch.compile`` (Inductor fuses each layer's
    elementwise work: norms, activations, LRPE, the recurrence), which cuts the kernel count per token.
    """

    def __init__(self, model, cache, fuse: bool = False, compile_mode: str | None = None):
        if getattr(model.config, "positional", None) == "ape":
            raise RuntimeError("static decoding does not support absolute position embeddings")
        self.model = model
        B = cache.positions.shape[0]
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=cache.positions.device)
        self.cache = type(cache)([st.clone() for st in cache.states], cache.positions.clone())
        self._fn = torch.compile(self._body, dynamic=False, mode=compile_mode) if fuse else self._body

    @torch.no_grad()
    def _body(self):
        logits, new = self.model.step(self.tokens, self.cache, validate=False)
        for st, nw in zip(self.cache.states, new.states):
            st.copy_(nw)
        self.cache.positions.copy_(new.positions)
        return logits

    def snapshot(self):
        return [st.clone() for st in self.cache.states], self.cache.positions.clone()

    def restore(self, snap):
        for st, sv in zip(self.cache.states, snap[0]):
            st.copy_(sv)
        self.cache.positions.copy_(snap[1])

    def __call__(self, tokens=None):
        if tokens is not None:
            self.tokens.copy_(tokens.view_as(self.tokens))
        return self._fn()


class GraphDecoder:
    """One TransNormerLLM decode step captured as a CUDA graph and replayed per token.

    The recurrent state has a fixed size, so the step has static shapes: the state lives in static
    buffers that the captured step updates in place. This removes the ~hundreds of kernel launches
    per token that dominate eager batch-1 decoding. ``fuse=True`` also compiles the step first
    (fewer, fused kernels inside the graph; ``compile_mode``, e.g. ``"max-autotune-no-cudagraphs"``,
    is passed to ``torch.compile``). ``decode(tokens)`` returns ``[B, 1, vocab]`` logits
    (a static buffer: copy it if you keep it).
    """

    def __init__(self, model, cache, fuse: bool = False, compile_mode: str | None = None):
        if not torch.cuda.is_available() or cache.states[0].device.type != "cuda":
            raise RuntimeError("GraphDecoder needs the model and cache on a CUDA device")
        self.step = StaticDecodeStep(model, cache, fuse, compile_mode)
        saved = self.step.snapshot()
        with force_gemv():  # the captured step's projections use tnlib's GEMV kernel, compiled or not
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm up: compilation and autotuning stay outside the capture
                    self.step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.step()
        self.step.restore(saved)  # undo the warm-up steps

    @property
    def cache(self):
        return self.step.cache

    def decode(self, tokens):
        self.step.tokens.copy_(tokens.view_as(self.step.tokens))
        self.graph.replay()
        return self.logits


def _prepare_prompts(model, input_ids, pad_token_id):
    """Accept ``[B, T]`` tensors or a list of 1-D prompts of different lengths (left-padded here)."""
    vocab = model.config.vocab_size
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        prompts = list(input_ids)
    elif isinstance(input_ids, Sequence) and len(input_ids) > 0:
        prompts = [torch.as_tensor(p) for p in input_ids]
    else:
        raise TypeError("input_ids must be a [B, T] tensor or a non-empty list of 1-D token sequences")
    device = next(model.parameters()).device
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
    lengths = torch.tensor([p.numel() for p in prompts], device=device)
    T = int(lengths.max())
    ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - p.numel():] = p.to(device=device, dtype=torch.long)
        mask[i, T - p.numel():] = True
    return prompts, ids, (None if bool(mask.all()) else mask)


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
    cuda_graph: bool | None = None,
    fuse_step: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence (``[B]`` long) as it is produced.

    Sequences that have emitted an end token keep yielding ``pad_token_id``; the stream stops when
    all are done or after ``max_new_tokens`` steps. ``cuda_graph`` (default: on for TransNormerLLM on
    a GPU) replays decode steps from a captured CUDA graph; ``False`` keeps the readable eager path.
    ``fuse_step`` also compiles the captured step with ``torch.compile`` first (fewer, fused kernels:
    1.08 instead of 1.71 ms per token for ``tnl-385m`` at batch 1 on an H200, see
    ``results/bench/inference-h200.json``), at the price of a one-time compilation per batch size.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    _, ids, mask = _prepare_prompts(model, input_ids, pad_token_id)
    eos = torch.as_tensor([] if eos_token_id is None else eos_token_id, device=ids.device).flatten()
    was_training = model.training
    model.eval()
    try:
        if max_new_tokens == 0:
            return
        logits, cache = model.step(ids, None, mask, last_only=True)
        if cuda_graph is None:
            cuda_graph = ids.is_cuda and hasattr(cache, "states") and getattr(model.config, "positional", "") != "ape"
        graph = GraphDecoder(model, cache, fuse=fuse_step) if cuda_graph and max_new_tokens > 1 else None
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
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
             eos_token_id=None, pad_token_id: int = 0, generator=None, cuda_graph: bool | None = None,
             fuse_step: bool = False):
    """Prompt followed by up to ``max_new_tokens`` new tokens (greedy when ``temperature == 0``).

    ``input_ids``: a ``[B, T]`` tensor (returns ``[B, T + n]``, finished rows filled with
    ``pad_token_id``) or a list of 1-D prompts of any lengths (returns a list of 1-D tensors, each
    ending at its end token if one was produced).
    """
    prompts, ids, _ = _prepare_prompts(model, input_ids, pad_token_id)
    steps = list(stream_generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                 pad_token_id, generator, cuda_graph, fuse_step))
    new = torch.stack(steps, dim=1) if steps else ids.new_zeros(ids.shape[0], 0)
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
