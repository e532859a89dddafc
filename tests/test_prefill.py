"""The packed prefill (issue 29, item 4): prompts of mixed lengths back to back, every layer's attention through
``cu_seqlens`` (``TransNormerLLM.step(ids, cu_seqlens=...)``, ``generate(..., prefill="packed")``), against the
left-padded prefill and each prompt alone: the same logits, every layer's state and positions, the same greedy
tokens through every decoder; ``prefill="auto"`` (the default) packs TransNormerLLM's prompts and pads the
Transformer's; bad inputs refused before any work. Float64 on the PyTorch path; the Triton path
(``triton`` marker: the interpreter on a CPU) in float32."""
import inspect

import pytest
import torch

from tnlib import create_model, generate, stream_generate
from tnlib.generation import PREFILLS, DecoderCache, _prepare_prompts, auto_prefill, pack_prompts
from tnlib.nn.lrpe import lrpe, lrpe_theta_init
from tnlib.testing import KERNEL_TOLERANCE, TOLERANCE, assert_close

#: mixed lengths with a one-token prompt, boundaries inside a 64-token chunk and a prompt longer than one chunk
LENGTHS = (5, 17, 1, 70, 9)
#: fewer for the interpreter (still one token, boundaries inside chunks, one prompt over a 64-token chunk)
LENGTHS_TRITON = (7, 1, 70, 3)
VOCAB = 101


def tiny(dtype=torch.float64, n_layers=2, **kw):
    torch.manual_seed(0)
    return create_model("tnl-tiny", vocab_size=VOCAB, n_layers=n_layers, **kw).to(dtype).eval()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def check_packed_prefill(m, prompts, tol):
    """The packed prefill's last-token logits, every layer's state and the positions == the padded prefill's
    and each prompt's alone (relative error within ``tol``); returns the worst error."""
    _, ids, mask = _prepare_prompts(m, prompts, 0)
    padded_logits, padded = m.step(ids, None, mask, last_only=True)
    packed_ids, cu = pack_prompts(prompts)
    logits, cache = m.step(packed_ids, cu_seqlens=cu, last_only=True)
    N = len(prompts)
    assert logits.shape == padded_logits.shape == (N, 1, VOCAB)
    assert torch.equal(cache.positions, torch.tensor([len(p) for p in prompts]))
    assert torch.equal(cache.positions, padded.positions) and cache.positions.dtype == padded.positions.dtype
    assert len(cache.states) == len(padded.states) == len(m.layers)
    worst = assert_close(logits, padded_logits, tol=tol, name="logits vs padded")
    for i, (st, ref) in enumerate(zip(cache.states, padded.states)):
        # the same shape, dtype and layout as the padded prefill's (graph decoders copy into buffers built from either)
        assert st.shape == ref.shape and st.dtype == ref.dtype and st.stride() == ref.stride(), i
        worst = max(worst, assert_close(st, ref, tol=tol, name=f"layer {i} state vs padded"))
    for n, p in enumerate(prompts):
        alone_logits, alone = m.step(p[None], last_only=True)
        worst = max(worst, assert_close(logits[n], alone_logits[0], tol=tol, name=f"prompt {n} logits vs alone"))
        for i, (st, ref) in enumerate(zip(cache.states, alone.states)):
            worst = max(worst, assert_close(st[n], ref[0], tol=tol, name=f"prompt {n} layer {i} state vs alone"))
    return worst


@pytest.mark.parametrize("positional", ["mix", "lrpe-d", "lrpe", "decay", "ape"])
def test_packed_prefill_equals_padded_and_alone(positional):
    """Float64, the PyTorch path: LRPE on the first layer (the paper's "mix"), on every layer (with and without
    decay), none, and absolute positions; every layer's state of every prompt, the one-token prompt included."""
    m = tiny(positional=positional)
    check_packed_prefill(m, prompts_of(LENGTHS), TOLERANCE[torch.float64])
    # all logits (not only the last): each prompt's rows == the prompt alone
    prompts = prompts_of(LENGTHS)
    ids, cu = pack_prompts(prompts)
    full, _ = m.step(ids, cu_seqlens=cu)
    assert full.shape == (1, sum(LENGTHS), VOCAB)
    for p, a, b in zip(prompts, cu[:-1].tolist(), cu[1:].tolist()):
        assert_close(full[0, a:b], m.step(p[None])[0][0], name="every position vs alone")


@pytest.mark.triton
@pytest.mark.parametrize("positional", ["mix", "decay"])
def test_packed_prefill_triton_kernels(positional, monkeypatch):
    """Float32 through the Triton kernels (the interpreter on a CPU): the packed prefill == the padded one and
    each prompt alone, within the fp32 kernel tolerance (a model's composite budget: 10x one kernel's)."""
    from tnlib.ops.lightning import op

    launches, fwd = [], op._lightning_fwd_op
    builds, items = [], op._work_items
    monkeypatch.setattr(op, "_lightning_fwd_op", lambda *a: launches.append(a[-1] is not None) or fwd(*a))
    monkeypatch.setattr(op, "_work_items", lambda cu, total, seg: builds.append(seg) or items(cu, total, seg))
    m = tiny(torch.float32, positional=positional)
    check_packed_prefill(m, prompts_of(LENGTHS_TRITON), 10 * KERNEL_TOLERANCE[torch.float32])
    # every layer of the packed prefill ran the kernels with cu_seqlens; the padded and lone prefills without
    assert launches.count(True) == len(m.layers) and launches.count(False) == len(m.layers) * (1 + len(LENGTHS_TRITON))
    assert len(builds) == 1  # one work table for every layer of the prefill (a tnlib.ops.PackedSequences)


