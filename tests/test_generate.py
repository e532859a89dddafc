"""Generation: greedy == argmax of the parallel forward, mixed-length batches, constant-size state."""
import pytest
import torch

import tnlib
from tnlib import create_model, generate, stream_generate
from tnlib.generation import DECODERS, DecoderCache, GraphDecoder, StaticDecodeStep, _prepare_prompts, auto_decoder, \
    capacity_for, sample_next
from tnlib.testing import assert_close, stepwise_logits


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


PRESETS = ["tnl-tiny", "transformer-tiny"]


def tiny(preset, **kw):
    torch.manual_seed(0)
    m = create_model(preset, vocab_size=101, n_layers=2, **kw).double().eval()
    return m


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("prompt_len", [1, 37, 70])
def test_greedy_equals_argmax_of_parallel_forward(preset, prompt_len):
    m = tiny(preset)
    prompt = torch.randint(0, 101, (1, prompt_len))
    out = generate(m, prompt, max_new_tokens=12)
    assert out.shape == (1, prompt_len + 12) and torch.equal(out[:, :prompt_len], prompt)
    with torch.no_grad():
        logits = m(out)
    # every generated token is the argmax of the full parallel forward at the step before it
    assert torch.equal(logits[0, prompt_len - 1 : -1].argmax(-1), out[0, prompt_len:])


