"""TransNormerLLM and the Transformer baseline: counts, init, switches, precision, learning, save/load."""
import pytest
import torch

from tnlib.models import CHOICES, Implementation, ModelConfig, create_model, glu_dim_for, load_model, save_model
from tnlib.nn import decay_slopes, lrpe_theta_init
from tnlib.testing import rel_err


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def meta_model(preset, **kw):
    with torch.device("meta"):
        return create_model(preset, **kw)


def test_paper_parameter_counts():
    # docs/sources.md, parameter counts: the paper's sizes count layers + one tied 50,272-row embedding (not LRPE's theta)
    tnl = meta_model("tnl-385m", vocab_size=50272)
    assert tnl.num_parameters(exclude_lrpe_theta=True) == 384_925_696
    assert tnl.num_parameters() == 384_925_696 + 1024  # + theta of layer 0 (H * d_h)
    assert meta_model("tnl-1b", vocab_size=50272).num_parameters(exclude_lrpe_theta=True) == 992_149_504
    assert meta_model("tnl-7b", vocab_size=50272).num_parameters(exclude_lrpe_theta=True) == 6_780_485_632
    tf = meta_model("transformer-385m", vocab_size=50272)
    assert abs(tf.num_parameters() / tnl.num_parameters() - 1) < 0.02
    assert glu_dim_for(1024) == 2816 and glu_dim_for(2048) == 5632 and glu_dim_for(4096) == 11008


def test_385m_shape_and_decay_per_layer():
    m = meta_model("tnl-385m")
    assert len(m.layers) == 24 and m.config.head_dim == 128 and m.config.n_heads == 8
    assert [layer.token_mixer.lrpe is not None for layer in m.layers] == [True] + [False] * 23
    # a meta model holds no values: the slopes are checked on a narrow CPU model with 385m's heads and depth
    narrow = create_model("tnl-385m", vocab_size=64, d_model=64, glu_dim=64)
    assert len(narrow.layers) == 24 and narrow.config.n_heads == 8
    for i, layer in enumerate(narrow.layers):
        assert torch.equal(layer.token_mixer.slope, decay_slopes(8, i, 24)), i
    small = create_model("tnl-tiny")
    for i, layer in enumerate(small.layers):
        assert torch.equal(layer.token_mixer.slope, decay_slopes(4, i, 4))
    assert small.embed_scale == pytest.approx(128**0.5)


@pytest.mark.parametrize("preset", ["tnl-tiny", "tnl-385m", "transformer-tiny"])
def test_built_on_the_default_device(preset):
    """``with torch.device(d): create_model(...)`` puts every parameter and buffer on ``d`` (the decay
    slopes, made on the CPU to check their values, included): a benchmark building on the GPU this way met
    a CPU slope in the attention call."""
    m = meta_model(preset)
    placed = {name: t.device.type for name, t in [*m.named_parameters(), *m.named_buffers()]}
    assert placed and set(placed.values()) == {"meta"}, {n: d for n, d in placed.items() if d != "meta"}


@pytest.mark.parametrize("preset", ["tnl-tiny", "transformer-tiny"])
def test_parameter_init(preset):
    """Every projection and embedding ~ N(0, init_std^2) (std within 5%, mean within 3 standard errors),
    RMSNorm gains 1, LRPE's theta at its closed form."""
    m = create_model(preset, tie_embeddings=False, norm="rms", init_std=0.02)
    seen = set()
    for name, p in m.named_parameters():
        kind = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if name.endswith("lrpe.theta"):
            assert torch.equal(p.detach(), lrpe_theta_init(m.config.n_heads, m.config.head_dim)), name
        elif p.dim() == 1:  # RMSNorm gains
            assert torch.equal(p.detach(), torch.ones_like(p)), name
        else:
            std, mean = p.detach().std().item(), p.detach().mean().item()
            assert abs(std / 0.02 - 1) < 0.05, (name, std)
            assert abs(mean) < 3 * 0.02 / p.numel() ** 0.5, (name, mean)
        seen.add(kind)
    assert {"embed", "lm_head"} <= seen