def test_packed_prefill_continues_a_cache():
    """A packed step from a cache continues each sequence at its own position: prefixes then suffixes, packed
    both times (one suffix a single token), == the whole prompts packed at once; then a one-token step each."""
    m = tiny(positional="ape")  # absolute positions: the continuation must start at each cache position
    prompts = prompts_of(LENGTHS)
    cut = (2, 16, 1, 33, 8)
    heads, tails = [p[:c] for p, c in zip(prompts, cut)], [p[c:] for p, c in zip(prompts, cut)]
    tails[2] = torch.tensor([7])  # the one-token prompt gets a second token
    whole = [torch.cat([h, t]) for h, t in zip(heads, tails)]
    _, first = packed_step(m, heads)
    logits, cache = packed_step(m, tails, first)
    want_logits, want = packed_step(m, whole)
    assert torch.equal(cache.positions, torch.tensor([len(p) for p in whole]))
    assert_close(logits, want_logits, name="continued logits")
    for st, ref in zip(cache.states, want.states):
        assert_close(st, ref, name="continued state")
    nxt = logits[:, -1].argmax(-1)[:, None]
    assert_close(m.step(nxt, cache)[0], m.step(nxt, want)[0], name="next step")


def packed_step(m, prompts, cache=None):
    ids, cu = pack_prompts(prompts)
    return m.step(ids, cache, cu_seqlens=cu, last_only=True)


def test_generate_packed_equals_padded():
    """Greedy tokens with prefill="packed" == "padded", for a list of mixed-length prompts (lists out) and a
    [B, T] tensor (tensor out), through stream_generate too; the graph decoders' steps (uncaptured, as on a
    CPU) take the packed prefill's cache as they take the padded one's."""
    m = tiny()
    prompts = prompts_of(LENGTHS)
    want = generate(m, prompts, 8, prefill="padded")
    got = generate(m, prompts, 8, prefill="packed")
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)
    ids = torch.randint(0, VOCAB, (3, 6))
    assert torch.equal(generate(m, ids, 5, prefill="packed"), generate(m, ids, 5, prefill="padded"))
    streamed = torch.stack(list(stream_generate(m, prompts, 6, prefill="packed")), 1)
    assert torch.equal(streamed, torch.stack([w[len(p):len(p) + 6] for p, w in zip(prompts, want)]))
    eos = int(want[1][len(prompts[1]) + 2])  # an end token stops that sequence the same way
    assert all(torch.equal(a, b) for a, b in zip(generate(m, prompts, 8, eos_token_id=eos, prefill="packed"),
                                                  generate(m, prompts, 8, eos_token_id=eos, prefill="padded")))
    m32 = tiny(torch.float32)
    for decoder in ("graph", "compiled-graph"):
        built = DecoderCache(capture=False)
        base = generate(m32, prompts, 6, decoder=decoder, decoder_cache=built, prefill="padded")
        got = generate(m32, prompts, 6, decoder=decoder, decoder_cache=built, prefill="packed")  # reuses the decoder
        assert len(built) == 1 and all(torch.equal(a, b) for a, b in zip(got, base)), decoder


@pytest.mark.triton
def test_fused_graph_decoder_from_a_packed_prefill():
    """tnlib's fused decode kernels (decoder="fused-graph", uncaptured; the interpreter on a CPU) continue from
    the packed prefill's cache (the prefill itself through the Triton kernels) with the padded prefill's tokens."""
    m = tiny(torch.float32)
    prompts = prompts_of(LENGTHS_TRITON)
    want = generate(m, prompts, 4, decoder="eager")
    for prefill in PREFILLS:
        got = generate(m, prompts, 4, decoder="fused-graph", decoder_cache=DecoderCache(capture=False), prefill=prefill)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), prefill


def _spy_prefills(monkeypatch, model):
    """The prefill calls of ``model.step`` (those without a cache), as ``(how, ids shape)``: ``"packed"`` when
    given ``cu_seqlens``, ``"padded"`` otherwise."""
    calls, step = [], model.step

    def spy(input_ids, cache=None, *args, **kw):
        if cache is None:
            calls.append(("packed" if kw.get("cu_seqlens") is not None else "padded", tuple(input_ids.shape)))
        return step(input_ids, cache, *args, **kw)

    monkeypatch.setattr(model, "step", spy)
    return calls


