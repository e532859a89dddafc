"""Decay tables (the official formula, docs/sources.md) and LRPE-d's relative-position property."""
import math

import pytest
import torch

from tnlib.nn import LRPE, alibi_slopes, decay_slopes, decay_table, half_life, lrpe, lrpe_theta_init


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(
    "H, expected",
    [
        (8, [2.0 ** (-k) for k in range(1, 9)]),
        (16, [2.0 ** (-0.5 * k) for k in range(1, 17)]),
        (32, [2.0 ** (-0.25 * k) for k in range(1, 33)]),
        (20, [2.0 ** (-0.5 * k) for k in range(1, 17)] + [2.0**-0.25, 2.0**-0.75, 2.0**-1.25, 2.0**-1.75]),
    ],
)
def test_alibi_slopes_spec_10_5(H, expected):
    assert alibi_slopes(H) == pytest.approx(expected, rel=1e-12)
    # layer 0 of a multi-layer model: factor 1 + 1e-5
    assert decay_slopes(H, 0, 24).tolist() == pytest.approx([e * (1 + 1e-5) for e in expected], rel=1e-6)


def test_385m_lambda_table_spec_4_2():
    lam = decay_table(8, 24).neg().exp()
    assert lam.shape == (24, 8)
    assert lam[0].tolist() == pytest.approx([0.6065, 0.7788, 0.8825, 0.9394, 0.9692, 0.9845, 0.9922, 0.9961], abs=5e-5)
    assert lam[12].tolist() == pytest.approx([0.7873, 0.8873, 0.9420, 0.9706, 0.9852, 0.9926, 0.9963, 0.9981], abs=5e-5)
    assert (lam[23] > 0.99999).all() and (lam[23] < 1).all()
    # official ordering: head 1 decays fastest; layers decay less as depth grows
    slopes = decay_table(8, 24)
    assert (slopes[:, 1:] < slopes[:, :-1]).all() and (slopes[1:] < slopes[:-1]).all()


def test_paper_formula_literal():
    s = decay_slopes(8, 0, 24, formula="paper")  # l = 1 in the paper's 1-based indexing
    assert s[-1].item() == pytest.approx(8 * 23 / 24, rel=1e-6)
    assert math.exp(-s[-1].item()) == pytest.approx(4.7e-4, rel=0.02)
    assert (decay_slopes(8, 23, 24, formula="paper") == 0).all()  # last layer: no decay
    assert (s[1:] > s[:-1]).all()  # larger h decays faster: the opposite of the code
    nt = decay_slopes(8, 5, 24, formula="paper", layer_temperature=False)
    assert nt.tolist() == pytest.approx([8 * h / 8 for h in range(1, 9)])
    assert decay_slopes(8, 5, 24, layer_temperature=False).tolist() == pytest.approx(alibi_slopes(8), rel=1e-6)


def test_decay_errors_and_half_life():
    with pytest.raises(ValueError, match="unknown decay formula"):
        decay_slopes(8, 0, 2, formula="learned")
    with pytest.raises(ValueError, match="layer_idx"):
        decay_slopes(8, 2, 2)
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)
    assert decay_slopes(4, 0, 1).dtype == torch.float32
    hl = half_life(torch.tensor([math.log(2.0), 0.0]))
    assert hl[0].item() == pytest.approx(1.0) and math.isinf(hl[1].item())


def test_theta_init_runs_over_the_full_width():
    th = lrpe_theta_init(4, 8)
    assert th.shape == (4, 8)
    assert th[0, 0].item() == 1.0
    assert th[1, 0].item() == pytest.approx(10000 ** (-2 * 8 / 32), rel=1e-6)
    assert (th.flatten()[1:] < th.flatten()[:-1]).all()  # each head its own band


def _scores(x, y):  # [B, T, H, 2D] -> [B, H, T, T]
    return torch.einsum("bthd,bshd->bhts", x, y)


def test_lrpe_shift_invariance():
    B, T, H, D = 2, 11, 3, 4
    theta = lrpe_theta_init(H, D).double() * 7  # larger angles make the test sharper
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    k = torch.randn(B, T, H, D, dtype=torch.float64)
    base = _scores(lrpe(q, theta), lrpe(k, theta))
    for off in (1, 17, 1000):
        shifted = _scores(lrpe(q, theta, off), lrpe(k, theta, off))
        assert torch.allclose(shifted, base, rtol=1e-9, atol=1e-9)
    # per-sequence offsets
    per = _scores(lrpe(q, theta, torch.tensor([5, 900])), lrpe(k, theta, torch.tensor([5, 900])))
    assert torch.allclose(per, base, rtol=1e-9, atol=1e-9)
    # and the score really is sum_j q_j k_j cos(theta_j (t - s))
    t = torch.arange(T, dtype=torch.float64)
    ang = (t[:, None] - t[None, :])[None, :, :, None] * theta[:, None, None, :]  # [H, T, T, D]
    direct = torch.einsum("bthd,bshd,htsd->bhts", q, k, torch.cos(ang))
    assert torch.allclose(base, direct, rtol=1e-10, atol=1e-10)
    # a query and key encoded at different offsets do NOT give the same scores (the decoding bug)
    wrong = _scores(lrpe(q, theta, 3), lrpe(k, theta, 0))
    assert not torch.allclose(wrong, base, atol=1e-3)


def test_lrpe_module_and_errors():
    m = LRPE(2, 4)
    assert isinstance(m.theta, torch.nn.Parameter) and m.theta.shape == (2, 4)
    x = torch.randn(1, 3, 2, 4, requires_grad=True)
    y = m(x)
    assert y.shape == (1, 3, 2, 8)
    y.sum().backward()
    assert m.theta.grad is not None and x.grad is not None
    assert y.dtype == torch.float32 and m(x.bfloat16()).dtype == torch.bfloat16
    assert "theta" in dict(LRPE(2, 4, learnable=False).named_buffers())
    with pytest.raises(ValueError, match=r"\[H, D\]"):
        lrpe(torch.randn(1, 3, 2, 5), m.theta)
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        lrpe(torch.randn(3, 2, 4), m.theta)
    with pytest.raises(ValueError, match="offset"):
        lrpe(torch.randn(2, 3, 2, 4), m.theta, torch.tensor([1, 2, 3]))


def test_lrpe_pair_equals_two_calls():
    m = LRPE(3, 4)
    q, k = torch.randn(2, 7, 3, 4), torch.randn(2, 7, 3, 4)
    for off in (0, 11, torch.tensor([2, 40])):
        pq, pk = m.pair(q, k, off)
        assert torch.equal(pq, m(q, off)) and torch.equal(pk, m(k, off))