@pytest.mark.parametrize("preset", PRESETS)
def test_recurrent_step_logits_match_parallel(preset):
    m = tiny(preset)
    ids = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        full = m(ids)
    assert torch.allclose(stepwise_logits(m, ids, 20), full, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("preset", PRESETS)
def test_mixed_length_batch_equals_separate_runs(preset):
    """Through every prefill the model has (the default, "auto", packs TNL's prompts and pads the Transformer's)."""
    m = tiny(preset)
    prompts = [torch.randint(0, 101, (n,)) for n in (5, 17, 1, 9)]
    for prefill in ("auto", "padded", "packed") if preset == "tnl-tiny" else ("auto", "padded"):
        batch = generate(m, prompts, max_new_tokens=8, prefill=prefill)
        for p, b in zip(prompts, batch):
            alone = generate(m, [p], max_new_tokens=8, prefill=prefill)[0]
            assert torch.equal(b, alone), prefill


def test_new_prompt_resets_positions():
    """docs/sources.md (the official code's offset): the LRPE offset must restart at 0 for every new prompt."""
    m = tiny("tnl-tiny")
    p = torch.randint(0, 101, (1, 11))
    first = generate(m, p, max_new_tokens=6)
    generate(m, torch.randint(0, 101, (1, 23)), max_new_tokens=6)
    assert torch.equal(generate(m, p, max_new_tokens=6), first)


def test_state_size_does_not_depend_on_context():
    m = tiny("tnl-tiny")
    sizes = []
    for T in (1, 50, 400):
        _, cache = m.step(torch.randint(0, 101, (2, T)))
        sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1
    tf = tiny("transformer-tiny")
    kv = [tf.step(torch.randint(0, 101, (2, T)))[1].nbytes() for T in (10, 20)]
    assert kv[1] == 2 * kv[0]  # the KV cache grows linearly


def test_eos_and_streaming():
    m = tiny("tnl-tiny")
    prompt = torch.randint(0, 101, (1, 8))
    greedy = generate(m, prompt, max_new_tokens=10)
    eos = int(greedy[0, 8 + 3])  # force a stop at the 4th new token
    stopped = generate(m, [prompt[0]], max_new_tokens=10, eos_token_id=eos)[0]
    first = (greedy[0, 8:] == eos).nonzero()[0, 0].item()
    assert torch.equal(stopped, greedy[0, : 8 + first + 1])
    streamed = [t.item() for t in stream_generate(m, prompt, max_new_tokens=5)]
    assert streamed == greedy[0, 8:13].tolist()


def test_sampling_is_seeded_and_filters():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample_next(logits, 1.0, top_p=0.1, generator=g).item() for _ in range(50)}
    assert draws == {1}
    m = tiny("tnl-tiny")
    a = generate(m, torch.ones(1, 4, dtype=torch.long), 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(m, torch.ones(1, 4, dtype=torch.long), 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_clear_errors():
    m = tiny("tnl-tiny")
    with pytest.raises(ValueError, match="empty"):
        generate(m, [torch.tensor([], dtype=torch.long)], 3)
    with pytest.raises(ValueError, match="outside"):
        generate(m, torch.tensor([[1, 101]]), 3)
    with pytest.raises(TypeError, match="integers"):
        generate(m, torch.tensor([[1.0, 2.0]]), 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, torch.tensor([[1, 2]]), 3, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, torch.tensor([[1, 2]]), -1)


@pytest.mark.parametrize("fuse", [False, True])
def test_static_decode_step_matches_eager(fuse):
    """The buffers-in-place step that CUDA graphs capture (optionally torch.compile'd) == model.step."""
    from tnlib.generation import StaticDecodeStep

    torch.manual_seed(5)
    m = create_model("tnl-tiny", vocab_size=101, n_layers=2).eval()
    _, cache = m.step(torch.randint(0, 101, (2, 20)))
    static = StaticDecodeStep(m, cache, fuse=fuse)
    for t in torch.randint(0, 101, (3, 2, 1)):
        got = static(t).clone()
        want, cache = m.step(t, cache)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(static.cache.positions, cache.positions)


def test_auto_decoder_follows_the_measured_rule(monkeypatch):
    """Where a graph can be captured (faked here: no CUDA), ``auto`` is the fused step for TransNormerLLM
    (compiled-graph where the fused kernels refuse the model: fp64 weights), and for the Transformer eager up
    to 8 sequences, compiled-graph from 9 (counted by ``batch`` for packed prompts); eager when at most one
    token is decoded."""
    import tnlib.generation as G

    monkeypatch.setattr(G, "_graph_capable", lambda model, ids, capture=True: True)
    ids = {b: torch.zeros(b, 5, dtype=torch.long) for b in (1, 8, 9)}
    tnl, tf = tiny("tnl-tiny").float(), tiny("transformer-tiny")
    assert [auto_decoder(tnl, ids[b], 10) for b in (1, 8, 9)] == ["fused-graph"] * 3
    assert auto_decoder(tnl.double(), ids[1], 10) == "compiled-graph"
    assert [auto_decoder(tf, ids[b], 10) for b in (1, 8, 9)] == ["eager", "eager", "compiled-graph"]
    assert auto_decoder(tf, ids[1], 10, batch=9) == "compiled-graph"
    assert auto_decoder(tf, ids[9], 1) == auto_decoder(tiny("tnl-tiny"), ids[1], 1) == "eager"


def test_public_api_and_decoder_choice():
    """``tnlib.generate`` is the function; ``decoder="auto"`` is eager on a CPU; graph decoders refuse
    a CPU model or the Transformer with a clear error; unknown names are refused."""
    assert tnlib.generate is generate and callable(tnlib.stream_generate)
    assert DECODERS == ("auto", "eager", "graph", "compiled-graph", "fused-graph")
    m = tiny("tnl-tiny")
    ids = torch.randint(0, 101, (1, 5))
    assert auto_decoder(m, ids, 10) == "eager"
    assert torch.equal(generate(m, ids, 6), generate(m, ids, 6, decoder="eager"))
    with pytest.raises(ValueError, match="decoder must be one of"):
        generate(m, ids, 3, decoder="fast")
    for preset in PRESETS:
        with pytest.raises(ValueError, match="CUDA"):
            generate(tiny(preset), ids, 3, decoder="graph")


class _FakeGraphDecoder:
    """Stands in for ``GraphDecoder`` on a CPU: counts builds, decodes eagerly from the loaded cache."""

    built = 0

    def __init__(self, model, cache, fuse=False, kernels=False, capacity=None, capture=True):
        type(self).built += 1
        self.model, self.fuse, self.kernels, self.capacity = model, fuse, kernels, capacity
        self.load(cache)

    def load(self, cache):
        self.cache = cache

    def decode(self, tokens):
        logits, self.cache = self.model.step(tokens, self.cache)
        return logits


def test_graph_decoders_are_built_once_per_model_and_batch(monkeypatch):
    """The decoder cache: a second call (new prompt, same batch size) reuses the decoder and gives the
    tokens of a fresh one; another batch size or a ``model.to(dtype)`` builds a new one. The decoders live
    in the ``DecoderCache`` given (else ``default_decoder_cache``), which a caller can inspect and clear;
    nothing is stored on the model."""
    import copy

    from tnlib import generation

    monkeypatch.setattr(generation, "GraphDecoder", _FakeGraphDecoder)
    monkeypatch.setattr(generation, "_graph_capable", lambda model, ids, capture=True: model.config.arch == "tnl")
    _FakeGraphDecoder.built = 0
    m = tiny("tnl-tiny")
    attrs = dict(vars(m))
    cache = generation.DecoderCache()
    assert len(cache) == 0 and cache.models() == [] and cache.decoders(m) == {}
    a, b = torch.randint(0, 101, (2, 1, 9))
    want = [generate(m, p, 5, decoder="eager") for p in (a, b)]
    assert torch.equal(generate(m, a, 5, decoder="compiled-graph", decoder_cache=cache), want[0])
    assert torch.equal(generate(m, b, 5, decoder="compiled-graph", decoder_cache=cache), want[1])
    assert _FakeGraphDecoder.built == 1
    assert list(cache.decoders(m)) == [("compiled-graph", 1)] and cache.models() == [m]
    generate(m, torch.cat([a, b]), 5, decoder="compiled-graph", decoder_cache=cache)  # batch 2
    streamed = list(stream_generate(m, a, 5, decoder="graph", decoder_cache=cache))  # another decoder
    assert torch.equal(torch.stack(streamed, 1), want[0][:, 9:])
    assert _FakeGraphDecoder.built == 3 and len(cache) == 3
    m.float()  # new tensors: the cached decoders are stale
    generate(m, a, 5, decoder="compiled-graph", decoder_cache=cache)
    assert _FakeGraphDecoder.built == 4 and len(cache) == 3  # the stale one replaced
    assert vars(m) == attrs  # nothing stored on the model
    assert len(generation.default_decoder_cache) == 0  # an explicit cache leaves the default alone
    other = copy.deepcopy(m)
    assert cache.decoders(other) == {}  # a copy is another model
    generate(other, a, 5, decoder="compiled-graph", decoder_cache=cache)
    assert _FakeGraphDecoder.built == 5 and cache.models() == [m, other]
    assert "4 decoders for 2 models" in repr(cache)
    cache.clear(m)
    assert cache.decoders(m) == {} and cache.models() == [other]
    cache.clear()
    assert len(cache) == 0 and cache.models() == []
    # without a cache argument: the module's default one
    try:
        generate(m, a, 5, decoder="compiled-graph")
        generate(m, b, 5, decoder="compiled-graph")
        assert _FakeGraphDecoder.built == 6 and list(generation.default_decoder_cache.decoders(m)) == [("compiled-graph", 1)]
    finally:
        generation.default_decoder_cache.clear()
    # a bounded cache drops its least recently used model's decoders (the default keeps 2 models)
    assert generation.default_decoder_cache.max_models == 2
    small, third = generation.DecoderCache(max_models=2), copy.deepcopy(m)
    for model in (m, other, m, third):  # m used again before third comes: other is the oldest
        generate(model, a, 5, decoder="compiled-graph", decoder_cache=small)
    assert small.models() == [m, third]
    with pytest.raises(ValueError, match="max_models"):
        generation.DecoderCache(max_models=0)
    with pytest.raises(TypeError, match="DecoderCache"):
        generate(m, a, 5, decoder="compiled-graph", decoder_cache={})
    with pytest.raises(ValueError, match="graph decoders"):
        cache.get(m, m.step(a)[1], "eager")


def test_transformer_graph_decoder_capacity(monkeypatch):
    """A Transformer's graph decoder holds a static KV cache of the call's length rounded up to
    ``CAPACITY_STEP``; the ``DecoderCache`` reuses it while a call needs at most as many slots and at least
    half, else builds one of the call's capacity. ``fused-graph`` refuses the Transformer by name."""
    from tnlib import generation

    monkeypatch.setattr(generation, "GraphDecoder", _FakeGraphDecoder)
    monkeypatch.setattr(generation, "_graph_capable", lambda model, ids, capture=True: True)
    _FakeGraphDecoder.built = 0
    assert capacity_for(1) == capacity_for(256) == 256 and capacity_for(257) == 512
    monkeypatch.setattr(generation, "CAPACITY_STEP", 16)  # short sequences, the same rule
    m = tiny("transformer-tiny")
    cache = DecoderCache()
    a = torch.randint(0, 101, (1, 9))
    built = []
    for new_tokens in (3, 7, 30, 20, 90, 3):  # needs 11, 15, 38, 28, 98, 11 slots
        out = generate(m, a, new_tokens, decoder="graph", decoder_cache=cache)
        assert torch.equal(out, generate(m, a, new_tokens, decoder="eager"))
        built.append((_FakeGraphDecoder.built, cache.decoders(m)[("graph", 1)].capacity))
    assert built == [(1, 16), (1, 16), (2, 48), (2, 48), (3, 112), (4, 16)]
    with pytest.raises(ValueError, match="fused-graph.*TransNormerLLM's"):
        generate(m, a, 3, decoder="fused-graph", decoder_cache=cache)


def _prompts(batch):
    """One prompt, or a mixed-length batch (left-padded by ``generate``)."""
    return [torch.randint(0, 101, (11,))] if batch == "one" else [torch.randint(0, 101, (n,)) for n in (5, 17, 1, 9)]


@pytest.mark.parametrize("batch", ["one", "mixed"])
def test_transformer_static_cache_equals_growing_cache(batch):
    """The Transformer's ``StaticKVCache`` step (``static_step``: preallocated slots, written in place,
    masked attention over the whole capacity) == its growing ``KVCache`` step, token for token: logits
    within fp32's rounding, the greedy tokens of each chain identical, the same keys, values and positions."""
    torch.manual_seed(3)
    m = create_model("transformer-tiny", vocab_size=101, n_layers=2).eval()
    _, ids, mask = _prepare_prompts(m, _prompts(batch), 0)
    T, steps = ids.shape[1], 16
    logits, cache = m.step(ids, None, mask, last_only=True)
    static = m.static_cache(cache, capacity=T + steps + 5)
    assert static.capacity == T + steps + 5 and int(static.length) == T
    tok_grow = tok_static = logits[:, -1].argmax(-1)[:, None]
    for _ in range(steps):
        grow, cache = m.step(tok_grow, cache)
        got = m.static_step(tok_static, static)
        assert_close(got, grow, dtype=torch.float32, tol=1e-5, name="static-cache logits")
        tok_grow, tok_static = grow[:, -1].argmax(-1)[:, None], got[:, -1].argmax(-1)[:, None]
        assert torch.equal(tok_grow, tok_static)
    assert int(static.length) == T + steps and torch.equal(static.positions, cache.positions)
    for mine, theirs in zip(static.keys + static.values, cache.keys + cache.values):
        assert_close(mine[:, :, : T + steps], theirs, dtype=torch.float32, tol=1e-6)
    want_valid = torch.ones(len(ids), T + steps, dtype=torch.bool) if cache.valid is None else cache.valid
    assert torch.equal(static.valid[:, : T + steps], want_valid) and not static.valid[:, T + steps:].any()
    with pytest.raises(ValueError, match="cannot hold"):
        m.static_cache(cache, capacity=T + steps - 1)


@pytest.mark.parametrize("fuse", [False, True])
def test_transformer_static_decode_step(fuse):
    """The step that the Transformer's graph decoders capture (compiled with ``fuse``) == the growing-cache
    step; compiled, one graph serves every capacity (the capacity is a dynamic size)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(4)
    m = create_model("transformer-tiny", vocab_size=101, n_layers=2).eval()
    for capacity, T in ((64, 20), (256, 9)):
        _, cache = m.step(torch.randint(0, 101, (2, T)))
        step = StaticDecodeStep(m, cache, fuse=fuse, capacity=capacity)
        for t in torch.randint(0, 101, (3, 2, 1)):
            got = step(t).clone()
            want, cache = m.step(t, cache)
            assert_close(got, want, dtype=torch.float32, tol=1e-5)
        assert torch.equal(step.cache.positions, cache.positions) and int(step.cache.length) == T + 3
    assert counters["stats"]["unique_graphs"] == (1 if fuse else 0)
    with pytest.raises(ValueError, match="needs a capacity"):
        StaticDecodeStep(m, cache)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("batch", ["one", "mixed"])
def test_graph_decoder_uncaptured_equals_eager(preset, batch):
    """A graph decoder's step without the capture (``capture=False``: what runs on a CPU) gives the eager
    decoder's greedy tokens, for both models, one prompt and a mixed-length batch; ``load`` restarts it."""
    m = tiny(preset).float()
    prompts = _prompts(batch)
    want = generate(m, prompts, 10, decoder="eager")
    _, ids, mask = _prepare_prompts(m, prompts, 0)
    logits, cache = m.step(ids, None, mask, last_only=True)
    capacity = capacity_for(ids.shape[1] + 9) if preset.startswith("transformer") else None
    dec = GraphDecoder(m, cache, capacity=capacity, capture=False)
    assert dec.capacity == capacity and dec.graph is None
    for _ in range(2):  # the second time from the same prefill, reloaded
        toks = [logits[:, -1].argmax(-1)]
        for _ in range(9):
            toks.append(dec.decode(toks[-1][:, None])[:, -1].argmax(-1))
        for p, w, g in zip(prompts, want, torch.stack(toks, 1)):
            assert torch.equal(w[len(p):], g)
        dec.load(cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("decoder", ["graph", "compiled-graph", "fused-graph"])
def test_graph_decoders_match_eager_on_gpu(decoder, preset):
    if decoder == "fused-graph" and preset.startswith("transformer"):
        pytest.skip("the fused decode step is TransNormerLLM's")
    torch.manual_seed(7)
    m = create_model(preset, vocab_size=101, n_layers=2).cuda().eval()
    for T in (9, 30):  # the second prompt reuses the decoder built for the first
        ids = torch.randint(0, 101, (1, T), device="cuda")
        got = generate(m, ids, 8, decoder=decoder)
        with torch.no_grad():
            logits = m(got)
        # fp32 with TF32/GEMV rounding: every token is the argmax, or within 1e-3 of it
        top = logits[0, T - 1: -1].max(-1).values
        chosen = logits[0, T - 1: -1].gather(-1, got[0, T:, None])[:, 0]
        assert ((top - chosen) <= 1e-3 * top.abs().clamp(min=1)).all()