def test_bad_presets_and_overrides():
    with pytest.raises(ValueError, match="unknown preset"):
        create_model("tnl-3b")
    with pytest.raises(ValueError, match="unknown config overrides"):
        create_model("tnl-tiny", hidden=3)
    with pytest.raises(ValueError, match="positional"):
        create_model("tnl-tiny", positional="rope")
    with pytest.raises(ValueError, match="divisible"):
        create_model("tnl-tiny", n_heads=3)


SWITCHES = [
    dict(positional=p) for p in CHOICES["positional"]
] + [
    dict(decay_formula="paper"), dict(layer_temperature=False), dict(gate=False), dict(qk_act="1+elu"),
    dict(qk_act="none"), dict(glu_act="silu"), dict(norm="rms"), dict(norm="layer"),
    dict(scale_embedding=False), dict(tie_embeddings=False), dict(lrpe_learnable=False),
    dict(residual_dtype="params"),
    # implementation choices (tnlib.models.Implementation), given to create_model as impl=
    dict(impl=Implementation(checkpointing=True)), dict(impl=Implementation(packed_attention=False)),
    dict(impl=Implementation(decode_gemv=False)),
]


def _switch_id(d):
    return ",".join(f"impl.{k}={v}" for k, v in vars(d["impl"]).items() if v != getattr(Implementation(), k)) \
        if "impl" in d else ",".join(f"{k}={v}" for k, v in d.items())


@pytest.mark.parametrize("overrides", SWITCHES, ids=_switch_id)
def test_every_ablation_switch_runs_forward_and_backward(overrides):
    torch.manual_seed(0)
    m = create_model("tnl-tiny", vocab_size=97, n_layers=2, **overrides).train()
    ids = torch.randint(0, 97, (2, 19))
    logits = m(ids)
    assert logits.shape == (2, 19, 97) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if overrides.get("gate") is False:
        assert m.layers[0].token_mixer.qkvu_proj.out_features == 3 * 128


@pytest.mark.parametrize("preset", ["tnl-tiny", "transformer-tiny"])
def test_causality(preset):
    m = create_model(preset, vocab_size=50).eval()
    ids = torch.randint(0, 50, (1, 24))
    ids2 = ids.clone()
    ids2[0, 15:] = (ids2[0, 15:] + 7) % 50
    with torch.no_grad():
        a, b = m(ids), m(ids2)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-5)
    assert not torch.allclose(a[:, 15:], b[:, 15:], atol=1e-3)


@pytest.mark.parametrize("preset", ["tnl-tiny", "transformer-tiny"])
def test_bf16_autocast_agrees_with_fp32(preset):
    torch.manual_seed(1)
    m = create_model(preset, vocab_size=300).eval()
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref = m(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(ids)
    assert low.dtype == torch.bfloat16
    assert rel_err(low, ref) < 3e-2


@pytest.mark.parametrize("preset", ["tnl-tiny", "transformer-tiny"])
def test_tiny_model_learns_a_repeated_batch(preset):
    torch.manual_seed(2)
    m = create_model(preset, vocab_size=64, n_layers=1, d_model=64, n_heads=2, glu_dim=128)
    ids = torch.randint(0, 64, (4, 24))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        logits = m(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5  # about ln(64) = 4.16 at init
    assert losses[-1] < 0.5, losses[-1]


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(3)
    a = create_model("tnl-tiny", vocab_size=50, n_layers=2)
    b = create_model("tnl-tiny", vocab_size=50, n_layers=2, impl=Implementation(checkpointing=True))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 50, (2, 17))
    for m in (a, b):
        m(ids).float().pow(2).mean().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert rel_err(q.grad, p.grad) < 1e-5, n


def test_checkpointing_recomputes_each_block():
    """``Implementation.checkpointing`` reaches the block loop: with it, a training forward + backward runs
    every block's forward twice (once more in the backward); without it, or in eval mode, once."""
    for checkpointing, train_mode, want in ((False, True, 1), (True, True, 2), (True, False, 1)):
        m = create_model("tnl-tiny", vocab_size=50, n_layers=2, impl=Implementation(checkpointing=checkpointing))
        m.train(train_mode)
        calls = []
        m.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))
        m(torch.randint(0, 50, (1, 9))).float().pow(2).mean().backward()
        assert len(calls) == want, (checkpointing, train_mode, calls)


