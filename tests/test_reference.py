"""The reference ladder: quadratic == recurrent == chunked (outputs, final state, all gradients)."""
import pytest
import torch

from tnlib.ops import (
    decay_mask,
    linear_attention_chunked,
    linear_attention_quadratic,
    linear_attention_recurrent,
    softmax_attention,
)
from tnlib.testing import assert_close, rel_err

F64 = torch.float64


def make_inputs(B, T, H, K, V, dtype=F64, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=g, dtype=dtype) * d**-0.5 for d in (K, K, V))
    slope = torch.rand(H, generator=g, dtype=torch.float32) * 0.5 + 0.01
    s0 = torch.randn(B, H, K, V, generator=g, dtype=dtype) if with_state else None
    return q, k, v, slope, s0


def run_with_grads(fn, q, k, v, slope, s0, go, gs, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, s0)]
    o, s = fn(*leaves[:3], slope, leaves[3], output_final_state=True, **kw)
    loss = (o * go).sum() + (s * gs).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (o.detach(), s.detach(), *grads)


NAMES = ("o", "final_state", "dq", "dk", "dv", "d_initial_state")
_cache = {}


def reference_pair(T, H):
    """Quadratic and recurrent results for one shape (shared across block sizes)."""
    key = (T, H)
    if key not in _cache:
        B, K, V = 2, 8, 5
        q, k, v, slope, s0 = make_inputs(B, T, H, K, V, seed=T * 10 + H)
        g = torch.Generator().manual_seed(T * 10 + H + 1)
        go = torch.randn(B, T, H, V, dtype=F64, generator=g)
        gs = torch.randn(B, H, K, V, dtype=F64, generator=g)
        args = (q, k, v, slope, s0, go, gs)
        _cache[key] = (args, run_with_grads(linear_attention_quadratic, *args), run_with_grads(linear_attention_recurrent, *args))
    return _cache[key]


@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("T", [1, 63, 64, 913])
def test_quadratic_equals_recurrent(T, H):
    _, quad, rec = reference_pair(T, H)
    for name, a, b in zip(NAMES, rec, quad):
        assert_close(a, b, tol=1e-10, name=f"recurrent {name}")


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("T", [1, 63, 64, 913])
def test_chunked_equals_quadratic(T, H, block):
    args, quad, _ = reference_pair(T, H)
    chunk = run_with_grads(linear_attention_chunked, *args, block_size=block)
    for name, a, b in zip(NAMES, chunk, quad):
        assert_close(a, b, tol=1e-10, name=f"chunked(block={block}) {name}")


def test_no_state_no_decay_matches_plain_causal_product():
    q, k, v, _, _ = make_inputs(1, 37, 2, 4, 6, seed=1, with_state=False)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    expected = ((qh @ kh.transpose(-1, -2)).tril() @ vh).transpose(1, 2)
    for fn in (linear_attention_quadratic, linear_attention_recurrent, linear_attention_chunked):
        assert_close(fn(q, k, v), expected, tol=1e-12, name=fn.__name__)


def test_initial_state_continues_a_sequence():
    """Running [0:T1] then [T1:T] from the returned state equals one run over [0:T]."""
    q, k, v, slope, _ = make_inputs(2, 50, 3, 8, 4, seed=2, with_state=False)
    full, s_full = linear_attention_chunked(q, k, v, slope, output_final_state=True, block_size=16)
    o1, s1 = linear_attention_chunked(q[:, :21], k[:, :21], v[:, :21], slope, output_final_state=True, block_size=16)
    o2, s2 = linear_attention_recurrent(q[:, 21:], k[:, 21:], v[:, 21:], slope, s1, output_final_state=True)
    assert_close(torch.cat([o1, o2], dim=1), full, tol=1e-12, name="o")
    assert_close(s2, s_full, tol=1e-12, name="state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    q, k, v, slope, s0 = make_inputs(2, 70, 2, 16, 16, dtype=dtype, seed=3)
    o, s = linear_attention_chunked(q, k, v, slope, s0.float(), output_final_state=True, block_size=16)
    assert o.dtype == dtype and s.dtype == torch.float32
    ref, sref = linear_attention_quadratic(q.double(), k.double(), v.double(), slope, s0.double(), output_final_state=True)
    assert_close(o, ref, dtype=dtype, name="o")
    assert_close(s, sref, tol=1e-5, name="state")


def test_decay_mask_values_and_no_nan_for_large_slopes():
    slope = torch.tensor([0.0, 0.5, 800.0], dtype=F64)
    m = decay_mask(slope, 5)
    assert torch.isfinite(m).all()
    assert torch.equal(m[0], torch.ones(5, 5, dtype=F64).tril())
    assert m[1, 3, 1].item() == pytest.approx(torch.exp(torch.tensor(-1.0, dtype=F64)).item(), rel=1e-14)
    assert m[1, 1, 3].item() == 0.0


def test_softmax_attention_matches_sdpa():
    q, k, v, _, _ = make_inputs(2, 33, 3, 8, 8, seed=4, with_state=False)
    ours = softmax_attention(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    assert rel_err(ours, sdpa) < 1e-12


def test_rel_err_never_passes_nan():
    a = torch.ones(3)
    b = a.clone()
    b[1] = float("nan")
    assert rel_err(b, a) == float("inf")
    with pytest.raises(AssertionError):
        assert_close(b, a, tol=1.0)
