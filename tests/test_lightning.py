"""Lightning Attention Triton kernels (tnlib.ops.lightning) against the float64 references.

Kernel tests carry the ``triton`` marker: on a CPU they run under ``TRITON_INTERPRET=1`` (``make
test`` runs them in a second process with it set), at tiny sizes. Outputs are poisoned with NaN
before every launch (the ``poison`` fixture of ``conftest.py``), so an unwritten element fails.
"""
import dataclasses

import pytest
import torch

from tnlib.ops import lightning as L
from tnlib.ops import (PackedSequences, lightning_attention, linear_attention_chunked, linear_attention_quadratic,
                       linear_attention_recurrent)
from tnlib.ops.lightning import op, plan
from tnlib.testing import KERNEL_TOLERANCE, TOLERANCE, assert_close

triton_test = pytest.mark.triton
K32 = KERNEL_TOLERANCE[torch.float32]
pytestmark = pytest.mark.usefixtures("poison")


def _cfg(q, v, seg=None, **tiles):
    """The default launch config of ``q, v``, with ``seg`` tokens per segment and tiles replaced."""
    B, T, H, K = q.shape
    c = plan.launch_config(B, T, H, K, v.shape[3], q.dtype)
    return dataclasses.replace(c, **({} if seg is None else dict(seg_len=seg)), **tiles)


def _inputs(B, T, H, K, V, dtype, device, init=True, fused=False, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else (B * 1000 + T * 10 + K + V))
    if fused:  # q, k, v as views of one projection output, like the model's qkv split
        x = torch.randn(B, T, H, 2 * K + V, generator=g)
        q, k, v = x[..., :K] / K**0.5, x[..., K : 2 * K] / K**0.5, x[..., 2 * K :]
        big = torch.cat([q, k, v], dim=-1).to(device=device, dtype=dtype)
        q, k, v = big[..., :K], big[..., K : 2 * K], big[..., 2 * K :]
    else:
        q = (torch.randn(B, T, H, K, generator=g) / K**0.5).to(device=device, dtype=dtype)
        k = (torch.randn(B, T, H, K, generator=g) / K**0.5).to(device=device, dtype=dtype)
        v = torch.randn(B, T, H, V, generator=g).to(device=device, dtype=dtype)
    slope = (torch.rand(H, generator=g) * 0.6 + 0.005).to(device)
    S0 = torch.randn(B, H, K, V, generator=g).to(device) if init else None
    do = torch.randn(B, T, H, V, generator=g).to(device)
    G = torch.randn(B, H, K, V, generator=g).to(device)
    return q, k, v, slope, S0, do, G


def _run_and_compare(B, T, H, K, V, dtype, device, init=True, use_final=True, fused=False, tol=None, seg=None,
                     **tiles):
    """Kernel output, final state and every gradient against float64 autograd; ``seg``/``tiles``: a
    launch config other than the default (see ``_cfg``)."""
    q, k, v, slope, S0, do, G = _inputs(B, T, H, K, V, dtype, device, init, fused)
    tol = KERNEL_TOLERANCE[dtype] if tol is None else tol
    cfg = _cfg(q, v, seg, **tiles) if seg is not None or tiles else None
    # kernel
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    s0 = S0.clone().requires_grad_() if init else None
    o, S = lightning_attention(*xs, slope, s0, output_final_state=True, config=cfg)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    assert S.dtype == torch.float32 and S.shape == (B, H, K, V)
    loss = (o.float() * do).sum() + ((S * G).sum() if use_final else 0)
    loss.backward()
    # float64 reference (quadratic: closed forms for o and the final state)
    xr = [x.detach().double().requires_grad_() for x in (q, k, v)]
    s0r = S0.double().requires_grad_() if init else None
    orf, Sr = linear_attention_quadratic(*xr, slope.double(), s0r, output_final_state=True)
    loss_r = (orf * do.double()).sum() + ((Sr * G.double()).sum() if use_final else 0)
    loss_r.backward()
    assert_close(o, orf, dtype, tol, "o")
    assert_close(S, Sr, dtype, tol, "final state")
    for name, a, b in zip(("dq", "dk", "dv"), xs, xr):
        assert a.grad.dtype == dtype
        assert_close(a.grad, b.grad, dtype, tol, name)
    if init:
        assert s0.grad.dtype == S0.dtype
        assert_close(s0.grad, s0r.grad, dtype, tol, "dS0")


CASES = [
    # B, T, H, K, V, dtype, seg_len, init, use_final, fused
    (1, 1, 1, 16, 16, torch.float32, None, True, True, False),
    (1, 63, 2, 16, 32, torch.float32, None, True, True, False),
    (2, 64, 1, 32, 16, torch.bfloat16, None, True, True, False),
    (1, 65, 3, 16, 16, torch.float16, None, False, True, False),
    (2, 200, 3, 32, 16, torch.float32, 128, True, True, False),  # 2 parallel segments, partial last
    (1, 201, 1, 16, 64, torch.bfloat16, 128, True, False, True),  # segments + strided views
    (1, 5, 1, 256, 128, torch.float32, None, True, True, False),  # the LRPE layer's dims
    (1, 70, 1, 256, 128, torch.bfloat16, None, False, True, False),
]


@triton_test
@pytest.mark.parametrize("B,T,H,K,V,dtype,seg,init,use_final,fused", CASES)
def test_kernel_matches_float64_reference(device, B, T, H, K, V, dtype, seg, init, use_final, fused):
    _run_and_compare(B, T, H, K, V, dtype, device, init, use_final, fused, seg=seg)


