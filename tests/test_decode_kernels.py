"""The fused decode kernels (``tnlib.ops.decode``) against their float64 references, and the fused decode
step (``tnlib.models.fused_decode``, ``decoder="fused-graph"``) against the model's float64 step.

Triton kernels: on a CPU they run under ``TRITON_INTERPRET=1`` (``make test``'s second pass)."""
import copy

import pytest
import torch

from tnlib import create_model, generate
from tnlib.generation import GraphDecoder, _prepare_prompts
from tnlib.models.fused_decode import FusedDecodeStep, fused_decode_support
from tnlib.ops import decode as D
from tnlib.testing import KERNEL_TOLERANCE, TOLERANCE, assert_close

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _out_tolerance(dtype):
    """A kernel's budget against float64 on the same rounded inputs (its output rounded to ``dtype``)."""
    return KERNEL_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 21])
@pytest.mark.parametrize("flags", ["plain", "norm", "norm+gate+gain+residual", "norm+pair", "pair+silu+gain"])
def test_fused_gemv_matches_float64(flags, rows, dtype, device):
    """Every prologue/epilogue combination the step uses, broadcast (up to 8 rows) and dot (16 and more)
    paths, masked edges (N, K not multiples of the blocks), weights in each kernel dtype, fp32 activations."""
    torch.manual_seed(rows)
    N, K = 72, 200
    w = (torch.randn(N, K, dtype=torch.float64) / K**0.5).to(device, dtype)
    kw = {}
    if "norm" in flags:
        kw["norm_eps"] = 1e-6
    if "gate" in flags:
        kw["gate"] = torch.randn(rows, K, device=device)
    if "gain" in flags:
        kw["gain"] = (1 + 0.1 * torch.randn(K)).to(device, dtype)
    if "residual" in flags:
        kw["residual"] = torch.randn(rows, N, device=device)
    if "pair" in flags:
        kw["weight2"] = (torch.randn(N, K, dtype=torch.float64) / K**0.5).to(device, dtype)
        kw["glu_act"] = 1 if "silu" in flags else 0
    x = 3 * torch.randn(rows, K, device=device)
    out = torch.full((rows, N), float("nan"), device=device, dtype=dtype)
    D.fused_gemv(x, w, out=out, tile=D.gemv_tile(rows, N, K, "pair" in flags, interpreted=False), **kw)  # GPU tiles
    want = D.fused_gemv_reference(x, w, **kw)
    # a dot path on a GPU feeds the activations to the tensor cores in the weights' dtype: one more rounding
    tol = _out_tolerance(dtype) * (2 if rows >= 16 and dtype != torch.float32 and device == "cuda" else 1)
    assert_close(out, want, dtype=dtype, tol=tol, name=f"fused_gemv {flags}")


@pytest.mark.parametrize("tile", [D.GemvTile(8, 4, 128), D.GemvTile(4, 8, 64)])
@pytest.mark.parametrize("flags", ["norm+gate+residual", "norm+pair+silu"])
def test_fused_gemv_broadcast_tiles_over_row_blocks(flags, tile, device):
    """Broadcast tiles of 4 or 8 rows over 21 sequences (several row blocks, the last one masked): the
    candidates ``tools/tune_decode.py`` times beside the dot tiles from 16 sequences."""
    torch.manual_seed(2)
    M, N, K = 21, 40, 136
    w = torch.randn(N, K, device=device) / K**0.5
    kw = {"norm_eps": 1e-6}
    if "gate" in flags:
        kw.update(gate=torch.randn(M, K, device=device), residual=torch.randn(M, N, device=device))
    if "pair" in flags:
        kw.update(weight2=torch.randn(N, K, device=device) / K**0.5, glu_act=1)
    x = torch.randn(M, K, device=device)
    out = torch.full((M, N), float("nan"), device=device)
    D.fused_gemv(x, w, out=out, tile=tile, **kw)
    assert_close(out, D.fused_gemv_reference(x, w, **kw), dtype=torch.float32, tol=KERNEL_TOLERANCE[torch.float32],
                 name=f"fused_gemv {flags} {tile}")


@pytest.mark.parametrize("tile", [D.GemvTile(1, 8, 32, split_k=3), D.GemvTile(4, 8, 64, split_k=2),
                                  D.GemvTile(16, 16, 32, split_k=8)])