def test_auto_prefill_packs_tnl_and_pads_the_transformer(monkeypatch):
    """``prefill="auto"``, the default of ``generate`` and ``stream_generate``: TransNormerLLM's prompts go back to
    back through ``cu_seqlens`` (one ``[1, total]`` step), the Transformer's left-padded (``[N, longest]``); the
    same tokens as the explicit choice, for a list of mixed-length prompts, a ``[B, T]`` tensor and a stream."""
    assert PREFILLS == ("auto", "padded", "packed")
    for f in (generate, stream_generate):
        assert inspect.signature(f).parameters["prefill"].default == "auto", f.__name__
    tnl = tiny()
    tf = create_model("transformer-tiny", vocab_size=VOCAB, n_layers=2).double().eval()
    assert (auto_prefill(tnl), auto_prefill(tf)) == ("packed", "padded")
    prompts = prompts_of(LENGTHS)
    ids = torch.randint(0, VOCAB, (3, 6))
    for model, chosen, shape in ((tnl, "packed", (1, sum(LENGTHS))), (tf, "padded", (len(LENGTHS), max(LENGTHS)))):
        want = generate(model, prompts, 6, prefill=chosen)
        want_ids = generate(model, ids, 4, prefill=chosen)
        calls = _spy_prefills(monkeypatch, model)
        got = generate(model, prompts, 6)
        assert calls == [(chosen, shape)], (model.config.arch, calls)
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), model.config.arch
        calls.clear()
        assert torch.equal(generate(model, ids, 4, prefill="auto"), want_ids)
        assert calls == [(chosen, (1, ids.numel()) if chosen == "packed" else tuple(ids.shape))], (model.config.arch, calls)
        calls.clear()
        streamed = torch.stack(list(stream_generate(model, prompts, 6)), 1)
        assert calls == [(chosen, shape)] and torch.equal(
            streamed, torch.stack([w[len(p):] for p, w in zip(prompts, want)])), model.config.arch


def _no_work(monkeypatch, m):
    """Any computation by the model (the embedding, a block) fails the test: the checks must come first."""
    def boom(*a, **k):
        raise AssertionError("work started before the inputs were checked")
    monkeypatch.setattr(m.embed, "forward", boom)
    for layer in m.layers:
        monkeypatch.setattr(layer, "forward", boom)


def test_bad_inputs_raise_before_work(monkeypatch):
    assert PREFILLS == ("auto", "padded", "packed")
    prompts = prompts_of((3, 5))
    tf = create_model("transformer-tiny", vocab_size=VOCAB, n_layers=2).double().eval()
    _no_work(monkeypatch, tf)
    with pytest.raises(ValueError, match="Transformer prefills a left-padded batch"):
        generate(tf, prompts, 3, prefill="packed")
    with pytest.raises(ValueError, match="Transformer prefills a left-padded batch"):
        next(stream_generate(tf, prompts, 3, prefill="packed"))
    m = tiny()
    _, padded = m.step(torch.randint(0, VOCAB, (3, 4)))
    _no_work(monkeypatch, m)
    with pytest.raises(ValueError, match="prefill must be one of"):
        generate(m, prompts, 3, prefill="pack")
    with pytest.raises(ValueError, match="empty"):
        generate(m, [prompts[0], torch.tensor([], dtype=torch.long)], 3, prefill="packed")
    ids, cu = pack_prompts(prompts)
    cases = [
        (dict(input_ids=ids, pad_mask=torch.ones_like(ids, dtype=torch.bool)), ValueError, "exclude each other"),
        (dict(input_ids=ids.view(2, 4)), ValueError, r"\[1, total\]"),
        (dict(cu_seqlens=torch.tensor([0, 3, 9])), ValueError, "end at the total length"),
        (dict(cu_seqlens=torch.tensor([0, 3, 3, 8])), ValueError, "strictly increase"),
        (dict(cu_seqlens=cu.float()), TypeError, "int32 or int64"),
        (dict(cu_seqlens=cu[None]), ValueError, r"\[N \+ 1\]"),
        (dict(input_ids=ids.clone().fill_(VOCAB)), ValueError, "token ids must lie"),
        (dict(cache=padded), ValueError, "cache holds 3 sequences"),
    ]
    for change, error, words in cases:
        kw = dict(input_ids=ids, cache=None, pad_mask=None, cu_seqlens=cu, last_only=True) | change
        with pytest.raises(error, match=words):
            m.step(kw.pop("input_ids"), kw.pop("cache"), kw.pop("pad_mask"), **kw)


def test_lrpe_takes_every_token_position():
    """``lrpe``'s ``[B, T]`` offset (every token's position, as the packed prefill passes it) == the ``[B]``
    form where the positions are consecutive, and restarts per prompt where told to; other shapes refused."""
    B, T, H, D = 2, 9, 3, 4
    theta = lrpe_theta_init(H, D).double() * 5
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    start = torch.tensor([3, 40])
    per_token = start[:, None] + torch.arange(T)
    assert torch.equal(lrpe(x, theta, per_token), lrpe(x, theta, start))
    restart = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]] * B)  # three prompts back to back
    got = lrpe(x, theta, restart)
    assert torch.equal(got[:, 3:5], lrpe(x[:, 3:5], theta)) and torch.equal(got[:, 5:], lrpe(x[:, 5:], theta))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        lrpe(x, theta, torch.zeros(B, T + 1, dtype=torch.long))