@triton_test
def test_segmented_equals_single_pass(device):
    q, k, v, slope, S0, _, _ = _inputs(1, 300, 2, 16, 16, torch.float32, device)
    o1, s1 = lightning_attention(q, k, v, slope, S0, output_final_state=True)
    cfg = _cfg(q, v, seg=128)
    assert _cfg(q, v).n_seg(300) == 1 and cfg.n_seg(300) == 3
    o2, s2 = lightning_attention(q, k, v, slope, S0, output_final_state=True, config=cfg)
    assert_close(o2, o1, tol=K32, name="o (3 segments vs 1)")
    assert_close(s2, s1, tol=K32, name="state (3 segments vs 1)")


@triton_test
def test_return_forms_and_final_state_only_loss(device):
    q, k, v, slope, S0, _, G = _inputs(2, 40, 2, 16, 16, torch.float32, device, init=False)
    o = lightning_attention(q, k, v, slope)
    assert isinstance(o, torch.Tensor) and o.shape == (2, 40, 2, 16)
    # a loss on the final state alone: dS flows into dk and dv (dq must be exactly zero)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    _, S = lightning_attention(*xs, slope, output_final_state=True)
    (S * G).sum().backward()
    xr = [x.detach().double().requires_grad_() for x in (q, k, v)]
    _, Sr = linear_attention_quadratic(*xr, slope.double(), output_final_state=True)
    (Sr * G.double()).sum().backward()
    assert torch.count_nonzero(xs[0].grad) == 0
    assert_close(xs[1].grad, xr[1].grad, name="dk", tol=K32)
    assert_close(xs[2].grad, xr[2].grad, name="dv", tol=K32)


@triton_test
def test_no_decay_and_strong_decay(device):
    q, k, v, _, S0, _, _ = _inputs(1, 90, 2, 16, 16, torch.float32, device)
    slope = torch.tensor([0.0, 30.0], device=device)  # lambda = 1 and lambda ~ 1e-13
    o, S = lightning_attention(q, k, v, slope, S0, output_final_state=True)
    orf, Sr = linear_attention_quadratic(*(x.double() for x in (q, k, v)), slope.double(), S0.double(), True)
    assert_close(o, orf, name="o", tol=K32)
    assert_close(S, Sr, name="state", tol=K32)


@triton_test
def test_torch_compile_kernel_path(device):
    q, k, v, slope, S0, do, _ = _inputs(1, 33, 2, 16, 16, torch.float32, device)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    f = torch.compile(lambda a, b, c: lightning_attention(a, b, c, slope, S0), backend="aot_eager")
    (f(*xs).float() * do).sum().backward()
    xr = [x.detach().double().requires_grad_() for x in (q, k, v)]
    (linear_attention_quadratic(*xr, slope.double(), S0.double()) * do.double()).sum().backward()
    for name, a, b in zip(("dq", "dk", "dv"), xs, xr):
        assert_close(a.grad, b.grad, name=name, tol=K32)


@triton_test
def test_torch_compile_dynamic_shapes_multi_segment(device):
    """Under dynamic shapes (as in a model whose layers have different head dims) the op's fake
    implementation must count segments from symbolic sizes; the segment states the forward keeps
    for the backward must give the reference gradients."""
    f = torch.compile(lambda a, b, c, s, cfg: lightning_attention(a, b, c, s, config=cfg), backend="aot_eager",
                      dynamic=True)
    for K, T in ((16, 300), (32, 390)):
        q, k, v, slope, _, do, _ = _inputs(1, T, 2, K, 16, torch.float32, device, init=False)
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        (f(*xs, slope, _cfg(q, v, seg=128)).float() * do).sum().backward()
        xr = [x.detach().double().requires_grad_() for x in (q, k, v)]
        (linear_attention_quadratic(*xr, slope.double()) * do.double()).sum().backward()
        for name, a, b in zip(("dq", "dk", "dv"), xs, xr):
            assert_close(a.grad, b.grad, name=f"{name} K={K}", tol=K32)


def test_cpu_fallback_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, slope, S0, do, _ = _inputs(2, 70, 2, 16, 32, torch.float32, "cpu")
    assert not op.use_triton(q)
    o, S = lightning_attention(q, k, v, slope, S0, output_final_state=True)
    o2, S2 = op._fallback(q, k, v, slope, S0, True)
    orf, Sr = linear_attention_quadratic(q.double(), k.double(), v.double(), slope.double(), S0.double(), True)
    assert_close(o, orf, name="o", tol=K32)
    assert_close(S, Sr, name="state", tol=K32)
    assert torch.equal(o, o2) and torch.equal(S, S2)
    # float64 inputs always take the (exact) fallback
    assert not op.use_triton(q.double())