@pytest.mark.parametrize("flags", ["norm+gate+gain", "plain"])
def test_fused_gemv_split_k_adds_into_the_residual(flags, tile, device):
    """Split-K (the reduction cut in ranges whose programs add atomically into the residual, in place):
    the float64 result, with the norm still over the whole row; K = 200 is no multiple of the ranges'
    blocks, and the last program of the 8-way split has nothing left to add. Refused where it cannot add."""
    torch.manual_seed(3)
    M = 2 if tile.block_m == 1 else (5 if tile.block_m == 4 else 17)
    N, K = 40, 200
    w = torch.randn(N, K, device=device) / K**0.5
    kw = {"norm_eps": 1e-6, "gate": torch.randn(M, K, device=device),
          "gain": 1 + 0.1 * torch.randn(K, device=device)} if flags != "plain" else {}
    x, res = 3 * torch.randn(M, K, device=device), torch.randn(M, N, device=device)
    want = D.fused_gemv_reference(x, w, residual=res, **kw)
    D.fused_gemv(x, w, out=res, residual=res, tile=tile, **kw)
    assert_close(res, want, dtype=torch.float32, tol=KERNEL_TOLERANCE[torch.float32], name=f"split-K {flags} {tile}")
    with pytest.raises(ValueError, match="needs residual=out"):
        D.fused_gemv(x, w, out=torch.empty(M, N, device=device), residual=res, tile=tile, **kw)