def test_implementation_is_held_by_the_model_not_its_config():
    """``ModelConfig`` has no implementation field; the model holds an ``Implementation`` (its defaults:
    packed attention and the GEMV kernel on, checkpointing off), set at build time or by ``set_impl``,
    which reaches every module that makes the choice, and parses values like every config field."""
    from tnlib.nn import GatedLinearAttention, Linear

    names = {"packed_attention", "decode_gemv", "checkpointing"}
    assert not names & {f for f in ModelConfig.__dataclass_fields__}
    assert Implementation() == Implementation(packed_attention=True, decode_gemv=True, checkpointing=False)
    for preset in ("tnl-tiny", "transformer-tiny"):
        m = create_model(preset, vocab_size=61, n_layers=2)
        assert m.impl == Implementation()

        def flags(model):
            return ({lin.gemv for lin in model.modules() if isinstance(lin, Linear)},
                    {g.packed for g in model.modules() if isinstance(g, GatedLinearAttention)})

        assert flags(m) == ({True}, {True} if preset.startswith("tnl") else set())
        before = {k: v.clone() for k, v in m.state_dict().items()}
        assert m.set_impl(decode_gemv="false", packed_attention=False) is m
        assert m.impl == Implementation(decode_gemv=False, packed_attention=False)
        assert flags(m) == ({False}, {False} if preset.startswith("tnl") else set())
        built = create_model(preset, vocab_size=61, n_layers=2, impl=m.impl)
        assert flags(built) == flags(m) and built.impl == m.impl
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # parameters untouched
        m.set_impl(Implementation())
        assert flags(m) == ({True}, {True} if preset.startswith("tnl") else set())
    with pytest.raises(ValueError, match=r"Implementation\.checkpointing='maybe'"):
        Implementation(checkpointing="maybe")
    with pytest.raises(ValueError, match="unknown Implementation fields"):
        m.set_impl(gemv=False)
    with pytest.raises(ValueError, match="implementation choices, not ModelConfig fields"):
        create_model("tnl-tiny", packed_attention=False)


@pytest.mark.parametrize("preset", ["tnl-tiny", "transformer-tiny"])
def test_save_load_roundtrip(preset, tmp_path):
    m = create_model(preset, vocab_size=77, n_layers=2, gate=False) if preset.startswith("tnl") else create_model(preset, vocab_size=77)
    m.set_impl(decode_gemv=False, checkpointing=True)
    save_model(m, tmp_path / "ckpt")
    import json

    saved = json.load(open(tmp_path / "ckpt" / "config.json"))
    assert not {"packed_attention", "decode_gemv", "checkpointing"} & set(saved)  # the architecture only
    m2 = load_model(tmp_path / "ckpt")
    assert m2.config == m.config and m2.impl == Implementation()  # how it computes is the loader's choice
    assert load_model(tmp_path / "ckpt", impl=m.impl).impl == m.impl
    ids = torch.randint(0, 77, (1, 9))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(tmp_path / "nowhere")


def test_old_config_json_with_implementation_fields_loads(tmp_path):
    """A ``save_model`` directory written before issue 27 records ``checkpointing``, ``packed_attention`` and
    ``decode_gemv`` in ``config.json`` (as the ModelConfig fields they were): it loads, the three are
    dropped, and the model is the same; any other unknown field is still refused."""
    import json

    from tnlib.files import FileDamaged

    m = create_model("tnl-tiny", vocab_size=77, n_layers=2)
    save_model(m, tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    cfg = json.loads(path.read_text())
    old = {**cfg, "checkpointing": False, "packed_attention": True, "decode_gemv": True}  # the old layout
    assert list(old) != list(cfg)
    path.write_text(json.dumps(old, indent=2, sort_keys=True))
    back = load_model(tmp_path / "old")
    assert back.config == m.config and back.impl == Implementation()
    assert ModelConfig.from_dict({**cfg, "checkpointing": True, "decode_gemv": False}) == m.config
    ids = torch.randint(0, 77, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))
    path.write_text(json.dumps({**cfg, "fused_sglu": True}))
    with pytest.raises(FileDamaged, match="unknown ModelConfig fields"):
        load_model(tmp_path / "old")