def test_torch_compile_cpu_fallback(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, slope, _, _, _ = _inputs(1, 40, 2, 16, 16, torch.float32, "cpu", init=False)
    f = torch.compile(lambda a, b, c: lightning_attention(a, b, c, slope), backend="aot_eager")
    assert_close(f(q, k, v), linear_attention_chunked(q, k, v, slope), tol=1e-6, name="compiled fallback")


@pytest.mark.parametrize(
    "change, err, match",
    [
        (dict(q=lambda x: x[0]), ValueError, "4 dims"),
        (dict(K=48), ValueError, "unsupported head dims"),
        (dict(V=256), ValueError, "unsupported head dims"),
        (dict(K=8), ValueError, "unsupported head dims"),
        (dict(q=lambda x: x.to(torch.int32)), TypeError, "dtype"),
        (dict(v=lambda x: x.half()), TypeError, "share one dtype"),
        (dict(slope=lambda s: s[:1]), ValueError, r"shape \[H\]"),
        (dict(slope=lambda s: -s), ValueError, ">= 0"),
        (dict(slope=lambda s: None), ValueError, "slope"),
        (dict(S0=lambda s: s[:, :, :8]), ValueError, "initial_state"),
        (dict(k=lambda x: x[:, :5]), ValueError, "shape"),
    ],
)
def test_clear_errors(change, err, match):
    K, V = change.get("K", 16), change.get("V", 16)
    q, k, v, slope, S0, _, _ = _inputs(1, 10, 2, K, V, torch.float32, "cpu")
    q = change.get("q", lambda x: x)(q)
    k = change.get("k", lambda x: x)(k)
    v = change.get("v", lambda x: x)(v)
    slope = change.get("slope", lambda x: x)(slope)
    S0 = change.get("S0", lambda x: x)(S0)
    with pytest.raises(err, match=match):
        lightning_attention(q, k, v, slope, S0)


@triton_test
def test_bad_launch_config_raises_before_launch(device):
    q, k, v, slope, _, _, _ = _inputs(1, 10, 2, 16, 32, torch.float32, device, init=False)
    bad = _cfg(q, v, forward=plan.Tile(64, 24, 4, 1))  # 24 does not divide V = 32
    with pytest.raises(ValueError, match="forward.block_v = 24"):
        lightning_attention(q, k, v, slope, config=bad)
    with pytest.raises(ValueError, match="seg_len"):
        lightning_attention(q, k, v, slope, config=_cfg(q, v, seg=0))


def test_slope_values_checked_again_after_in_place_change():
    q, k, v, slope, _, _, _ = _inputs(1, 10, 2, 16, 16, torch.float32, "cpu", init=False)
    lightning_attention(q, k, v, slope)  # a CPU slope's values are checked at every call (no sync needed)
    slope.mul_(-1)
    with pytest.raises(ValueError, match=">= 0"):
        lightning_attention(q, k, v, slope)


def _snapshot(*tensors):
    """What a call must leave as it was on its inputs: Python attributes and the version counter."""
    return [(dict(vars(t)), t._version) for t in tensors]


def _call_everything(q, k, v, slope, S0, do):
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    s0 = S0.clone().requires_grad_()
    inputs = (*xs, slope, s0)
    before = _snapshot(*inputs)
    o, S = lightning_attention(*xs, slope, s0, output_final_state=True)
    ((o.float() * do).sum() + S.sum()).backward()
    lightning_attention(*xs, slope)
    H = q.shape[2]
    qkv = torch.cat([q, k, v], dim=-1).flatten(2).requires_grad_()
    before_packed = _snapshot(qkv, slope)
    L.lightning_attention_packed(qkv, slope, H).sum().backward()
    assert _snapshot(*inputs) == before and _snapshot(qkv, slope) == before_packed, \
        [vars(t) for t in (*inputs, qkv)]


@triton_test
def test_nothing_written_onto_callers_tensors(device):
    """Issue 27: no attribute (such as a checked-version stamp) set on, and no write into, a caller's
    tensor, on the kernel path (forward, backward, packed)."""
    q, k, v, slope, S0, do, _ = _inputs(1, 20, 2, 16, 16, torch.float32, device)
    _call_everything(q, k, v, slope, S0, do)


def test_nothing_written_onto_callers_tensors_fallback(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch path
    q, k, v, slope, S0, do, _ = _inputs(1, 20, 2, 16, 16, torch.float32, "cpu")
    _call_everything(q, k, v, slope, S0, do)


def test_slope_values_are_checked_where_they_are_made(monkeypatch):
    """A GPU slope's values are not read by the op (a device sync per call); the model's decay is checked
    once, at construction, and ``check_slope_values`` checks any other."""
    import tnlib
    from tnlib.nn import gla
    from tnlib.ops import check_slope_values

    with pytest.raises(ValueError, match=">= 0"):
        check_slope_values(torch.tensor([0.1, -0.2]))
    check_slope_values(torch.tensor([0.0, 3.0]))
    monkeypatch.setattr(gla, "decay_slopes", lambda *a, **k: torch.tensor([0.5, -1.0]))
    with pytest.raises(ValueError, match="decay: slope = -ln\\(lambda\\) must be finite and >= 0"):
        tnlib.create_model("tnl-tiny", vocab_size=64, n_layers=1, n_heads=2)
    q, k, v, slope, _, _, _ = _inputs(1, 10, 2, 16, 16, torch.float32, "meta", init=False)
    op._check_inputs(q, k, v, -slope, None, "lightning_attention")  # meta (no values to read): shape only


@triton_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_dkdv_backward(device, dtype):
    """The backward of shapes too wide for the fused dk/dv kernel (dv and dk as two passes of the generic
    kernel, as at K=256), here forced on a small shape with segments."""
    _run_and_compare(2, 150, 2, 16, 32, dtype, device, seg=128, dkdv=None)


@triton_test
def test_model_block_compiles_without_graph_breaks(device):
    """Under torch.compile the input checks must not break the graph (the slope value check needs
    the host, and so do cu_seqlens' values): one graph per block, whatever the layer's slope tensor, with and
    without documents, given as a tensor or as the ``PackedSequences`` the model hands its blocks."""
    import torch._dynamo

    import tnlib

    torch.manual_seed(0)
    model = tnlib.create_model("tnl-tiny", vocab_size=64, n_layers=2).to(device)
    cu = torch.tensor([0, 5, 17, 40], dtype=torch.int32, device=device)  # documents (TrainConfig.document_mask)
    for layer in model.layers:
        h = torch.randn(1, 40, model.config.d_model, device=device)
        for kw in ({}, {"cu_seqlens": cu}, {"cu_seqlens": PackedSequences(cu, 40)}):
            torch._dynamo.reset()
            ex = torch._dynamo.explain(layer)(h, **kw)
            assert ex.graph_break_count == 0, [str(b.reason)[:200] for b in ex.break_reasons]


# ------------------------------------------------------------------------------------------------
# The packed path: q | k | v from one projection, feature map inside the kernels
# ------------------------------------------------------------------------------------------------

def _split(qkv, H):
    """q, k, v views ``[B, T, H, D]`` of a packed ``qkv``."""
    return op._split_packed(qkv, H)


_PHI = {"silu": torch.nn.functional.silu, "1+elu": lambda x: 1 + torch.nn.functional.elu(x), "none": lambda x: x}

PACKED_CASES = [
    # B, T, H, D, dtype, act, seg_len
    (1, 1, 1, 16, torch.float32, "silu", None),
    (2, 70, 2, 16, torch.float32, "silu", None),
    (1, 200, 2, 32, torch.bfloat16, "silu", 128),  # 2 segments: saved segment states reused by dq
    (2, 65, 1, 16, torch.float16, "1+elu", None),
    (1, 130, 2, 16, torch.float32, "none", 64),
    (1, 40, 1, 128, torch.float32, "silu", None),  # fp32 D=128: dk, dv in two generic passes
]


@triton_test
@pytest.mark.parametrize("B,T,H,D,dtype,act,seg", PACKED_CASES)
def test_packed_matches_float64_reference(device, B, T, H, D, dtype, act, seg):
    g = torch.Generator().manual_seed(B * 100 + T + D)
    qkv = (torch.randn(B, T, 3 * H * D, generator=g) * 0.5).to(device=device, dtype=dtype)
    slope = (torch.rand(H, generator=g) * 0.6 + 0.005).to(device)
    do = torch.randn(B, T, H, D, generator=g).to(device)
    x = qkv.clone().requires_grad_()
    cfg = None if seg is None else _cfg(*_split(qkv, H)[1:], seg=seg)
    o = L.lightning_attention_packed(x, slope, H, act, config=cfg)
    assert o.dtype == dtype and o.shape == (B, T, H, D)
    (o.float() * do).sum().backward()
    assert x.grad.dtype == dtype and x.grad.shape == qkv.shape
    xr = qkv.detach().double().requires_grad_()
    q, k, v = (t.reshape(B, T, H, D) for t in xr.chunk(3, dim=-1))
    phi = _PHI[act]
    # reference: the feature map applied to the input rounded to the test dtype, then rounded again,
    # as the unfused model stores it
    qa, ka = (phi(t.to(dtype).double()).to(dtype).double() if dtype != torch.float32 else phi(t) for t in (q, k))
    orf = linear_attention_quadratic(qa, ka, v, slope.double())
    (orf * do.double()).sum().backward()
    tol = 1.5e-2 if dtype == torch.bfloat16 else KERNEL_TOLERANCE[dtype]  # bf16 SiLU path: 1.24e-2 measured
    assert_close(o, orf, dtype, tol, "o")
    d = H * D
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(x.grad[..., i * d:(i + 1) * d], xr.grad[..., i * d:(i + 1) * d], dtype, tol, name)


@triton_test
def test_packed_equals_unpacked_and_compiles(device):
    B, T, H, D = 1, 50, 2, 16
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(device)
    slope = (torch.rand(H, generator=g) * 0.5).to(device)
    q, k, v = (t.reshape(B, T, H, D) for t in qkv.chunk(3, dim=-1))
    o_ref = lightning_attention(torch.nn.functional.silu(q), torch.nn.functional.silu(k), v.contiguous(), slope)
    f = torch.compile(lambda x: L.lightning_attention_packed(x, slope, H), backend="aot_eager")
    x = qkv.clone().requires_grad_()
    o = f(x)
    assert_close(o, o_ref, tol=K32, name="packed vs unpacked")
    o.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_packed_errors_and_cpu_fallback():
    qkv = torch.randn(1, 8, 3 * 2 * 16, dtype=torch.float64)
    slope = torch.tensor([0.1, 0.2], dtype=torch.float64)
    with pytest.raises(ValueError, match="3 \\* n_heads"):
        L.lightning_attention_packed(qkv, slope, 5)
    with pytest.raises(ValueError, match="qk_act"):
        L.lightning_attention_packed(qkv, slope, 2, "relu")
    with pytest.raises(ValueError, match=r"\[B, T, 3\*H\*D\]"):
        L.lightning_attention_packed(qkv[0], slope, 2)
    with pytest.raises(ValueError, match="head dim"):
        L.lightning_attention_packed(torch.randn(1, 8, 3 * 2 * 24), slope, 2)
    o = L.lightning_attention_packed(qkv, slope, 2)  # float64: the PyTorch path
    q, k, v = (t.reshape(1, 8, 2, 16) for t in qkv.chunk(3, dim=-1))
    orf = linear_attention_quadratic(torch.nn.functional.silu(q), torch.nn.functional.silu(k), v, slope)
    assert_close(o, orf, tol=1e-12, name="fallback")


@triton_test
def test_packed_compiles_with_dynamic_shapes(device):
    """Under torch.compile with dynamic shapes (what a model sees when the sequence length changes)
    the packed op's fake implementation counts segments from symbolic sizes."""
    H, D = 2, 16
    slope = torch.tensor([0.2, 0.02], device=device)
    f = torch.compile(lambda x, cfg: L.lightning_attention_packed(x, slope, H, config=cfg), backend="aot_eager",
                      dynamic=True)
    for T in (70, 133):
        g = torch.Generator().manual_seed(T)
        qkv = torch.randn(1, T, 3 * H * D, generator=g).to(device)
        x = qkv.clone().requires_grad_()
        o = f(x, _cfg(*_split(qkv, H)[1:], seg=64))
        (o * o).sum().backward()
        xr = qkv.double().requires_grad_()
        q, k, v = (t.reshape(1, T, H, D) for t in xr.chunk(3, dim=-1))
        orf = linear_attention_quadratic(torch.nn.functional.silu(q), torch.nn.functional.silu(k), v, slope.double())
        (orf * orf).sum().backward()
        assert_close(o, orf, name=f"o T={T}", tol=K32)
        assert_close(x.grad, xr.grad, name=f"dqkv T={T}", tol=K32)


def test_feature_map_fallback_for_uneven_rows():
    """Rows without one common stride (a batch-strided view) take the PyTorch form of the map."""
    x = torch.randn(3, 5, 12)[::2]  # batch stride 2*5*12 != T * row stride
    for act, ref in ((1, torch.nn.functional.silu(x)), (2, 1 + torch.nn.functional.elu(x)), (0, x)):
        assert torch.equal(op._feature_map(x, act), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only: a compiled-kernel fault at a model-sized launch")
@pytest.mark.parametrize("B,T,H,K,V", [(8, 1024, 8, 256, 128), (16, 2048, 8, 256, 128), (16, 2048, 8, 128, 128)])
def test_model_sized_launch_on_gpu(B, T, H, K, V):
    """The model's shapes at full size on the GPU. At K=256 (the LRPE layer) Triton 3.6's build of the
    value-scaled state update faulted with an illegal memory access from about 8 x 1024 tokens x 8
    heads up, while the tiny interpreter-sized cases above passed (see ``plan.PLANS``, ``scale_value``)."""
    q, k, v, slope, S0, do, G = _inputs(B, T, H, K, V, torch.bfloat16, "cuda", init=False)
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = lightning_attention(*xs, slope)
    (o.float() * do).sum().backward()
    torch.cuda.synchronize()
    b = slice(0, 1)  # reference on one sequence (fp64 chunked form)
    xr = [x[b].detach().double().requires_grad_() for x in (q, k, v)]
    orf = linear_attention_chunked(*xr, slope.double())
    (orf * do[b].double()).sum().backward()
    assert_close(o[b], orf, torch.bfloat16, TOLERANCE[torch.bfloat16], "o")
    for name, a, r in zip(("dq", "dk", "dv"), xs, xr):
        assert_close(a.grad[b], r.grad, torch.bfloat16, TOLERANCE[torch.bfloat16], name)


# ------------------------------------------------------------------------------------------------
# Packed sequences (cu_seqlens): many sequences back to back in [1, total, H, D], no state across them
# ------------------------------------------------------------------------------------------------

def _cu(lens, dtype=torch.int32, device="cpu"):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=dtype, device=device)


def _varlen_inputs(lens, H, K, V, dtype, device, init=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, N = sum(lens), len(lens)
    q = (torch.randn(1, T, H, K, generator=g) / K**0.5).to(device=device, dtype=dtype)
    k = (torch.randn(1, T, H, K, generator=g) / K**0.5).to(device=device, dtype=dtype)
    v = torch.randn(1, T, H, V, generator=g).to(device=device, dtype=dtype)
    slope = torch.tensor([0.3, 0.02, 0.0, 1.5][:H]).to(device)  # strong, weak and no decay
    S0 = torch.randn(N, H, K, V, generator=g).to(device) if init else None
    do = torch.randn(1, T, H, V, generator=g).to(device)
    G = torch.randn(N, H, K, V, generator=g).to(device)
    return q, k, v, slope, S0, do, G


def _varlen_compare(lens, H, K, V, dtype, device, init=True, use_final=True, seg=None, cu_dtype=torch.int32,
                    **tiles):
    """The kernel on packed sequences against the per-sequence float64 recurrence: output, final states and
    the gradients of q, k, v and the initial states."""
    q, k, v, slope, S0, do, G = _varlen_inputs(lens, H, K, V, dtype, device, init)
    cu = _cu(lens, cu_dtype, device)
    tol = KERNEL_TOLERANCE[dtype]
    cfg = None
    if seg is not None or tiles:
        cfg = plan.launch_config(1, sum(lens), H, K, V, dtype, varlen=True)
        cfg = dataclasses.replace(cfg, **({} if seg is None else dict(seg_len=seg)), **tiles)
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    s0 = S0.clone().requires_grad_() if init else None
    o, S = lightning_attention(*xs, slope, s0, output_final_state=True, config=cfg, cu_seqlens=cu)
    assert o.shape == (1, sum(lens), H, V) and S.shape == (len(lens), H, K, V) and S.dtype == torch.float32
    ((o.float() * do).sum() + ((S * G).sum() if use_final else 0)).backward()
    xr = [x.detach().double().requires_grad_() for x in (q, k, v)]
    s0r = S0.double().requires_grad_() if init else None
    orf, Sr = linear_attention_recurrent(*xr, slope.double(), s0r, True, cu_seqlens=cu)
    ((orf * do.double()).sum() + ((Sr * G.double()).sum() if use_final else 0)).backward()
    assert_close(o, orf, dtype, tol, "o")
    assert_close(S, Sr, dtype, tol, "final states")
    for name, a, b in zip(("dq", "dk", "dv"), xs, xr):
        assert_close(a.grad, b.grad, dtype, tol, name)
    if init:
        assert_close(s0.grad, s0r.grad, dtype, tol, "d initial states")


VARLEN_CASES = [
    # lengths, H, K, V, dtype, seg_len, init, use_final
    ((1, 5, 64, 70, 3, 128, 1, 40), 2, 16, 16, torch.float32, None, True, True),  # inside chunks, length 1
    ((64, 128, 1, 64, 1, 1), 2, 16, 32, torch.float32, None, True, True),  # boundaries on chunk edges
    ((1,) * 7, 1, 16, 16, torch.float32, None, True, True),  # every sequence one token
    ((100, 7, 150, 33), 2, 32, 16, torch.float32, 48, True, True),  # segments: long ones cut in 48s
    ((30, 1, 65, 2), 2, 16, 16, torch.float32, 16, False, False),  # segments, no states in or out
    ((9, 70, 1, 20), 1, 256, 128, torch.float32, None, True, True),  # the LRPE layer's dims
    ((33, 64, 1, 90), 2, 32, 16, torch.bfloat16, 64, True, True),
    ((17, 1, 80), 2, 16, 16, torch.float16, None, True, True),
]


@triton_test
@pytest.mark.parametrize("lens,H,K,V,dtype,seg,init,use_final", VARLEN_CASES)
def test_varlen_matches_per_sequence_reference(device, lens, H, K, V, dtype, seg, init, use_final):
    _varlen_compare(lens, H, K, V, dtype, device, init, use_final, seg=seg)


@triton_test
def test_varlen_two_pass_backward_and_int64_boundaries(device):
    """dk and dv as two reverse passes of the generic kernel (as at K = 256 or fp32 D = 128), segments, and
    int64 boundaries."""
    _varlen_compare((45, 1, 120, 8), 2, 16, 32, torch.float32, device, seg=32, dkdv=None, cu_dtype=torch.int64)


@triton_test
def test_varlen_no_state_or_score_crosses_a_boundary(device):
    """Changing every input of sequence 0 leaves the outputs, final states and gradients of the others
    bitwise unchanged; and the packed call equals separate calls, sequence by sequence."""
    lens = (70, 5, 66)
    q, k, v, slope, S0, do, G = _varlen_inputs(lens, 2, 16, 16, torch.float32, device)
    cu = _cu(lens, device=device)

    def run(q, k, v):
        xs = [x.clone().requires_grad_() for x in (q, k, v, S0)]
        o, S = lightning_attention(*xs[:3], slope, xs[3], output_final_state=True, cu_seqlens=cu)
        ((o * do).sum() + (S * G).sum()).backward()
        return o.detach(), S.detach(), [x.grad for x in xs]

    o1, S1, g1 = run(q, k, v)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, : lens[0]] = torch.randn_like(x[:, : lens[0]])
    o2, S2, g2 = run(q2, k2, v2)
    rest = slice(lens[0], None)
    assert torch.equal(o1[:, rest], o2[:, rest]) and torch.equal(S1[1:], S2[1:])
    assert not torch.equal(o1[:, : lens[0]], o2[:, : lens[0]])
    for a, b in zip(g1[:3], g2[:3]):
        assert torch.equal(a[:, rest], b[:, rest])
    assert torch.equal(g1[3][1:], g2[3][1:])
    bounds = cu.tolist()
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        on, Sn = lightning_attention(q[:, a:b], k[:, a:b], v[:, a:b], slope, S0[n:n + 1], output_final_state=True)
        assert_close(o1[:, a:b], on, tol=K32, name=f"sequence {n}: o")
        assert_close(S1[n:n + 1], Sn, tol=K32, name=f"sequence {n}: final state")


@triton_test
@pytest.mark.parametrize("dtype,act,seg", [(torch.float32, "silu", None), (torch.float32, "1+elu", 32),
                                           (torch.bfloat16, "silu", 64)])
def test_packed_varlen_matches_reference(device, dtype, act, seg):
    """``lightning_attention_packed`` (the model's training path) on packed documents: the feature map's
    derivative in the kernels, every gradient of ``qkv``, against the per-sequence float64 reference."""
    lens, H, D = (50, 1, 77, 2, 30), 2, 16
    T = sum(lens)
    g = torch.Generator().manual_seed(3)
    qkv = (torch.randn(1, T, 3 * H * D, generator=g) * 0.5).to(device=device, dtype=dtype)
    slope = torch.tensor([0.2, 0.02], device=device)
    do = torch.randn(1, T, H, D, generator=g).to(device)
    cu = _cu(lens, device=device)
    cfg = None if seg is None else dataclasses.replace(plan.launch_config(1, T, H, D, D, dtype, varlen=True),
                                                       seg_len=seg)
    x = qkv.clone().requires_grad_()
    o = L.lightning_attention_packed(x, slope, H, act, config=cfg, cu_seqlens=cu)
    (o.float() * do).sum().backward()
    xr = qkv.detach().double().requires_grad_()
    q, k, v = (t.reshape(1, T, H, D) for t in xr.chunk(3, dim=-1))
    phi = _PHI[act]
    qa, ka = (phi(t.to(dtype).double()).to(dtype).double() if dtype != torch.float32 else phi(t) for t in (q, k))
    orf = linear_attention_quadratic(qa, ka, v, slope.double(), cu_seqlens=cu)
    (orf * do.double()).sum().backward()
    tol = 1.5e-2 if dtype == torch.bfloat16 else KERNEL_TOLERANCE[dtype]
    assert_close(o, orf, dtype, tol, "o")
    d = H * D
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(x.grad[..., i * d:(i + 1) * d], xr.grad[..., i * d:(i + 1) * d], dtype, tol, name)


@triton_test
def test_varlen_compiles_with_dynamic_shapes(device):
    """Under torch.compile with dynamic shapes the fake implementations count sequences, work items and
    segment states from symbolic sizes (a model sees a new number of documents every batch)."""
    f = torch.compile(lambda a, b, c, s, s0, cu, cfg: lightning_attention(a, b, c, s, s0, True, config=cfg,
                                                                          cu_seqlens=cu),
                      backend="aot_eager", dynamic=True)
    for lens in ((40, 1, 90), (7, 100, 3, 33)):
        q, k, v, slope, S0, do, G = _varlen_inputs(lens, 2, 16, 16, torch.float32, device)
        cu = _cu(lens, device=device)
        cfg = dataclasses.replace(plan.launch_config(1, sum(lens), 2, 16, 16, torch.float32, varlen=True), seg_len=32)
        xs = [x.clone().requires_grad_() for x in (q, k, v, S0)]
        o, S = f(*xs[:3], slope, xs[3], cu, cfg)
        ((o * do).sum() + (S * G).sum()).backward()
        xr = [x.detach().double().requires_grad_() for x in (q, k, v, S0)]
        orf, Sr = linear_attention_chunked(*xr[:3], slope.double(), xr[3], True, cu_seqlens=cu)
        ((orf * do.double()).sum() + (Sr * G.double()).sum()).backward()
        assert_close(o, orf, tol=K32, name=f"o {lens}")
        for name, a, b in zip(("dq", "dk", "dv", "dS0"), xs, xr):
            assert_close(a.grad, b.grad, tol=K32, name=f"{name} {lens}")


def test_varlen_fallback_matches_reference(monkeypatch):
    """Without the interpreter (and for float64) the op takes the PyTorch path, sequence by sequence."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lens = (3, 70, 1)
    q, k, v, slope, S0, _, _ = _varlen_inputs(lens, 2, 16, 16, torch.float32, "cpu")
    cu = _cu(lens)
    o, S = lightning_attention(q, k, v, slope, S0, output_final_state=True, cu_seqlens=cu)
    orf, Sr = linear_attention_recurrent(*(x.double() for x in (q, k, v)), slope.double(), S0.double(), True,
                                         cu_seqlens=cu)
    assert_close(o, orf, tol=K32, name="o")
    assert_close(S, Sr, tol=K32, name="final states")
    qkv = torch.cat([x.flatten(2) for x in (q, k, v)], -1)  # the q | k | v column blocks
    o_p = L.lightning_attention_packed(qkv.double(), slope.double(), 2, "none", cu_seqlens=cu)
    assert_close(o_p, linear_attention_quadratic(q.double(), k.double(), v.double(), slope.double(), cu_seqlens=cu),
                 tol=1e-12, name="packed fallback")


def test_reference_forms_agree_on_packed_sequences():
    lens = (1, 9, 64, 2)
    q, k, v, slope, S0, _, _ = _varlen_inputs(lens, 2, 16, 16, torch.float64, "cpu")
    cu = _cu(lens, torch.int64)
    outs = [f(q, k, v, slope.double(), S0.double(), True, cu_seqlens=cu)
            for f in (linear_attention_quadratic, linear_attention_recurrent, linear_attention_chunked)]
    for o, S in outs[1:]:
        assert_close(o, outs[0][0], tol=1e-12, name="o")
        assert_close(S, outs[0][1], tol=1e-12, name="S")


@pytest.mark.parametrize(
    "cu, err, match",
    [
        ([0, 5, 3, 10], ValueError, "strictly increase"),
        ([0, 5, 5, 10], ValueError, "strictly increase"),
        ([1, 5, 10], ValueError, "start at 0"),
        ([0, 5, 9], ValueError, "end at the total length 10"),
        ([0, 5, 11], ValueError, "end at the total length 10"),
        (torch.tensor([0.0, 10.0]), TypeError, "int32 or int64"),
        (torch.tensor([[0, 10]]), ValueError, r"shape \[N \+ 1\]"),
        (torch.tensor([0]), ValueError, r"shape \[N \+ 1\]"),
        ("meta", ValueError, "cu_seqlens is on meta but q is on cpu"),
        ("batch", ValueError, r"back to back as \[1, total, H, D\]"),
        ("list", TypeError, "must be a torch.Tensor"),
    ],
)
def test_varlen_clear_errors_before_launch(cu, err, match, monkeypatch):
    """Bad boundaries fail in the op's checks, before any work table, kernel (or the PyTorch path) runs, on both
    ops; made into a ``PackedSequences``, they fail at its construction, or (batch, device) at the call."""
    def no_work(*a, **kw):
        raise AssertionError("work began before the boundaries were checked")

    for name in ("_work_items", "_fallback", "_lightning_fwd_op", "_packed_fwd_op"):
        monkeypatch.setattr(op, name, no_work)
    q, k, v, slope, _, _, _ = _varlen_inputs((4, 6), 2, 16, 16, torch.float32, "cpu", init=False)
    if cu == "batch":
        q, k, v = (x.reshape(2, 5, 2, 16) for x in (q, k, v))
    cu = {"meta": torch.tensor([0, 10], device="meta"), "batch": torch.tensor([0, 4, 10]), "list": [0, 4, 10]}.get(
        cu, cu) if isinstance(cu, str) else (torch.tensor(cu) if isinstance(cu, list) else cu)
    qkv = torch.cat([x.flatten(2) for x in (q, k, v)], -1)
    with pytest.raises(err, match=match):
        lightning_attention(q, k, v, slope, cu_seqlens=cu)
    with pytest.raises(err, match=match):
        L.lightning_attention_packed(qkv, slope, 2, cu_seqlens=cu)
    with pytest.raises(err, match=match):
        seqs = PackedSequences(cu, 10)
        lightning_attention(q, k, v, slope, cu_seqlens=seqs)
    with pytest.raises(err, match=match):
        L.lightning_attention_packed(qkv, slope, 2, cu_seqlens=PackedSequences(cu, 10))


def test_packed_sequences_errors_name_the_object():
    """Values fail at construction, naming it; a ``PackedSequences`` of another length than q's fails at the call."""
    with pytest.raises(ValueError, match=r"PackedSequences: cu_seqlens must strictly increase.*cu_seqlens\[1\] = 5"):
        PackedSequences(torch.tensor([0, 5, 5, 10]), 10)
    with pytest.raises(ValueError, match="PackedSequences: cu_seqlens must start at 0 and end at the total length 12"):
        PackedSequences(torch.tensor([0, 5, 10]), 12)
    q, k, v, slope, _, _, _ = _varlen_inputs((4, 6), 2, 16, 16, torch.float32, "cpu", init=False)
    seqs = PackedSequences(torch.tensor([0, 4, 7, 12]), 12)
    with pytest.raises(ValueError, match="lightning_attention: the PackedSequences cover 12 tokens, but q holds 10"):
        lightning_attention(q, k, v, slope, cu_seqlens=seqs)
    assert repr(seqs) == "PackedSequences(3 sequences, 12 tokens, on cpu; work tables for segment lengths [])"


def test_varlen_initial_state_is_one_per_sequence():
    q, k, v, slope, S0, _, _ = _varlen_inputs((4, 6), 2, 16, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\] = \(2, 2, 16, 16\)"):
        lightning_attention(q, k, v, slope, S0[:1], cu_seqlens=_cu((4, 6)))


def test_work_items_cover_every_segment_once_longest_first():
    lens, seg = [1, 100, 64, 65, 3, 200], 64
    cu = _cu(lens)
    items = op._work_items(cu, sum(lens), seg)
    assert items.dtype == torch.int32 and items.shape == (op._n_work_items(len(lens), sum(lens), seg), 5)
    real = items[items[:, 3] > 0]
    want = {(n, j) for n, ln in enumerate(lens) for j in range(-(-ln // seg))}
    assert {(int(r[0]), int(r[1])) for r in real} == want and len(real) == len(want)
    tokens = [min(seg, int(r[3]) - int(r[1]) * seg) for r in real]
    assert tokens == sorted(tokens, reverse=True)  # the longest segments start first
    assert (items[len(real):] == 0).all()  # padding rows: length 0
    for n, j, bos, ln, loc0 in real.tolist():
        assert bos == int(cu[n]) and ln == lens[n]
        # the segment states of a sequence's non-last segments: consecutive, all of them below G
        assert 0 <= loc0 and (j == -(-ln // seg) - 1 or loc0 + j < op._n_local(sum(lens), seg))
    assert op._n_seqs(items, sum(lens), seg) == len(lens)


def test_varlen_too_many_work_items_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(op, "MAX_WORK_ITEMS", 3)
    monkeypatch.setattr(op, "use_triton", lambda t: True)
    q, k, v, slope, _, _, _ = _varlen_inputs((1, 1, 1, 1), 2, 16, 16, torch.float32, "cpu", init=False)
    with pytest.raises(ValueError, match="more than the 3 one launch takes"):
        lightning_attention(q, k, v, slope, cu_seqlens=_cu((1, 1, 1, 1)))


def test_varlen_segment_plan():
    # the benchmark's shape: documents up to 8K run unsplit; one 64K document is cut in 8
    assert plan.varlen_segment_plan(65536, 16, 2) == 8192
    assert plan.launch_config(1, 65536, 16, 128, 128, torch.bfloat16, varlen=True).seg_len == 8192
    assert plan.varlen_segment_plan(1000, 2, 1) == plan.MIN_SEG
    assert plan.launch_config(1, 1000, 2, 16, 16, torch.float32) == dataclasses.replace(
        plan.launch_config(1, 1000, 2, 16, 16, torch.float32, varlen=True), seg_len=plan.segment_plan(1, 2, 1000, 1))


def test_varlen_values_read_at_every_call_or_once_by_packed_sequences(monkeypatch):
    """A plain cu_seqlens tensor's values are read at every call (a device sync on a GPU); a ``PackedSequences``'
    once, when it is made, and never by the calls it is passed to (their checks take shapes only)."""
    from tnlib.ops import _checks

    reads = []
    orig = _checks.check_cu_seqlens
    monkeypatch.setattr(_checks, "check_cu_seqlens", lambda *a, **kw: reads.append(kw["values"]) or orig(*a, **kw))
    monkeypatch.setattr(op, "check_cu_seqlens", _checks.check_cu_seqlens)
    monkeypatch.setattr(op, "_fallback", lambda *a, **kw: None)  # the op's own check only (the references read too)
    q, k, v, slope, _, _, _ = _varlen_inputs((4, 6), 2, 16, 16, torch.float32, "cpu", init=False)
    cu = _cu((4, 6))
    for _ in range(3):
        lightning_attention(q, k, v, slope, cu_seqlens=cu)
    assert reads == [True, True, True]
    reads.clear()
    seqs = PackedSequences(cu, 10)
    for _ in range(3):
        lightning_attention(q, k, v, slope, cu_seqlens=seqs)
    assert reads == [True, False, False, False]


@triton_test
@pytest.mark.parametrize("seg", [None, 16])
def test_packed_sequences_equal_the_plain_tensor(device, seg, monkeypatch):
    """A ``PackedSequences`` gives what the plain cu_seqlens tensor gives, bitwise: outputs, final states and every
    gradient (q, k, v, initial states; ``qkv`` on the packed op). The tensor's work table is built at each call
    (its backward reuses it), the object's once for both calls and their backward passes; ``seg``: long
    sequences cut into segments."""
    builds = []
    orig = op._work_items
    monkeypatch.setattr(op, "_work_items", lambda *a: builds.append(a[2]) or orig(*a))
    lens = (1, 37, 5, 70, 2)
    q, k, v, slope, S0, do, G = _varlen_inputs(lens, 2, 16, 16, torch.float32, device)
    cu = _cu(lens, device=device)
    cfg = None if seg is None else dataclasses.replace(
        plan.launch_config(1, sum(lens), 2, 16, 16, torch.float32, varlen=True), seg_len=seg)
    seqs = PackedSequences(cu, sum(lens))

    def run(boundaries):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, S0)]
        o, S = lightning_attention(*xs[:3], slope, xs[3], True, config=cfg, cu_seqlens=boundaries)
        ((o * do).sum() + (S * G).sum()).backward()
        qkv = torch.cat([x.detach().flatten(2) for x in (q, k, v)], -1).requires_grad_()
        o_packed = L.lightning_attention_packed(qkv, slope, 2, "silu", config=cfg, cu_seqlens=boundaries)
        (o_packed * do).sum().backward()
        return [o, S, *(x.grad for x in xs), o_packed, qkv.grad]

    seg_len = seg or plan.launch_config(1, sum(lens), 2, 16, 16, torch.float32, varlen=True).seg_len
    want = run(cu)
    assert builds == [seg_len] * 2
    got = run(seqs)
    assert builds == [seg_len] * 3 and list(seqs._tables) == [seg_len]
    for name, a, b in zip(("o", "S", "dq", "dk", "dv", "dS0", "packed o", "dqkv"), got, want):
        assert torch.equal(a, b), name
    assert torch.equal(seqs.work_items(seg_len), orig(cu, sum(lens), seg_len))