def test_fused_gemv_residual_in_place_and_strided_gate(device):
    """The step's uses: the residual stream updated in place, the gate a strided view of the projection."""
    torch.manual_seed(1)
    M, N, K = 2, 48, 48
    qkvu = torch.randn(M, 4 * K, device=device)
    x = torch.randn(M, N, device=device)
    w = torch.randn(N, K, device=device) / K**0.5
    o = torch.randn(M, K, device=device)
    want = D.fused_gemv_reference(o, w, norm_eps=1e-6, gate=qkvu[:, 3 * K:], residual=x)
    D.fused_gemv(o, w, out=x, norm_eps=1e-6, gate=qkvu[:, 3 * K:], residual=x)
    assert_close(x, want, dtype=torch.float32, tol=KERNEL_TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lrpe", [False, True])
@pytest.mark.parametrize("act", [0, 1, 2])
def test_recurrent_step_matches_float64(act, lrpe, dtype, device):
    """State updated in place and output, at positions up to 2^20 (LRPE's angles), for every q/k feature map."""
    torch.manual_seed(act)
    B, H, Dh = 3, 2, 16
    qkv = torch.randn(B, 4 * H * Dh, device=device).to(dtype)
    state = torch.randn(B, H, (2 if lrpe else 1) * Dh, Dh, device=device)
    slope = torch.rand(H, device=device)
    positions = torch.tensor([0, 777, 2**20 + 3], device=device)
    theta = torch.rand(H, Dh, device=device) if lrpe else None
    before = state.clone()
    out = torch.full((B, H * Dh), float("nan"), device=device)
    bv = D.recurrent_tile(B, H, Dh, lrpe, interpreted=False)[0]  # the GPU's value blocks
    D.recurrent_step(qkv, state, slope, out=out, act=act, positions=positions, theta=theta, bv=bv)
    want_o, want_s = D.recurrent_step_reference(qkv, before, slope, act=act, positions=positions, theta=theta)
    tol = KERNEL_TOLERANCE[torch.float32]  # fp32 arithmetic on the same (rounded) inputs
    assert_close(out, want_o, dtype=torch.float32, tol=tol, name="o")
    assert_close(state, want_s, dtype=torch.float32, tol=tol, name="state")


def test_embed_matches_float64(device):
    ids = torch.tensor([3, 0, 9, 3], device=device)
    table = torch.randn(10, 70, device=device).to(torch.bfloat16)
    out = torch.empty(4, 70, device=device)
    D.embed(ids, table, 2.5, out=out)
    assert_close(out, D.embed_reference(ids, table, 2.5), dtype=torch.float32, tol=KERNEL_TOLERANCE[torch.float32])


# the step's configurations: the default; RMSNorm (gains), SiLU GLU and 1+elu q/k; no gate, LRPE-d on every
# layer and an untied head
CONFIGS = [{}, dict(norm="rms", glu_act="silu", qk_act="1+elu"),
           dict(gate=False, positional="lrpe-d", tie_embeddings=False)]


def _tiny(**overrides):
    torch.manual_seed(0)
    m = create_model("tnl-tiny", vocab_size=101, n_layers=2, **overrides).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm gains away from 1, so that a missed gain shows
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("overrides", CONFIGS, ids=["default", "rms-silu-elu", "nogate-lrped-untied"])
def test_fused_step_matches_float64_step(overrides, device):
    """``FusedDecodeStep`` in fp32 against ``model.step`` in float64 (the reference step), over a
    mixed-length batch: logits, every layer's state and the positions, step after step."""
    m = _tiny(**overrides).to(device)
    m64 = copy.deepcopy(m).double()
    prompts = [torch.randint(0, 101, (n,)) for n in (7, 19, 2)]
    _, ids, mask = _prepare_prompts(m64, prompts, 0)
    _, cache64 = m64.step(ids, None, mask)  # one prefill (float64, rounded to fp32 below) for both
    step = FusedDecodeStep(m, type(cache64)([s.float() for s in cache64.states], cache64.positions))
    for t in torch.randint(0, 101, (4, 3, 1), device=device):
        got = step(t)
        want, cache64 = m64.step(t, cache64)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert_close(got, want, dtype=torch.float32, tol=1e-5, name="logits")
    for s, s64 in zip(step.cache.states, cache64.states):
        assert_close(s, s64, dtype=torch.float32, tol=1e-5, name="state")
    assert torch.equal(step.cache.positions, cache64.positions)


def test_fused_step_bf16_within_documented_tolerance(device):
    """A bf16 model: the fused step's logits against the float64 step within ``TOLERANCE[bf16]`` (the
    model-level budget; the eager bf16 step is held to the same)."""
    m = _tiny().to(device)
    m64 = copy.deepcopy(m).double()
    mb = copy.deepcopy(m).to(torch.bfloat16)
    ids = torch.randint(0, 101, (2, 12), device=device)
    _, cache = mb.step(ids)
    _, cache64 = m64.step(ids)
    _, cache_eager = mb.step(ids)
    step = FusedDecodeStep(mb, cache)
    for t in torch.randint(0, 101, (3, 2, 1), device=device):
        got = step(t).clone()
        want, cache64 = m64.step(t, cache64)
        eager, cache_eager = mb.step(t, cache_eager)
        assert got.dtype == torch.bfloat16
        assert_close(got, want, dtype=torch.bfloat16, name="fused bf16 logits")
        assert_close(eager, want, dtype=torch.bfloat16, name="eager bf16 logits")


def test_fused_decoder_greedy_tokens_equal_eager_fp32(device):
    """``decoder="fused-graph"``'s decoder uncaptured (a CPU has no CUDA graphs): the greedy tokens of
    the eager decoder in fp32, for one prompt and a mixed-length batch, reloaded for a second prompt."""
    m = _tiny().to(device)
    for prompts in ([torch.randint(0, 101, (9,))], [torch.randint(0, 101, (n,)) for n in (4, 13)]):
        want = generate(m, prompts, 8, decoder="eager")
        _, ids, mask = _prepare_prompts(m, prompts, 0)
        logits, cache = m.step(ids, None, mask, last_only=True)
        dec = GraphDecoder(m, cache, kernels=True, capture=False)
        toks = [logits[:, -1].argmax(-1)]
        for _ in range(7):
            toks.append(dec.decode(toks[-1][:, None])[:, -1].argmax(-1))
        got = torch.stack(toks, 1)
        for p, w, g in zip(prompts, want, got):
            assert torch.equal(w[len(p):], g), (w[len(p):], g)
        dec.load(cache)  # a new sequence batch from the same prefill: the same first token again
        assert torch.equal(dec.decode(toks[0][:, None])[:, -1].argmax(-1), toks[1])


def test_fused_step_launches_five_kernels_per_layer(monkeypatch, device):
    """5 launches per layer, plus the embedding and the LM head (and one PyTorch add for the positions)."""
    launched = []
    real = D.launch
    monkeypatch.setattr(D, "launch", lambda kernel, grid, **a: launched.append(kernel) or real(kernel, grid, **a))
    for n_layers in (2, 3):
        torch.manual_seed(0)
        m = create_model("tnl-tiny", vocab_size=101, n_layers=n_layers).to(device).eval()
        _, cache = m.step(torch.randint(0, 101, (1, 5), device=device))
        step = FusedDecodeStep(m, cache)
        launched.clear()
        step(torch.tensor([[4]], device=device))
        assert len(launched) == 5 * n_layers + 2
        assert launched.count(D._recurrent_kernel) == n_layers and launched.count(D._embed_kernel) == 1


def test_fused_decode_support_says_why():
    assert fused_decode_support(_tiny()) is None
    reasons = {
        "Transformer": create_model("transformer-tiny", vocab_size=101, n_layers=1),
        "absolute position": create_model("tnl-tiny", vocab_size=101, n_layers=1, positional="ape"),
        "norm='layer'": create_model("tnl-tiny", vocab_size=101, n_layers=1, norm="layer"),
        "float64": create_model("tnl-tiny", vocab_size=101, n_layers=1).double(),
    }
    for words, model in reasons.items():
        why = fused_decode_support(model)
        assert why and words in why, (words, why)
        with pytest.raises(ValueError, match="FusedDecodeStep: "):
            FusedDecodeStep(model, None)
    assert TOLERANCE[torch.bfloat16] == 2e-2  # the documented bf16 budget the step is held to


def test_pdl_is_refused_where_the_device_cannot_and_off_there():
    """Programmatic dependent launch needs sm_90+: asked for on a CPU (the interpreter) the launchers say so
    before launching, and a step built from a model whose ``impl.decode_pdl`` is on just runs without it."""
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    if D.pdl_supported(x.device):
        pytest.skip("this device supports PDL")
    with pytest.raises(ValueError, match="compute capability 9.0"):
        D.fused_gemv(x, w, out=torch.empty(1, 4), pdl=True)
    with pytest.raises(ValueError, match="prefetch=True needs pdl=True"):
        D.fused_gemv(x, w, out=torch.empty(1, 4), prefetch=True)
    m = _tiny()
    m.set_impl(decode_pdl="true", decode_prefetch=True)
    _, cache = m.step(torch.randint(0, 101, (1, 5)))
    step = FusedDecodeStep(m, cache)
    assert m.impl.decode_pdl is True and step.pdl is False and step.prefetch is False
    if D.interpreting():  # without the interpreter (a GPU machine) Triton cannot launch on CPU tensors
        assert step(torch.tensor([[3]])).shape == (1, 1, 101)


def test_pdl_by_default_up_to_eight_sequences(monkeypatch):
    """``Implementation.decode_pdl`` / ``decode_prefetch`` (on by default) turn PDL and the prefetch on for up to
    ``PDL_MAX_BATCH`` sequences where the device supports it (faked here), off from 9 unless asked for; off
    with the fields off; explicit ``pdl=`` / ``prefetch=`` win. Only the choice is checked: nothing launches."""
    from tnlib.models import fused_decode as FD

    m = _tiny()
    assert m.impl.decode_pdl is True and m.impl.decode_prefetch is True and FD.PDL_MAX_BATCH == 8
    monkeypatch.setattr(D, "pdl_supported", lambda device: True)
    caches = {b: m.step(torch.randint(0, 101, (b, 3)))[1] for b in (1, 8, 9)}
    got = {b: (FusedDecodeStep(m, c).pdl, FusedDecodeStep(m, c).prefetch) for b, c in caches.items()}
    assert got == {1: (True, True), 8: (True, True), 9: (False, False)}
    forced = FusedDecodeStep(m, caches[9], pdl=True, prefetch=False)
    assert (forced.pdl, forced.prefetch) == (True, False)
    m.set_impl(decode_pdl=False)
    assert FusedDecodeStep(m, caches[1]).pdl is False
    m.set_impl(decode_pdl=True, decode_prefetch=False)
    assert (FusedDecodeStep(m, caches[1]).pdl, FusedDecodeStep(m, caches[1]).prefetch) == (True, False)


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
                    reason="programmatic dependent launch needs an sm_90+ GPU")
@pytest.mark.parametrize("prefetch", [False, True])
def test_pdl_step_in_a_graph_equals_the_plain_step(prefetch):
    """On sm_90+: the fused step with every kernel launched with PDL (and the weights hinted into L2 first),
    captured in a CUDA graph and replayed, gives the logits and states of the plain launches bit for bit
    (the same arithmetic in the same order)."""
    m = _tiny().cuda()
    _, cache = m.step(torch.randint(0, 101, (2, 9), device="cuda"))
    plain, fast = FusedDecodeStep(m, cache, pdl=False), FusedDecodeStep(m, cache, pdl=True, prefetch=prefetch)
    assert fast.pdl and fast.prefetch == prefetch
    tok = torch.randint(0, 101, (2, 1), device="cuda")
    fast(tok)  # compiles the kernels before capture
    fast.load(cache)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fast()
    fast.load(cache)
    for t in torch.randint(0, 101, (5, 2, 1), device="cuda"):
        want = plain(t).clone()
        fast.tokens.copy_(t)
        g.replay()
        assert torch.equal(fast.logits, want)
    for a, b in zip(plain.cache.states, fast.cache.states):
        assert torch.equal(a, b)
    assert torch.equal(plain.cache.positions, fast.cache.positions)