def test_input_id_errors():
    m = create_model("tnl-tiny", vocab_size=10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        m(torch.tensor([[1, 10]]))
    with pytest.raises(TypeError, match="integer"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        m(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        m(torch.zeros(1, 0, dtype=torch.long))


def test_model_compiles():
    torch.manual_seed(4)
    m = create_model("tnl-tiny", vocab_size=50, n_layers=1)
    ids = torch.randint(0, 50, (1, 16))
    compiled = torch.compile(m, backend="eager", fullgraph=False)
    with torch.no_grad():
        assert rel_err(compiled(ids), m(ids)) < 1e-5


def _assert_packed_equals_unfused(layer, x, packed, unfused):
    """The packed token-mixer path and the unfused one: the same output, input gradient and parameter gradients."""
    results = []
    for fwd in (packed, unfused):
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        out = fwd(xi)
        out.pow(2).mean().backward()
        results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (o1, dx1, g1), (o2, dx2, g2) = results
    assert rel_err(o1, o2) < 1e-5 and rel_err(dx1, dx2) < 1e-4
    for name, g in g1.items():
        assert rel_err(g, g2[name]) < 1e-4, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("kernel", marks=pytest.mark.triton)])
@pytest.mark.parametrize("overrides", [dict(), dict(gate=False, qk_act="1+elu")], ids=["default", "nogate-elu"])
def test_packed_attention_matches_unfused(overrides, device):
    """The packed path (``_forward_packed``: ``lightning_attention_packed``, u from its own product) gives
    the unfused layer's output and every gradient. ``device="kernel"`` runs the Triton kernels (GPU, or
    the interpreter), ``"cpu"`` the op's PyTorch form."""
    if device == "kernel":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    m = create_model("tnl-tiny", vocab_size=61, n_layers=2, **overrides).to(device)
    layer = m.layers[1].token_mixer  # no LRPE: the packed path applies
    x = torch.randn(2, 21, m.config.d_model, device=device)
    _assert_packed_equals_unfused(layer, x, layer._forward_packed, lambda x: layer(x, return_state=True)[0])


def test_packed_attention_dispatch():
    """``Implementation.packed_attention`` takes the packed path only on CUDA, in layers without LRPE, for
    a stateless forward; ``packed_attention=False`` never does."""
    from tnlib.nn import gla

    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = []
    orig = gla.GatedLinearAttention._forward_packed
    gla.GatedLinearAttention._forward_packed = lambda self, x, cu=None: calls.append(self.layer_idx) or orig(self, x, cu)
    try:
        for packed in (True, False):
            m = create_model("tnl-tiny", vocab_size=61, n_layers=2, impl=Implementation(packed_attention=packed)).to(device)
            ids = torch.randint(0, 61, (2, 21), device=device)
            calls.clear()
            m(ids)
            m.step(ids)  # prefill keeps the state: never packed
            assert calls == ([1] if packed and device == "cuda" else []), (packed, calls)
    finally:
        gla.GatedLinearAttention._forward_packed = orig


def test_decode_gemv_switch():
    """``Implementation.decode_gemv`` reaches every projection and the tied head; outside compiled or
    captured code (here) both settings compute ``F.linear``: the same logits."""
    from tnlib.nn import Linear

    on = create_model("tnl-tiny", vocab_size=61, n_layers=2)
    off = create_model("tnl-tiny", vocab_size=61, n_layers=2, impl=Implementation(decode_gemv=False))
    off.load_state_dict(on.state_dict())
    lin = [m for m in on.modules() if isinstance(m, Linear)]
    assert lin and all(m.gemv for m in lin)
    assert not any(m.gemv for m in off.modules() if isinstance(m, Linear))
    assert len(on.gemv_weights()) == len(lin) + 1 and off.gemv_weights() == []  # + the tied head
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        assert torch.equal(on(ids), off(ids))


@pytest.mark.parametrize("preset", ["tnl-tiny", "transformer-tiny"])
def test_residual_dtype_compute_under_autocast(preset):
    """``residual_dtype="compute"`` (``"params"`` is the default): the stream between blocks is bf16 under bf16 autocast
    (fp32 with ``"params"``), the result stays close to the fp32 stream's, gradients stay finite, and without autocast the
    switch changes nothing."""
    torch.manual_seed(0)
    base = create_model(preset, vocab_size=61, n_layers=2)  # the default: fp32 stream
    comp = create_model(preset, vocab_size=61, n_layers=2, residual_dtype="compute")
    comp.load_state_dict(base.state_dict())
    ids = torch.randint(0, 61, (2, 33))
    seen = {}
    for name, m in (("base", base), ("comp", comp)):
        h = m.layers[1].register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(ids)
            loss = m(ids[:, :-1], ids[:, 1:])
        h.remove()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        seen[name + "_logits"] = logits.float()
    assert seen["base"] == torch.float32 and seen["comp"] == torch.bfloat16
    ref = seen["base_logits"]
    assert ((seen["comp_logits"] - ref).abs().max() / ref.abs().max()).item() < 0.05
    with torch.no_grad():  # no autocast: the switch changes nothing
        assert torch.equal(base(ids), comp(ids))


# ------------------------------------------------------------------------------------------------
# Documents (TrainConfig.document_mask): cu_seqlens through TNL's attention, a block-diagonal mask in the Transformer
# ------------------------------------------------------------------------------------------------

def _documents_batch(vocab=50, eot=0):
    """Two windows of 40 tokens: row 0 holds three documents (EOT at 13 and 30), row 1 two (EOT at 22)."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, vocab, (2, 40), generator=g)
    ids[0, 13] = ids[0, 30] = ids[1, 22] = eot
    return ids


def test_document_cu_seqlens_and_mask():
    from tnlib.models.common import document_cu_seqlens, document_mask

    ids = _documents_batch()
    cu = document_cu_seqlens(ids, 0)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 13, 30, 40, 62, 80]  # window starts and every EOT
    m = document_mask(cu, 2, 40)[:, 0]
    assert m.shape == (2, 40, 40) and m.dtype == torch.bool
    assert m[0, 20, 13] and not m[0, 20, 12] and not m[0, 12, 13] and m[0, 12, 0] and not m[0, 31, 29]
    assert m[1, 21, 0] and not m[1, 22, 21] and m[1, 39, 22]
    assert (m.sum(-1) >= 1).all()  # every query sees itself


@pytest.mark.parametrize("device", ["cpu", pytest.param("kernel", marks=pytest.mark.triton)])
@pytest.mark.parametrize("preset", ["tnl-tiny", "transformer-tiny"])
def test_no_state_or_score_crosses_a_document_boundary(preset, device):
    """With ``cu_seqlens`` (``document_cu_seqlens``) a document's logits depend on its own tokens only: changing
    every token of the other documents leaves them bitwise unchanged, and they are the model's on the document
    alone. Without it the change reaches the later documents (so the test can see a leak). ``device="kernel"``:
    TNL's attention through the Triton kernels (interpreter on a CPU)."""
    from tnlib.models.common import document_cu_seqlens

    if device == "kernel" and preset.startswith("transformer"):
        pytest.skip("the Transformer has no attention kernel")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "kernel" else "cpu"
    m = create_model(preset, vocab_size=50, n_layers=2).to(dev).eval()
    ids = _documents_batch().to(dev)
    cu = document_cu_seqlens(ids.cpu(), 0).to(dev)
    other = ids.clone()
    for r, sl in ((0, slice(0, 13)), (0, slice(31, 40)), (1, slice(23, 40))):  # all but row 0's 2nd and row 1's 1st
        other[r, sl] = (other[r, sl] % 49) + 1  # other tokens, never the EOT
    with torch.no_grad():
        a, b = m(ids, cu_seqlens=cu), m(other, cu_seqlens=cu)
        plain_a, plain_b = m(ids), m(other)
        alone = m(ids[0:1, 13:30])
    assert torch.equal(a[0, 13:30], b[0, 13:30]) and torch.equal(a[1, :22], b[1, :22])
    assert not torch.allclose(a[0, 31:], b[0, 31:])
    assert rel_err(a[0, 13:30], alone[0]) < 1e-5  # the same up to the rounding of other positions' rotations
    assert not torch.allclose(plain_a[0, 13:30], plain_b[0, 13:30], atol=1e-4)  # without documents: a leak
    # the fused loss takes the same documents
    tgt = torch.roll(ids, -1, 1)
    loss = m(ids, tgt, cu_seqlens=cu)
    ref = torch.nn.functional.cross_entropy(a.flatten(0, 1).float(), tgt.flatten())
    assert abs(loss.item() - ref.item()) < 1e-4


@pytest.mark.parametrize("preset", ["tnl-tiny", "transformer-tiny"])
def test_documents_with_checkpointing_and_errors(preset):
    from tnlib.models.common import document_cu_seqlens

    m = create_model(preset, vocab_size=50, n_layers=2)
    ids = _documents_batch()
    cu = document_cu_seqlens(ids, 0)
    grads = []
    for ckpt in (False, True):
        m.set_impl(checkpointing=ckpt).zero_grad()
        m(ids, torch.roll(ids, -1, 1), cu_seqlens=cu).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n, g in grads[0].items():
        assert rel_err(grads[1][n], g) < 1e-6, n
    with pytest.raises(ValueError, match="every window boundary"):
        m(ids, cu_seqlens=torch.tensor([0, 13, 80], dtype=torch.int32))  # row 1 would continue row 0's document
    from tnlib.ops import PackedSequences

    with pytest.raises(ValueError, match=r"the PackedSequences cover 40 tokens, but the batch holds B \* T = 80"):
        m(ids, cu_seqlens=PackedSequences(torch.tensor([0, 13, 40], dtype=torch.int32), 40))


@pytest.mark.parametrize("device", ["cpu", pytest.param("kernel", marks=pytest.mark.triton)])
def test_packed_attention_with_documents_matches_unfused(device):
    """The training path on packed documents (``_forward_packed`` with ``cu_seqlens``: what a GPU runs under
    ``document_mask``) gives the unfused layer's output and gradients on the same documents."""
    if device == "kernel":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    m = create_model("tnl-tiny", vocab_size=61, n_layers=2).to(device)
    layer = m.layers[1].token_mixer  # no LRPE: the packed path applies
    x = torch.randn(1, 50, m.config.d_model, device=device)
    cu = torch.tensor([0, 7, 8, 40, 50], dtype=torch.int32, device=device)
    _assert_packed_equals_unfused(layer, x, lambda x: layer._forward_packed(x, cu),
                                  lambda x: layer(x, return_state=True, cu_seqlens=cu)[0])
    _, state = layer(x, return_state=True, cu_seqlens=cu)
    assert state.shape == (4, layer.n_heads, layer.head_dim, layer.head_dim)  # one final state per document


@pytest.mark.triton
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_documents_build_each_work_table_once_per_step(checkpointing, monkeypatch):
    """A step with documents builds the kernels' work table once per segment length its layers use, not once per
    layer: the model makes one ``PackedSequences`` and every layer's attention, forward and backward (and a
    checkpointed block's recompute), shares its tables. The blocks given the plain tensor build one per layer
    call (each backward reusing its forward's), so the count can tell the two apart. Two layers suffice: at 80 tokens
    every layer (the LRPE layer 0 and the plain layer 1 alike) gets the minimum segment length
    (``plan.varlen_segment_plan``), so sharing builds one table and a build per layer two; the model is narrow
    (2 heads) because under the interpreter the cost is per program."""
    from tnlib.models.common import document_cu_seqlens
    from tnlib.ops import PackedSequences
    from tnlib.ops.lightning import op

    builds, calls = [], []
    orig_items, orig_fwd, orig_bwd = op._work_items, op._forward_impl, op._backward_impl
    monkeypatch.setattr(op, "_work_items", lambda cu, total, seg: builds.append(seg) or orig_items(cu, total, seg))
    monkeypatch.setattr(op, "_forward_impl", lambda *a, **kw: calls.append("fwd") or orig_fwd(*a, **kw))
    monkeypatch.setattr(op, "_backward_impl", lambda *a, **kw: calls.append("bwd") or orig_bwd(*a, **kw))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n_layers = 2
    m = create_model("tnl-tiny", vocab_size=50, n_layers=n_layers, d_model=64, n_heads=2, glu_dim=128).to(dev)
    m.set_impl(checkpointing=checkpointing)
    ids = _documents_batch().to(dev)
    tgt = torch.roll(ids, -1, 1)
    cu = document_cu_seqlens(ids.cpu(), 0)
    m(ids, tgt, cu_seqlens=cu.to(dev)).backward()
    assert calls.count("fwd") == n_layers * (2 if checkpointing else 1) and calls.count("bwd") == n_layers
    assert builds and len(builds) == len(set(builds)) < n_layers, builds  # once per segment length
    assert len(set(builds)) == 1, builds  # what makes n_layers = 2 enough to tell sharing from a build per layer
    # the trainer's form: boundaries checked on the CPU, then on the device; the model takes the object as it is
    builds.clear()
    docs = PackedSequences(cu, ids.numel(), device=dev)
    m(ids, tgt, cu_seqlens=docs).backward()
    assert len(builds) == len(set(builds)) < n_layers and sorted(docs._tables) == sorted(builds)
    builds.clear()
    m(ids, tgt, cu_seqlens=docs).backward()  # its tables are kept: used again, it builds nothing
    assert builds == []
    # the plain tensor handed to every block: one table per layer call (the recompute calls again)
    builds.clear()
    x = m.embed_tokens(ids).reshape(1, ids.numel(), -1)
    m.run_blocks(x, cu_seqlens=cu.to(dev)).float().pow(2).mean().backward()
    assert len(builds) == n_layers * (2 if checkpointing else 1), builds


def test_trainer_documents_are_one_packed_sequences():
    """``TrainConfig.document_mask``'s keyword: one ``PackedSequences`` over the windows' inputs, made from the CPU
    boundaries (the values read there, no device sync), on the step's device."""
    from tnlib.models.common import document_cu_seqlens
    from tnlib.ops import PackedSequences
    from tnlib.train import _documents

    x = torch.cat([_documents_batch(), torch.zeros(2, 1, dtype=torch.long)], 1)  # [B, T + 1]: inputs and the last target
    docs = _documents(x, 0, torch.device("cpu"), True)["cu_seqlens"]
    assert isinstance(docs, PackedSequences) and docs.total == 80
    assert torch.equal(docs.cu_seqlens, document_cu_seqlens(x[:, :-1], 0))
    assert _documents(x, 0, torch.device("cpu"), False) == {}


@pytest.mark.triton
def test_compiled_model_takes_documents():
    """Compiled blocks (``TrainConfig.compile``'s default scope) and a compiled model take the documents, as a
    tensor or a ``PackedSequences``, and give the eager model's loss and gradients."""
    import torch._dynamo

    from tnlib.models.common import document_cu_seqlens
    from tnlib.ops import PackedSequences

    ids = _documents_batch()
    tgt = torch.roll(ids, -1, 1)
    cu = document_cu_seqlens(ids, 0)

    def step(fwd, model, docs):
        model.zero_grad()
        loss = fwd(ids, tgt, cu_seqlens=docs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    small = dict(vocab_size=50, n_layers=2, d_model=64, n_heads=2, glu_dim=128)  # narrow: the interpreter's cost
    eager = create_model("tnl-tiny", **small)
    want_loss, want = step(eager, eager, cu)
    for scope in ("blocks", "model"):
        torch._dynamo.reset()
        m = create_model("tnl-tiny", **small)
        m.load_state_dict(eager.state_dict())
        fwd = m.compile_blocks(backend="aot_eager") if scope == "blocks" else torch.compile(m, backend="aot_eager")
        for docs in (cu, PackedSequences(cu, ids.numel())):
            loss, grads = step(fwd, m, docs)
            assert rel_err(loss, want_loss) < 1e-6, scope
            for name, g in grads.items():
                assert rel_err(g, want[name]) < 1e-5, (scope, type(docs).__name__, name)
    torch._dynamo.reset()
